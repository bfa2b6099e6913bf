"""Hypothesis strategies that draw random models and inputs for the property tests.

Every layer the models may contain is one entry of LAYERS (a flat [B, H] input) or ND_LAYERS (an
N-d per-sample input, before the Flatten): a name, whether jacobian_ext should run it natively, and a
`build(draw, width, max_width)` that draws its options and returns (constructor, output width).
Constructors run later, all under one drawn torch seed, so that hypothesis shrinks the structure
(layer kinds, widths, batch) while the weights stay reproducible. Adding a layer is one entry here.
"""
import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from hypothesis import strategies as st
from torch import nn

from conftest import Sin

# Per-example work budget: batch x in_features x sum of (w_in x w_out) over the layers bounds the cost
# of the reference, the error bound (a chain of per-layer Jacobians) and our own sweeps; with batch 1
# a 300 x 300 layer fits, and a batch of 64 then has narrow layers (about 0.3 s per example).
WORK_BUDGET = 400_000
MAX_WIDTH = 300


class ScaledLinear(nn.Linear):
    """A subclass of a native layer with its own forward (LoRA-like): traced into, where its F.linear on its own
    parameters and the scale are native."""

    def forward(self, x):
        return 0.5 * super().forward(x)


def randomized_affine(norm: nn.LayerNorm) -> nn.LayerNorm:
    with torch.no_grad():
        norm.weight.uniform_(-2, 2)
        norm.bias.uniform_(-1, 1)
    return norm


@dataclass(frozen=True)
class LayerFactory:
    name: str
    native: bool  # expected path in float32/float64
    build: Callable  # (draw, width, max_width) -> (constructor () -> nn.Module, output width)
    # A layer with a native rule on the graph path only sends the whole model there (jx.compile captures
    # it as a graph), where some layers have a native rule that the fused chain lacks.
    graph_path: bool = False
    native_on_graph: Optional[bool] = None  # None: as `native`

    def expected_native(self, on_graph: bool) -> bool:
        return self.native_on_graph if on_graph and self.native_on_graph is not None else self.native


def widths(max_width: int):
    """Mostly narrow layers (fast, shrink well), sometimes wide ones up to MAX_WIDTH."""
    max_width = max(1, min(MAX_WIDTH, max_width))
    narrow = st.integers(1, min(16, max_width))
    return st.one_of(narrow, narrow, narrow, st.integers(1, max_width))


def same_width(constructor):
    return lambda draw, width, max_width: (constructor, width)


def _linear(cls):
    def build(draw, width, max_width):
        out = draw(widths(max_width), label="out_features")
        bias = draw(st.booleans(), label="bias")
        return (lambda: cls(width, out, bias=bias)), out

    return build


def _softmax(cls):
    def build(draw, width, max_width):
        dim = draw(st.sampled_from([-1, 1, None]) if cls is nn.Softmax else st.sampled_from([-1, 1]), label="dim")
        return (lambda: cls(dim=dim)), width

    return build


def _saturating_linear(draw, width, max_width):
    """A Linear whose first output leads the others by about 40 (times the weight gain): a softmax after it
    holds nearly all its probability in one class, where the softmax rules must not cancel the tail."""
    out = draw(widths(max_width), label="out_features")

    def build():
        layer = nn.Linear(width, out)
        with torch.no_grad():
            layer.bias[0] += 40.0
        return layer

    return build, out


def _layer_norm(draw, width, max_width):
    return (lambda: randomized_affine(nn.LayerNorm(width))), width


LAYERS: List[LayerFactory] = [
    LayerFactory("linear", True, _linear(nn.Linear)),
    LayerFactory("relu", True, same_width(nn.ReLU)),
    LayerFactory("tanh", True, same_width(nn.Tanh)),
    LayerFactory("sigmoid", True, same_width(nn.Sigmoid)),
    LayerFactory("softmax", True, _softmax(nn.Softmax)),
    LayerFactory("log_softmax", True, _softmax(nn.LogSoftmax)),
    LayerFactory("identity", True, same_width(nn.Identity)),
    LayerFactory("dropout", True, same_width(lambda: nn.Dropout(0.3).eval())),
    LayerFactory("flatten", True, same_width(nn.Flatten)),
    LayerFactory("gelu", True, same_width(nn.GELU)),
    # Native on the graph path: a model with it is captured as a graph.
    LayerFactory("layer_norm", True, _layer_norm, graph_path=True),
    # No native rule: the torch.func fallback, mixed freely with native layers.
    LayerFactory("sin", False, same_width(Sin)),
    LayerFactory("scaled_linear", True, _linear(ScaledLinear)),
    LayerFactory("saturating_linear", True, _saturating_linear),
]
# Heads close the model (None: the last layer is the output); they are LAYERS too, drawn more often here.
HEADS: List[Optional[str]] = [None, "softmax", "log_softmax", "sin"]


def _last_axis_linear(draw, shape, max_width):
    out = draw(st.integers(1, 6), label="out_features")
    return (lambda: nn.Linear(shape[-1], out)), (*shape[:-1], out)


def _same_shape(constructor):
    return lambda draw, shape, max_width: (constructor, shape)


# Layers on an N-d per-sample input (rank 3-4 inputs, before the Flatten).
ND_LAYERS: List[LayerFactory] = [
    LayerFactory("relu", True, _same_shape(nn.ReLU)),
    LayerFactory("tanh", True, _same_shape(nn.Tanh)),
    LayerFactory("identity", True, _same_shape(nn.Identity)),
    LayerFactory("sin", False, _same_shape(Sin)),
    LayerFactory("linear_last_axis", False, _last_axis_linear, native_on_graph=True),
]
FACTORIES = {factory.name: factory for factory in LAYERS}


@dataclass(repr=False)
class ModelCase:
    """A drawn model and input; repr() is what hypothesis prints for a failing example."""

    layers: List[Tuple[str, nn.Module, bool]]  # (factory name, module, expected native)
    in_shape: Tuple[int, ...]
    batch: int
    dtype: torch.dtype
    seed: int
    weight_gain: float
    input_scale: float

    @property
    def model(self) -> nn.Module:
        return self._model

    def __post_init__(self):
        self._model = self.build_model()
        generator = torch.Generator().manual_seed(self.seed)
        self.x = self.arrange_input((torch.randn(self.batch, *self.in_shape, generator=generator, dtype=torch.float64)
                                     * self.input_scale).to(self.dtype))

    # Hooks for other model shapes (tests/graph_strategies.GraphCase).
    def build_model(self) -> nn.Module:
        return nn.Sequential(*[module for _, module, _ in self.layers])

    def arrange_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def describe(self) -> str:
        return f"layers=[{', '.join(name for name, _, _ in self.layers)}]"

    @property
    def expected_fallbacks(self) -> List[str]:
        return [str(i) for i, (_, _, native) in enumerate(self.layers) if not native]

    def __repr__(self):
        return (f"{type(self).__name__}(x=[{self.batch}, {', '.join(map(str, self.in_shape))}] {self.dtype}, "
                f"seed={self.seed}, weight_gain={self.weight_gain}, input_scale={self.input_scale}, "
                f"{self.describe()})\n{self._model}")


@st.composite
def model_cases(draw, dtypes=(torch.float64, torch.float32), max_depth: int = 6, max_batch: int = 64) -> ModelCase:
    """A random nn.Sequential of depth 1..max_depth (plus an optional head, and a Flatten for rank 3-4
    inputs), with an input of batch 0..max_batch."""
    seed = draw(st.integers(0, 2**31 - 1), label="seed")
    rank = draw(st.integers(2, 4), label="input rank")
    specs = []  # (factory, constructor)
    if rank == 2:
        in_shape = (draw(widths(MAX_WIDTH), label="in_features"),)
        shape = in_shape
    else:
        in_shape = tuple(draw(st.integers(1, 6), label="in_shape") for _ in range(rank - 1))
        shape = in_shape
        for _ in range(draw(st.integers(0, 2), label="N-d layers")):
            factory = draw(st.sampled_from(ND_LAYERS), label="N-d layer")
            constructor, shape = factory.build(draw, shape, MAX_WIDTH)
            specs.append((factory, constructor))
        specs.append((FACTORIES["flatten"], nn.Flatten))
    width = math.prod(shape)
    in_features = math.prod(in_shape)

    work = max(width, 1) * in_features
    depth = draw(st.integers(1, max_depth), label="depth")
    head = draw(st.sampled_from(HEADS), label="head")
    names = [draw(st.sampled_from(LAYERS), label="layer").name for _ in range(depth)] + ([head] if head else [])
    for name in names:
        factory = FACTORIES[name]
        # The widest layer that keeps batch 1 within the budget.
        max_width = max(1, (WORK_BUDGET - work) // max(1, width * in_features))
        constructor, out_width = factory.build(draw, width, max_width)
        work += max(width, 1) * max(out_width, 1) * in_features
        specs.append((factory, constructor))
        width = out_width

    # B >= 1: the property tests run B = 0 on every model as case.x[:0]. (Drawing 0 as one choice of five
    # gave B = 0 in 55% of the examples, which hypothesis favours as the simplest, and those checked no values.)
    batch = draw(st.integers(1, max(1, min(max_batch, WORK_BUDGET // work))), label="batch")
    dtype = draw(st.sampled_from(dtypes), label="dtype")
    weight_gain = draw(st.sampled_from([1.0, 0.2, 3.0]), label="weight gain")
    input_scale = draw(st.sampled_from([1.0, 1e-3, 10.0]), label="input scale")

    # A layer native on the graph path only keeps the model there (fusion.chain_plan declines the chain).
    on_graph = any(factory.graph_path or (factory.native_on_graph and not factory.native) for factory, _ in specs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = [(factory.name, constructor(), factory.expected_native(on_graph)) for factory, constructor in specs]
    model = nn.Sequential(*[module for _, module, _ in layers]).to(dtype).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(weight_gain)
    return ModelCase(layers, in_shape, batch, dtype, seed, weight_gain, input_scale)
