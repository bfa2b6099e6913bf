"""Public API: batch_jacobian, compile and JacobianModule."""
import operator
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from . import deploy
from .cost import Bracketing
from .differentiable import differentiable_call, needs_grad
from .errors import GraphCaptureError
from .graph import build_graph_plan, capture, warn_whole_model_fallback
from .graph_rules import prefers_graph
from .memory import parse_max_memory, run_within_budget
from .plan import NATIVE_DTYPES, Plan, build_plan, flatten_sequential, short_repr
from .rules import has_native_rule

MODES = ("auto", "forward", "reverse", "mixed")
# Modules whose training-mode output couples or randomises samples: no per-sample Jacobian exists.
_BATCH_COUPLED = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


def batch_jacobian(model: Callable, x: torch.Tensor, mode: str = "auto", return_output: bool = False,
                   max_memory=None):
    """Per-sample Jacobian J[b, *o, *i] = d model(x)[b, *o] / d x[b, *i], shape [B, *out_shape, *in_shape].

    model: an nn.Module or callable mapping [B, *in_shape] to [B, *out_shape], samples independent.
    mode: "auto" (cost model), "forward" (propagate [B, H, D] from the input), "reverse" (propagate
    [B, C, H] from the output) or "mixed" (the bracketing of the per-sample chain product with the fewest
    multiply-adds: sweeps over parts of an nn.Sequential joined by batched GEMMs; on the graph path, the
    cheaper sweep). "auto" runs "mixed"'s split when it saves enough, else the cheaper sweep. With
    return_output=True returns (model(x), J).
    max_memory: bytes (int) or a size string ("2GB", "512MiB"); a batch whose estimated need exceeds it
    (default: half the available RAM, or of the free CUDA memory) runs in chunks, with the same result
    up to rounding; MemoryError when y and J plus one sample's working memory do not fit (memory.py).
    The plan is rebuilt on every call; use jacobian_ext.compile(model) to reuse it.
    """
    output, jacobian = JacobianModule(model, mode=mode, max_memory=max_memory)(x)
    return (output, jacobian) if return_output else jacobian


def compile(model: Callable, mode: str = "auto", max_memory=None) -> "JacobianModule":
    """A module whose call jm(x) returns (model(x), J), caching the plan per input shape, dtype and device.
    Parameters are read at every call; a replaced layer, or a parameter of another shape, dtype or device,
    is detected and the plan rebuilt. max_memory: as in batch_jacobian."""
    return JacobianModule(model, mode=mode, max_memory=max_memory)


class JacobianModule(nn.Module):
    """jm(x) -> (y, J) for a wrapped model; see batch_jacobian. print(jm) shows every layer with its
    path (native rule or torch.func fallback) and the accumulation order chosen."""

    def __init__(self, model: Callable, mode: str = "auto", max_memory=None):
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be an nn.Module or a callable, got {type(model).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(repr(m) for m in MODES)}; got {mode!r}")
        self.model = model
        self.mode = mode
        self.max_memory = parse_max_memory(max_memory)
        self._layout = None  # the model's structure the plans were built for (see _forget_stale_plans)
        self._plans: Dict[tuple, Plan] = {}
        # Plain attribute holders: nn.Module.__setattr__ is slow on the per-call path, and the captured
        # graph module must not become a submodule (it would duplicate the model's parameters).
        self._last = {"plan": None}
        self._capture = {}
        self._encodings = {}  # input signature -> deploy.FusedEncoding, for traced calls

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        _check_input(x)
        if torch.compiler.is_compiling():  # torch.compile or torch.export tracing this call
            self._check_layer_types()
            encoding = self._fused_encoding(self._traced_input_shape(x), x.dtype, x.device)
            return deploy.call_fused(encoding, deploy.read_params(self.model, encoding), x)
        self._forget_stale_plans()
        self._check_eval_mode()
        plan = self.plan_for(x)
        self._last["plan"] = plan
        mode = plan.choose_mode(x.shape[0], self.mode)
        # The fused op has its own backward; every other plan gets torch.func's gradients this way.
        if not getattr(plan, "all_native", False) and needs_grad(self.model, x):
            return differentiable_call(lambda inputs: run_within_budget(plan, inputs, mode, self.max_memory),
                                       self.model, x)
        return run_within_budget(plan, x, mode, self.max_memory)

    def _traced_input_shape(self, x: torch.Tensor) -> Tuple[int, ...]:
        """x's per-sample shape as plain ints. torch.compile marks a dimension dynamic once the forward code,
        which every JacobianModule shares, has met two sizes of it, even in two modules of different widths:
        symbolic feature sizes are then matched against this model's known input shapes, which specialises
        them (with a guard) to constants."""
        shape = tuple(x.shape[1:])
        for known in self._known_input_shapes():
            if len(known) == len(shape) and all(size == expected for size, expected in zip(shape, known)):
                return known
        return shape

    def _known_input_shapes(self) -> List[Tuple[int, ...]]:
        shapes = [key[0] for key in self._encodings] + [key[0] for key in self._plans]
        try:
            shapes.append(deploy.scripting_input_shape(self.model, None))
        except ValueError:  # the model does not fix its input shape
            pass
        return shapes

    @torch.compiler.assume_constant_result
    def _check_layer_types(self) -> bool:
        """Raises, at trace time, for a model that is off the single-op path whatever its input shape."""
        return deploy.check_layer_types(self.model)

    @torch.compiler.assume_constant_result
    def _fused_encoding(self, input_shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device):
        """The single-op encoding for a traced call, computed eagerly once per input signature: the tracer
        treats the result as a constant, so the graph holds one op call and no planning."""
        key = (input_shape, dtype, device)
        if key not in self._encodings:
            self._forget_stale_plans()
            self._check_eval_mode()
            self._encodings[key] = deploy.fused_encoding(self.model, input_shape, dtype, device, self.mode)
        return self._encodings[key]

    def __prepare_scriptable__(self):
        """torch.jit.script(jm) scripts the single op call (see deploy.ScriptableJacobian)."""
        self._forget_stale_plans()
        self._check_eval_mode()
        plan = self._last["plan"]
        input_shape = deploy.scripting_input_shape(self.model, plan)
        parameter = next(self.model.parameters(), None) if isinstance(self.model, nn.Module) else None
        dtype = plan.dtype if plan is not None else getattr(parameter, "dtype", torch.float32)
        device = plan.device if plan is not None else getattr(parameter, "device", torch.device("cpu"))
        encoding = deploy.fused_encoding(self.model, input_shape, dtype, device, self.mode)
        return deploy.ScriptableJacobian(encoding, deploy.read_params(self.model, encoding))

    def _forget_stale_plans(self):
        """Plans capture the layers and the parameter shapes: after a layer is replaced, or a parameter
        or buffer changes shape, dtype or device, they are rebuilt on this call, never reused. (New
        values need nothing: parameters are read on every call.)"""
        layout = _layout(self.model)
        if not _same_layout(self._layout, layout):
            self._layout = layout
            self._plans.clear()
            self._capture.clear()
            self._encodings.clear()
            self._coupled_modules = (
                [(n, m) for n, m in self.model.named_modules() if isinstance(m, _BATCH_COUPLED)]
                if isinstance(self.model, nn.Module)
                else []
            )

    def plan_for(self, x: torch.Tensor) -> Plan:
        """The plan for inputs shaped like x (built on first use, with one probe forward)."""
        key = (tuple(x.shape[1:]), x.dtype, x.device)
        plan = self._plans.get(key)
        if plan is None:
            _check_parameters(self.model, x)
            plan = self._plans[key] = self._build_plan(x)
        return plan

    def _build_plan(self, x: torch.Tensor):
        """An nn.Sequential whose layers all run on the fused ops (or have no native rule anywhere)
        keeps the segment plan; every other model is captured as a graph, and a model that cannot be
        captured runs whole on the fallback, with a warning that says why."""
        if type(self.model) is nn.Sequential and not any(prefers_graph(m) for _, m in flatten_sequential(self.model)):
            return build_plan(self.model, x)
        if x.dtype in NATIVE_DTYPES:
            try:
                if "graph" not in self._capture:
                    self._capture["graph"] = capture(self.model)
                return build_graph_plan(self.model, x, self._capture["graph"])
            except GraphCaptureError as error:
                warn_whole_model_fallback(str(error))
        return build_plan(self.model, x)

    @property
    def fallbacks(self) -> List[str]:
        """Names of the layers on the fallback path ([] when all are native). Before the first call
        this is judged from the layer types alone; afterwards from the plan of the last input."""
        if self._last["plan"] is not None:
            return self._last["plan"].fallbacks
        return [name for name, module in self._layers() if not has_native_rule(module)]

    def _layers(self):
        if type(self.model) is nn.Sequential:
            return flatten_sequential(self.model)
        return [("model", self.model)]

    def _check_eval_mode(self):
        for name, module in self._coupled_modules:
            if module.training and not (isinstance(module, nn.modules.dropout._DropoutNd) and module.p == 0):
                raise ValueError(
                    f"layer '{name}' ({type(module).__name__}) is in training mode, where it couples or "
                    "randomises the samples of a batch and no per-sample Jacobian exists; call model.eval() first"
                )

    def __repr__(self) -> str:
        lines = [f"JacobianModule(mode={self.mode!r}, model={type(self.model).__name__}"]
        plan = self._last["plan"]
        if plan is None:
            lines.append("  no plan yet: built on the first call; layer paths judged by type:")
            for name, module in self._layers():
                lines.append(f"    {name:<12} {short_repr(module):<48} {'native' if has_native_rule(module) else 'fallback'}")
        else:
            lines.append(f"  plan for per-sample input {list(plan.input_shape)} -> output {list(plan.output_shape)}, "
                         f"{str(plan.dtype).replace('torch.', '')} on {plan.device}")
            for batch, (_, costs, *_) in sorted(plan.decisions.items()):
                chosen = plan.choose_mode(batch, self.mode)
                how = f"split {chosen} (step ranges)" if isinstance(chosen, Bracketing) else f"{chosen} sweep"
                macs = ", ".join(f"{name} {value:.3g}" for name, value in costs.items())
                lines.append(f"  B={batch}: {how} ({'cost model' if self.mode == 'auto' else 'requested'}; "
                             f"MACs: {macs})")
            lines += [f"    {line}" for line in plan.describe()]
        lines.append(f"  fallbacks: {self.fallbacks}")
        return "\n".join(lines) + "\n)"


def _layout(model) -> Tuple[list, list]:
    """Every module of the model (as objects: a replaced layer is a new object; holding them, not their
    ids, keeps ids from being reused) and the shape, dtype and device of every parameter and buffer."""
    modules, tensors, pending = [], [], [model] if isinstance(model, nn.Module) else []
    while pending:
        module = pending.pop()
        modules.append(module)
        for tensor in (*module._parameters.values(), *module._buffers.values()):
            tensors.append(None if tensor is None else (tensor.shape, tensor.dtype, tensor.device))
        pending += (child for child in module._modules.values() if child is not None)
    return modules, tensors


def _same_layout(first: Optional[Tuple[list, list]], second: Tuple[list, list]) -> bool:
    return (first is not None and len(first[0]) == len(second[0]) and all(map(operator.is_, first[0], second[0]))
            and first[1] == second[1])


def _check_input(x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor (float32 or float64 run natively), got dtype {x.dtype}")
    if x.is_meta:
        raise ValueError("x is on the meta device, which holds no values: a Jacobian needs real tensors")
    if x.dim() < 2:
        raise ValueError(
            f"x must be [B, *in_shape]: a batch dimension and at least one feature dimension, got shape {list(x.shape)}"
        )


def _check_parameters(model, x):
    if not isinstance(model, nn.Module):
        return
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_meta:
            raise ValueError(f"the model's '{name}' is on the meta device, which holds no values; materialise the "
                             "model first (model.to_empty(device=...) and load its weights)")
        if not tensor.is_floating_point():
            continue
        if tensor.device != x.device:
            raise ValueError(f"x is on {x.device} but the model's '{name}' is on {tensor.device}; move one of them")
        if tensor.dtype != x.dtype:
            raise TypeError(
                f"x has dtype {x.dtype} but the model's '{name}' has dtype {tensor.dtype}; "
                f"convert one of them (e.g. model.to({x.dtype}) or x.to({tensor.dtype}))"
            )
