"""Native ops over a node's features: the chain layers (Linear, activations, softmax) over the flattened
per-sample features [B, H] (FeatureOpRule, what the fusion pass merges into chains), nn.Linear over the last axis
of token-shaped inputs, and the N-d ops (convolution, batch norm, pooling; norms in norm_rules.py) that take
blocks with their per-sample shape (NdOpRule)."""
import math
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from . import ops
from . import rules as layer_rules
from .program import entry
from . import spatial_rules
from .blocks import IDENTITY, NodeRule, explicit_block
from .rules import tensor_getter


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


def linear_rule(module: nn.Linear, input_shape) -> NodeRule:
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


def activation_rule(spec: str, features: int) -> NodeRule:
    return FeatureOpRule(
        spec,
        lambda x, jac: ops.pointwise_jac_forward(x, jac, spec),
        lambda x, out, cot: ops.pointwise_jac_reverse(x, cot, spec),
        needs_output=False,
        work_per_row=features,
        layers_of=lambda: ([spec], []),
    )


def softmax_rule(log: bool, features: int) -> NodeRule:
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


def spatial_rule(module: nn.Module, input_shape, out_numel: int) -> Optional[NodeRule]:
    call = spatial_rules.native_call(module, input_shape)
    if call is None:
        return None
    work = out_numel
    if call.op == "conv":  # multiply-adds per output element: in_channels / groups x kernel volume
        work *= module.in_channels // module.groups * math.prod(module.kernel_size)
    elif call.op in ("max_pool2d", "avg_pool2d"):
        work *= math.prod(call.params["kernel_size"])
    return NdOpRule(module, input_shape, spatial_rules.native_call, call.op, work)
