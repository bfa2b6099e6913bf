"""Measures one case: checks every method's J against the reference, then times the correct ones."""
import math
import statistics
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

import jacobian_ext as jx

from .cases import Case, build_model_and_input
from .floors import CaseFloor, case_floor
from .memory import cuda_peak_growth
from .methods import REFERENCE, Method, as_torch
from .timing import Budget, Timing, time_interleaved, timed_call

TOLERANCE = 1e-4  # max |J - reference| / max |reference|, float32


@dataclass
class CaseResult:
    case: Case
    auto_mode: str
    floor: CaseFloor
    timings: Dict[str, Timing] = field(default_factory=dict)  # method name -> its timed calls
    failures: Dict[str, str] = field(default_factory=dict)  # method name -> why it was not timed
    # Bytes (None: failed); on a CPU the peak-RSS growth with --memory, on a GPU the allocator's, always.
    peak_memory: Dict[str, Optional[int]] = field(default_factory=dict)
    memory_bound: int = 0  # bytes of J plus the largest Jacobian block of auto's order (target: peak <= 1.25x)

    def seconds(self, method_name: str) -> Optional[float]:
        timing = self.timings.get(method_name)
        return statistics.median(timing.samples) if timing else None


def _relative_error(jacobian: torch.Tensor, reference: torch.Tensor) -> float:
    if jacobian.shape != reference.shape:
        return float("inf")
    return float((jacobian - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


def _checked_runners(methods: List[Method], model, x, failures: Dict[str, str], device: str):
    """Prepares every method and makes its first call, the check; keeps those whose J matches the
    reference, with the seconds that first call took. The reference goes first so that only one J
    besides it is alive at a time."""
    runners, first_call_s, reference = {}, {}, None
    for method in sorted(methods, key=lambda m: m.name != REFERENCE):
        try:
            runner = method.prepare(model, x)
            output, first_call_s[method.name] = timed_call(runner, device)
            jacobian = as_torch(output).detach()
        except Exception as error:  # a peer that cannot handle a case is reported, not fatal
            failures[method.name] = f"error: {type(error).__name__}"
            print(f"    {method.name} failed: {type(error).__name__}: {error}")
            continue
        if reference is None:
            if method.name != REFERENCE:
                raise RuntimeError(f"the reference {REFERENCE} failed: {failures.get(REFERENCE)}")
            reference = jacobian
        error = _relative_error(jacobian, reference)
        if error <= TOLERANCE:  # NaN fails too
            runners[method.name] = runner
        else:
            failures[method.name] = f"wrong ({error:.1e})"
    return runners, first_call_s


def memory_bound(model, x) -> int:
    """Bytes of J [B, C, D] plus the largest intermediate Jacobian block of the order auto runs: [B, C, H]
    over the hidden widths H in reverse, [B, D, H] in forward, the larger of the two for a split."""
    jm = jx.compile(model)
    plan = jm.plan_for(x)
    mode = plan.choose_mode(x.shape[0], "auto")
    hidden = [math.prod(step.output_shape) for step in plan.steps[:-1]] or [0]
    rows = {"forward": [plan.in_features], "reverse": [plan.out_features]}.get(mode, [plan.in_features,
                                                                                   plan.out_features])
    batch, size = x.shape[0], x.element_size()
    return size * batch * (plan.out_features * plan.in_features + max(rows) * max(hidden))


def auto_mode(model, x) -> str:
    jm = jx.compile(model)
    with torch.no_grad():
        jm(x)
    return jm.plan_for(x).decisions[x.shape[0]][0]


def warm_up_process(methods: List[Method], case: Case, device: str):
    """Calls every method once on a small case, so that the one-off costs of the process (loading
    libraries and CUDA kernels, first use of torch.func or JAX) are not charged to the first case measured."""
    model, x = build_model_and_input(case, device)
    for method in methods:
        try:
            method.prepare(model, x)()
        except Exception:  # reported when the real case runs
            pass


def run_case(case: Case, methods: List[Method], budget: Budget, device: str) -> CaseResult:
    model, x = build_model_and_input(case, device)
    result = CaseResult(case, auto_mode(model, x), case_floor(model, x), memory_bound=memory_bound(model, x))
    runners, first_call_s = _checked_runners(methods, model, x, result.failures, device)
    result.timings = time_interleaved(runners, first_call_s, budget, device)
    if device == "cuda":  # after timing, so that every call measured is a warm one
        result.peak_memory = {name: cuda_peak_growth(runner) for name, runner in runners.items()}
    return result
