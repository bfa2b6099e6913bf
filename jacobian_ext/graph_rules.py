"""One rule per graph node kind: how a node's Jacobian block (blocks.py) is pushed forward and pulled back.
Three families:
- native: the C++ ops of jacobian_ext.ops (Linear, activations, softmax, ...), and attention's products
  and softmax (attention_rules.py);
- index maps: views, slicing, sums, concatenation and scaling by a constant, applied to the block
  directly (views stay views);
- the torch.func fallback for any other node: jvp / vjp of that node over the whole batch, vmapped
  over the rows. The planner has checked on a probe that each node maps samples independently, so
  the batch-level jvp / vjp is exactly the per-sample one.
"""
import math
import operator
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.func import jvp, vmap

from . import ops
from . import rules as layer_rules
from .program import entry
from . import attention_rules, spatial_rules
from .errors import GraphCaptureError
from .blocks import IDENTITY, NodeRule, Picked, call_arguments, explicit_block
from .rules import read_path, tensor_getter
from .fallback import FORWARD_AD_LOCK, per_sample_jacobians, vjp_in_grad_mode


def _node_args(plan, node: fx.Node, env, substitute: Optional[Dict] = None):
    lookup = (lambda a: substitute[a] if a in substitute else env[a]) if substitute else env.__getitem__
    return plan.evaluator.arguments(node, lookup)


# ---------------------------------------------------------------------------------------------
# The torch.func fallback, for one node
# ---------------------------------------------------------------------------------------------


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


def _call_with_inputs(node: fx.Node, inputs: Sequence[fx.Node]):
    def function_of(plan, env):
        def function(*values):
            args, kwargs = _node_args(plan, node, env, dict(zip(inputs, values)))
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


def _pick_from_tuple(node: fx.Node, producer: fx.Node, indices: Sequence, inputs: Sequence[fx.Node]):
    """getitem on a node that returns several tensors (e.g. MultiheadAttention; an LSTM's (h_n, c_n)[0] picks
    twice): the producer is differentiated as a whole and the wanted output picked (batch-first, as the plan
    stores it)."""
    produce = _call_with_inputs(producer, inputs)

    def function_of(plan, env):
        function = produce(plan, env)

        def picked(*values):
            value = function(*values)
            for index in indices:
                value = value[index]
            return plan.evaluator.batch_first(node, value)

        return picked

    return function_of


# ---------------------------------------------------------------------------------------------
# Native ops over a [B, H] feature matrix (the per-sample shape is flattened)
# ---------------------------------------------------------------------------------------------


def flat_tangent(block, batch: int, features: int):
    """A tangent block [B, D, *shape] as the ops' [B, H, D] (a view) or None for the identity."""
    if block is IDENTITY:
        return None
    return block.reshape(batch, block.shape[1], features).transpose(1, 2)


def unflat_tangents(jac_out: torch.Tensor, batch: int, shape) -> torch.Tensor:
    """The ops' [B, H, D] (or a batch-shared [H, D]) back to tangents [B, D, *shape]."""
    if jac_out.dim() == 2:
        jac_out = jac_out.unsqueeze(0).expand(batch, *jac_out.shape)
    return jac_out.transpose(1, 2).reshape(batch, jac_out.shape[2], *shape)


def flat_cotangent(block, batch: int, features: int):
    return None if block is IDENTITY else block.reshape(batch, block.shape[1], features)


def unflat_cotangent(result: torch.Tensor, batch: int, shape) -> torch.Tensor:
    if result.dim() == 2:  # batch-shared (a Linear fed the identity)
        result = result.unsqueeze(0).expand(batch, *result.shape)
    return result.reshape(batch, result.shape[1], *shape)


class FeatureOpRule(NodeRule):
    """A native op over the flattened features [B, H]: forward_op(input2d, jac) -> (output2d, jac_out),
    reverse_op(input2d, output2d, cotangent) -> cotangent_in."""

    reverse_allocates = True

    def __init__(self, label: str, forward_op, reverse_op, needs_output: bool, work_per_row: float,
                 layers_of: Callable[[], Tuple[List[str], List[Callable]]]):
        super().__init__(work_per_row)
        self.label = f"native {label}"
        self.forward_op, self.reverse_op, self.needs_output = forward_op, reverse_op, needs_output
        self.layers_of = layers_of  # () -> (chain layer names, parameter getters): the op encoding

    def _pointwise(self) -> bool:
        return all(layer.split(":")[0] in layer_rules.ACTIVATION_REPLAY for layer in self.layers_of()[0])

    def position_axes(self, plan, g):
        return len(g.shape) if self._pointwise() else 0

    def encode(self, plan, g, sources):
        """The chain layers, behind a flatten when they hold a Linear or softmax (the chain ops read [B, H])
        and before a reshape to the node's shape where the chain's own output shape differs."""
        layers, getters = self.layers_of()
        input_shape = plan.shape_of(g.inputs[0])
        pointwise = self._pointwise()
        entries = []
        if not pointwise and len(input_shape) != 1:
            entries.append((entry("reshape", sources, shape=[math.prod(input_shape)]), []))
            sources = ()
        entries.append((entry(layers[0], sources), getters))
        entries += [(layer, []) for layer in layers[1:]]
        # The chain executor reads a 0-d sample as one feature: [B] comes back [B, 1].
        out_shape = input_shape if pointwise and input_shape else (math.prod(g.shape),)
        if tuple(out_shape) != tuple(g.shape):
            entries.append((entry("reshape", shape=list(g.shape)), []))
        return entries

    def forward(self, plan, g, env, tangents):
        x = env[g.inputs[0]]
        batch, features = x.shape[0], math.prod(x.shape[1:])
        output, jac_out = self.forward_op(x.reshape(batch, features), flat_tangent(tangents[0], batch, features))
        return output.reshape(batch, *g.shape), unflat_tangents(jac_out, batch, g.shape)

    def reverse(self, plan, g, env, cotangent):
        x = env[g.inputs[0]]
        batch, features, out_features = x.shape[0], math.prod(x.shape[1:]), math.prod(g.shape)
        if (isinstance(cotangent, torch.Tensor) and cotangent.is_contiguous() and self._pointwise()
                and plan.owns_cotangent(g.node)):
            # An activation on a block nothing else holds: its derivative (the rule on one row of ones) scales
            # the block in place, instead of into a new one.
            derivative = self.reverse_op(x.reshape(batch, features), None, x.new_ones(batch, 1, features))
            return [cotangent.mul_(derivative.reshape(batch, 1, *x.shape[1:]))]
        output = env[g.node].reshape(batch, out_features) if self.needs_output else None
        pulled = self.reverse_op(x.reshape(batch, features), output, flat_cotangent(cotangent, batch, out_features))
        return [unflat_cotangent(pulled, batch, x.shape[1:])]


def _linear_rule(module: nn.Linear, input_shape) -> NodeRule:
    weight = tensor_getter(module, "weight")  # read at call time: parameters may be replaced
    if len(input_shape) == 1:
        def layers_of():
            if module.bias is None:
                return ["linear_no_bias"], [weight]
            return ["linear"], [weight, tensor_getter(module, "bias")]

        return FeatureOpRule(
            "linear",
            lambda x, jac: ops.linear_jac_forward(x, jac, weight(), module.bias),
            lambda x, out, cot: ops.linear_jac_reverse(cot, weight()),
            needs_output=False,
            work_per_row=module.in_features * module.out_features,
            layers_of=layers_of,
        )
    return LastAxisLinearRule(module, math.prod(input_shape[:-1]) * module.in_features * module.out_features)


class LastAxisLinearRule(NodeRule):
    """nn.Linear over the last axis of an N-d per-sample input (tokens): the block's last axis is
    multiplied by W^T (forward) or W (reverse), one GEMM over all rows of all samples."""

    label = "native linear (last axis)"
    reverse_allocates = True

    def __init__(self, module: nn.Linear, work_per_row: float):
        super().__init__(work_per_row)
        self.module = module

    def forward(self, plan, g, env, tangents):
        x = env[g.inputs[0]]
        tangent = explicit_block(tangents[0], x.shape[0], x.shape[1:], x)
        return plan.evaluator.evaluate(g.node, env), torch.matmul(tangent, self.module.weight.t())

    def reverse(self, plan, g, env, cotangent):
        x = env[g.inputs[0]]
        return [torch.matmul(explicit_block(cotangent, x.shape[0], g.shape, x), self.module.weight)]

    def position_axes(self, plan, g):
        return len(g.shape) - 1

    def encode(self, plan, g, sources):
        module = self.module
        getters = [tensor_getter(module, "weight")] + ([tensor_getter(module, "bias")] if module.bias is not None else [])
        return [(entry("linear_last_axis", sources, bias=module.bias is not None), getters)]


def _activation_rule(spec: str, features: int) -> NodeRule:
    return FeatureOpRule(
        spec,
        lambda x, jac: ops.pointwise_jac_forward(x, jac, spec),
        lambda x, out, cot: ops.pointwise_jac_reverse(x, cot, spec),
        needs_output=False,
        work_per_row=features,
        layers_of=lambda: ([spec], []),
    )


def _softmax_rule(log: bool, features: int) -> NodeRule:
    forward_op, reverse_op = (
        (ops.log_softmax_jac_forward, ops.log_softmax_jac_reverse) if log else (ops.softmax_jac_forward, ops.softmax_jac_reverse)
    )
    # Both reverse rules take the layer's own output (log-probabilities for log-softmax).
    name = "log_softmax" if log else "softmax"
    return FeatureOpRule(
        name,
        forward_op,
        lambda x, out, cot: reverse_op(out, cot),
        needs_output=True,
        work_per_row=3 * features,
        layers_of=lambda: ([name], []),
    )


class NdOpRule(NodeRule):
    """A native op on N-d per-sample features (convolution, batch norm, pooling, layer norm): the ops
    take tangents as [B, *shape, D] and cotangents as [B, C, *shape]. `call_of(module, input_shape)`
    gives an object with forward(input, jac) and reverse(input, cotangent), built at every call from
    the module, so that updated weights are used."""

    reverse_allocates = True

    def __init__(self, module: nn.Module, input_shape, call_of: Callable, label: str, work_per_row: float,
                 position_axes: int = 0):
        super().__init__(work_per_row)
        self.module, self.input_shape, self.call_of, self.label = module, tuple(input_shape), call_of, f"native {label}"
        self._position_axes = position_axes  # a layer norm's axes before its normalised ones

    def position_axes(self, plan, g):
        return self._position_axes

    def _call(self):
        call = self.call_of(self.module, self.input_shape)
        if call is None:
            raise RuntimeError(f"{self.module} no longer has a native rule (its configuration changed after "
                               "planning); compile the model again")
        return call

    def forward(self, plan, g, env, tangents):
        jac = None if tangents[0] is IDENTITY else tangents[0].movedim(1, -1)
        output, jac_out = self._call().forward(env[g.inputs[0]], jac)
        return output, jac_out.movedim(-1, 1)

    def reverse(self, plan, g, env, cotangent):
        return [self._call().reverse(env[g.inputs[0]], None if cotangent is IDENTITY else cotangent)]

    def encode(self, plan, g, sources):
        return self._call().encode(self.module, sources, self.input_shape, g.shape)


class _LayerNormCall:
    """nn.LayerNorm's native rule in the interface of spatial_rules.SpatialCall."""

    def __init__(self, module: nn.LayerNorm):
        self.module = module

    def forward(self, input, jac):
        m = self.module
        return ops.layer_norm_jac_forward(input, jac, list(m.normalized_shape), m.weight, m.bias, m.eps)

    def reverse(self, input, cotangent):
        m = self.module
        return ops.layer_norm_jac_reverse(input, cotangent, list(m.normalized_shape), m.weight, m.eps)

    def encode(self, module, sources, input_shape, output_shape):
        return [spatial_rules.encode_with_module_params(
            module, "layer_norm", sources, dict(shape=list(module.normalized_shape), eps=float(module.eps), weight=module.weight is not None,
                 bias=module.bias is not None),
            ("weight", "bias"))]


class _GroupNormCall:
    """nn.GroupNorm as the layer norm of each group of channels (the per-sample input [C, *spatial] viewed as
    [G, C / G * spatial], normalised over its last axis, and viewed back), then the per-channel affine map:
    the layer norm's full rule, no new kernel."""

    def __init__(self, module: nn.GroupNorm, input_shape):
        self.module, self.input_shape = module, tuple(input_shape)
        self.grouped = (module.num_groups, math.prod(input_shape) // module.num_groups)
        self.channel_shape = (module.num_channels,) + (1,) * (len(input_shape) - 1)

    def _affine(self):
        m = self.module
        return (m.weight.reshape(self.channel_shape), m.bias.reshape(self.channel_shape)) if m.affine else (None, None)

    def forward(self, input, jac):
        batch = input.shape[0]
        grouped_jac = None if jac is None else jac.reshape(batch, *self.grouped, jac.shape[-1])
        output, jac_out = ops.layer_norm_jac_forward(input.reshape(batch, *self.grouped), grouped_jac,
                                                     [self.grouped[1]], None, None, self.module.eps)
        output = output.reshape(batch, *self.input_shape)
        jac_out = jac_out.reshape(batch, *self.input_shape, jac_out.shape[-1])
        weight, bias = self._affine()
        if weight is not None:
            output, jac_out = output * weight + bias, jac_out * weight.unsqueeze(-1)
        return output, jac_out

    def reverse(self, input, cotangent):
        batch = input.shape[0]
        weight, _ = self._affine()
        if weight is not None:
            # The identity block too, scaled: its rows are the output features.
            cotangent = explicit_block(IDENTITY if cotangent is None else cotangent, batch, self.input_shape, input)
            cotangent = cotangent * weight
        grouped = None if cotangent is None else cotangent.reshape(batch, cotangent.shape[1], *self.grouped)
        pulled = ops.layer_norm_jac_reverse(input.reshape(batch, *self.grouped), grouped, [self.grouped[1]], None,
                                            self.module.eps)
        return pulled.reshape(batch, pulled.shape[1], *self.input_shape)

    def encode(self, module, sources, input_shape, output_shape):
        """The program reads the module's own [C] weight and bias (so that an exported graph finds them among
        the model's parameters); they broadcast over the last axis, so the affine map runs on [*spatial, C]."""
        entries = [(entry("reshape", sources, shape=list(self.grouped)), []),
                   (entry("layer_norm", shape=[self.grouped[1]], eps=float(module.eps), weight=False, bias=False), [])]
        if not module.affine:
            return entries + [(entry("reshape", shape=list(self.input_shape)), [])]
        channels = module.num_channels
        return entries + [
            (entry("reshape", shape=[channels, self.grouped[0] * self.grouped[1] // channels]), []),
            (entry("permute", dims=[1, 0]), []),
            (entry("scale", divide=False), [tensor_getter(module, "weight")]),
            (entry("add", coef="1.0", offset_param=1.0), [tensor_getter(module, "bias")]),
            (entry("permute", dims=[1, 0]), []),
            (entry("reshape", shape=list(self.input_shape)), []),
        ]


class _RMSNormCall:
    """nn.RMSNorm / F.rms_norm, y = w x r with r = (mean(x^2) + eps)^(-1/2) over the normalised trailing axes:
    its Jacobian is diag(w) (r I - r^3 x x^T / n) per group, applied to tangents as w (r t - r^3 x mean(x t))
    and to cotangents as r u - r^3 x mean(x u) with u = g w (the matrix in brackets is symmetric). A few
    torch ops on the blocks, no kernel of its own; the program's rms_norm entry runs the same rule in ATen."""

    def __init__(self, module, input_shape):
        self.module, self.input_shape = module, tuple(input_shape)
        self.dims = tuple(range(-len(module.normalized_shape), 0))

    def _eps(self, dtype):
        eps = self.module.eps
        return torch.finfo(dtype).eps if eps is None else eps

    def _scale(self, input):
        """r with the normalised axes kept (size 1), as F.rms_norm computes it."""
        return torch.rsqrt(input.pow(2).mean(self.dims, keepdim=True) + self._eps(input.dtype))

    def _project(self, input, block):
        """r b - r^3 x mean(x b) for a block b [B, R, *shape] (rows second)."""
        x, r = input.unsqueeze(1), self._scale(input).unsqueeze(1)
        return r * block - (r * r * r) * x * (x * block).mean(self.dims, keepdim=True)

    def forward(self, input, jac):
        m = self.module
        output = F.rms_norm(input, m.normalized_shape, m.weight, m.eps)
        tangent = explicit_block(IDENTITY, input.shape[0], self.input_shape, input) if jac is None else jac.movedim(-1, 1)
        projected = self._project(input, tangent)
        if m.weight is not None:
            projected = projected * m.weight
        return output, projected.movedim(1, -1)

    def reverse(self, input, cotangent):
        block = explicit_block(IDENTITY if cotangent is None else cotangent, input.shape[0], self.input_shape, input)
        if self.module.weight is not None:
            block = block * self.module.weight
        return self._project(input, block)

    def encode(self, module, sources, input_shape, output_shape):
        # No eps= in the entry stands for eps=None: the dtype's epsilon, resolved where the dtype is known.
        eps = {} if module.eps is None else {"eps": float(module.eps)}
        attributes = dict(shape=list(module.normalized_shape), **eps, weight=module.weight is not None)
        return [spatial_rules.encode_with_module_params(module, "rms_norm", sources, attributes, ("weight",))]


def _leading_axes(normalized_shape, input_shape) -> Optional[int]:
    """How many per-sample axes come before a norm's normalised ones (they end the per-sample shape), or None
    when normalized_shape does not end input_shape."""
    normalized, leading = tuple(normalized_shape), len(input_shape) - len(normalized_shape)
    return leading if leading >= 0 and tuple(input_shape[leading:]) == normalized else None


def _rms_norm_rule(module, input_shape, out_numel: int) -> Optional[NodeRule]:
    leading = _leading_axes(module.normalized_shape, input_shape)
    if leading is None:
        return None
    return NdOpRule(module, input_shape, _RMSNormCall, "rms_norm", 6 * out_numel, position_axes=leading)


def _group_norm_rule(module: nn.GroupNorm, input_shape, out_numel: int) -> Optional[NodeRule]:
    if not input_shape or input_shape[0] != module.num_channels:
        return None
    return NdOpRule(module, input_shape, _GroupNormCall, "group_norm", 8 * out_numel)


def attribute_source(gm: fx.GraphModule) -> nn.Module:
    """The module that get_attr targets are read from: the captured model (capture() records it), not gm.
    fx.GraphModule keeps references of its own to the tensors that get_attr nodes read, and those go stale
    when the model's parameter is replaced (m.weight = nn.Parameter(...), load_state_dict(assign=True))."""
    return gm.meta.get(CAPTURED_MODEL, gm)


CAPTURED_MODEL = "jacobian_ext_captured_model"


class _GraphTensors:
    """The tensors a functional call reads from the model (get_attr nodes of the captured graph: a traced
    subclass's self.weight, self.running_var) as attributes looked up at every access, beside constant
    attributes (eps, normalized_shape): a stand-in for the module, so that the module rules' ops and
    encodings read current parameters from it at every call. Each tensor's owning module is found once:
    replacing a module changes the model's layout, which replans (api.JacobianModule._forget_stale_plans)."""

    def __init__(self, gm: fx.GraphModule, targets: Dict[str, Optional[str]], **constants):
        source = attribute_source(gm)
        self._readers = {}
        for name, target in targets.items():
            if target is not None:
                path, _, leaf = target.rpartition(".")
                self._readers[name] = tensor_getter(read_path(source, path), leaf)
        self._absent = {name for name, target in targets.items() if target is None}
        self.__dict__.update(constants)

    def __getattr__(self, name):
        read = self.__dict__.get("_readers", {}).get(name)
        if read is None:
            if name in self.__dict__.get("_absent", ()):
                return None
            raise AttributeError(name)
        return read()

    def tensor_getter(self, name: str) -> Callable:
        """A getter of the tensor `name` that reads its owning module directly (rules.tensor_getter)."""
        return (lambda: None) if name in self._absent else self._readers[name]


def _get_attr_targets(arguments: Dict, names: Sequence[str]) -> Optional[Dict[str, Optional[str]]]:
    """The get_attr targets of the tensor arguments `names` (None for an absent one), or None when one
    is computed in the graph (not a parameter or buffer of the model)."""
    targets = {}
    for name in names:
        value = arguments.get(name)
        if value is None:
            targets[name] = None
        elif isinstance(value, fx.Node) and value.op == "get_attr":
            targets[name] = value.target
        else:
            return None
    return targets


# Functional pools, as the module each stands for (built from the call's arguments, which are constants of
# the captured graph): (module type, its constructor's argument names in the function's order after input).
_FUNCTIONAL_POOLS = {
    F.max_pool2d: (nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")),
    F.max_pool1d: (nn.MaxPool1d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")),
    F.avg_pool2d: (nn.AvgPool2d, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                                  "divisor_override")),
    F.avg_pool1d: (nn.AvgPool1d, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")),
    F.adaptive_avg_pool2d: (nn.AdaptiveAvgPool2d, ("output_size",)),
    F.adaptive_avg_pool1d: (nn.AdaptiveAvgPool1d, ("output_size",)),
}


def _functional_pool_rule(gm: fx.GraphModule, node: fx.Node, x, out_numel: int) -> Optional[NodeRule]:
    """F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d (and the 1-d forms) with constant arguments: the
    rule of the pooling module with those arguments (inception's branches call them functionally)."""
    if node.op != "call_function" or node.target not in _FUNCTIONAL_POOLS:
        return None
    module_type, names = _FUNCTIONAL_POOLS[node.target]
    normalized = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
    if normalized is None or not isinstance(normalized.kwargs.get("input"), fx.Node):
        return None
    arguments = {name: value for name, value in normalized.kwargs.items() if name in names}
    traced = []
    fx.node.map_arg(list(arguments.values()), traced.append)
    if traced:  # an argument computed in the graph
        return None
    if arguments.get("stride") in (None, []) and "stride" in names:
        arguments.pop("stride", None)  # the functions' default stride is the kernel size, as the modules'
    try:
        module = module_type(**arguments)
    except (TypeError, ValueError):
        return None
    return _spatial_rule(module, tuple(x.shape[1:]), out_numel)


_RMS_NORM = getattr(F, "rms_norm", None)  # torch >= 2.4


def _functional_layer_rule(gm: fx.GraphModule, node: fx.Node, x, out_numel: int) -> Optional[NodeRule]:
    """F.linear, F.batch_norm in eval mode (training=False), F.layer_norm and F.rms_norm on the node's carried
    input, with the model's own parameters and buffers: the module rules of Linear, BatchNorm, LayerNorm and
    RMSNorm (a subclass whose
    forward calls them functionally, e.g. timm's BatchNormAct2d, convnext's LayerNorm2d and timm's classifier
    Linear, is traced into)."""
    if node.op != "call_function" or node.target not in (F.linear, F.batch_norm, F.layer_norm, _RMS_NORM):
        return None
    normalized = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
    if normalized is None or not isinstance(normalized.kwargs.get("input"), fx.Node):
        return None
    arguments = normalized.kwargs
    input_shape = tuple(x.shape[1:])
    if node.target is F.linear:
        targets = _get_attr_targets(arguments, ("weight", "bias"))
        if targets is None or targets["weight"] is None:
            return None
        tensors = _GraphTensors(gm, targets)
        if tensors.weight.dim() != 2 or not input_shape or input_shape[-1] != tensors.weight.shape[1]:
            return None
        out_features, in_features = tensors.weight.shape
        return _linear_rule(_GraphTensors(gm, targets, in_features=in_features, out_features=out_features),
                            input_shape)
    # F.rms_norm's eps None means the dtype's epsilon (_RMSNormCall), the others' default is 1e-5.
    eps = arguments.get("eps", None if node.target is _RMS_NORM else 1e-5)
    if not (isinstance(eps, (int, float)) or eps is None and node.target is _RMS_NORM):
        return None
    if node.target in (F.layer_norm, _RMS_NORM):
        shape = arguments.get("normalized_shape")
        targets = _get_attr_targets(arguments, ("weight", "bias") if node.target is F.layer_norm else ("weight",))
        if targets is None or not isinstance(shape, (tuple, list)) or not all(isinstance(n, int) for n in shape):
            return None
        tensors = _GraphTensors(gm, targets, normalized_shape=tuple(shape), eps=None if eps is None else float(eps))
        return (_layer_norm_rule if node.target is F.layer_norm else _rms_norm_rule)(tensors, input_shape, out_numel)
    targets = _get_attr_targets(arguments, ("weight", "bias", "running_mean", "running_var"))
    if (arguments.get("training", False) is not False or targets is None or targets["running_mean"] is None
            or targets["running_var"] is None or len(input_shape) not in (1, 2, 3)):
        return None
    tensors = _GraphTensors(gm, targets, eps=float(eps))
    if tensors.running_mean.shape != (input_shape[0],):
        return None

    def call_of(module, shape):
        return spatial_rules.SpatialCall("batch_norm", dict(
            weight=module.weight, bias=module.bias, running_mean=module.running_mean,
            running_var=module.running_var, eps=module.eps))

    return NdOpRule(tensors, input_shape, call_of, "batch_norm", out_numel)


def _layer_norm_rule(module: nn.LayerNorm, input_shape, out_numel: int) -> Optional[NodeRule]:
    leading = _leading_axes(module.normalized_shape, input_shape)
    if leading is None:
        return None
    return NdOpRule(module, input_shape, lambda m, shape: _LayerNormCall(m), "layer_norm", 8 * out_numel,
                    position_axes=leading)


def _spatial_rule(module: nn.Module, input_shape, out_numel: int) -> Optional[NodeRule]:
    call = spatial_rules.native_call(module, input_shape)
    if call is None:
        return None
    work = out_numel
    if call.op == "conv":  # multiply-adds per output element: in_channels / groups x kernel volume
        work *= module.in_channels // module.groups * math.prod(module.kernel_size)
    elif call.op in ("max_pool2d", "avg_pool2d"):
        work *= math.prod(call.params["kernel_size"])
    return NdOpRule(module, input_shape, spatial_rules.native_call, call.op, work)


# ---------------------------------------------------------------------------------------------
# Index maps: applied to the block itself
# ---------------------------------------------------------------------------------------------


class ShapeArgument:
    """An index map's argument (slice bounds, roll shifts, pad amounts) that may hold graph nodes computing
    integers from shapes alone (a window's padding from x.shape, _shape_arithmetic): one capture serves every
    input size, so their values are read at each call."""

    def __init__(self, argument):
        self.argument = argument
        self.traced = bool(_graph_nodes(argument))

    def at(self, env):
        return fx.node.map_arg(self.argument, env.__getitem__) if self.traced else self.argument


class ReshapeRule(NodeRule):
    """Any op that keeps the row-major order of a sample's features (view, reshape, flatten,
    unflatten, squeeze, unsqueeze, contiguous, Identity, Dropout in eval mode): a view of the block."""

    label = "index map (reshape)"
    reverse_views = True

    def forward(self, plan, g, env, tangents):
        x = env[g.inputs[0]]
        value = plan.evaluator.evaluate(g.node, env)
        if tangents[0] is IDENTITY and tuple(x.shape[1:]) == g.shape:
            return value, IDENTITY
        tangent = explicit_block(tangents[0], x.shape[0], x.shape[1:], x)
        return value, tangent.reshape(x.shape[0], tangent.shape[1], *g.shape)

    def reverse(self, plan, g, env, cotangent):
        x = env[g.inputs[0]]
        if cotangent is IDENTITY and tuple(x.shape[1:]) == g.shape:
            return [IDENTITY]
        block = explicit_block(cotangent, x.shape[0], g.shape, x)
        return [block.reshape(x.shape[0], block.shape[1], *x.shape[1:])]

    def position_axes(self, plan, g):
        """The leading axes the input's shape and the node's share: row-major order keeps their positions."""
        shared = 0
        for before, after in zip(plan.shape_of(g.inputs[0]), g.shape):
            if before != after:
                break
            shared += 1
        return shared

    def encode(self, plan, g, sources):
        return [(entry("reshape", sources, shape=list(g.shape)), [])]


class PermuteRule(NodeRule):
    """permute / transpose / movedim of the per-sample axes: the same permutation of the block's
    axes, shifted past the rows axis (a view)."""

    label = "index map (permute)"
    reverse_views = True

    def __init__(self, permutation: Sequence[int], work_per_row: float):
        super().__init__(work_per_row)
        # permutation of [B, *shape] with 0 fixed -> of [B, R, *shape]
        self.block_permutation = [0, 1] + [p + 1 for p in permutation[1:]]
        self.inverse = [self.block_permutation.index(i) for i in range(len(self.block_permutation))]

    def forward(self, plan, g, env, tangents):
        x = env[g.inputs[0]]
        tangent = explicit_block(tangents[0], x.shape[0], x.shape[1:], x)
        return plan.evaluator.evaluate(g.node, env), tangent.permute(self.block_permutation)

    def reverse(self, plan, g, env, cotangent):
        x = env[g.inputs[0]]
        return [explicit_block(cotangent, x.shape[0], g.shape, x).permute(self.inverse)]

    def encode(self, plan, g, sources):
        return [(entry("permute", sources, dims=[p - 2 for p in self.block_permutation[2:]]), [])]


class ShiftRule(NodeRule):
    """torch.roll / torch.flip over per-sample axes: the same permutation of positions on the block's axes
    (shifted past the rows axis); reverse rolls back by the opposite shifts (a flip is its own inverse)."""

    label = "index map (roll/flip)"

    def __init__(self, block_dims: Sequence[int], shifts: Optional[Sequence], work_per_row: float):
        super().__init__(work_per_row)
        self.block_dims, self.shifts = list(block_dims), None if shifts is None else ShapeArgument(list(shifts))

    def _moved(self, block, env, inverse: bool):
        if self.shifts is None:
            return block.flip(self.block_dims)
        shifts = self.shifts.at(env)
        if not any(shifts):
            return block  # a shift computed as 0 (swin's, where one window covers the map)
        return block.roll([-s if inverse else s for s in shifts], self.block_dims)

    def forward(self, plan, g, env, tangents):
        x = env[g.inputs[0]]
        tangent = explicit_block(tangents[0], x.shape[0], x.shape[1:], x)
        return plan.evaluator.evaluate(g.node, env), self._moved(tangent, env, inverse=False)

    def reverse(self, plan, g, env, cotangent):
        x = env[g.inputs[0]]
        return [self._moved(explicit_block(cotangent, x.shape[0], g.shape, x), env, inverse=True)]


class PadRule(NodeRule):
    """F.pad(x, pad) in constant mode over per-sample axes: the block padded the same way with zeros (the padding
    value is a constant); reverse pads by the opposite amounts, which crops the padding off (and puts zeros back
    where a negative amount cropped the input)."""

    label = "index map (pad)"

    def __init__(self, pad: Sequence, work_per_row: float):
        super().__init__(work_per_row)
        self.pad = ShapeArgument(list(pad))

    def forward(self, plan, g, env, tangents):
        x = env[g.inputs[0]]
        tangent = explicit_block(tangents[0], x.shape[0], x.shape[1:], x)
        return plan.evaluator.evaluate(g.node, env), F.pad(tangent, self.pad.at(env))

    def reverse(self, plan, g, env, cotangent):
        x = env[g.inputs[0]]
        block = explicit_block(cotangent, x.shape[0], g.shape, x)
        return [F.pad(block, [-amount for amount in self.pad.at(env)])]


class IndexRule(NodeRule):
    """Basic slicing x[:, ...] that keeps the batch axis: the same index on the block (a view);
    reverse writes the cotangent into zeros of the input's shape."""

    label = "index map (slice)"

    def __init__(self, block_index: tuple, work_per_row: float):
        super().__init__(work_per_row)
        self.block_index = ShapeArgument(block_index)  # slice bounds may be computed from shapes (x[:, :H])

    def forward(self, plan, g, env, tangents):
        x = env[g.inputs[0]]
        tangent = explicit_block(tangents[0], x.shape[0], x.shape[1:], x)
        return plan.evaluator.evaluate(g.node, env), tangent[self.block_index.at(env)]

    def reverse(self, plan, g, env, cotangent):
        x = env[g.inputs[0]]
        block = explicit_block(cotangent, x.shape[0], g.shape, x)
        block_index = self.block_index.at(env)
        box = self._box(block_index, x.shape[1:])
        if box is not None:  # integers and unit-step slices: a Picked box, integer axes kept with size 1
            kept = [slice(None), slice(None)] + [slice(None) if isinstance(p, slice) else None
                                                 for p in block_index[2:]]
            return [Picked(box, block[tuple(kept)], x.shape[1:])]
        pulled = block.new_zeros(x.shape[0], block.shape[1], *x.shape[1:])
        pulled[block_index] = block
        return [pulled]

    @staticmethod
    def _box(block_index: tuple, shape) -> Optional[List[slice]]:
        """The index as one unit-step slice per indexed per-sample axis, or None (a new axis, another step)."""
        parts = block_index[2:]
        if len(parts) > len(shape):  # new axes (None) among the parts
            return None
        box = []
        for part, size in zip(parts, shape):
            if isinstance(part, int):
                box.append(slice(part % size, part % size + 1))
            elif isinstance(part, slice) and part.indices(size)[2] == 1:
                start, stop, _ = part.indices(size)
                box.append(slice(start, max(start, stop)))
            else:
                return None
        return box

    def encode(self, plan, g, sources):
        """One `slice` entry per sliced per-sample axis; integer indices and None have none."""
        input_shape = plan.shape_of(g.inputs[0])
        parts = self.block_index.argument[2:]
        if self.block_index.traced or not all(isinstance(p, slice) for p in parts):
            return None  # a bound computed in the forward: not a constant of the program
        entries = []
        for axis, part in enumerate(parts):
            start, stop, step = part.indices(input_shape[axis])
            if part == slice(None):
                continue
            entries.append((entry("slice", sources if not entries else (), dim=axis, start=start,
                                  stop=max(stop, start), step=step), []))
        return entries or [(entry("reshape", sources, shape=list(g.shape)), [])]


class SelectionRule(NodeRule):
    """x.gather(dim, index) / x.index_select(dim, index) along a per-sample axis, the index carrying no
    derivative (a buffer, a constant, or argmax indices): the same selection of the block's positions, the
    index broadcast over the rows axis (forward); reverse adds each cotangent position back where it was read
    from (scatter_add / index_add into zeros: a position read twice gets both, one never read gets zero)."""

    def __init__(self, gather: bool, dim: int, index: fx.Node, program_index: Optional[fx.Node],
                 work_per_row: float):
        super().__init__(work_per_row)
        self.gather, self.dim, self.index = gather, dim, index  # dim: an axis of [B, *shape], not 0
        self.program_index = program_index  # the get_attr node the program reads the index from, or None
        self.label = f"index map ({'gather' if gather else 'index_select'})"

    def _block_index(self, env, rows: int) -> torch.Tensor:
        index = env[self.index]
        if not self.gather:
            return index.reshape(-1)  # one number selects one position and keeps the axis, as index_select does
        return index.unsqueeze(1).expand(index.shape[0], rows, *index.shape[1:])

    def forward(self, plan, g, env, tangents):
        x = env[g.inputs[0]]
        tangent = explicit_block(tangents[0], x.shape[0], x.shape[1:], x)
        index = self._block_index(env, tangent.shape[1])
        selected = tangent.gather(self.dim + 1, index) if self.gather else tangent.index_select(self.dim + 1, index)
        return plan.evaluator.evaluate(g.node, env), selected

    def reverse(self, plan, g, env, cotangent):
        x = env[g.inputs[0]]
        block = explicit_block(cotangent, x.shape[0], g.shape, x)
        index = self._block_index(env, block.shape[1])
        pulled = block.new_zeros(x.shape[0], block.shape[1], *x.shape[1:])
        if self.gather:
            return [pulled.scatter_add_(self.dim + 1, index, block)]
        return [pulled.index_add_(self.dim + 1, index, block)]

    def encode(self, plan, g, sources):
        if self.program_index is None:
            return None  # an index computed in the forward: not a tensor the program can read from the model
        kind = "gather" if self.gather else "index_select"
        return [(entry(kind, sources, dim=self.dim - 1), [_attribute_getter(plan, self.program_index)])]


class SumRule(NodeRule):
    """x + y, x - y, -x, x + constant (residual connections): the blocks of the inputs that carry a
    derivative, each times its coefficient (x + x has 2, x - x has 0); constants drop out."""

    label = "index map (sum)"

    def __init__(self, coefficients: Sequence[float], work_per_row: float):
        super().__init__(work_per_row)
        self.coefficients = list(coefficients)

    def forward(self, plan, g, env, tangents):
        value = plan.evaluator.evaluate(g.node, env)
        total = None
        for coefficient, tangent in zip(self.coefficients, tangents):
            block = explicit_block(tangent, value.shape[0], g.shape, value)
            term = block if coefficient == 1 else block * coefficient
            total = term if total is None else total + term
        return value, total

    def position_axes(self, plan, g):
        return len(g.shape)  # its inputs have the node's shape (_sum_rule)

    def reverse(self, plan, g, env, cotangent):
        if all(c == 1 for c in self.coefficients):
            return [cotangent] * len(self.coefficients)
        value = env[g.node]
        block = explicit_block(cotangent, value.shape[0], g.shape, value)
        return [block if c == 1 else block * c for c in self.coefficients]

    def encode(self, plan, g, sources):
        """sum of coef_i * input_i plus at most one constant: a number, or a parameter or buffer (get_attr)."""
        node = g.node
        negate = node.target in (operator.neg, torch.neg, "neg")
        subtract = node.target in _SUB_FUNCTIONS or node.target == "sub"
        signs = [-1.0] if negate else [1.0, -1.0 if subtract else 1.0]
        constants = [(sign, arg) for sign, arg in zip(signs, node.args) if arg not in g.inputs]
        attributes, getters = {"coef": ",".join(repr(float(c)) for c in self.coefficients)}, []
        if len(constants) > 1:
            return None
        for sign, constant in constants:
            if isinstance(constant, (int, float)) and not isinstance(constant, bool):
                attributes["offset"] = float(sign * constant)
            elif isinstance(constant, fx.Node) and constant.op == "get_attr":
                attributes["offset_param"] = sign
                getters.append(_attribute_getter(plan, constant))
            else:
                return None
        all_sources = [plan.slot_of(i) for i in g.inputs]
        return [(entry("add", all_sources, **attributes), getters)]


class ScaleRule(NodeRule):
    """x * c or x / c with c a constant (a number or a tensor that carries no derivative) that does
    not broadcast x to a larger shape: the block is scaled by c, broadcast past the rows axis."""

    label = "index map (scale)"
    reverse_allocates = True

    def __init__(self, constant, divide: bool, work_per_row: float):
        super().__init__(work_per_row)
        self.constant, self.divide = constant, divide  # a number, or the fx node of a tensor

    def constant_of(self, env):
        """The factor the block is multiplied by: a number or a tensor broadcastable to [B, *shape]."""
        c = env[self.constant] if isinstance(self.constant, fx.Node) else self.constant
        return 1.0 / c if self.divide else c

    def encode(self, plan, g, sources):
        if isinstance(self.constant, fx.Node):
            if self.constant.op != "get_attr":
                return None  # a tensor computed in the forward: not a constant of the program
            return [(entry("scale", sources, divide=self.divide), [_attribute_getter(plan, self.constant)])]
        if not isinstance(self.constant, (int, float)) or isinstance(self.constant, bool):
            return None
        return [(entry("scale", sources, divide=self.divide, factor=float(self.constant)), [])]

    def _block_factor(self, env, ndim: int):
        factor = self.constant_of(env)
        if isinstance(factor, torch.Tensor) and factor.dim() == ndim:  # has the batch axis: add the rows axis
            factor = factor.unsqueeze(1)
        return factor

    def forward(self, plan, g, env, tangents):
        x = env[g.inputs[0]]
        tangent = explicit_block(tangents[0], x.shape[0], x.shape[1:], x)
        return plan.evaluator.evaluate(g.node, env), tangent * self._block_factor(env, x.dim())

    def reverse(self, plan, g, env, cotangent):
        x = env[g.inputs[0]]
        return [explicit_block(cotangent, x.shape[0], g.shape, x) * self._block_factor(env, x.dim())]


class ReductionRule(NodeRule):
    """x.mean(dims) / x.sum(dims) over per-sample axes (global average pooling written functionally,
    F.adaptive_avg_pool2d(x, 1)): the same reduction of the block over the same axes (forward); the
    cotangent spread back over the reduced axes, divided by their size for a mean (reverse)."""

    label = "index map (reduction)"

    def __init__(self, dims: Sequence[int], keepdim: bool, mean: bool, work_per_row: float):
        super().__init__(work_per_row)
        self.block_dims = sorted(d + 1 for d in dims)  # axes of [B, R, *shape]
        self.keepdim, self.mean = keepdim, mean

    def forward(self, plan, g, env, tangents):
        x = env[g.inputs[0]]
        tangent = explicit_block(tangents[0], x.shape[0], x.shape[1:], x)
        reduced = (tangent.mean if self.mean else tangent.sum)(self.block_dims, keepdim=True)
        return plan.evaluator.evaluate(g.node, env), reduced.reshape(x.shape[0], tangent.shape[1], *g.shape)

    def reverse(self, plan, g, env, cotangent):
        x = env[g.inputs[0]]
        block = explicit_block(cotangent, x.shape[0], g.shape, x)
        kept = [block.shape[0], block.shape[1]] + [1 if d + 2 in self.block_dims else size
                                                   for d, size in enumerate(x.shape[1:])]
        spread = block.reshape(kept).expand(block.shape[0], block.shape[1], *x.shape[1:])
        if self.mean:
            spread = spread / math.prod(x.shape[d - 1] for d in self.block_dims)
        return [spread]

    def encode(self, plan, g, sources):
        return [(entry("mean" if self.mean else "sum", sources, dims=[d - 2 for d in self.block_dims],
                       keepdim=self.keepdim), [])]


class ProductRule(NodeRule):
    """a * b (product rule: T_a b + a T_b) or a / b (quotient rule: T_a / b - a T_b / b^2) of two carried
    values, broadcast over per-sample axes; reverse sums each cotangent back to its factor's shape."""

    label = "native product"

    def __init__(self, first: fx.Node, second: fx.Node, divide: bool, work_per_row: float):
        super().__init__(work_per_row)
        self.first, self.second, self.divide = first, second, divide

    def _factors(self, env):
        """(d out / d first, d out / d second) per element, each with a rows axis: [B, 1, *shape]."""
        a, b = env[self.first], env[self.second]
        if self.divide:
            return (1 / b).unsqueeze(1), (-a / (b * b)).unsqueeze(1)
        return b.unsqueeze(1), a.unsqueeze(1)

    def forward(self, plan, g, env, tangents):
        by_input = dict(zip(g.inputs, tangents))
        total = None
        for source, factor in zip((self.first, self.second), self._factors(env)):
            x = env[source]
            term = explicit_block(by_input[source], x.shape[0], x.shape[1:], x) * factor
            total = term if total is None else total + term
        value = plan.evaluator.evaluate(g.node, env)
        return value, total.expand(value.shape[0], total.shape[1], *g.shape)

    def reverse(self, plan, g, env, cotangent):
        value = env[g.node]
        block = explicit_block(cotangent, value.shape[0], g.shape, value)
        pulled = {}
        for source, factor in zip((self.first, self.second), self._factors(env)):
            x = env[source]
            part = (block * factor).sum_to_size(block.shape[0], block.shape[1], *x.shape[1:])
            pulled[source] = part if source not in pulled else pulled[source] + part
        return [pulled[i] for i in g.inputs]

    def encode(self, plan, g, sources):
        factors = [plan.slot_of(self.first), plan.slot_of(self.second)]
        return [(entry("div" if self.divide else "mul", factors), [])]


class CatRule(NodeRule):
    """torch.cat along a per-sample axis: the blocks concatenated along the same axis (zeros for the
    parts that carry no derivative); reverse splits the cotangent."""

    label = "index map (cat)"

    def __init__(self, block_dim: int, parts: Sequence[Optional[fx.Node]], work_per_row: float):
        super().__init__(work_per_row)
        self.block_dim = block_dim
        self.parts = list(parts)  # the fx node of each concatenated tensor, or None when constant

    def forward(self, plan, g, env, tangents):
        value = plan.evaluator.evaluate(g.node, env)
        by_input = dict(zip(g.inputs, tangents))
        blocks = []
        for part, part_value in zip(self.parts, self._part_values(plan, g, env)):
            if part is not None:
                blocks.append(explicit_block(by_input[part], value.shape[0], part_value.shape[1:], part_value))
            else:
                blocks.append(part_value.new_zeros(value.shape[0], plan.in_features, *part_value.shape[1:]))
        return value, torch.cat(blocks, self.block_dim)

    def _part_values(self, plan, g, env):
        args, kwargs = _node_args(plan, g.node, env)
        return list(args[0] if args else kwargs["tensors"])

    def reverse(self, plan, g, env, cotangent):
        value = env[g.node]
        block = explicit_block(cotangent, value.shape[0], g.shape, value)
        sizes = [v.shape[self.block_dim - 1] for v in self._part_values(plan, g, env)]
        pieces = torch.split(block, sizes, dim=self.block_dim)
        by_part = {}
        for part, piece in zip(self.parts, pieces):
            if part is not None:
                by_part[part] = piece if part not in by_part else by_part[part] + piece
        return [by_part[i] for i in g.inputs]

    def encode(self, plan, g, sources):
        if any(part is None for part in self.parts):
            return None  # a constant part: not a value of the program
        return [(entry("cat", [plan.slot_of(part) for part in self.parts], dim=self.block_dim - 2), [])]


def _attribute_getter(plan, node: fx.Node) -> Callable:
    """Reads a get_attr node's tensor (a parameter or buffer) at call time."""
    return lambda: plan.evaluator.call(node, (), {})


# ---------------------------------------------------------------------------------------------
# Choosing a node's rule
# ---------------------------------------------------------------------------------------------

_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "contiguous", "view_as", "reshape_as"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten}
_ADD_FUNCTIONS = {operator.add, torch.add, operator.iadd}
_SUB_FUNCTIONS = {operator.sub, torch.sub, operator.isub}
_MUL_FUNCTIONS = {operator.mul, torch.mul, operator.imul}
_DIV_FUNCTIONS = {operator.truediv, torch.div, operator.itruediv}


def rule_for(gm: fx.GraphModule, node: fx.Node, values: Dict, carries: Dict,
             batch_axes: Dict[fx.Node, int]) -> Tuple[NodeRule, List]:
    """(rule, input nodes that carry a derivative) for a node whose value carries one. `values` are the
    probe's, batch-first; `batch_axes` names the carried values whose own op puts the batch elsewhere."""
    inputs = [a for a in node.all_input_nodes if carries.get(a, False)]
    is_pick = node.op == "call_function" and node.target is operator.getitem
    out_numel = math.prod(values[node].shape[1:])
    picked = _split_pick_rule(node, values, carries, batch_axes, out_numel) if is_pick else None
    if picked is not None:
        return picked
    if not is_pick and any(not isinstance(values[i], torch.Tensor) for i in inputs):
        raise GraphCaptureError(f"node '{node.name}' takes a whole multi-output value that carries a derivative")
    if node.target in attention_rules.EINSUMS:
        # Its letters say where each operand's batch axis is, so its rule serves every layout.
        native = attention_rules.einsum_rule(node, values, inputs, batch_axes)
    elif any(n in batch_axes for n in (node, *inputs)):
        # Only index maps (and einsum) know where the batch axis went; any other node is the fallback's, whose function
        # sees its inputs in its own layout (Evaluator.arguments).
        native = (_layout_rule(node, values, inputs, batch_axes, out_numel)
                  or _layout_free_rule(gm, node, values, inputs, batch_axes))
    else:
        native = (_selection_rule(node, values, inputs, carries, batch_axes, out_numel)
                  or _native_rule(gm, node, values, inputs, out_numel))
    if native is not None:
        return native, inputs
    # getitem on a multi-output node: differentiate the producer as a whole.
    producer, indices = tuple_origin(node, values)
    if indices:
        producer_inputs = [a for a in producer.all_input_nodes if carries.get(a, False)]
        return TorchFuncRule(_pick_from_tuple(node, producer, indices, producer_inputs), 4 * out_numel), producer_inputs
    return TorchFuncRule(_call_with_inputs(node, inputs), 4 * out_numel), inputs


def _native_rule(gm, node: fx.Node, values, inputs, out_numel) -> Optional[NodeRule]:
    if len(inputs) != 1 and not _is_sum_or_cat(node) and not _is_product(node) and not _is_attention(node):
        return None
    if node.op == "call_module":
        return _module_rule(gm.get_submodule(node.target), values[inputs[0]], out_numel)
    if node.op in ("call_function", "call_method"):
        x = values[inputs[0]]
        # _function_rule first: it reads F.adaptive_avg_pool2d(x, 1) as the reduction it is (an index map).
        return (_functional_layer_rule(gm, node, x, out_numel) or _function_rule(node, values, inputs, out_numel)
                or _functional_pool_rule(gm, node, x, out_numel))
    return None


def _is_product(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and (
        node.target in _MUL_FUNCTIONS or node.target in _DIV_FUNCTIONS or node.target in ("mul", "div"))


def _is_attention(node: fx.Node) -> bool:
    return node.target in attention_rules.MATMULS or node.target is F.scaled_dot_product_attention


def _is_sum_or_cat(node: fx.Node) -> bool:
    return node.op == "call_function" and (
        node.target in _ADD_FUNCTIONS or node.target in _SUB_FUNCTIONS or node.target in (torch.cat, torch.concat)
    )


def _module_rule(module: nn.Module, x: torch.Tensor, out_numel: int) -> Optional[NodeRule]:
    input_shape = tuple(x.shape[1:])
    kind = layer_rules.rule_type(module)
    if kind is nn.Linear:
        return _linear_rule(module, input_shape)  # on the last axis of N-d inputs too
    if kind in spatial_rules.SPATIAL_RULES:
        return _spatial_rule(module, input_shape, out_numel)
    if kind is nn.LayerNorm:
        return _layer_norm_rule(module, input_shape, out_numel)
    if kind is nn.GroupNorm:
        return _group_norm_rule(module, input_shape, out_numel)
    if kind is getattr(nn, "RMSNorm", None):  # torch >= 2.4
        return _rms_norm_rule(module, input_shape, out_numel)
    # The chain layers (activations, softmax, reshapes and eval-mode identities): their one table.
    chain_rule = layer_rules.native_rule(module, input_shape)
    if chain_rule is None and kind in (nn.Softmax, nn.LogSoftmax):  # over an axis of N-d features
        return attention_rules.axis_softmax_rule("log_softmax" if kind is nn.LogSoftmax else "softmax", module.dim, x,
                                                 out_numel)
    if chain_rule is None:
        return None
    if chain_rule.is_reshape:
        return ReshapeRule(0)
    features = math.prod(input_shape)
    if chain_rule.layer in ("softmax", "log_softmax"):
        return _softmax_rule(chain_rule.layer == "log_softmax", features)
    return _activation_rule(chain_rule.layer, features)


def _function_rule(node: fx.Node, values, inputs, out_numel) -> Optional[NodeRule]:
    target = node.target
    x_node = inputs[0]
    x = values[x_node]
    out = values[node]
    spec = layer_rules.functional_activation_spec(target, node.args, node.kwargs)
    if spec is not None and node.args and node.args[0] is x_node:
        return _activation_rule(spec, math.prod(x.shape[1:]))
    softmax = (layer_rules.functional_softmax_layer(target, node.args, node.kwargs, x.shape[1:])
               if node.args and node.args[0] is x_node and isinstance(x, torch.Tensor) else None)
    if softmax is not None:
        return _softmax_rule(softmax == "log_softmax", math.prod(x.shape[1:]))
    if node.op == "call_method" and target in _RESHAPE_METHODS or target in _RESHAPE_FUNCTIONS:
        return ReshapeRule(0) if out.shape[0] == x.shape[0] and node.args[0] is x_node else None
    if node.args and node.args[0] is x_node and layer_rules.functional_identity_in_eval(target, node.args, node.kwargs):
        return ReshapeRule(0)
    layout = _layout_rule(node, values, inputs, {}, out_numel)
    if layout is not None:
        return layout
    if target in _ADD_FUNCTIONS or target in _SUB_FUNCTIONS or target in (operator.neg, torch.neg, "neg"):
        return _sum_rule(node, values, inputs, out_numel)
    if _is_product(node):
        carried = [a for a in node.args if isinstance(a, fx.Node) and a in inputs]
        if len(carried) == 2:  # both factors carry a derivative (x * x included)
            return _product_rule(node, values, out_numel)
        return _scale_rule(node, values, x_node, out_numel)
    if target in (torch.cat, torch.concat):
        return _cat_rule(node, values, inputs, out_numel)
    if target is F.pad and node.args and node.args[0] is x_node:
        return _pad_rule(node, values, out_numel)
    if target is F.normalize and node.args and node.args[0] is x_node:
        return attention_rules.normalize_rule(node, x, out_numel)
    if target in attention_rules.MATMULS:
        return attention_rules.matmul_rule(node, values, inputs)
    if target is F.scaled_dot_product_attention:
        return attention_rules.attention_rule(node, values, inputs)
    axis_softmax = layer_rules.softmax_call(target, node.args, node.kwargs)
    if axis_softmax is not None and node.args[0] is x_node:
        return attention_rules.axis_softmax_rule(*axis_softmax, x, out_numel)
    if target in _REDUCTIONS and node.args and node.args[0] is x_node:
        return _reduction_rule(node, x, out_numel)
    return None


_REDUCTIONS = {torch.mean: True, "mean": True, torch.sum: False, "sum": False, F.adaptive_avg_pool2d: True,
               F.adaptive_avg_pool1d: True}


def _reduction_rule(node: fx.Node, x: torch.Tensor, out_numel) -> Optional[NodeRule]:
    """mean/sum over explicit per-sample axes (no dtype argument); adaptive average pooling to size 1."""
    mean = _REDUCTIONS[node.target]
    ndim = x.dim()
    if node.target in (F.adaptive_avg_pool2d, F.adaptive_avg_pool1d):
        spatial = 2 if node.target is F.adaptive_avg_pool2d else 1
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        sizes = size if isinstance(size, (tuple, list)) else (size,) * spatial
        if ndim < spatial + 2 or any(s != 1 for s in sizes) or len(sizes) != spatial:
            return None
        return ReductionRule(range(ndim - spatial, ndim), True, True, out_numel)
    kwargs = dict(node.kwargs)
    dims = node.args[1] if len(node.args) > 1 else kwargs.pop("dim", None)
    keepdim = node.args[2] if len(node.args) > 2 else kwargs.pop("keepdim", False)
    if dims is None or kwargs or len(node.args) > 3 or not isinstance(keepdim, bool):
        return None  # a reduction over every axis (the batch too), or a dtype argument
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not dims or not all(isinstance(d, int) for d in dims):
        return None
    dims = sorted({_normalize_dim(d, ndim) for d in dims})
    if 0 in dims:
        return None  # reduces over the batch axis: mixes samples
    return ReductionRule(dims, keepdim, mean, out_numel)


def _normalize_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _layout_rule(node: fx.Node, values, inputs, batch_axes: Dict[fx.Node, int], out_numel) -> Optional[NodeRule]:
    """permute / transpose and basic indexing, written against the layout their op sees (the batch axis
    where batch_axes says, else first), as maps of the batch-first blocks."""
    if len(inputs) != 1 or not node.args or node.args[0] is not inputs[0]:
        return None
    x_node = inputs[0]
    if not isinstance(values[x_node], torch.Tensor):
        return None  # a pick from a multi-output node
    ndim, x_axis, out_axis = values[x_node].dim(), batch_axes.get(x_node, 0), batch_axes.get(node, 0)
    if node.target in _PERMUTES:
        return _permute_rule(node, ndim, x_axis, out_axis, out_numel)
    if node.target is operator.getitem:
        return _index_rule(node.args[1], values, ndim, x_axis, out_numel)
    if node.target in ("roll", torch.roll, "flip", torch.flip) and out_axis == x_axis:
        return _shift_rule(node, values, ndim, x_axis, out_numel)
    return None


def _graph_nodes(argument) -> List[fx.Node]:
    found = []
    fx.node.map_arg(argument, found.append)
    return found


def _shape_arithmetic(argument, values) -> bool:
    """Whether every graph node in an argument is an integer computed from shapes and constants alone
    (_reads_no_samples): the same for every sample, so the map it parameterises is one per-sample map."""
    return all(isinstance(values[n], int) and not isinstance(values[n], bool) and _reads_no_samples(n)
               for n in _graph_nodes(argument))


def _shift_rule(node: fx.Node, values, ndim: int, x_axis: int, out_numel) -> Optional[NodeRule]:
    """roll(x, shifts, dims) with explicit dims (none: a roll of the flattened tensor, batch included) and
    flip(x, dims), over per-sample axes."""
    roll = node.target in ("roll", torch.roll)
    arguments = call_arguments(node, ("shifts", "dims") if roll else ("dims",))
    if arguments is None:
        return None
    as_list = lambda v: list(v) if isinstance(v, (tuple, list)) else [v]  # noqa: E731
    dims = as_list(arguments.get("dims"))
    shifts = as_list(arguments.get("shifts")) if roll else None
    if not all(isinstance(d, int) for d in dims) or (roll and (
            not all(isinstance(s, (int, fx.Node)) for s in shifts) or not _shape_arithmetic(shifts, values)
            or len(shifts) != len(dims))):
        return None
    dims = [_normalize_dim(d, ndim) for d in dims]
    if not dims or x_axis in dims:
        return None  # moves samples
    return ShiftRule([_batch_first_position(d, x_axis) + 1 for d in dims], shifts, out_numel)


def _layout_free_rule(gm, node: fx.Node, values, inputs, batch_axes: Dict[fx.Node, int]) -> Optional[NodeRule]:
    """Nodes whose rule does not care where the batch axis is, as long as it stays put: activations (elementwise)
    and a Linear over the last axis when the batch is not that axis (a time-major RNN's projections)."""
    if len(inputs) != 1 or not node.args or node.args[0] is not inputs[0]:
        return None
    x = values[inputs[0]]
    x_axis = batch_axes.get(inputs[0], 0)
    if batch_axes.get(node, 0) != x_axis:
        return None
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    if module is not None and layer_rules.rule_type(module) is nn.Linear:
        return None if x_axis == x.dim() - 1 else _linear_rule(module, tuple(x.shape[1:]))
    if values[node].shape != x.shape:
        return None
    features = math.prod(x.shape[1:])
    if module is not None:
        chain_rule = layer_rules.native_rule(module, tuple(x.shape[1:]))
        if chain_rule is None or chain_rule.layer in ("softmax", "log_softmax"):
            return None
        return ReshapeRule(0) if chain_rule.is_reshape else _activation_rule(chain_rule.layer, features)
    spec = layer_rules.functional_activation_spec(node.target, node.args, node.kwargs)
    return None if spec is None else _activation_rule(spec, features)


def _batch_first_position(axis: int, batch_axis: int) -> int:
    """Where an axis of a value whose batch axis is batch_axis lands once that axis is moved first."""
    return 0 if axis == batch_axis else axis + 1 if axis < batch_axis else axis


_SWAPS = {"transpose", torch.transpose, "swapaxes", torch.swapaxes, "swapdims", torch.swapdims}
_MOVES = {"movedim", torch.movedim, "moveaxis", torch.moveaxis}
_PERMUTES = _SWAPS | _MOVES | {"permute", torch.permute}


def _permute_rule(node: fx.Node, ndim: int, x_axis: int, out_axis: int, out_numel) -> Optional[NodeRule]:
    args, traced = node.args[1:], []
    fx.node.map_arg(args, traced.append)
    if traced or node.kwargs:  # an axis computed in the graph
        return None
    if node.target in _SWAPS:
        first, second = (_normalize_dim(d, ndim) for d in args)
        permutation = list(range(ndim))
        permutation[first], permutation[second] = second, first
    elif node.target in _MOVES:
        # Output axis k is input axis permutation[k]: read off a meta tensor whose sizes name its axes.
        moved = torch.empty([axis + 2 for axis in range(ndim)], device="meta").movedim(*args)
        permutation = [size - 2 for size in moved.shape]
    else:
        dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        permutation = [_normalize_dim(d, ndim) for d in dims]
    if len(permutation) != ndim or permutation[out_axis] != x_axis:
        return None  # the probe says otherwise: leave the node to the fallback
    # Output axis m of the batch-first output is axis order[m] of the op's output, i.e. axis
    # permutation[order[m]] of the op's input, which sits at _batch_first_position(...) of the stored input.
    order = [out_axis] + [axis for axis in range(ndim) if axis != out_axis]
    return PermuteRule([_batch_first_position(permutation[m], x_axis) for m in order], out_numel)


def _index_rule(index, values, ndim: int, x_axis: int, out_numel) -> Optional[NodeRule]:
    """Integers, slices (their bounds constants or computed from shapes), None and one Ellipsis, the batch axis
    taken whole: the same index on the block, whose rows axis is taken whole too."""
    parts = index if isinstance(index, tuple) else (index,)
    if any(isinstance(p, bool) or not isinstance(p, (int, slice)) and p is not Ellipsis and p is not None
           for p in parts) or parts.count(Ellipsis) > 1:
        return None  # advanced indexing, a computed index: fallback
    if not _shape_arithmetic(parts, values):
        return None
    consumed = sum(p is not None and p is not Ellipsis for p in parts)  # input axes the index names
    if consumed > ndim:
        return None
    at = parts.index(Ellipsis) if Ellipsis in parts else len(parts)  # trailing axes: an implicit Ellipsis
    parts = parts[:at] + (slice(None),) * (ndim - consumed) + parts[at + 1:]
    axis_of_part = [None] * len(parts)  # which input axis each part indexes (None inserts one)
    axis = 0
    for position, part in enumerate(parts):
        if part is not None:
            axis_of_part[position], axis = axis, axis + 1
    batch_part = axis_of_part.index(x_axis)
    if parts[batch_part] != slice(None):
        return None  # indexes the batch axis
    if any(p is None for p in parts[:batch_part]):
        return None  # a new axis ahead of the batch: the output's batch axis moves; leave it to the fallback
    per_sample = parts[:batch_part] + parts[batch_part + 1:]
    return IndexRule((slice(None), slice(None), *per_sample), out_numel)


_SPLITS = {"unbind": 1, torch.unbind: 1, "chunk": 2, torch.chunk: 2, "split": 2, torch.split: 2,
           "tensor_split": 2, torch.tensor_split: 2}  # each producer's position of its dim argument


def _split_pick_rule(node: fx.Node, values, carries, batch_axes: Dict[fx.Node, int],
                     out_numel) -> Optional[Tuple[NodeRule, List]]:
    """A part of x picked from unbind / chunk / split / tensor_split along a per-sample axis (q, k, v =
    qkv.unbind(0); shufflenet's x.chunk(2, dim=1)): an index of x's block, the part's offset and size read
    from the probe (they do not depend on the batch size)."""
    producer, pick = node.args
    if not (isinstance(producer, fx.Node) and isinstance(pick, int) and producer.op in ("call_function", "call_method")
            and producer.target in _SPLITS and isinstance(values[producer], (tuple, list))):
        return None
    x_node = producer.args[0] if producer.args else None
    if not (isinstance(x_node, fx.Node) and carries.get(x_node, False) and isinstance(values[x_node], torch.Tensor)):
        return None
    dim_position = _SPLITS[producer.target]
    if set(producer.kwargs) - {"dim"} or len(producer.args) > dim_position + 1:
        return None
    dim = producer.args[dim_position] if len(producer.args) > dim_position else producer.kwargs.get("dim", 0)
    if not isinstance(dim, int):
        return None
    parts = values[producer]
    ndim, x_axis = values[x_node].dim(), batch_axes.get(x_node, 0)
    dim = _normalize_dim(dim, ndim)
    if dim == x_axis or not -len(parts) <= pick < len(parts):
        return None
    pick %= len(parts)
    position = _batch_first_position(dim, x_axis)
    if producer.target in ("unbind", torch.unbind):
        index = pick
    else:
        offset = sum(part.shape[dim] for part in parts[:pick])
        index = slice(offset, offset + parts[pick].shape[dim])
    return IndexRule((slice(None),) * (position + 1) + (index,), out_numel), [x_node]


# Each selection's target, and whether it is gather (True) or index_select (False).
_SELECTIONS = {torch.gather: True, "gather": True, torch.index_select: False, "index_select": False}
_ARG_EXTREMA = {torch.argmax, "argmax", torch.argmin, "argmin"}


def _selection_rule(node: fx.Node, values, inputs, carries, batch_axes, out_numel) -> Optional[NodeRule]:
    """gather / index_select of the one carried value along a per-sample axis, with an index that cannot carry
    samples into one another: computed without reading any sample (_reads_no_samples) or argmax / argmin over a
    per-sample axis of a value the probe checked (_per_sample_extremum). Any other index and the batch axis are
    left to the fallback (rule_for sends a node whose batch axis moved to the layout rules, which have none)."""
    if node.op not in ("call_function", "call_method") or node.target not in _SELECTIONS or len(inputs) != 1:
        return None
    gather = _SELECTIONS[node.target]
    if not node.args or node.args[0] is not inputs[0]:
        return None
    arguments = call_arguments(node, ("dim", "index", "sparse_grad") if gather else ("dim", "index"))
    if arguments is None:
        return None
    dim, index = arguments.get("dim"), arguments.get("index")
    if (arguments.get("sparse_grad", False) is not False or not isinstance(dim, int) or isinstance(dim, bool)
            or not isinstance(index, fx.Node)):
        return None
    dim = _normalize_dim(dim, values[inputs[0]].dim())
    if dim == 0:
        return None  # selects samples
    if not (_reads_no_samples(index) or _per_sample_extremum(index, values, carries, batch_axes)):
        return None
    return SelectionRule(gather, dim, index, _program_index(index, values, gather), out_numel)


def _reads_no_samples(node: fx.Node) -> bool:
    """Whether a value is computed from parameters, buffers and constants alone, reading at most the input's
    shape (x.size(0), x.shape): the same for every sample, a constant of the derivative."""
    pending, seen = [node], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "placeholder":
            return False
        if _is_shape_query(current):
            continue
        pending += current.all_input_nodes
    return True


def _is_shape_query(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in ("size", "dim")
            or node.op == "call_function" and node.target is getattr and len(node.args) == 2
            and node.args[1] in ("shape", "ndim", "dtype", "device"))


def _per_sample_extremum(node: fx.Node, values, carries, batch_axes) -> bool:
    """argmax / argmin(v, dim, keepdim=True) over a per-sample axis of a batch-first value v that the probe
    checked maps samples on their own (a carried value): per-sample indices, piecewise constant in x."""
    if node.op not in ("call_function", "call_method") or node.target not in _ARG_EXTREMA or not node.args:
        return False
    arguments = call_arguments(node, ("dim", "keepdim"))
    if arguments is None:
        return False
    source, dim = node.args[0], arguments.get("dim")
    if not (isinstance(source, fx.Node) and carries.get(source, False) and source not in batch_axes
            and isinstance(values[source], torch.Tensor) and isinstance(dim, int) and not isinstance(dim, bool)
            and arguments.get("keepdim") is True):
        return False
    return _normalize_dim(dim, values[source].dim()) != 0


def _program_index(index: fx.Node, values, gather: bool) -> Optional[fx.Node]:
    """The parameter or buffer (get_attr) a program reads the index from: the index itself, or for gather the
    batch-1 tensor the model expands over the batch (expand / expand_as changing nothing else); None otherwise."""
    if index.op == "get_attr":
        return index
    if not gather or index.op != "call_method" or index.target not in ("expand", "expand_as"):
        return None
    source = index.args[0]
    if not (isinstance(source, fx.Node) and source.op == "get_attr"
            and isinstance(values.get(source), torch.Tensor)):
        return None
    base, expanded = values[source], values[index]
    if base.dim() != expanded.dim() or base.shape[0] != 1 or base.shape[1:] != expanded.shape[1:]:
        return None
    return source


def _sum_rule(node: fx.Node, values, inputs, out_numel) -> Optional[NodeRule]:
    out_shape = values[node].shape
    if node.kwargs or len(node.args) > 2 or any(values[i].shape != out_shape for i in inputs):
        return None  # alpha, or an input broadcast to a larger shape: fallback
    negate = node.target in (operator.neg, torch.neg, "neg")
    subtract = node.target in _SUB_FUNCTIONS or node.target == "sub"
    position_sign = [-1.0] if negate else [1.0, -1.0 if subtract else 1.0]
    coefficients = {i: 0.0 for i in inputs}
    for position, arg in enumerate(node.args):
        if isinstance(arg, fx.Node) and arg in coefficients:
            coefficients[arg] += position_sign[position]
    if any(i not in node.args for i in inputs):
        return None  # a derivative-carrying input hidden inside another argument
    return SumRule([coefficients[i] for i in inputs], out_numel)


def _scale_rule(node: fx.Node, values, x_node, out_numel) -> Optional[NodeRule]:
    if len(node.args) != 2 or node.kwargs:
        return None
    first, second = node.args
    divide = node.target in _DIV_FUNCTIONS or node.target == "div"
    if divide and first is not x_node:
        return None  # c / x is not linear in x
    constant = second if first is x_node else first
    if constant is x_node:
        return None  # x * x
    constant_value = values[constant] if isinstance(constant, fx.Node) else constant
    if values[node].shape != values[x_node].shape:
        return None
    if isinstance(constant_value, torch.Tensor) and constant_value.dim() > values[x_node].dim():
        return None

    return ScaleRule(constant, divide, out_numel)


def _product_rule(node: fx.Node, values, out_numel) -> Optional[NodeRule]:
    """a * b or a / b of two carried values with the same number of axes (broadcasting over per-sample axes,
    e.g. squeeze-excitation's [B, C, 1, 1] gate times [B, C, H, W])."""
    if len(node.args) != 2 or node.kwargs:
        return None
    first, second = node.args
    if values[first].dim() != values[second].dim():
        return None  # broadcasting would align a batch axis with a feature axis
    return ProductRule(first, second, node.target in _DIV_FUNCTIONS or node.target == "div", 3 * out_numel)


def _pad_rule(node: fx.Node, values, out_numel) -> Optional[NodeRule]:
    """F.pad(x, pad, "constant", value) over per-sample axes, the amounts constants or computed from shapes."""
    arguments = call_arguments(node, ("pad", "mode", "value"))
    if arguments is None:
        return None
    pad = arguments.get("pad")
    if arguments.get("mode", "constant") != "constant" or not isinstance(pad, (tuple, list)) or len(pad) % 2:
        return None  # the other modes fill the padding with copies of the input, not a constant
    if len(pad) // 2 >= values[node.args[0]].dim():
        return None  # pads the batch axis
    if not all(isinstance(p, (int, fx.Node)) and not isinstance(p, bool) for p in pad) or not _shape_arithmetic(pad, values):
        return None
    return PadRule(pad, out_numel)


def _cat_rule(node: fx.Node, values, inputs, out_numel) -> Optional[NodeRule]:
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or isinstance(dim, fx.Node):
        return None
    ndim = values[node].dim()
    dim = _normalize_dim(dim, ndim)
    if dim == 0:
        return None
    parts = [t if isinstance(t, fx.Node) and t in inputs else None for t in tensors]
    return CatRule(dim + 1, parts, out_numel)
