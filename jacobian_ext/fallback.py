"""The fallback rule for any module without a native rule: its per-sample Jacobian contribution,
computed with torch.func (vmap over jvp in forward mode, over vjp in reverse mode) and chained with
the running block exactly like a native rule."""
import math
import operator
import threading
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import fx
from torch.func import jacfwd, jacrev, jvp, vjp, vmap

from .blocks import IDENTITY, NodeRule, explicit_block, node_arguments

# torch.func's forward mode (jvp, jacfwd) uses process-wide forward-AD levels: two threads in it at once
# raise "no level exists" or, worse, return wrong tangents (seen with 8 threads on one compiled module).
# Forward-mode fallbacks therefore run one thread at a time; the reverse mode is thread-safe.
FORWARD_AD_LOCK = threading.Lock()


def vjp_in_grad_mode(function: Callable, *primals):
    """torch.func.vjp with autograd's grad mode on for the forward pass: some kernels read the grad mode, not
    torch.func's levels, to decide what to keep for the backward (the CPU LSTM drops the workspace its
    backward needs under torch.no_grad). The value is detached when the caller is in no-grad mode."""
    caller_tracks = torch.is_grad_enabled()
    with torch.enable_grad():
        value, pull = vjp(function, *primals)
    return (value if caller_tracks else value.detach()), pull


def _single_sample(fn: Callable) -> Callable:
    """fn on one sample: modules expect a batch axis, so the sample travels as a batch of one."""

    def single(sample):
        return fn(sample.unsqueeze(0)).squeeze(0)

    return single


def per_sample_jacobians(function: Callable, primals: Tuple[torch.Tensor, ...]) -> List[torch.Tensor]:
    """Per input, [B, H_out, H_in_k] of a batch function that maps samples independently, one sample at a
    time (each as a batch of one): the last fallback, for what vmap over samples cannot run (data-dependent
    control flow; jacrev itself only vmaps the backward pass). Where vmap cannot batch even that backward
    over the output rows (the CPU LSTM backward), one plain backward per output row."""
    batch = primals[0].shape[0]
    widths = [math.prod(p.shape[1:]) for p in primals]
    per_input = [[] for _ in primals]
    for b in range(batch):
        sample = tuple(p[b:b + 1].detach() for p in primals)
        try:
            parts = jacrev(function, argnums=tuple(range(len(sample))))(*sample)
        except Exception:  # noqa: BLE001
            with torch.enable_grad():
                parts = torch.autograd.functional.jacobian(function, sample)
        for rows, part, width in zip(per_input, parts, widths):
            rows.append(part.reshape(part.numel() // width, width))
    if batch == 0:
        out_features = math.prod(function(*primals).shape[1:])
        return [primals[0].new_zeros(0, out_features, width) for width in widths]
    return [torch.stack(rows) for rows in per_input]


def forward_rule(fn: Callable, x: torch.Tensor, jac: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(fn(x), J_out) for x [B, *in] and the running Jacobian jac [B, H_in, D] (None: identity);
    J_out is [B, H_out, D] with H = the flattened per-sample sizes."""
    output = fn(x)
    single = _single_sample(fn)
    try:
        with FORWARD_AD_LOCK:
            return output, _forward_rule_vmapped(single, x, output, jac)
    except Exception as error:  # noqa: BLE001  (any op vmap cannot batch: the next fallback runs)
        own = _retried_sample_by_sample(fn, x, error)
    return output, own if jac is None else torch.bmm(own, jac)


def _retried_sample_by_sample(fn: Callable, x: torch.Tensor, error: Exception) -> torch.Tensor:
    """The Jacobian sample by sample after the vmapped rule failed: vmap cannot batch data-dependent control
    flow, nor some ops (an RNN's CPU backward); the error of the vmapped rule is raised when this fails too."""
    try:
        return per_sample_jacobians(fn, (x,))[0]
    except Exception:  # noqa: BLE001
        raise error from None


def _forward_rule_vmapped(single: Callable, x: torch.Tensor, output: torch.Tensor, jac: Optional[torch.Tensor]):
    batch = x.shape[0]
    if jac is None:
        return vmap(jacfwd(single))(x).reshape(batch, output[0].numel(), -1)
    columns = jac.shape[-1]
    tangents = jac.transpose(1, 2).reshape(batch, columns, *x.shape[1:])

    def push_sample(sample, sample_tangents):
        return vmap(lambda tangent: jvp(single, (sample,), (tangent,))[1])(sample_tangents)

    pushed = vmap(push_sample)(x, tangents)  # [B, D, *out]
    return pushed.reshape(batch, columns, -1).transpose(1, 2)


def reverse_rule(fn: Callable, x: torch.Tensor, cotangent: Optional[torch.Tensor], output_shape) -> torch.Tensor:
    """The cotangent block before fn: [B, C, H_in] from x [B, *in] and cotangent [B, C, H_out]
    (None: identity, fn is the last layer)."""
    single = _single_sample(fn)
    try:
        return _reverse_rule_vmapped(single, x, cotangent, output_shape)
    except Exception as error:  # noqa: BLE001  (any op vmap cannot batch: the next fallback runs)
        own = _retried_sample_by_sample(fn, x, error)
    return own if cotangent is None else torch.bmm(cotangent, own)


def _reverse_rule_vmapped(single: Callable, x: torch.Tensor, cotangent: Optional[torch.Tensor], output_shape):
    batch = x.shape[0]
    if cotangent is None:
        jacobian = vmap(jacrev(single))(x)  # [B, *out, *in]
        return jacobian.reshape(batch, -1, x[0].numel())
    rows = cotangent.shape[1]
    cotangents = cotangent.reshape(batch, rows, *output_shape)

    def pull_sample(sample, sample_cotangents):
        _, pull = vjp_in_grad_mode(single, sample)
        return vmap(pull)(sample_cotangents)[0]

    pulled = vmap(pull_sample)(x, cotangents)  # [B, C, *in]
    return pulled.reshape(batch, rows, -1)


# The fallback as a graph node's rule


class TorchFuncRule(NodeRule):
    """Any node: jvp (forward) or vjp (reverse) of the node over the whole batch, vmapped over rows."""

    label = "fallback (torch.func)"
    native = False

    def __init__(self, function_of: Callable, work_per_row: float):
        super().__init__(work_per_row)
        self.function_of = function_of  # (plan, env) -> f(*input values) -> node value
        self.forward_via_reverse = False

    def forward(self, plan, g, env, tangents):
        function = self.function_of(plan, env)
        primals = tuple(env[i] for i in g.inputs)
        batch = primals[0].shape[0]
        columns = [explicit_block(t, batch, p.shape[1:], p) for t, p in zip(tangents, primals)]
        value = function(*primals)
        if not self.forward_via_reverse:
            try:
                with FORWARD_AD_LOCK:  # forward AD is not thread-safe (fallback.py)
                    push = vmap(lambda *column: jvp(function, primals, column)[1], in_dims=1, out_dims=1)
                    return value, push(*columns)
            except NotImplementedError:  # an op without a forward-mode derivative (e.g. CPU flash attention)
                self.forward_via_reverse = True
            except Exception:  # noqa: BLE001  (an op vmap cannot batch: the sample-by-sample fallback)
                return value, _chain_forward(per_sample_jacobians(function, primals), columns, value)
        try:
            return value, self._forward_via_reverse(function, primals, value, columns)
        except Exception:  # noqa: BLE001
            return value, _chain_forward(per_sample_jacobians(function, primals), columns, value)

    @staticmethod
    def _forward_via_reverse(function, primals, value, columns):
        """T_out = J_node T_in with J_node [B, out, in] built row by row with vjp: for nodes whose ops
        have no forward-mode derivative."""
        batch, out_features = value.shape[0], math.prod(value.shape[1:])
        _, pull = vjp_in_grad_mode(function, *primals)
        rows = explicit_block(IDENTITY, batch, value.shape[1:], value)
        node_jacobians = vmap(pull, in_dims=1, out_dims=1)(rows)  # per input: [B, out, *in]
        total = None
        for node_jacobian, column in zip(node_jacobians, columns):
            in_features = math.prod(column.shape[2:])
            product = torch.bmm(
                column.reshape(batch, column.shape[1], in_features),
                node_jacobian.reshape(batch, out_features, in_features).transpose(1, 2),
            )
            total = product if total is None else total + product
        return total.reshape(batch, total.shape[1], *value.shape[1:])

    def reverse(self, plan, g, env, cotangent):
        function = self.function_of(plan, env)
        primals = tuple(env[i] for i in g.inputs)
        value, pull = vjp_in_grad_mode(function, *primals)
        rows = explicit_block(cotangent, value.shape[0], value.shape[1:], value)
        try:
            return list(vmap(pull, in_dims=1, out_dims=1)(rows))
        except Exception:  # noqa: BLE001  (an op vmap cannot batch, e.g. the CPU LSTM backward)
            pass
        try:  # one backward pass over the whole batch per cotangent row: the classic loop
            return [torch.stack(parts, dim=1) for parts in zip(*(pull(rows[:, r]) for r in range(rows.shape[1])))]
        except Exception:  # noqa: BLE001  (data-dependent control flow: sample by sample)
            jacobians = per_sample_jacobians(function, primals)
            batch, out_features = value.shape[0], math.prod(value.shape[1:])
            flat_rows = rows.reshape(batch, rows.shape[1], out_features)
            return [torch.bmm(flat_rows, jacobian).reshape(batch, rows.shape[1], *primal.shape[1:])
                    for jacobian, primal in zip(jacobians, primals)]


def _chain_forward(jacobians: Sequence[torch.Tensor], columns, value) -> torch.Tensor:
    """T_out [B, D, *out] = sum over inputs of T_in [B, D, in] @ J^T."""
    batch = value.shape[0]
    total = None
    for jacobian, column in zip(jacobians, columns):
        product = torch.bmm(column.reshape(batch, column.shape[1], jacobian.shape[2]), jacobian.transpose(1, 2))
        total = product if total is None else total + product
    return total.reshape(batch, total.shape[1], *value.shape[1:])


def call_with_inputs(node: fx.Node, inputs: Sequence[fx.Node]):
    def function_of(plan, env):
        def function(*values):
            args, kwargs = node_arguments(plan, node, env, dict(zip(inputs, values)))
            return plan.evaluator.call(node, args, kwargs)

        return function

    return function_of


def tuple_origin(node: fx.Node, values) -> Tuple[fx.Node, List]:
    """(the node that returned several tensors, the indices picking this value from it) for a pick from a
    multi-output node, through nested picks (an LSTM's (h_n, c_n)[0]); (node, []) for any other node."""
    producer, indices = node, []
    while (producer.op == "call_function" and producer.target is operator.getitem
           and isinstance(values[producer.args[0]], (tuple, list))):
        producer, indices = producer.args[0], [producer.args[1], *indices]
    return producer, indices


def pick_from_tuple(node: fx.Node, producer: fx.Node, indices: Sequence, inputs: Sequence[fx.Node]):
    """getitem on a node that returns several tensors (e.g. MultiheadAttention; an LSTM's (h_n, c_n)[0] picks
    twice): the producer is differentiated as a whole and the wanted output picked (batch-first, as the plan
    stores it)."""
    produce = call_with_inputs(producer, inputs)

    def function_of(plan, env):
        function = produce(plan, env)

        def picked(*values):
            value = function(*values)
            for index in indices:
                value = value[index]
            return plan.evaluator.batch_first(node, value)

        return picked

    return function_of
