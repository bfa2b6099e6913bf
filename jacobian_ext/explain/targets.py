"""The `target` argument: which outputs to attribute, checked against the batch and the model's
per-sample output shape, and how the computed rows map back to the result's layout. Outputs are counted
flat (row-major over the per-sample output shape), so an N-d output is a C = prod(out) wide one.

Forms (Captum's conventions where Captum has one):
  None                      Captum's classes: the model's one output per sample ([B] or [B, 1, ...]);
                            the functions (explain.saliency, ...): every output -> [B, C, *in]
  all_classes               every output, for the classes too -> [B, C, *in] ([B, *out, *in] there)
  int, or a one-element int tensor                -> [B, *in]: output[:, i]
  tuple of ints             output[:, i, j, ...] of an N-d output -> [B, *in]
  list of B ints or tuples, or a 1-D int tensor of length B  one target per sample -> [B, *in]
  classes(k1, k2, ...)      the same K outputs for every sample -> [B, K, *in]
An index (or a tuple's indices) may leave trailing output dimensions of size 1 unindexed, as in Captum.
A plain list always means one target per sample (as in Captum), so it must have length B; the
"same classes for all samples" form is spelled with `classes(...)` to stay unambiguous when K == B.
Invalid targets raise InvalidTarget / InvalidTargetType: ValueError / TypeError that name `target`, and
AssertionError too, which is what Captum raises for them (so code catching Captum's errors still works).
"""
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch


class InvalidTarget(ValueError, AssertionError):
    """A target that does not fit the batch or the model's outputs."""


class InvalidTargetType(TypeError, AssertionError):
    """A target of a type that names no output."""


class _AllClasses:
    def __repr__(self) -> str:
        return "explain.all_classes"


# Target form: every output of every sample (the classes' opt-in for what target=None means in the functions).
all_classes = _AllClasses()


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


def parse_target(target, batch: int, output_shape, none_means_all: bool = True) -> TargetSpec:
    """Checks `target` for a batch of `batch` samples and a model whose per-sample output has shape
    `output_shape` (an int C for [B, C]). none_means_all: what target=None means, every output (the
    functions) or Captum's one output per sample (the classes)."""
    if isinstance(target, CheckedTarget):
        return target.spec
    shape = (output_shape,) if isinstance(output_shape, int) else tuple(output_shape)
    num_outputs = math.prod(shape)
    if target is all_classes or (target is None and none_means_all):
        return TargetSpec("all", None)
    if target is None:
        if num_outputs != 1:
            raise InvalidTarget(
                f"target=None needs a model with one output per sample (Captum's convention), but its outputs per "
                f"sample have shape {list(shape)}; pass a target, or target=explain.all_classes for every output")
        return TargetSpec("single", (0,))
    if isinstance(target, classes):
        return TargetSpec("classes", tuple(_flat_index((i,), shape) for i in target.indices))
    if isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise InvalidTargetType(
                f"target must hold integer class indices, got a tensor of dtype {target.dtype}")
        if target.numel() == 1 and target.dim() <= 1:
            return TargetSpec("single", (_flat_index((int(target.item()),), shape),))
        if target.dim() != 1:
            raise InvalidTarget(f"target as a tensor must be 1-D (one class per sample), got shape {list(target.shape)}")
        return _per_sample(target.tolist(), batch, shape)
    if isinstance(target, list):
        return _per_sample(target, batch, shape)
    if isinstance(target, tuple):
        return TargetSpec("single", (_flat_index(_check_indices(target, "target"), shape),))
    return TargetSpec("single", (_flat_index((_check_index(target, "target"),), shape),))


def _per_sample(indices: Sequence, batch: int, shape: Tuple[int, ...]) -> TargetSpec:
    if len(indices) != batch:
        raise InvalidTarget(
            f"target as a list or 1-D tensor gives one class per sample, so it needs {batch} entries (the batch "
            f"size), got {len(indices)}; for the same classes for every sample write explain.classes(...)"
        )
    rows = [_flat_index(_check_indices(i, "target entries") if isinstance(i, tuple)
                        else (_check_index(i, "target entries"),), shape) for i in indices]
    per_sample = torch.tensor(rows, dtype=torch.long)
    return TargetSpec("per_sample", tuple(sorted(set(rows))), per_sample)


def _check_indices(indices: tuple, what: str) -> Tuple[int, ...]:
    return tuple(_check_index(i, what) for i in indices)


def _check_index(index, what: str) -> int:
    if isinstance(index, bool) or not isinstance(index, int):
        raise InvalidTargetType(f"{what} must be integer class indices, got {type(index).__name__} {index!r}")
    return index


def _flat_index(indices: Tuple[int, ...], shape: Tuple[int, ...]) -> int:
    """The flat (row-major) output index of output[b][indices] in a per-sample output of this shape; the
    dimensions left unindexed must be of size 1, so that one output is named. Negative indices count from
    the end as in Python and Captum."""
    if len(indices) > len(shape):
        what = f"the tuple {indices}" if len(indices) > 1 else f"class {indices[0]}"
        raise InvalidTarget(f"target {what} has {len(indices)} indices, but the model's outputs per sample have "
                            f"{len(shape)} dimensions (shape {list(shape)})")
    if math.prod(shape[len(indices):]) != 1:
        raise InvalidTarget(f"target {indices if len(indices) > 1 else indices[0]} leaves outputs of shape "
                            f"{list(shape[len(indices):])} per sample, not one output; index every dimension of "
                            f"the per-sample output shape {list(shape)}")
    flat = 0
    for index, size in zip(indices, shape):
        if not -size <= index < size:
            where = f" in that dimension (per-sample output shape {list(shape)})" if len(shape) > 1 else ""
            raise InvalidTarget(f"target class {index} is out of range for a model with {size} outputs{where}")
        flat = flat * size + index % size
    return flat * math.prod(shape[len(indices):])
