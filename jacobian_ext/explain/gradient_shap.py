"""Captum's GradientShap on the engine: the expected gradients of n_samples points per sample, each at a
random point of the segment from a baseline drawn from the baselines' distribution to a noisy copy of the
input, times (noisy input - baseline). The random draws are Captum's, in Captum's order: the baselines'
rows (NumPy's global generator), the Gaussian noise (torch's, as NoiseTunnel draws it), the points on the
segments (NumPy's), so the same torch and NumPy seeds give Captum's result."""
import inspect

import numpy as np
import torch

from . import gradients as methods
from .captum_api import PathAttribution, delta_on_engine, finish
from .captum_inputs import InvalidArgument, InvalidArgumentType


class GradientShap(PathAttribution):
    def attribute(self, inputs, baselines, n_samples: int = 5, stdevs=0.0, target=None,
                  additional_forward_args=None, return_convergence_delta: bool = False):
        """baselines: the distribution to draw from, a tensor [N, *in] (a tuple of one per input; a number
        stands for a constant), or a callable returning them (given `inputs` if it takes an argument).
        With return_convergence_delta, deltas [B * n_samples] per noisy point, each sample's adjacent."""
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
        call, spec = self._prepare(inputs, target, additional_forward_args)
        distributions = _distributions(baselines, inputs, call.inputs)
        per_input_stdevs = methods.stdevs_per_input(stdevs, len(call.inputs))
        copies, spec_of_copies = n_samples, spec.repeat_interleave(n_samples)
        with torch.no_grad():
            drawn = [d[np.random.choice(d.shape[0], copies * call.batch).tolist()] if isinstance(d, torch.Tensor)
                     else torch.full_like(x.repeat_interleave(copies, 0), float(d))
                     for d, x in zip(distributions, call.inputs)]
            noisy = [methods.add_noise(x, copies, stdev) for x, stdev in zip(call.inputs, per_input_stdevs)]
            coefficient = torch.tensor(np.random.uniform(0.0, 1.0, copies * call.batch), dtype=noisy[0].dtype,
                                       device=noisy[0].device)
            points = [_per_row(coefficient, x) * x + (1.0 - _per_row(coefficient, x)) * b for x, b in zip(noisy, drawn)]
            grads = methods.gradients(call.rows, call.pack(points), spec_of_copies)
            ends, starts = call.pack(noisy), call.pack(drawn)
            attributions = grads * methods.per_sample_factor(ends - starts, spec) if self._multiply_by_inputs else grads
            mean = attributions.view(call.batch, copies, *attributions.shape[1:]).sum(1) * 1 / copies
            if not return_convergence_delta:
                return finish(call, spec, mean)
            return finish(call, spec, (mean, delta_on_engine(call, spec_of_copies, attributions, ends, starts)))


def _per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *[1] * (like.dim() - 1))


def _distributions(baselines, given_inputs, inputs):
    """Captum's baselines distribution, one tensor [N, *in] (or a number) per input."""
    if callable(baselines):
        baselines = baselines() if not inspect.signature(baselines).parameters else baselines(given_inputs)
    per_input = baselines if isinstance(baselines, tuple) else (baselines,)
    if len(per_input) != len(inputs):
        raise InvalidArgument(f"baselines needs one distribution per input tensor ({len(inputs)}), got {len(per_input)}")
    for k, (distribution, x) in enumerate(zip(per_input, inputs)):
        name = f"baselines[{k}]" if isinstance(baselines, tuple) else "baselines"
        if isinstance(distribution, (int, float)) and not isinstance(distribution, bool):
            continue
        if not isinstance(distribution, torch.Tensor):
            raise InvalidArgumentType(f"{name} must be a tensor [N, *in] of baselines to draw from (or a number), got "
                            f"{type(distribution).__name__}")
        if distribution.dim() != x.dim() or distribution.shape[1:] != x.shape[1:] or distribution.shape[0] < 1:
            raise InvalidArgument(f"{name} must be [N, *in] with the per-sample shape of its input {list(x.shape[1:])}, "
                             f"got {list(distribution.shape)}")
    return [d.to(dtype=x.dtype, device=x.device) if isinstance(d, torch.Tensor) else d
            for d, x in zip(per_input, inputs)]
