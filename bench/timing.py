"""Interleaved timing: every method's runs are spread evenly over one shared schedule, so a burst of
machine noise hits all methods alike instead of whichever happened to run then."""
import gc
import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch


@dataclass(frozen=True)
class Budget:
    target_s: float  # wall time aimed at per method per case
    min_runs: int
    max_runs: int  # caps the runs of microsecond-scale calls, where more adds no precision
    warmup_runs: int  # after the correctness check, which is every method's first call
    slow_call_s: float  # a method whose first call took longer gets only `slow_runs` timed runs...
    slow_runs: int  # ...and with 0 the first (cold) call is its time: one slow peer must not eat the budget


FULL = Budget(target_s=1.5, min_runs=5, max_runs=5000, warmup_runs=1, slow_call_s=2.0, slow_runs=1)
QUICK = Budget(target_s=0.1, min_runs=3, max_runs=200, warmup_runs=1, slow_call_s=0.3, slow_runs=0)


@dataclass
class Timing:
    samples: List[float]  # seconds per timed call
    cold: bool = False  # True: the only sample is the first call, which includes one-off work


def timed_call(function: Callable[[], object], device: str) -> Tuple[object, float]:
    """(result, seconds) of one call. On CUDA: between events recorded on the current stream just before
    and after the call, with the GPU idle at the start (synchronised). Then no earlier work is charged to
    the call, while the host's launch overhead is, as it is to a caller waiting for the result."""
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = function()
        end.record()
        end.synchronize()
        return result, start.elapsed_time(end) / 1e3  # elapsed_time is in milliseconds
    start_s = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start_s


def seconds_of(function: Callable[[], object], device: str) -> float:
    return timed_call(function, device)[1]


def _run_count(seconds_per_call: float, budget: Budget) -> int:
    """Runs that take about budget.target_s, within the budget's bounds."""
    return min(budget.max_runs, max(budget.min_runs, math.ceil(budget.target_s / max(seconds_per_call, 1e-9))))


def time_interleaved(runners: Dict[str, Callable[[], object]], first_call_s: Dict[str, float],
                     budget: Budget, device: str) -> Dict[str, Timing]:
    """Times every runner, whose first call (taking first_call_s) has already happened, on `device`."""
    timings, counts = {}, {}
    for name, runner in runners.items():
        if first_call_s[name] > budget.slow_call_s:
            if budget.slow_runs == 0:
                timings[name] = Timing([first_call_s[name]], cold=True)
            else:
                counts[name] = budget.slow_runs
            continue
        estimate = min([seconds_of(runner, device) for _ in range(budget.warmup_runs)], default=first_call_s[name])
        counts[name] = _run_count(estimate, budget)
    rounds = max(counts.values(), default=0)
    samples = {name: [] for name in counts}
    gc.collect()
    gc.disable()  # a collection inside one timed call would be charged to whichever method ran
    try:
        names, order = list(counts), random.Random(0)
        for round_index in range(rounds):
            # A fresh order every round (seeded), so that no method always runs right after the same other
            # one: in a fixed order, and in a rotated one (which keeps every method's predecessor), `ours
            # (auto)`, always after JAX jacfwd, ran 1.15-1.35x slower than `ours (reverse)`, the same
            # computation (tiny, small, pinn, cifar; 2026-11-26).
            order.shuffle(names)
            for name in names:
                count = counts[name]
                # Runs are spread evenly: this method runs in the rounds where its share steps up.
                if (round_index + 1) * count // rounds > round_index * count // rounds:
                    samples[name].append(seconds_of(runners[name], device))
    finally:
        gc.enable()
    timings.update({name: Timing(values) for name, values in samples.items()})
    return timings
