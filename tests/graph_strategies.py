"""Hypothesis strategies that draw random graph models (the torch.fx path of jacobian_ext): an image
[B, C, H, W] or signal [B, C, L] through a chain of stages, where a stage is a layer or a fork of two
branches joined by a residual sum, a difference or a channel concatenation, then a head (flatten, a
Linear and an optional softmax, log-softmax, BatchNorm1d or Sin; sometimes no head at all: an N-d
output).

Every layer kind is one entry of STAGES: a name and a `build(draw, shape, keep)` that draws its options
and returns (constructor, expected native). `keep` asks for a layer that keeps the per-sample shape
("all": a residual branch) or its spatial size ("spatial": a concatenated branch). As in
model_strategies, constructors run later under one drawn torch seed; output shapes are found by
running each layer on zeros. The model's forward goes through user modules (GraphModel, Fork, Scale,
IndexMap, ...), so that fx traces into them and torch's layers, functions and methods become the
graph's nodes (views, slices and sums by constants included).
"""
import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

from conftest import Sin, non_contiguous
from model_strategies import ModelCase, randomized_affine

# Per-example work: batch x D x the sum of (in features x out features) over the layers, i.e. the dense
# per-layer Jacobian products that the error bound multiplies (conv and pooling Jacobians are sparse
# for our rules, dense for the bound); about 0.3 s per example at the cap.
GRAPH_WORK_BUDGET = 60_000_000
MAX_BATCH = 16


class GraphModel(nn.Module):
    """The stages in order; `stages` is the chain the error bound (tests/error_bound.py) walks."""

    def __init__(self, stages: Sequence[nn.Module]):
        super().__init__()
        self.stages = nn.ModuleList(stages)

    def forward(self, x):
        for stage in self.stages:
            x = stage(x)
        return x


class Fork(nn.Module):
    """Two branches (nn.Sequential, empty for the identity) on the same input, joined by `combine`:
    "add" (a residual connection), "sub", or "cat" along the channel axis."""

    def __init__(self, branches: Sequence[nn.Sequential], combine: str):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.combine = combine

    def join(self, values):
        first, second = values
        if self.combine == "cat":
            return torch.cat([first, second], 1)
        return first + second if self.combine == "add" else first - second

    def forward(self, x):
        return self.join([branch(x) for branch in self.branches])


class Scale(nn.Module):
    """x * c or x / c: an index map on the graph path."""

    def __init__(self, factor: float, divide: bool):
        super().__init__()
        self.factor, self.divide = factor, divide

    def forward(self, x):
        return x / self.factor if self.divide else x * self.factor

    def extra_repr(self):
        return f"{'/' if self.divide else '*'} {self.factor}"


class Functional(nn.Module):
    """A torch function called in forward (F.silu, torch.tanh, ...): a call_function node."""

    def __init__(self, function: Callable, **kwargs):
        super().__init__()
        self.function, self.kwargs = function, kwargs

    def forward(self, x):
        return self.function(x, **self.kwargs)

    def extra_repr(self):
        return f"{getattr(self.function, '__name__', self.function)}, {self.kwargs}"


class IndexMap(nn.Module):
    """A view, a slice, a negation or a shift by a constant: index maps on the graph path."""

    MAPS = {
        "transpose": lambda x: x.transpose(-1, -2),
        "drop_first": lambda x: x[..., 1:],
        "every_other": lambda x: x[:, :, ::2],
        "merge_spatial": lambda x: x.flatten(2),
        "neg": lambda x: -x,
        "shift": lambda x: x + 1.5,
    }

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        return self.MAPS[self.kind](x)

    def extra_repr(self):
        return self.kind


class FlattenMethod(nn.Module):
    def forward(self, x):
        return x.flatten(1)


def randomized_batch_norm(norm: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """Eval mode with drawn running statistics (and affine parameters when it has them)."""
    with torch.no_grad():
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.1, 3.0)
        if norm.affine:
            randomized_affine(norm)
    return norm.eval()


def output_shape(constructor, shape: Tuple[int, ...]) -> Tuple[int, ...]:
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        return tuple(constructor()(torch.zeros(1, *shape)).shape[1:])


@dataclass(frozen=True)
class StageFactory:
    name: str
    # (draw, per-sample shape [C, *spatial], keep: None | "spatial" | "all") -> (constructor, native)
    # or None when the layer cannot keep what `keep` asks for
    build: Callable


def _by_rank(shape, one_d, two_d):
    return one_d if len(shape) == 2 else two_d


def _conv(draw, shape, keep):
    channels, spatial = shape[0], shape[1:]
    out_channels = channels if keep == "all" else draw(st.integers(1, 6), label="out_channels")
    kernel = draw(st.integers(1, 3), label="kernel")
    dilation = draw(st.sampled_from([1, 1, 2]), label="dilation")
    extent = dilation * (kernel - 1)
    if keep:
        stride = 1
        if extent % 2:  # "same" with an odd extent pads asymmetrically: no native rule (fallback)
            padding = "same"
        else:
            padding = draw(st.sampled_from(["same", extent // 2]), label="padding")
    else:
        stride = draw(st.integers(1, 2), label="stride")
        least = max(0, math.ceil((extent + 1 - min(spatial)) / 2))  # an output of at least one element
        padding = draw(st.integers(least, max(least, extent)), label="padding")
    groups = draw(st.sampled_from([g for g in range(1, min(channels, out_channels) + 1)
                                   if channels % g == 0 and out_channels % g == 0]), label="groups")
    bias = draw(st.booleans(), label="bias")
    modes = ["zeros"] * 4 + (["circular", "reflect"] if padding != "same" and 0 < padding < min(spatial) else [])
    padding_mode = draw(st.sampled_from(modes), label="padding_mode")
    cls = _by_rank(shape, nn.Conv1d, nn.Conv2d)
    native = padding_mode == "zeros" and not (padding == "same" and extent % 2)
    return (lambda: cls(channels, out_channels, kernel, stride=stride, padding=padding, dilation=dilation,
                        groups=groups, bias=bias, padding_mode=padding_mode)), native


def _batch_norm(draw, shape, keep):
    affine = draw(st.booleans(), label="affine")
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.5]), label="eps")
    cls = _by_rank(shape, nn.BatchNorm1d, nn.BatchNorm2d)
    return (lambda: randomized_batch_norm(cls(shape[0], eps=eps, affine=affine))), True


def _layer_norm(draw, shape, keep):
    axes = draw(st.integers(1, len(shape)), label="normalized axes")
    affine = draw(st.booleans(), label="affine")
    normalized = shape[len(shape) - axes:]

    def construct():
        norm = nn.LayerNorm(normalized, elementwise_affine=affine)
        return randomized_affine(norm) if affine else norm

    return construct, True


_ACTIVATIONS = [nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, lambda: nn.GELU(approximate="tanh"), nn.SiLU,
                lambda: nn.LeakyReLU(0.2), nn.ELU, lambda: nn.Softplus(beta=2.0, threshold=3.0), nn.Hardtanh,
                nn.ReLU6, lambda: Functional(F.relu), lambda: Functional(torch.tanh), lambda: Functional(F.silu),
                lambda: Functional(F.gelu, approximate="tanh"), lambda: Functional(F.leaky_relu, negative_slope=0.3)]


def _activation(draw, shape, keep):
    return draw(st.sampled_from(_ACTIVATIONS), label="activation"), True


def _pool_geometry(draw, spatial, keep):
    """(kernel, stride, padding) of a window that fits the input (and keeps its size when asked)."""
    if keep:
        kernel = draw(st.sampled_from([1, 3]), label="kernel")
        return kernel, 1, kernel // 2
    kernel = draw(st.integers(1, min(3, min(spatial))), label="kernel")
    stride = draw(st.integers(1, 2), label="stride")
    padding = draw(st.integers(0, kernel // 2), label="padding")
    return kernel, stride, padding


def _max_pool(draw, shape, keep):
    kernel, stride, padding = _pool_geometry(draw, shape[1:], keep)
    ceil_mode = not keep and draw(st.booleans(), label="ceil_mode")
    cls = _by_rank(shape, nn.MaxPool1d, nn.MaxPool2d)
    return (lambda: cls(kernel, stride, padding, ceil_mode=ceil_mode)), True


def _avg_pool(draw, shape, keep):
    kernel, stride, padding = _pool_geometry(draw, shape[1:], keep)
    ceil_mode = not keep and draw(st.booleans(), label="ceil_mode")
    count_include_pad = draw(st.booleans(), label="count_include_pad")
    if len(shape) == 2:
        return (lambda: nn.AvgPool1d(kernel, stride, padding, ceil_mode, count_include_pad)), True
    divisor_override = draw(st.sampled_from([None, None, 2]), label="divisor_override")
    return (lambda: nn.AvgPool2d(kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)), True


def _adaptive_avg_pool(draw, shape, keep):
    size = tuple(s if keep else draw(st.integers(1, s), label="output size") for s in shape[1:])
    cls = _by_rank(shape, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
    return (lambda: cls(size)), True


def _scale(draw, shape, keep):
    factor = draw(st.sampled_from([0.5, -2.0, 3.0]), label="factor")
    divide = draw(st.booleans(), label="divide")
    return (lambda: Scale(factor, divide)), True


def _last_axis_linear(draw, shape, keep):
    if keep:
        return None
    out = draw(st.integers(1, 8), label="out_features")
    return (lambda: nn.Linear(shape[-1], out)), True


def _index_map(draw, shape, keep):
    kinds = ["neg", "shift"]
    if len(shape) == 3 and (not keep or shape[1] == shape[2]):
        kinds.append("transpose")
    if not keep:
        kinds += ["every_other"] + (["drop_first"] if shape[-1] > 1 else []) + (["merge_spatial"] if len(shape) == 3 else [])
    kind = draw(st.sampled_from(kinds), label="index map")
    return (lambda: IndexMap(kind)), True


def _sin(draw, shape, keep):
    return Sin, False  # no native rule: the node runs alone on the torch.func fallback


STAGES: List[StageFactory] = [
    StageFactory("conv", _conv),
    StageFactory("batch_norm", _batch_norm),
    StageFactory("layer_norm", _layer_norm),
    StageFactory("activation", _activation),
    StageFactory("max_pool", _max_pool),
    StageFactory("avg_pool", _avg_pool),
    StageFactory("adaptive_avg_pool", _adaptive_avg_pool),
    StageFactory("scale", _scale),
    StageFactory("linear_last_axis", _last_axis_linear),
    StageFactory("index_map", _index_map),
    StageFactory("sin", _sin),
]


@dataclass
class StageSpec:
    """A drawn stage: a layer (constructor, native) or a fork of two branches of layer specs."""

    name: str
    constructor: Optional[Callable] = None
    native: bool = True
    branches: Tuple[List["StageSpec"], ...] = ()
    combine: str = ""


NATIVE_STAGES: List[StageFactory] = [factory for factory in STAGES if factory.name != "sin"]


def _draw_layer(draw, shape, keep, native_only) -> Tuple[StageSpec, Tuple[int, ...]]:
    while True:
        factory = draw(st.sampled_from(NATIVE_STAGES if native_only else STAGES), label="layer")
        built = factory.build(draw, shape, keep)
        if built is not None and (built[1] or not native_only):
            constructor, native = built
            return StageSpec(factory.name, constructor, native), output_shape(constructor, shape)


def _draw_branch(draw, shape, keep, native_only) -> Tuple[List[StageSpec], Tuple[int, ...]]:
    specs = []
    for _ in range(draw(st.integers(0, 2), label="branch depth")):
        spec, shape = _draw_layer(draw, shape, keep, native_only)
        specs.append(spec)
    return specs, shape


def _draw_stage(draw, shape, native_only) -> Tuple[StageSpec, Tuple[int, ...]]:
    kind = draw(st.sampled_from(["layer", "layer", "residual", "cat"]), label="stage")
    if kind == "layer":
        return _draw_layer(draw, shape, None, native_only)
    keep = "all" if kind == "residual" else "spatial"
    (first, first_shape), (second, second_shape) = (_draw_branch(draw, shape, keep, native_only) for _ in range(2))
    combine = "cat" if kind == "cat" else draw(st.sampled_from(["add", "add", "sub"]), label="combine")
    out_shape = (first_shape[0] + second_shape[0], *shape[1:]) if combine == "cat" else shape
    return StageSpec(kind, branches=(first, second), combine=combine), out_shape


def _layer_work(spec: StageSpec, shape) -> int:
    """Sum of in x out features over the spec's layers (both branches of a fork)."""
    if not spec.branches:
        return math.prod(shape) * math.prod(output_shape(spec.constructor, shape))
    work = 0
    for branch in spec.branches:
        branch_shape = shape
        for layer in branch:
            work += _layer_work(layer, branch_shape)
            branch_shape = output_shape(layer.constructor, branch_shape)
    return work


_HEADS = ["linear", "linear", "linear", "flatten", "none"]


def _draw_head(draw, shape, native_only: bool) -> List[StageSpec]:
    head = draw(st.sampled_from(_HEADS), label="head")
    if head == "none":
        return []
    flatten = draw(st.sampled_from([nn.Flatten, FlattenMethod, lambda: Functional(torch.flatten, start_dim=1)]),
                   label="flatten")
    specs = [StageSpec("flatten", flatten)]
    if head == "linear":
        features, out = math.prod(shape), draw(st.integers(1, 6), label="out_features")
        specs.append(StageSpec("linear", lambda: nn.Linear(features, out)))
        lasts = [None, "softmax", "log_softmax", "sin", "batch_norm"]
        last = draw(st.sampled_from([name for name in lasts if not (native_only and name == "sin")]),
                    label="output layer")
        if last is not None:
            constructor = {"softmax": lambda: nn.Softmax(-1), "log_softmax": lambda: nn.LogSoftmax(-1), "sin": Sin,
                           "batch_norm": lambda: randomized_batch_norm(nn.BatchNorm1d(out))}[last]
            specs.append(StageSpec(last, constructor, native=last != "sin"))
    return specs


def _build(spec: StageSpec) -> nn.Module:
    if not spec.branches:
        return spec.constructor()
    return Fork([nn.Sequential(*[_build(s) for s in branch]) for branch in spec.branches], spec.combine)


def _fallback_names(model: nn.Module, specs: List[StageSpec]) -> List[str]:
    """The qualified names of the layers drawn as fallback ones, in the order the model runs them."""
    expected = []

    def visit(prefix, spec, module):
        if spec.branches:
            for b, branch in enumerate(spec.branches):
                for i, (s, m) in enumerate(zip(branch, module.branches[b])):
                    visit(f"{prefix}.branches.{b}.{i}", s, m)
        elif not spec.native:
            expected.append(prefix)

    for index, (spec, module) in enumerate(zip(specs, model.stages)):
        visit(f"stages.{index}", spec, module)
    return expected


@dataclass(repr=False)
class GraphCase(ModelCase):
    """A drawn graph model: `layers` are its stages; `layout` how x is stored."""

    layout: str = "contiguous"
    fallback_names: Tuple[str, ...] = ()

    def build_model(self) -> nn.Module:
        return GraphModel([module for _, module, _ in self.layers])

    def arrange_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "channels_last":  # channels stored last (torch.channels_last for images)
            return x.movedim(1, -1).contiguous().movedim(-1, 1)
        return non_contiguous(x) if self.layout == "non_contiguous" else x

    @property
    def expected_fallbacks(self) -> List[str]:
        return list(self.fallback_names)

    def describe(self) -> str:
        return f"layout={self.layout}, stages=[{', '.join(name for name, _, _ in self.layers)}]"


@st.composite
def graph_cases(draw, dtypes=(torch.float64, torch.float32), max_stages: int = 4, max_batch: int = MAX_BATCH,
                native_only: bool = False) -> GraphCase:
    """A random GraphModel on [B, C, L] or [B, C, H, W] inputs (C 1-4, sizes 3-10) with 1..max_stages
    stages and a head, within GRAPH_WORK_BUDGET, and an input of batch 1..max_batch; with native_only, no
    layer without a native rule."""
    seed = draw(st.integers(0, 2**31 - 1), label="seed")
    spatial_dims = draw(st.integers(1, 2), label="spatial dims")
    in_shape = (draw(st.integers(1, 4), label="channels"),
                *(draw(st.integers(3, 10), label="size") for _ in range(spatial_dims)))
    in_features = math.prod(in_shape)
    shape, specs, work = in_shape, [], 0
    for _ in range(draw(st.integers(1, max_stages), label="stages")):
        spec, out_shape = _draw_stage(draw, shape, native_only)
        stage_work = in_features * _layer_work(spec, shape)
        if work + stage_work > GRAPH_WORK_BUDGET:
            break
        specs.append(spec)
        work, shape = work + stage_work, out_shape
    for spec in _draw_head(draw, shape, native_only):
        work += in_features * _layer_work(spec, shape)
        specs.append(spec)
        shape = output_shape(spec.constructor, shape)

    # B >= 1: hypothesis favours the simplest draws, so a drawn B = 0 took most examples (as it does in
    # model_cases); the property test runs B = 0 on every model instead (case.x[:0]).
    batch = draw(st.integers(1, max(1, min(max_batch, GRAPH_WORK_BUDGET // max(1, work)))), label="batch")
    dtype = draw(st.sampled_from(dtypes), label="dtype")
    weight_gain = draw(st.sampled_from([1.0, 0.5, 2.0]), label="weight gain")
    input_scale = draw(st.sampled_from([1.0, 1e-3, 10.0]), label="input scale")
    layout = draw(st.sampled_from(["contiguous", "contiguous", "channels_last", "non_contiguous"]), label="layout")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        stages = [_build(spec) for spec in specs]
    model = GraphModel(stages).to(dtype).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(weight_gain)
    layers = [(spec.name, module, spec.native) for spec, module in zip(specs, stages)]
    return GraphCase(layers, in_shape, batch, dtype, seed, weight_gain, input_scale, layout,
                     tuple(_fallback_names(model, specs)))
