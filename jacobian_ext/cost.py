"""Cost model for the accumulation order: multiply-adds of a forward sweep (rows = input size D) and
of a reverse sweep (rows = output size C) over the same chain of layers.

Both sweeps start from a lazy identity: a Linear applied to the identity costs nothing (its Jacobian
is the weight), a Linear applied to a batch-shared block costs one GEMM for all samples, and only
per-sample factors (activations, softmax, fallback modules) make the block per-sample.
"""
from dataclasses import dataclass
from typing import Iterable, Sequence

# torch.func's cost per pushed column relative to the multiply-adds of the module's own forward
# (graph construction, vmap batching rules, no lazy seeds); only the ratio between the two sweeps
# matters, so a rough constant is enough.
FALLBACK_OVERHEAD = 4.0
# A softmax row update reads the row twice and writes it once.
SOFTMAX_PASSES = 3.0


@dataclass(frozen=True)
class CostItem:
    """One step of the chain: kind is "linear", "rowwise" (activation, softmax) or "fallback"."""

    kind: str
    in_width: int
    out_width: int
    passes: float = 1.0  # rowwise: passes over the block; fallback: multiply-adds per sample of its forward


def sweep_cost(items: Iterable[CostItem], rows: int, batch: int) -> float:
    """Multiply-adds of propagating a [batch, rows, width] block through `items` in the given order."""
    state = "identity"
    cost = 0.0
    for item in items:
        if item.kind == "linear":
            if state != "identity":
                cost += rows * item.in_width * item.out_width * (batch if state == "per_sample" else 1)
                state = state if state == "per_sample" else "shared"
            else:
                state = "shared"
        elif item.kind == "rowwise":
            cost += item.passes * batch * rows * max(item.in_width, item.out_width)
            state = "per_sample"
        else:
            cost += FALLBACK_OVERHEAD * batch * rows * (item.passes + item.in_width + item.out_width)
            state = "per_sample"
    return cost


def mode_costs(items: Sequence[CostItem], in_features: int, out_features: int, batch: int) -> dict:
    """{"forward": MACs, "reverse": MACs}; the forward sweep pays one extra transpose of J at the end."""
    return {
        "forward": sweep_cost(items, in_features, batch) + batch * in_features * out_features,
        "reverse": sweep_cost(reversed(items), out_features, batch),
    }


def choose_mode(costs: dict) -> str:
    """The cheaper sweep; reverse on a tie (it needs no final transpose)."""
    return "forward" if costs["forward"] < costs["reverse"] else "reverse"
