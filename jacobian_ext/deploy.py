"""The Jacobian as one operator call, for the deployment paths that trace or script the module:
torch.compile, torch.export (and AOTInductor) and TorchScript.

Those paths cannot run our planner (probe forwards, Python objects, per-batch mode decisions) inside the
traced graph. A model whose layers all have fused rules needs none of it at run time: its Jacobian is
`torch.ops.jacext.batch_jacobian(x, layers, params, mode)` with a layer encoding that depends only on the
per-sample input shape. That encoding is computed once, outside the trace, and the graph holds the single
op call. Models that need graph capture or the fallback are not traceable this way and say so.
"""
import operator
from dataclasses import dataclass
from typing import List, Tuple

import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

from .cost import choose_mode
from .plan import NATIVE_DTYPES, build_plan, flatten_sequential
from .rules import has_native_rule

# The batch size at which mode="auto" is resolved for a traced graph, which must serve every batch size:
# per-sample work dominates from a few samples on, so the choice holds for any batch but the tiniest.
TRACE_BATCH = 1024


@dataclass(frozen=True)
class FusedEncoding:
    """What the traced graph needs: the op's layer encoding, where each parameter lives in the model
    (dotted attribute names, read at every call), the per-sample shapes and the resolved mode."""

    layers: Tuple[str, ...]
    param_names: Tuple[str, ...]
    input_shape: Tuple[int, ...]
    output_shape: Tuple[int, ...]
    mode: str


def check_layer_types(model) -> bool:
    """NotImplementedError unless `model` is an nn.Sequential of layer types with fused rules (the check
    that needs no input shape); True otherwise."""
    if type(model) is not nn.Sequential:
        raise NotImplementedError(
            f"torch.compile, torch.export and TorchScript run the Jacobian as one operator call, which needs an "
            f"nn.Sequential whose layers all have fused rules; got a {type(model).__name__}. Call the "
            "JacobianModule eagerly, or compute its Jacobian outside the traced code")
    unfused = [name for name, layer in flatten_sequential(model) if not has_native_rule(layer)]
    if unfused:
        raise NotImplementedError(f"layers {unfused} have no fused rule, so the Jacobian is not one operator call "
                                  "and cannot be traced or scripted; call the JacobianModule eagerly instead")
    return True


def fused_encoding(model, input_shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device,
                   mode: str) -> FusedEncoding:
    """The encoding of `model` for per-sample inputs of `input_shape`, or NotImplementedError naming what
    keeps it off the single-op path."""
    check_layer_types(model)
    if dtype not in NATIVE_DTYPES:
        raise NotImplementedError(f"the single-op path runs float32 and float64, got {dtype}")
    # Under torch.export this runs inside the trace: the probe forward, and the grad-mode switch around it,
    # must not be recorded into the exported graph.
    with disable_proxy_modes_tracing(), torch._C.DisableTorchFunction():
        plan = build_plan(model, torch.zeros((1, *input_shape), dtype=dtype, device=device))
    if not plan.all_native:
        raise NotImplementedError(
            f"layers {plan.fallbacks} have no fused rule, so the Jacobian is not one operator call and "
            "cannot be traced or scripted; call the JacobianModule eagerly instead")
    where = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    params = plan.native_params()
    if any(id(p) not in where for p in params):
        raise NotImplementedError("a fused layer's weight is not an nn.Parameter of the model, so the traced "
                                  "graph could not read it at call time")
    # One op call runs one sweep: where the cost model would split the chain, the cheaper sweep.
    chosen = plan.choose_mode(TRACE_BATCH, mode)
    sweep = chosen if isinstance(chosen, str) else choose_mode(plan.decisions[TRACE_BATCH][1])
    return FusedEncoding(tuple(plan.native_layers), tuple(where[id(p)] for p in params), tuple(input_shape),
                         tuple(plan.output_shape), sweep)


def call_fused(encoding: FusedEncoding, params: List[torch.Tensor], x: torch.Tensor):
    """(y [B, *out], J [B, *out, *in]) through the single op."""
    output, jacobian = torch.ops.jacext.batch_jacobian(x, list(encoding.layers), params, encoding.mode)
    batch = x.shape[0]
    return output.reshape(batch, *encoding.output_shape), jacobian.reshape(batch, *encoding.output_shape,
                                                                            *encoding.input_shape)


def read_params(model: nn.Module, encoding: FusedEncoding) -> List[torch.Tensor]:
    return [operator.attrgetter(name)(model) for name in encoding.param_names]


class ScriptableJacobian(nn.Module):
    """What torch.jit.script(jx.compile(model)) compiles: the single op call with its encoding as
    constants. Holds the model's parameters (the same tensors), so it saves and loads on its own."""

    def __init__(self, encoding: FusedEncoding, params: List[torch.Tensor]):
        super().__init__()
        self.layers: List[str] = list(encoding.layers)
        self.mode: str = encoding.mode
        self.input_shape: List[int] = list(encoding.input_shape)
        self.output_shape: List[int] = list(encoding.output_shape)
        self.params = nn.ParameterList(params)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if x.dim() < 2 or list(x.shape[1:]) != self.input_shape:
            raise ValueError(f"x must be [B, {self.input_shape}], got {x.shape}")
        params: List[torch.Tensor] = [p for p in self.params]
        output, jacobian = torch.ops.jacext.batch_jacobian(x, self.layers, params, self.mode)
        batch = x.shape[0]
        return output.reshape([batch] + self.output_shape), jacobian.reshape([batch] + self.output_shape
                                                                              + self.input_shape)


def scripting_input_shape(model, last_plan) -> Tuple[int, ...]:
    """The per-sample input shape to script for: that of the last call, or a first Linear's width."""
    if last_plan is not None:
        return tuple(last_plan.input_shape)
    check_layer_types(model)
    layers = flatten_sequential(model)
    if layers and isinstance(layers[0][1], nn.Linear):
        return (layers[0][1].weight.shape[1],)
    raise ValueError("torch.jit.script needs the per-sample input shape, which this model does not fix: call the "
                     "JacobianModule once on an example input first")
