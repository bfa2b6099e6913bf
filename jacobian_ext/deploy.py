"""The Jacobian as one operator call, for the deployment paths that trace or script the module:
torch.compile, torch.export (and AOTInductor) and TorchScript.

Those paths cannot run our planner (probe forwards, Python objects, per-batch mode decisions) inside the
traced graph. A model whose layers all have fused rules needs none of it at run time: its Jacobian is
`torch.ops.jacext.batch_jacobian(x, layers, params, mode)` with a layer encoding that depends only on the
per-sample input shape. That encoding is computed once, outside the trace, and the graph holds the single
op call. Any model whose nodes all have native rules qualifies, however it is written: a chain plan
(fusion.py) encodes as its layer names, a graph plan as a graph program (GraphPlan.native_program, grammar
in csrc/graph.cpp); models with a fallback node are not traceable this way and say which nodes.
"""
import operator
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from .cost import choose_mode
from .plan import NATIVE_DTYPES, Plan

# The batch size at which mode="auto" is resolved for a traced graph, which must serve every batch size:
# per-sample work dominates from a few samples on, so the choice holds for any batch but the tiniest.
TRACE_BATCH = 1024


@dataclass(frozen=True)
class FusedEncoding:
    """What the traced graph needs: the op's layer encoding, where each parameter lives in the model
    (dotted attribute names, read at every call), the per-sample shapes and the resolved mode."""

    layers: Tuple[str, ...]
    param_names: Tuple[str, ...]  # "" where `computed` has the tensor
    input_shape: Tuple[int, ...]
    output_shape: Tuple[int, ...]
    mode: str
    # (position in params, getter): constants computed from parameters and shapes (index_rules.constant_getter),
    # recomputed at every call, so that a traced graph computes them from the parameters it reads
    computed: Tuple[Tuple[int, Callable], ...] = ()


def fused_encoding(plan, root: nn.Module, mode: str) -> FusedEncoding:
    """The single-op encoding of a planned model (`root`: the module whose parameters and buffers the plan
    reads), or NotImplementedError naming what keeps it off the single-op path."""
    if plan.dtype not in NATIVE_DTYPES:
        raise NotImplementedError(f"the single-op path runs float32 and float64, got {plan.dtype}")
    if isinstance(plan, Plan):
        if not plan.all_native:
            raise NotImplementedError(
                f"layers {plan.fallbacks} have no fused rule, so the Jacobian is not one operator call and "
                "cannot be traced or scripted; call the JacobianModule eagerly instead")
        layers, params, computed = list(plan.native_layers), plan.native_params(), ()
        # One op call runs one sweep: where the cost model would split the chain, the cheaper sweep.
        chosen = plan.choose_mode(TRACE_BATCH, mode)
        sweep = chosen if isinstance(chosen, str) else choose_mode(plan.decisions[TRACE_BATCH][1])
    else:
        program = plan.native_program()
        if program is None:
            raise NotImplementedError(
                "torch.compile, torch.export and TorchScript run the Jacobian as one operator call, which needs "
                f"every node of the model to have a native rule with an op encoding; nodes {plan.unencoded} have none "
                "(a torch.func fallback, or a native rule that runs on the Python walker only). Call the "
                "JacobianModule eagerly (the native parts still run as op calls), or compute the Jacobian "
                "outside the traced code")
        layers, params = program[0], [get() for get in program[1]]
        computed = tuple((i, get) for i, get in enumerate(program[1]) if getattr(get, "computed_constant", False))
        sweep = plan.choose_mode(TRACE_BATCH, mode)
    where = {id(t): name for name, t in (*root.named_parameters(remove_duplicate=False),
                                         *root.named_buffers(remove_duplicate=False))}
    positions = {i for i, _ in computed}
    if any(id(p) not in where and i not in positions for i, p in enumerate(params)):
        raise NotImplementedError("a native layer's tensor is not a parameter or buffer of the model, so the "
                                  "traced graph could not read it at call time")
    return FusedEncoding(tuple(layers), tuple("" if i in positions else where[id(p)] for i, p in enumerate(params)),
                         tuple(plan.input_shape), tuple(plan.output_shape), sweep, computed)


def call_fused(encoding: FusedEncoding, params: List[torch.Tensor], x: torch.Tensor):
    """(y [B, *out], J [B, *out, *in]) through the single op."""
    output, jacobian = torch.ops.jacext.batch_jacobian(x, list(encoding.layers), params, encoding.mode)
    batch = x.shape[0]
    return output.reshape(batch, *encoding.output_shape), jacobian.reshape(batch, *encoding.output_shape,
                                                                            *encoding.input_shape)


def read_params(model: nn.Module, encoding: FusedEncoding) -> List[torch.Tensor]:
    if encoding.computed and torch.compiler.is_dynamo_compiling():
        # dynamo cannot trace the getters (they run fx nodes through the plan's evaluator); export's default,
        # non-strict tracing runs them as Python and records their ops
        raise NotImplementedError("the program holds constants computed in the forward from parameters and shapes "
                                  "(swin's relative position bias and mask), which torch.compile cannot trace yet; "
                                  "torch.export can, and eager calls run them as one op call")
    computed = dict(encoding.computed)
    return [computed[i]() if i in computed else operator.attrgetter(name)(model)
            for i, name in enumerate(encoding.param_names)]


class ScriptableJacobian(nn.Module):
    """What torch.jit.script(jx.compile(model)) compiles: the single op call with its encoding as
    constants. Holds the model's parameters (the same tensors), so it saves and loads on its own."""

    def __init__(self, encoding: FusedEncoding, params: List[torch.Tensor]):
        super().__init__()
        if encoding.computed:
            raise NotImplementedError("the program holds constants computed in the forward from parameters and "
                                      "shapes (swin's relative position bias and mask), which TorchScript cannot "
                                      "recompute at every call; torch.export and torch.compile can")
        self.layers: List[str] = list(encoding.layers)
        self.mode: str = encoding.mode
        self.input_shape: List[int] = list(encoding.input_shape)
        self.output_shape: List[int] = list(encoding.output_shape)
        # Buffers (batch-norm statistics) travel as parameters that require no gradient.
        self.params = nn.ParameterList([p if isinstance(p, nn.Parameter) else nn.Parameter(p, requires_grad=False)
                                        for p in params])

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if x.dim() < 2 or list(x.shape[1:]) != self.input_shape:
            raise ValueError(f"x must be [B, {self.input_shape}], got {x.shape}")
        params: List[torch.Tensor] = [p for p in self.params]
        output, jacobian = torch.ops.jacext.batch_jacobian(x, self.layers, params, self.mode)
        batch = x.shape[0]
        return output.reshape([batch] + self.output_shape), jacobian.reshape([batch] + self.output_shape
                                                                              + self.input_shape)


def fixed_input_shape(captured) -> Optional[Tuple[int, ...]]:
    """The per-sample input shape a captured model fixes by itself: that of an nn.Linear applied directly
    to the model input; None when the model fixes none."""
    gm, _ = captured
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            users = [user for user in node.users if user.op == "call_module"]
            for user in users:
                if type(modules[user.target]) is nn.Linear and user.args[:1] == (node,):
                    return (modules[user.target].weight.shape[1],)
            break
    return None
