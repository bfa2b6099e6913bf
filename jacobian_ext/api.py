"""Public API: batch_jacobian, compile and JacobianModule."""
import operator
import threading
import weakref
from types import FunctionType
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

from . import deploy
from . import rules as layer_rules
from .cost import Bracketing
from .differentiable import differentiable_call, needs_grad
from .errors import GraphCaptureError, StructuredOutputError
from .fusion import chain_plan, fuse_interior_chains
from .graph import FunctionRoot, build_graph_plan, capture, capture_root, closed_over_modules, warn_whole_model_fallback
from .cuda_graphs import GraphCache
from .memory import fits_in_one_run, parse_max_memory, run_within_budget
from .plan import NATIVE_DTYPES, Plan, short_repr, whole_model_plan
from .structured import ModelLocalCache, structured_jacobian
from .walker import run_plan

MODES = ("auto", "forward", "reverse", "mixed")
# torch.fx tracing patches nn.Module.__call__ for the whole process while it runs, so two captures (or a
# capture and another thread's planning probes) must not overlap; plans are built under this lock.
_PLANNING_LOCK = threading.RLock()
def breaks_per_sample_jacobian(module: nn.Module) -> bool:
    """A layer in training mode that couples the samples of a batch (batch norm) or randomises them
    (dropout, stochastic depth; a dropout of p = 0 is the identity and passes)."""
    if not module.training:
        return False
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return True
    return layer_rules.is_random_in_training(module) and getattr(module, "p", 1) != 0


def batch_jacobian(model: Callable, x, mode: str = "auto", return_output: bool = False,
                   max_memory=None, argnums=None, wrt=None):
    """Per-sample Jacobian J[b, *o, *i] = d model(x)[b, *o] / d x[b, *i], shape [B, *out_shape, *in_shape].

    model: an nn.Module or callable mapping [B, *in_shape] to [B, *out_shape], samples independent.
    Several inputs and structured outputs: x may be a tuple or list of tensors (model(*x)), and the model
    may return a tuple, list or dict of tensors; J then has torch.func.jacrev's nesting: the output
    structure outside, inside each a tuple over the differentiated inputs ([B, *out_i, *in_k]).
    argnums (an int or a tuple of ints, default every input) picks the inputs to differentiate; an int
    gives a bare tensor per output. (structured.py: every input must be floating-point.)
    mode: "auto" (cost model), "forward" (propagate [B, H, D] from the input), "reverse" (propagate
    [B, C, H] from the output) or "mixed" (the bracketing of the per-sample chain product with the fewest
    multiply-adds: sweeps over parts of the chain joined by batched GEMMs; on a graph that is not a chain,
    the cheaper sweep). "auto" runs "mixed"'s split when it saves enough, else the cheaper sweep. With
    return_output=True returns (model(x), J).
    max_memory: bytes (int) or a size string ("2GB", "512MiB"); a batch whose estimated need exceeds it
    (default: half the available RAM, or of the free CUDA memory) runs in chunks, with the same result
    up to rounding; MemoryError when y and J plus one sample's working memory do not fit (memory.py).
    The plan is cached with the model (as jacobian_ext.compile(model) caches it) and rebuilt when a layer
    or a parameter's shape, dtype or device changes.
    wrt: a submodule of the model (or its name, e.g. "encoder.embed") to differentiate with respect to
    instead of x: J[b, *o, *l] = d model(x)[b, *o] / d layer_output[b, *l], shape [B, *out_shape, *layer_out].
    Whatever the model computes from x other than through the layer (a skip connection around it, a mask
    from token ids) is held fixed, so x may be integer-valued (token ids into an nn.Embedding). The layer
    must run once per forward and return one tensor [B, *layer_out]; x is then one tensor, and the result
    carries no gradient back to the parameters (eager calls only: see JacobianModule).
    """
    if wrt is not None:
        if isinstance(x, (tuple, list)) or argnums is not None:
            raise NotImplementedError("wrt= takes one input tensor x (the model called as model(x)); wrap a model of "
                                      "several inputs, e.g. lambda ids: model(ids, mask)")
        try:
            output, jacobian = _cached_module(model, mode, max_memory, wrt)(x)
        except StructuredOutputError as error:
            raise NotImplementedError(f"wrt= differentiates one output tensor: {error}") from error
        return (output, jacobian) if return_output else jacobian

    def engine(fn, inputs):
        # forward, not __call__: the cached module is private, so no hook can be on it, and this is every call's path
        return _cached_module(fn, mode, max_memory).forward(inputs)

    holder = getattr(model, "__dict__", None)
    structured = isinstance(x, (tuple, list)) or argnums is not None or (
        isinstance(holder, dict) and holder.get(_STRUCTURED_ATTRIBUTE, False))
    if not structured:
        try:
            output, jacobian = engine(model, x)
            return (output, jacobian) if return_output else jacobian
        except StructuredOutputError:
            if isinstance(holder, dict):
                holder[_STRUCTURED_ATTRIBUTE] = True  # later calls go straight to the structured path
    output, jacobian = structured_jacobian(model, x, argnums, engine)
    return (output, jacobian) if return_output else jacobian


_STRUCTURED_ATTRIBUTE = "_jacobian_ext_structured_output"


class _PlanCache(ModelLocalCache):
    """batch_jacobian's JacobianModules of one model, by (mode, max_memory). Stored in the model's own
    __dict__, so it lives and dies with the model; a copy or a pickle of the model starts empty (the
    modules hold the original; a shallow copy shares the dict, so the cache also records its owner)."""

    def __init__(self, owner=None):
        super().__init__()
        self.owner = weakref.ref(owner) if owner is not None else None


_CACHE_ATTRIBUTE = "_jacobian_ext_plans"


def _cached_module(model: Callable, mode: str, max_memory, wrt=None) -> "JacobianModule":
    holder = getattr(model, "__dict__", None)
    if not isinstance(model, nn.Module) and not isinstance(model, FunctionType):
        holder = None  # a bound method or a callable object: its __dict__ is not its own
    if holder is None:
        return JacobianModule(model, mode=mode, max_memory=max_memory, wrt=wrt)
    cache = holder.get(_CACHE_ATTRIBUTE)
    if cache is None or cache.owner is None or cache.owner() is not model:
        cache = holder[_CACHE_ATTRIBUTE] = _PlanCache(model)
    key = (mode, parse_max_memory(max_memory), wrt)
    module = cache.get(key)
    if module is None:
        module = cache[key] = JacobianModule(model, mode=mode, max_memory=max_memory, wrt=wrt)
    return module


def compile(model: Callable, mode: str = "auto", max_memory=None, wrt=None, cuda_graphs: bool = False
            ) -> "JacobianModule":
    """A module whose call jm(x) returns (model(x), J), caching the plan per input shape, dtype and device.
    Parameters are read at every call; a replaced layer, or a parameter of another shape, dtype or device,
    is detected and the plan rebuilt. max_memory, wrt: as in batch_jacobian.
    cuda_graphs=True: on CUDA inputs, each input shape (batch included) is captured once as a CUDA graph and
    later calls replay it, one launch instead of one per kernel (cuda_graphs.py: what is and is not seen
    between calls); calls that need gradients, run in chunks or cannot be captured run as usual."""
    return JacobianModule(model, mode=mode, max_memory=max_memory, wrt=wrt, cuda_graphs=cuda_graphs)


class JacobianModule(nn.Module):
    """jm(x) -> (y, J) for a wrapped model; see batch_jacobian. print(jm) shows every layer with its
    path (native rule or torch.func fallback) and the accumulation order chosen."""

    def __init__(self, model: Callable, mode: str = "auto", max_memory=None, wrt=None, cuda_graphs: bool = False):
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be an nn.Module or a callable, got {type(model).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(repr(m) for m in MODES)}; got {mode!r}")
        if wrt is not None and not isinstance(wrt, (str, nn.Module)):
            raise TypeError(f"wrt must be a submodule of the model or its name (a str), got {type(wrt).__name__}")
        self.model = model
        self.mode = mode
        # Plain attribute (not a submodule: it is one of the model's own): the layer whose output J is taken
        # with respect to, or None for the model input.
        self.__dict__["wrt"] = wrt
        self.max_memory = parse_max_memory(max_memory)
        self._layout = None  # the model's structure the plans were built for (see _forget_stale_plans)
        self._plans: Dict[tuple, Plan] = {}
        # Plain attribute holders: nn.Module.__setattr__ is slow on the per-call path, and neither the
        # captured graph module nor a function's root may become a submodule (they would duplicate the
        # model's parameters).
        self._last = {"plan": None}
        self._holder = {"root": capture_root(model)}  # the module that is captured and read for parameters
        self._capture = {}
        self._encodings = {}  # input signature -> deploy.FusedEncoding, for traced calls
        if not isinstance(cuda_graphs, bool):
            raise TypeError(f"cuda_graphs must be True or False, got {type(cuda_graphs).__name__}")
        self._holder["graphs"] = GraphCache() if cuda_graphs else None

    @property
    def _root(self) -> nn.Module:
        return self._holder["root"]

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        _check_input(x, integers_allowed=self.wrt is not None)
        if torch.compiler.is_compiling():  # torch.compile or torch.export tracing this call
            if self.wrt is not None:
                raise NotImplementedError("a Jacobian with respect to a layer (wrt=) runs eagerly; it is not one "
                                          "operator call that torch.compile or torch.export could trace")
            encoding = self._fused_encoding(self._traced_input_shape(x), x.dtype, x.device)
            return deploy.call_fused(encoding, deploy.read_params(self._root, encoding), x)
        self._forget_stale_plans()
        self._check_eval_mode()
        plan = self.plan_for(x)
        self._last["plan"] = plan
        mode = plan.choose_mode(x.shape[0], self.mode)
        # The fused op has its own backward; every other plan gets torch.func's gradients this way (their
        # recomputation differentiates the model input, so a Jacobian with respect to a layer has none).
        if self.wrt is None and not getattr(plan, "all_native", False) and needs_grad(self._root, x):
            return differentiable_call(lambda inputs: run_within_budget(plan, inputs, mode, self.max_memory),
                                       self._root, x)
        graphs = self._holder["graphs"]
        if (graphs is not None and graphs.handles(x) and not needs_grad(self._root, x)
                and fits_in_one_run(plan, x, mode, self.max_memory)):
            return graphs.call(plan, mode, x, lambda inputs: run_plan(plan, inputs, mode),
                               [*self._root.parameters(), *self._root.buffers()])
        return run_within_budget(plan, x, mode, self.max_memory)

    def _traced_input_shape(self, x: torch.Tensor) -> Tuple[int, ...]:
        """x's per-sample shape as plain ints. torch.compile marks a dimension dynamic once the forward code,
        which every JacobianModule shares, has met two sizes of it, even in two modules of different widths:
        symbolic feature sizes are then matched against this model's known input shapes, which specialises
        them (with a guard) to constants. (A model that does not fix its input shape, met by torch.compile after
        other shapes, needs one eager call first: dynamo cannot specialise an unknown symbolic shape here.)"""
        shape = tuple(x.shape[1:])
        for known in self._known_input_shapes():
            if len(known) == len(shape) and all(size == expected for size, expected in zip(shape, known)):
                return known
        return shape

    def _known_input_shapes(self) -> List[Tuple[int, ...]]:
        shapes = [key[0] for key in self._encodings] + [key[0] for key in self._plans]
        fixed = self._fixed_input_shape()
        return shapes + [fixed] if fixed else shapes

    @torch.compiler.assume_constant_result
    def _fixed_input_shape(self) -> Optional[Tuple[int, ...]]:
        """The input shape the model fixes by itself (deploy.fixed_input_shape), or None; exceptions do not
        leave a function that torch.compile treats as constant, so an untraceable model gives None too."""
        with disable_proxy_modes_tracing():
            try:
                return deploy.fixed_input_shape(self._capture_graph())
            except GraphCaptureError:
                return None

    @torch.compiler.assume_constant_result
    def _fused_encoding(self, input_shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device):
        """The single-op encoding for a traced call, computed eagerly once per input signature: the tracer
        treats the result as a constant, so the graph holds one op call and no planning."""
        key = (input_shape, dtype, device)
        if key not in self._encodings:
            self._forget_stale_plans()
            self._check_eval_mode()
            plan = self._traceable_plan(input_shape, dtype, device)
            self._encodings[key] = deploy.fused_encoding(plan, self._root, self.mode)
        return self._encodings[key]

    def fused_encoding(self, x: torch.Tensor) -> "deploy.FusedEncoding":
        """The single-op encoding (layer names, parameter names, sweep) for inputs shaped like x, as traced
        and scripted calls use it; NotImplementedError when the model is not one op call (deploy.py).
        deploy.read_params(jm.parameter_owner, encoding) reads its parameters."""
        self._forget_stale_plans()
        return deploy.fused_encoding(self.plan_for(x), self._root, self.mode)

    @property
    def parameter_owner(self) -> nn.Module:
        """The module the encoding's parameter names are relative to: the model, or for a function the
        module holding the modules it closes over."""
        return self._root

    def _traceable_plan(self, input_shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Plan:
        """The plan for a traced call's signature. Under torch.export this runs inside the trace: capture,
        probe forwards and their grad-mode switches must not be recorded into the exported graph (fx's own
        tracing needs torch functions, so only the probes run with them disabled)."""
        with disable_proxy_modes_tracing():
            self._capture_graph()
            with torch._C.DisableTorchFunction():
                return self.plan_for(torch.zeros((1, *input_shape), dtype=dtype, device=device))

    def __prepare_scriptable__(self):
        """torch.jit.script(jm) scripts the single op call (see deploy.ScriptableJacobian)."""
        self._forget_stale_plans()
        self._check_eval_mode()
        plan = self._last["plan"]
        if plan is None:
            parameter = next(self._root.parameters(), None)
            dtype = getattr(parameter, "dtype", torch.float32)
            device = getattr(parameter, "device", torch.device("cpu"))
            input_shape = deploy.fixed_input_shape(self._capture_graph())
            if input_shape is None:
                raise ValueError("torch.jit.script needs the per-sample input shape, which this model does not fix: "
                                 "call the JacobianModule once on an example input first")
            plan = self.plan_for(torch.zeros((1, *input_shape), dtype=dtype, device=device))
        encoding = deploy.fused_encoding(plan, self._root, self.mode)
        return deploy.ScriptableJacobian(encoding, deploy.read_params(self._root, encoding))

    def _forget_stale_plans(self):
        """Plans capture the layers and the parameter shapes: after a layer is replaced, or a parameter
        or buffer changes shape, dtype or device, they are rebuilt on this call, never reused. (New
        values need nothing: parameters are read on every call.) A function's closed-over modules are
        looked up again: a name rebound to another module counts as a replaced layer."""
        if isinstance(self._root, FunctionRoot):
            modules = closed_over_modules(self.model)
            if modules.keys() != self._root._modules.keys() or any(
                    module is not self._root._modules[name] for name, module in modules.items()):
                self._holder["root"] = capture_root(self.model)
        layout = _layout(self._root)
        if _same_layout(self._layout, layout):
            return
        with _PLANNING_LOCK:  # threads that met the change together forget (and recapture) once
            if _same_layout(self._layout, layout):
                return
            self._plans.clear()
            self._capture.clear()
            self._encodings.clear()
            if self._holder["graphs"] is not None:
                self._holder["graphs"].clear()
            self._last["plan"] = None
            self._coupled_modules = [(n, m) for n, m in self._root.named_modules()
                                     if isinstance(m, nn.modules.batchnorm._BatchNorm)
                                     or layer_rules.is_random_in_training(m)]
            self._layout = layout

    def plan_for(self, x: torch.Tensor) -> Plan:
        """The plan for inputs shaped like x (built on first use, with one probe forward)."""
        key = (tuple(x.shape[1:]), x.dtype, x.device)
        plan = self._plans.get(key)
        if plan is None:
            with _PLANNING_LOCK:
                plan = self._plans.get(key)
                if plan is None:
                    _check_parameters(self._root, x)
                    plan = self._plans[key] = self._build_plan(x)
        return plan

    def _capture_graph(self):
        """The model's fx capture, cached until the layout changes; GraphCaptureError (cached too) when the
        model's own forward cannot be traced. The wrt layer is captured as one node."""
        with _PLANNING_LOCK:
            if "graph" not in self._capture:
                try:
                    self._capture["graph"] = capture(self._root, leaves=[self._wrt_path()] if self.wrt is not None else [])
                except GraphCaptureError as error:
                    self._capture["graph"] = error
        captured = self._capture["graph"]
        if isinstance(captured, GraphCaptureError):
            raise captured
        return captured

    def _wrt_path(self) -> str:
        """The wrt layer's path in the captured root (checked against the model's modules as they are now)."""
        modules = dict(self._root.named_modules())
        if isinstance(self.wrt, str):
            if not self.wrt or self.wrt not in modules:
                raise ValueError(f"wrt: the model has no submodule named {self.wrt!r}; its submodules are "
                                 f"{[name for name in modules if name][:20]}")
            return self.wrt
        path = next((name for name, module in modules.items() if module is self.wrt), None)
        if not path:
            raise ValueError(f"wrt: {short_repr(self.wrt)} is not a submodule of the model"
                             + (" (it is the model itself: leave wrt=None for the input)" if path == "" else ""))
        return path

    def _build_plan(self, x: torch.Tensor):
        """Every model is captured as a graph; one whose derivative-carrying nodes form a chain becomes a
        chain plan (the fused op, the chain kernels, bracketing), any other a graph plan. A model that
        cannot be captured runs whole on the fallback, with a warning that says why. With wrt, always a
        graph plan seeded at the layer (nothing to fall back to: the whole-model fallback differentiates x)."""
        if self.wrt is not None:
            try:
                graph_plan = build_graph_plan(self._capture_graph(), x, wrt=self._wrt_path())
            except GraphCaptureError as error:
                raise NotImplementedError(f"wrt= needs the model's graph: {error}") from error
            if graph_plan.dtype not in NATIVE_DTYPES:
                raise NotImplementedError(f"wrt= runs float32 and float64 layers, layer '{graph_plan.input_node.target}' "
                                          f"returns {graph_plan.dtype}")
            return fuse_interior_chains(graph_plan)
        native = x.dtype in NATIVE_DTYPES
        try:
            graph_plan = build_graph_plan(self._capture_graph(), x)
        except GraphCaptureError as error:
            if native:
                warn_whole_model_fallback(str(error))
            return whole_model_plan(self.model, x)
        chain = chain_plan(graph_plan, native)
        if chain is not None:
            return chain
        return fuse_interior_chains(graph_plan) if native else whole_model_plan(self.model, x)

    @property
    def fallbacks(self) -> List[str]:
        """Names of the layers on the fallback path of the last call's plan ([] when all are native)."""
        if self._last["plan"] is None:
            raise RuntimeError("nothing is planned yet: a plan is built for an input shape on the first call, "
                               "jm(x); call it once, then read fallbacks (or print(jm))")
        return self._last["plan"].fallbacks

    def _check_eval_mode(self):
        for name, module in self._coupled_modules:
            if breaks_per_sample_jacobian(module):
                raise ValueError(
                    f"layer '{name}' ({type(module).__name__}) is in training mode, where it couples or "
                    "randomises the samples of a batch and no per-sample Jacobian exists; call model.eval() first"
                )

    def __repr__(self) -> str:
        wrt = "" if self.wrt is None else f", wrt={self.wrt if isinstance(self.wrt, str) else short_repr(self.wrt)!r}"
        lines = [f"JacobianModule(mode={self.mode!r}, model={_model_name(self.model)}{wrt}"]
        plan = self._last["plan"]
        if plan is None:
            lines.append("  no plan yet: the plan (each layer's path, the accumulation order) is built for an "
                         "input shape on the first call")
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
            lines.append(f"  fallbacks: {plan.fallbacks}")
        return "\n".join(lines) + "\n)"


def _model_name(model) -> str:
    return type(model).__name__ if isinstance(model, nn.Module) else getattr(model, "__name__", type(model).__name__)


def _layout(model) -> Tuple[list, list]:
    """Every module of the model (as objects: a replaced layer is a new object; holding them, not their
    ids, keeps ids from being reused), its training flag (a capture bakes `self.training` into the graph
    as a constant: F.dropout(x, p, self.training)), and the shape, dtype and device of every parameter
    and buffer. Runs on every call: written for speed (no work for the empty dicts of most modules)."""
    modules, state, pending = [], [], [model] if isinstance(model, nn.Module) else []
    append = state.append
    while pending:
        module = pending.pop()
        modules.append(module)
        append(module.training)
        for tensors in (module._parameters, module._buffers):
            if tensors:
                for tensor in tensors.values():
                    append(None if tensor is None else _tensor_layout(tensor))
        if module._modules:
            pending += [child for child in module._modules.values() if child is not None]
    return modules, state


_tensor_layout = operator.attrgetter("shape", "dtype", "device")


def _same_layout(first: Optional[Tuple[list, list]], second: Tuple[list, list]) -> bool:
    return (first is not None and len(first[0]) == len(second[0]) and all(map(operator.is_, first[0], second[0]))
            and first[1] == second[1])


def _check_input(x, integers_allowed: bool = False):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if integers_allowed:  # wrt=: x is not differentiated, only fed to the model
        if x.is_meta or x.dim() < 1:
            raise ValueError(f"x must be a real tensor [B, *in_shape] with a batch dimension, got shape "
                             f"{list(x.shape)}{' on the meta device' if x.is_meta else ''}")
        return
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor (float32 or float64 run natively), got dtype {x.dtype}")
    if x.is_meta:
        raise ValueError("x is on the meta device, which holds no values: a Jacobian needs real tensors")
    if x.dim() < 2:
        raise ValueError(
            f"x must be [B, *in_shape]: a batch dimension and at least one feature dimension, got shape {list(x.shape)}"
        )


def _check_parameters(model: nn.Module, x):
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_meta:
            raise ValueError(f"the model's '{name}' is on the meta device, which holds no values; materialise the "
                             "model first (model.to_empty(device=...) and load its weights)")
        if not tensor.is_floating_point():
            continue
        if tensor.device != x.device:
            raise ValueError(f"x is on {x.device} but the model's '{name}' is on {tensor.device}; move one of them")
        if not x.is_floating_point():  # integer inputs (wrt=): the model's own dtypes decide
            continue
        if tensor.dtype != x.dtype:
            raise TypeError(
                f"x has dtype {x.dtype} but the model's '{name}' has dtype {tensor.dtype}; "
                f"convert one of them (e.g. model.to({x.dtype}) or x.to({tensor.dtype}))"
            )
