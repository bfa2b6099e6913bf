"""Cost model for the accumulation order: multiply-adds of a forward sweep (rows = input size D), of a
reverse sweep (rows = output size C), and of every bracketing of the per-sample chain product between
them (matrix-chain order, by dynamic programming over the steps).

Sweeps start from a lazy identity: a Linear applied to the identity costs nothing (its Jacobian is the
weight), a Linear applied to a batch-shared block costs one GEMM for all samples, and only per-sample
factors (activations, softmax, fallback modules) make the block per-sample. Diagonal factors cost one
pass over the block, nothing like a GEMM, so the bracketing is decided by the Linear layers' widths.
"""
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

# torch.func's cost per pushed column relative to the multiply-adds of the module's own forward
# (graph construction, vmap batching rules, no lazy seeds); only the ratio between the two sweeps
# matters, so a rough constant is enough.
FALLBACK_OVERHEAD = 4.0
# A softmax row update reads the row twice and writes it once.
SOFTMAX_PASSES = 3.0
# mode="auto" runs a split bracketing only when it needs at most this fraction of the cheaper sweep's
# multiply-adds: every extra part costs one more op call, a forward through its layers and a batched
# GEMM to join, which the count of multiply-adds does not see.
SPLIT_MARGIN = 0.8


@dataclass(frozen=True)
class CostItem:
    """One step of the chain: kind is "linear", "rowwise" (activation, softmax) or "fallback"."""

    kind: str
    in_width: int
    out_width: int
    passes: float = 1.0  # rowwise: passes over the block; fallback: multiply-adds per sample of its forward

    @property
    def per_sample(self) -> bool:
        return self.kind != "linear"


def _sweep_step(state: str, item: CostItem, rows: int, batch: int) -> Tuple[str, float]:
    """(state after `item`, multiply-adds of applying it) for a [batch, rows, width] block in `state`:
    "identity", "shared" (one block for all samples) or "per_sample"."""
    if item.kind == "linear":
        if state == "identity":
            return "shared", 0.0
        return state, rows * item.in_width * item.out_width * (batch if state == "per_sample" else 1)
    if item.kind == "rowwise":
        return "per_sample", item.passes * batch * rows * max(item.in_width, item.out_width)
    return "per_sample", FALLBACK_OVERHEAD * batch * rows * (item.passes + item.in_width + item.out_width)


def sweep_cost(items: Iterable[CostItem], rows: int, batch: int) -> float:
    """Multiply-adds of propagating a [batch, rows, width] block through `items` in the given order."""
    state, total = "identity", 0.0
    for item in items:
        state, cost = _sweep_step(state, item, rows, batch)
        total += cost
    return total


def mode_costs(items: Sequence[CostItem], in_features: int, out_features: int, batch: int) -> dict:
    """{"forward": MACs, "reverse": MACs}; the forward sweep pays one extra transpose of J at the end."""
    return {
        "forward": sweep_cost(items, in_features, batch) + batch * in_features * out_features,
        "reverse": sweep_cost(reversed(items), out_features, batch),
    }


def choose_mode(costs: dict) -> str:
    """The cheaper sweep; reverse on a tie (it needs no final transpose)."""
    return "forward" if costs["forward"] < costs["reverse"] else "reverse"


@dataclass(frozen=True)
class Bracketing:
    """How to multiply out the Jacobian of steps [start, stop): one sweep over them (`mode` is "forward"
    or "reverse"), or J[split:stop] @ J[start:split] with each part bracketed in turn."""

    start: int
    stop: int
    cost: float  # multiply-adds, this part's sweeps and joins included
    mode: Optional[str] = None
    earlier: Optional["Bracketing"] = None  # steps [start, split)
    later: Optional["Bracketing"] = None  # steps [split, stop)

    @property
    def is_sweep(self) -> bool:
        return self.mode is not None

    def sweeps(self) -> List["Bracketing"]:
        """The single-sweep parts, in the order the input passes through them."""
        return [self] if self.is_sweep else self.earlier.sweeps() + self.later.sweeps()

    def __str__(self) -> str:
        if self.is_sweep:
            return f"{self.mode}[{self.start}:{self.stop}]"
        return f"({self.later} @ {self.earlier})"


def best_bracketing(step_items: Sequence[Sequence[CostItem]], widths: Sequence[int], batch: int) -> Bracketing:
    """The cheapest way to multiply out a chain of steps: dynamic programming over every sub-chain
    [i, j), which is either one sweep or the product of two cheapest sub-chains. widths[i] is the flat
    width between step i-1 and step i (widths[0] = D, widths[-1] = C). Ties go to sweeps, and between
    sweeps to reverse, as in choose_mode. O(n^3) for n steps."""
    count = len(step_items)
    if count == 0:
        return Bracketing(0, 0, 0.0, "reverse")
    forward = [[0.0] * (count + 1) for _ in range(count + 1)]
    reverse = [[0.0] * (count + 1) for _ in range(count + 1)]
    for start in range(count):  # sweeps grown one step at a time from each end
        state, total = "identity", 0.0
        for stop in range(start + 1, count + 1):
            for item in step_items[stop - 1]:
                state, cost = _sweep_step(state, item, widths[start], batch)
                total += cost
            forward[start][stop] = total + batch * widths[start] * widths[stop]
    for stop in range(count, 0, -1):
        state, total = "identity", 0.0
        for start in range(stop - 1, -1, -1):
            for item in reversed(step_items[start]):
                state, cost = _sweep_step(state, item, widths[stop], batch)
                total += cost
            reverse[start][stop] = total
    per_sample_before = [0]  # prefix counts of per-sample items: is a sub-chain's product per-sample?
    for items in step_items:
        per_sample_before.append(per_sample_before[-1] + sum(item.per_sample for item in items))

    best = {}
    for length in range(1, count + 1):
        for start in range(count - length + 1):
            stop = start + length
            if forward[start][stop] < reverse[start][stop]:
                choice = Bracketing(start, stop, forward[start][stop], "forward")
            else:
                choice = Bracketing(start, stop, reverse[start][stop], "reverse")
            for split in range(start + 1, stop):
                earlier, later = best[start, split], best[split, stop]
                per_sample = per_sample_before[stop] > per_sample_before[start]
                join = widths[stop] * widths[split] * widths[start] * (batch if per_sample else 1)
                if earlier.cost + later.cost + join < choice.cost:
                    choice = Bracketing(start, stop, earlier.cost + later.cost + join, None, earlier, later)
            best[start, stop] = choice
    return best[0, count]
