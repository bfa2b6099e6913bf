"""Runs a plan: the whole-plan operator when every layer is native, otherwise one sweep over the
segments, native segments through the C++ segment operators and fallback segments through torch.func;
a split bracketing runs each of its parts so, and joins them with batched GEMMs."""
from typing import Tuple, Union

import torch

from . import fallback, ops
from .cost import Bracketing
from .graph import GraphPlan
from .plan import Plan, flat_samples


def run_plan(plan: Plan, x: torch.Tensor, mode: Union[str, Bracketing]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y [B, *out], J [B, *out, *in]) for a resolved mode ("forward", "reverse" or a split Bracketing)."""
    batch = x.shape[0]
    if isinstance(mode, Bracketing):
        return _run_bracketing(plan, x, mode)
    if isinstance(plan, GraphPlan):
        if batch == 0:
            return (x.new_empty(0, *plan.output_shape, dtype=plan.dtype),
                    x.new_empty(0, *plan.output_shape, *plan.input_shape, dtype=plan.dtype))
        return plan.run(x, mode)
    if plan.all_native:
        output, jacobian = ops.batch_jacobian(x, plan.native_layers, plan.native_params(), mode)
        if len(plan.output_shape) == 1:  # already [B, C] and [B, C, *in_shape]
            return output, jacobian
    elif batch == 0:
        output = x.new_empty(0, plan.out_features)
        jacobian = x.new_empty(0, plan.out_features, plan.in_features)
    elif mode == "forward":
        output, jacobian = _forward_sweep(plan, x)
    else:
        output, jacobian = _reverse_sweep(plan, x)
    return (
        output.reshape(batch, *plan.output_shape),
        jacobian.reshape(batch, *plan.output_shape, *plan.input_shape),
    )


def _forward_sweep(plan: Plan, x: torch.Tensor):
    batch = x.shape[0]
    hidden, jac = x, None  # jac: [B, H, D]; None is the identity
    for segment in plan.segments:
        if not segment.native:
            hidden, jac = fallback.forward_rule(segment.apply, hidden, jac)
        elif segment.layers:
            flat_output, jac = ops.sequential_jac_forward(
                flat_samples(hidden), jac, segment.layers, segment.params()
            )
            hidden = flat_output.reshape(batch, *segment.output_shape)
        else:
            hidden = hidden.reshape(batch, *segment.output_shape)
    return hidden, jac.contiguous()


def _reverse_sweep(plan: Plan, x: torch.Tensor):
    inputs, hidden = [], x
    for segment in plan.segments:
        inputs.append(hidden)
        hidden = segment.apply(hidden)
    cotangent = None  # [B, C, H]; None is the identity
    for segment, segment_input in zip(reversed(plan.segments), reversed(inputs)):
        if not segment.native:
            cotangent = fallback.reverse_rule(segment.apply, segment_input, cotangent, segment.output_shape)
        elif segment.layers:
            _, cotangent = ops.sequential_jac_reverse(
                flat_samples(segment_input), cotangent, segment.layers, segment.params()
            )
    return hidden, cotangent


def _run_bracketing(plan: Plan, x: torch.Tensor, bracketing: Bracketing):
    """Each sweep of the bracketing on its own part of the chain, in input order (a part's output is the
    next part's input), then the parts' Jacobians multiplied out as the bracketing nests them."""
    batch = x.shape[0]
    hidden, parts = x, {}
    for sweep in bracketing.sweeps():
        part = plan.part(sweep.start, sweep.stop)
        hidden, jacobian = run_plan(part, hidden, sweep.mode)
        parts[sweep.start] = jacobian.reshape(batch, part.out_features, part.in_features)

    def multiplied_out(node: Bracketing) -> torch.Tensor:
        if node.is_sweep:
            return parts[node.start]
        return torch.matmul(multiplied_out(node.later), multiplied_out(node.earlier))

    return hidden, multiplied_out(bracketing).reshape(batch, *plan.output_shape, *plan.input_shape)
