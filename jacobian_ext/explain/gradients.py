"""The attribution methods on a JacobianRows engine and a checked target: gradients (saliency, input x
gradient), integrated gradients along a straight path, and the noise tunnel (SmoothGrad and its kin)
around any of them. Results keep the target's layout: [B, C, *in], [B, *in] or [B, K, *in]."""
import math
from typing import Callable, Optional, Tuple

import torch

from .budget import rows_per_call
from .prefix import pull_back
from .progress import Progress
from .quadrature import points_and_weights
from .rows import JacobianRows
from .targets import TargetSpec

NOISE_TUNNEL_TYPES = ("smoothgrad", "smoothgrad_sq", "vargrad")


def gradients(rows: JacobianRows, x: torch.Tensor, spec: TargetSpec) -> torch.Tensor:
    return rows(x, spec)[1]


def per_sample_factor(factor: torch.Tensor, spec: TargetSpec) -> torch.Tensor:
    """A per-sample tensor [B, *in] shaped to multiply attributions with a class axis ([B, 1, *in])."""
    return factor if spec.squeezes_row_axis else factor.unsqueeze(1)


def rows_width(rows: JacobianRows, x: torch.Tensor, spec: TargetSpec) -> int:
    """Jacobian rows per sample for this target (1 for one target per sample)."""
    if spec.kind == "all":
        return rows.num_outputs(x)
    return 1 if spec.squeezes_row_axis else len(spec.rows)


def baseline_tensor(baselines, x: torch.Tensor, name: str = "baselines") -> torch.Tensor:
    """Captum's baselines for one input: None (zeros), a number, or a tensor shaped like x or like one
    sample ([1, *in]); returned broadcastable against x."""
    if baselines is None:
        return torch.zeros((1, *x.shape[1:]), dtype=x.dtype, device=x.device)
    if isinstance(baselines, (int, float)) and not isinstance(baselines, bool):
        return torch.full((1, *x.shape[1:]), float(baselines), dtype=x.dtype, device=x.device)
    if not isinstance(baselines, torch.Tensor):
        raise TypeError(f"{name} must be None, a number or a tensor, got {type(baselines).__name__}")
    if baselines.dim() != x.dim() or baselines.shape[1:] != x.shape[1:] or baselines.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"{name} must have the shape of inputs {list(x.shape)} or [1, *in], got "
                         f"{list(baselines.shape)}")
    return baselines.to(dtype=x.dtype, device=x.device)


def integrated_gradients(rows: JacobianRows, x: torch.Tensor, spec: TargetSpec, baselines, n_steps: int,
                         method: str, internal_batch_size: Optional[int], multiply_by_inputs: bool = True,
                         return_convergence_delta: bool = False, progress=None):
    """Captum's integrated gradients for every requested row at once: the path points of all steps and
    samples (step-major, as Captum orders them) go through the model in chunks of rows; each chunk's
    Jacobian rows are weighted by their step's weight and summed into their sample's total at once, so
    memory holds one chunk, never steps x batch x classes. A model that starts with affine layers has its
    rows summed before them and pulled back through them once (prefix.py)."""
    alphas, weights = (t.to(dtype=x.dtype, device=x.device) for t in points_and_weights(method, n_steps))
    baseline = baseline_tensor(baselines, x)
    batch, path = x.shape[0], x - baseline
    baseline = baseline.expand_as(x)
    total_rows = n_steps * batch
    bytes_per_row = (rows_width(rows, x, spec) + 2) * x[:1].numel() * x.element_size()
    chunk = rows_per_call(total_rows, batch, bytes_per_row, x.device, internal_batch_size)
    split = rows.affine_split() if total_rows else None
    prefix, sweep = split if split is not None else (None, rows)
    spec_of_all_rows = spec.repeat(n_steps)
    total = None
    bar = Progress(math.ceil(total_rows / chunk), "integrated gradients", progress)
    for start in range(0, total_rows, chunk):
        row = torch.arange(start, min(start + chunk, total_rows), device=x.device)
        step, sample = row // batch, row % batch
        points = baseline[sample] + _per_row(alphas[step], x) * path[sample]
        jacobian = sweep(points if prefix is None else prefix(points), spec_of_all_rows.take(row))[1]
        weighted = jacobian * _per_row(weights[step], jacobian)
        if total is None:
            total = x.new_zeros((batch, *weighted.shape[1:]))
        total.index_add_(0, sample, weighted)
        bar.update()
    if total is None:  # an empty batch
        total = rows(x, spec)[1]
    elif prefix is not None:
        total = pull_back(prefix, total, not spec.squeezes_row_axis, x.shape[1:])
    attributions = total * per_sample_factor(path, spec) if multiply_by_inputs else total
    if not return_convergence_delta:
        return attributions
    sums = sum_over_input(attributions, attributions.dim() - x.dim())
    return attributions, convergence_delta(rows, sums, x, baseline, spec)


def sum_over_input(attributions: torch.Tensor, row_axes: int) -> torch.Tensor:
    """Attributions [B, (K,) *in] summed over *in: [B] or [B, K] (also for an empty batch or in = ())."""
    lead = attributions.shape[:1 + row_axes]
    return attributions.reshape(*lead, math.prod(attributions.shape[1 + row_axes:])).sum(-1)


def convergence_delta(rows: JacobianRows, attribution_sums, x, baseline, spec: TargetSpec) -> torch.Tensor:
    """Captum's completeness gap: the attributions' sums over the input (attribution_sums, per sample and
    requested class: [B], [B, K] or [B, C]) minus f(x) - f(baseline)."""
    with torch.no_grad():
        change = spec.select(rows.model(x)) - spec.select(rows.model(baseline.expand_as(x)))
    return attribution_sums - change


def noise_tunnel(attribute_copies: Callable, batch: int, device: torch.device, nt_type: str, nt_samples: int,
                 nt_samples_batch_size: Optional[int], bytes_per_copy=None, return_convergence_delta: bool = False,
                 progress=None):
    """Captum's NoiseTunnel over `attribute_copies(copies)`, which draws noise for `copies` noisy copies of
    each of the `batch` samples (add_noise: adjacent copies, Captum's draw) and returns their attributions
    [batch * copies, ...] (with deltas when return_convergence_delta). Called once per partition of
    nt_samples_batch_size copies, as Captum partitions, so the same seed gives the same noise. Without
    nt_samples_batch_size all copies go in one call if they fit the memory budget (bytes_per_copy per
    sample copy), else in as many partitions as needed."""
    if nt_type not in NOISE_TUNNEL_TYPES:
        raise ValueError(f"nt_type must be one of {', '.join(NOISE_TUNNEL_TYPES)}; got {nt_type!r}")
    for name, value in (("nt_samples", nt_samples), ("nt_samples_batch_size", nt_samples_batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if nt_samples_batch_size is None:
        per_call = rows_per_call(nt_samples * batch, batch, bytes_per_copy or 0, device)
        nt_samples_batch_size = max(1, per_call // max(batch, 1))
    partition = min(nt_samples, nt_samples_batch_size)
    sizes = [partition] * (nt_samples // partition) + ([nt_samples % partition] if nt_samples % partition else [])
    total = total_sq = None
    deltas = []
    bar = Progress(len(sizes), "noise tunnel", progress)
    for copies in sizes:
        result = attribute_copies(copies)
        if return_convergence_delta:
            result, delta = result
            deltas.append(delta)
        per_sample = result.view(batch, copies, *result.shape[1:])
        total = _add(total, per_sample.sum(1))
        total_sq = _add(total_sq, per_sample.pow(2).sum(1))
        bar.update()
    mean, mean_sq = total * 1 / nt_samples, total_sq * 1 / nt_samples
    smoothed = {"smoothgrad": mean, "smoothgrad_sq": mean_sq}.get(nt_type)
    if smoothed is None:
        smoothed = mean_sq - mean * mean
    return (smoothed, torch.cat(deltas)) if return_convergence_delta else smoothed


def stdevs_per_input(stdevs, count: int) -> Tuple[float, ...]:
    """Captum's stdevs: one number for every input tensor, or a tuple of one per input."""
    per_input = stdevs if isinstance(stdevs, tuple) else (stdevs,) * count
    if len(per_input) != count:
        raise ValueError(f"stdevs as a tuple needs one value per input tensor ({count}), got {len(per_input)}")
    for value in per_input:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"stdevs must be a number or a tuple of numbers (one per input), got "
                            f"{type(value).__name__}")
    return per_input


def add_noise(x: torch.Tensor, copies: int, stdev: float, generator=None) -> torch.Tensor:
    """`copies` noisy copies of each sample, adjacent, drawn as Captum draws them: normal(0, a tensor of
    stdevs) in the default dtype, added to the repeated inputs."""
    shape = (x.shape[0] * copies, *x.shape[1:])
    noise = torch.normal(0, torch.tensor(float(stdev), device=x.device).repeat(shape), generator=generator)
    return x.repeat_interleave(copies, dim=0) + noise


def _add(total, value):
    return value if total is None else total + value


def _per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[R] values shaped to broadcast over the rows of `like` [R, ...]."""
    return values.view(-1, *([1] * (like.dim() - 1)))
