"""The `target` argument: which output rows (classes) to attribute, checked against the batch and the
number of outputs, and how the computed rows map back to the result's layout.

Forms (Captum's conventions where Captum has one):
  None                      every output          -> [B, C, *in]
  int, or a one-element int tensor                -> [B, *in]
  list of B ints, or a 1-D int tensor of length B  one target per sample -> [B, *in]
  classes(k1, k2, ...)      the same K classes for every sample -> [B, K, *in]
A plain list always means one target per sample (as in Captum), so it must have length B; the
"same classes for all samples" form is spelled with `classes(...)` to stay unambiguous when K == B.
"""
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch


class classes:  # noqa: N801 - lower case: it reads as a target form, like a keyword
    """Target form: the same classes for every sample; the result is [B, K, *in] in this order."""

    def __init__(self, *indices):
        if len(indices) == 1 and not isinstance(indices[0], int):
            indices = tuple(indices[0])  # classes([1, 2]) or classes(range(3)) as well as classes(1, 2)
        self.indices = tuple(_check_index(i, "classes(...)") for i in indices)

    def __repr__(self) -> str:
        return f"classes{self.indices}"


@dataclass(frozen=True)
class TargetSpec:
    """A checked target. kind: "all", "single", "per_sample" or "classes". rows: the output rows to
    compute, shared by all samples (None: every row); per_sample: each sample's row (kind per_sample)."""

    kind: str
    rows: Optional[Tuple[int, ...]]
    per_sample: Optional[torch.Tensor] = None

    @property
    def squeezes_row_axis(self) -> bool:
        """Whether the result has no class axis ([B, *in])."""
        return self.kind in ("single", "per_sample")

    def repeat(self, times: int) -> "TargetSpec":
        """The target for the batch x repeated `times` times along dim 0 (step-major, as x.repeat)."""
        if self.kind != "per_sample":
            return self
        return TargetSpec(self.kind, self.rows, self.per_sample.repeat(times))

    def repeat_interleave(self, times: int) -> "TargetSpec":
        """The target for x.repeat_interleave(times, 0) (each sample's copies adjacent)."""
        if self.kind != "per_sample":
            return self
        return TargetSpec(self.kind, self.rows, self.per_sample.repeat_interleave(times))

    def take(self, indices: torch.Tensor) -> "TargetSpec":
        """The target for the rows x[indices] of a batch (the distinct classes recounted)."""
        if self.kind != "per_sample":
            return self
        per_sample = self.per_sample[indices.cpu()]
        return TargetSpec(self.kind, tuple(sorted(set(per_sample.tolist()))), per_sample)

    def select(self, outputs: torch.Tensor) -> torch.Tensor:
        """The targeted entries of model outputs [B, C]: [B, C], [B] or [B, K] like the attributions."""
        if self.kind == "all":
            return outputs
        if self.kind == "per_sample":
            return outputs.gather(1, self.per_sample.to(outputs.device).unsqueeze(1)).squeeze(1)
        picked = outputs[:, list(self.rows)]
        return picked[:, 0] if self.kind == "single" else picked


class CheckedTarget:
    """A target already checked for this batch (a NoiseTunnel passing its expanded target on)."""

    def __init__(self, spec: TargetSpec):
        self.spec = spec


def parse_target(target, batch: int, num_outputs: int) -> TargetSpec:
    """Checks `target` for a batch of `batch` samples and a model with `num_outputs` outputs per sample."""
    if isinstance(target, CheckedTarget):
        return target.spec
    if target is None:
        return TargetSpec("all", None)
    if isinstance(target, classes):
        return TargetSpec("classes", tuple(_in_range(i, num_outputs) for i in target.indices))
    if isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(f"target must hold integer class indices, got a tensor of dtype {target.dtype}")
        if target.numel() == 1 and target.dim() <= 1:
            return TargetSpec("single", (_in_range(int(target.item()), num_outputs),))
        if target.dim() != 1:
            raise ValueError(f"target as a tensor must be 1-D (one class per sample), got shape {list(target.shape)}")
        return _per_sample(target.tolist(), batch, num_outputs)
    if isinstance(target, (list, tuple)):
        if isinstance(target, tuple):
            raise TypeError(
                "target as a tuple indexes outputs with more than 2 dimensions in Captum, which is not supported "
                "(the model must return [B, C]); for the same classes for every sample write explain.classes(...)"
            )
        return _per_sample(target, batch, num_outputs)
    return TargetSpec("single", (_in_range(_check_index(target, "target"), num_outputs),))


def _per_sample(indices: Sequence, batch: int, num_outputs: int) -> TargetSpec:
    if len(indices) != batch:
        raise ValueError(
            f"target as a list or 1-D tensor gives one class per sample, so it needs {batch} entries (the batch "
            f"size), got {len(indices)}; for the same classes for every sample write explain.classes(...)"
        )
    rows = [_in_range(_check_index(i, "target entries"), num_outputs) for i in indices]
    per_sample = torch.tensor(rows, dtype=torch.long)
    return TargetSpec("per_sample", tuple(sorted(set(rows))), per_sample)


def _check_index(index, what: str) -> int:
    if isinstance(index, bool) or not isinstance(index, int):
        raise TypeError(f"{what} must be integer class indices, got {type(index).__name__} {index!r}")
    return index


def _in_range(index: int, num_outputs: int) -> int:
    """A class index in [-C, C), negative ones counted from the end as in Python and Captum."""
    if not -num_outputs <= index < num_outputs:
        raise ValueError(f"target class {index} is out of range for a model with {num_outputs} outputs")
    return index % num_outputs
