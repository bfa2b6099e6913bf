"""The chain plan: steps in order, each on a native rule or on the fallback, grouped into segments
(fusion.py builds it from a captured graph; whole_model_plan for a model that cannot be captured)."""
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from . import cost
from .errors import StructuredOutputError
from .rules import NativeRule

NATIVE_DTYPES = (torch.float32, torch.float64)


@dataclass
class Step:
    """One layer of the model (or the whole model, when it is not an nn.Sequential)."""

    name: str
    module: Callable
    rule: Optional[NativeRule]
    input_shape: Tuple[int, ...]  # per sample
    output_shape: Tuple[int, ...]

    @property
    def native(self) -> bool:
        return self.rule is not None

    def cost_items(self) -> List[cost.CostItem]:
        if self.rule is None:
            macs = sum(p.numel() for p in self.module.parameters()) if isinstance(self.module, nn.Module) else 0
            return [cost.CostItem("fallback", math.prod(self.input_shape), math.prod(self.output_shape), macs)]
        if self.rule.is_reshape:
            return []
        kind = "linear" if self.rule.layer.startswith("linear") else "rowwise"
        passes = cost.SOFTMAX_PASSES if self.rule.layer in ("softmax", "log_softmax") else 1.0
        return [cost.CostItem(kind, math.prod(self.input_shape), math.prod(self.output_shape), passes)]

    def describe(self) -> str:
        if self.rule is None:
            return "fallback (torch.func)"
        return "native (reshape)" if self.rule.is_reshape else f"native {self.rule.layer}"


@dataclass
class Segment:
    """A maximal run of native steps (one C++ call) or of fallback steps (one torch.func call)."""

    steps: List[Step]
    native: bool

    @property
    def input_shape(self):
        return self.steps[0].input_shape

    @property
    def output_shape(self):
        return self.steps[-1].output_shape

    @property
    def layers(self) -> List[str]:
        return [s.rule.layer for s in self.steps if s.native and not s.rule.is_reshape]

    def params(self) -> List[torch.Tensor]:
        # Read from the modules on every call, so that replaced parameters are never stale.
        return [p for s in self.steps if s.native for p in s.rule.params(s.module)]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            x = step.module(x)
        return x


class FlatWidths:
    """in_features and out_features (D and C) of a plan with per-sample input_shape and output_shape."""

    @property
    def in_features(self) -> int:
        return math.prod(self.input_shape)

    @property
    def out_features(self) -> int:
        return math.prod(self.output_shape)


@dataclass
class Plan(FlatWidths):
    steps: List[Step]
    input_shape: Tuple[int, ...]
    output_shape: Tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    opaque_modules: List[str] = field(default_factory=list)  # user modules fx could not trace into
    segments: List[Segment] = field(init=False)
    all_native: bool = field(init=False)
    native_layers: List[str] = field(init=False)
    # batch -> (auto's choice, {"forward": MACs, "reverse": MACs, "mixed": MACs}, cheapest bracketing)
    decisions: Dict[int, Tuple[Union[str, cost.Bracketing], dict, cost.Bracketing]] = field(
        default_factory=dict, init=False)
    _parts: Dict[Tuple[int, int], "Plan"] = field(default_factory=dict, init=False, repr=False)
    _param_readers: List[Tuple[Callable, Callable]] = field(init=False, repr=False)

    def __post_init__(self):
        self.segments = []
        for step in self.steps:
            if self.segments and self.segments[-1].native == step.native:
                self.segments[-1].steps.append(step)
            else:
                self.segments.append(Segment([step], step.native))

        self.all_native = all(segment.native for segment in self.segments)
        # The whole plan's op encoding, when every layer is native (the low-latency path).
        self.native_layers = [layer for segment in self.segments for layer in segment.layers]
        self._param_readers = [(step.rule.params, step.module) for step in self.steps if step.native]

    def native_params(self) -> List[torch.Tensor]:
        # Read from the modules on every call (Segment.params), flattened once: this is on every call's path.
        return [p for params, module in self._param_readers for p in params(module)]

    @property
    def fallbacks(self) -> List[str]:
        return list(dict.fromkeys(step.name for step in self.steps if not step.native))

    def describe(self) -> List[str]:
        """One line per layer: its name, the module and its path."""
        lines = [f"{step.name:<12} {short_repr(step.module):<48} {step.describe()}" for step in self.steps]
        if self.opaque_modules:
            lines.append(f"(not traceable, kept whole: {', '.join(self.opaque_modules)})")
        return lines

    def choose_mode(self, batch: int, requested: str) -> Union[str, cost.Bracketing]:
        """What to run: "forward" or "reverse" (one sweep), or a cost.Bracketing that splits the chain.
        "auto" takes the cheapest bracketing when it is a split that saves enough (cost.SPLIT_MARGIN), else
        the cheaper sweep; "mixed" takes the cheapest bracketing, which may be a sweep. Cached per batch."""
        if batch not in self.decisions:
            step_items = [step.cost_items() for step in self.steps]
            costs = cost.mode_costs([item for items in step_items for item in items], self.in_features,
                                    self.out_features, batch)
            widths = [self.in_features] + [math.prod(step.output_shape) for step in self.steps]
            best = cost.best_bracketing(step_items, widths, batch)
            costs["mixed"] = best.cost
            sweep = cost.choose_mode(costs)
            auto = best if not best.is_sweep and best.cost <= cost.SPLIT_MARGIN * costs[sweep] else sweep
            self.decisions[batch] = (auto, costs, best)
        auto, _, best = self.decisions[batch]
        if requested == "auto":
            return auto
        if requested == "mixed":
            return best.mode if best.is_sweep else best
        return requested

    def part(self, start: int, stop: int) -> "Plan":
        """The plan of steps [start, stop) alone (a part of a split bracketing)."""
        if (start, stop) not in self._parts:
            steps = self.steps[start:stop]
            self._parts[start, stop] = Plan(steps, steps[0].input_shape, steps[-1].output_shape, self.dtype,
                                            self.device, self.opaque_modules)
        return self._parts[start, stop]


def flat_samples(x: torch.Tensor) -> torch.Tensor:
    """x [B, *shape] as [B, prod(shape)], the width given explicitly: reshape(B, -1) is ambiguous for B = 0."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def short_repr(module) -> str:
    text = repr(module).replace("\n", " ")
    return text if len(text) <= 48 else text[:45] + "..."


def flatten_sequential(model: nn.Module, prefix: str = "") -> List[Tuple[str, nn.Module]]:
    """The leaf layers of a (nested) nn.Sequential, with their dotted names."""
    layers = []
    # Not named_children(): it skips a module instance met before, and nn.Sequential(act, lin, act) runs
    # `act` twice.
    for name, child in model._modules.items():
        if child is None:
            continue
        full_name = f"{prefix}{name}"
        if type(child) is nn.Sequential:
            layers += flatten_sequential(child, full_name + ".")
        else:
            layers.append((full_name, child))
    return layers


def whole_model_plan(model: Callable, x: torch.Tensor) -> Plan:
    """The plan of a model that cannot be captured as a graph: one fallback step, the whole model,
    checked on one probe sample."""
    probe = x[:1] if x.shape[0] > 0 else x.new_zeros((1, *x.shape[1:]))
    with torch.no_grad():
        try:
            output = model(probe)
        except Exception as error:
            raise ValueError(f"the model failed on a per-sample input of shape {list(x.shape[1:])}: {error}") from error
    if not isinstance(output, torch.Tensor):
        raise StructuredOutputError(f"the model must return a single tensor [B, *out_shape], got {type(output).__name__}; "
                                    "jx.batch_jacobian(model, x) returns a structure of Jacobians for it")
    if output.dim() < 1 or output.shape[0] != 1:
        raise ValueError(f"the model must keep the batch dimension: one sample in gave shape {list(output.shape)}")
    step = Step("model", model, None, tuple(x.shape[1:]), tuple(output.shape[1:]))
    return Plan([step], step.input_shape, step.output_shape, x.dtype, x.device)
