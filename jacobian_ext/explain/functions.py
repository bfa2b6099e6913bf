"""The functional API: one call, one model; plans are built per call (keep a Captum-style object, e.g.
explain.Saliency(model), to reuse them across calls)."""
from typing import Callable, Optional

import torch

from . import gradients as methods
from .rows import JacobianRows
from .targets import parse_target


def saliency(model: Callable, x: torch.Tensor, target=None, abs: bool = True) -> torch.Tensor:
    """Input gradients of the targeted outputs (absolute values unless abs=False), computed for all
    targeted rows in one sweep. target: None (every output: [B, C, *in]), an int ([B, *in]), a list or 1-D
    tensor of one class per sample ([B, *in]), or explain.classes(k1, ...) for the same K classes of every
    sample ([B, K, *in])."""
    rows, spec = _prepare(model, x, target)
    with torch.no_grad():
        grads = methods.gradients(rows, x, spec)
        return grads.abs() if abs else grads


def input_x_gradient(model: Callable, x: torch.Tensor, target=None) -> torch.Tensor:
    """Input gradients times the input, element-wise; target as in saliency."""
    rows, spec = _prepare(model, x, target)
    with torch.no_grad():
        return methods.gradients(rows, x, spec) * methods.per_sample_factor(x, spec)


def integrated_gradients(model: Callable, x: torch.Tensor, target=None, baselines=None, n_steps: int = 50,
                         method: str = "gausslegendre", internal_batch_size: Optional[int] = None,
                         return_convergence_delta: bool = False, progress: Optional[bool] = None):
    """Integrated gradients from `baselines` (None: zeros; a number; a tensor like x or [1, *in]) to x, with
    Captum's quadrature (`method`: "gausslegendre", "riemann_left", "riemann_right", "riemann_middle",
    "riemann_trapezoid"; n_steps points). Every targeted row in one sweep per chunk of path points; chunks
    hold at most internal_batch_size points (Captum's meaning) or, by default, what fits a quarter of the
    available memory. With return_convergence_delta=True returns (attributions, delta), delta = sum of the
    attributions - (f(x) - f(baseline)) per sample and targeted class. progress: None shows a bar on long
    runs, True always, False never."""
    rows, spec = _prepare(model, x, target)
    with torch.no_grad():
        return methods.integrated_gradients(rows, x, spec, baselines, n_steps, method, internal_batch_size,
                                            return_convergence_delta=return_convergence_delta, progress=progress)


def smoothgrad(model: Callable, x: torch.Tensor, target=None, nt_samples: int = 5, stdevs: float = 1.0,
               seed: Optional[int] = None, abs: bool = True, nt_type: str = "smoothgrad",
               nt_samples_batch_size: Optional[int] = None, progress: Optional[bool] = None) -> torch.Tensor:
    """SmoothGrad: saliency averaged over nt_samples noisy copies of each input (Gaussian noise of standard
    deviation stdevs), Captum's NoiseTunnel(Saliency) with the same defaults; nt_type "smoothgrad_sq" and
    "vargrad" as in Captum. seed: None draws from torch's global generator exactly as Captum does (so
    torch.manual_seed gives Captum's noise), an int from a private generator seeded with it."""
    rows, spec = _prepare(model, x, target)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=x.device)
        generator.manual_seed(seed)

    stdev = methods.stdevs_per_input(stdevs, 1)[0]

    def noisy_saliency(copies):
        grads = methods.gradients(rows, methods.add_noise(x, copies, stdev, generator), spec.repeat_interleave(copies))
        return grads.abs() if abs else grads

    bytes_per_copy = 3 * methods.rows_width(rows, x, spec) * x[:1].numel() * x.element_size()
    with torch.no_grad():
        return methods.noise_tunnel(noisy_saliency, x.shape[0], x.device, nt_type, nt_samples, nt_samples_batch_size,
                                    bytes_per_copy, progress=progress)


def _prepare(model, x, target):
    rows = JacobianRows(model)
    return rows, parse_target(target, x.shape[0] if isinstance(x, torch.Tensor) else 0, rows.num_outputs(x))
