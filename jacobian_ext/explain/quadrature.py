"""Integration points and weights of integrated gradients, the same as Captum's for every method, down to
Captum's rounding: its Riemann points come from a float32 torch.linspace and all its weights are turned
into float32 before use. Keeping that rounding (about 1e-8 relative, far below any quadrature error)
makes float64 results agree with Captum's to rounding level instead of to float32 level."""
from typing import Tuple

import numpy as np
import torch

METHODS = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre")


def points_and_weights(method: str, n_steps: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(alphas, step weights), float64 tensors of n_steps values each; the path point of step s is
    baseline + alphas[s] * (input - baseline)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if isinstance(n_steps, bool) or not isinstance(n_steps, int):
        raise TypeError(f"n_steps must be an int, got {type(n_steps).__name__}")
    minimum = 1 if method == "gausslegendre" else 2
    if n_steps < minimum:
        raise ValueError(f"n_steps must be at least {minimum} for method {method!r}, got {n_steps}")
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n_steps)  # on [-1, 1]
        alphas = torch.from_numpy(0.5 * (1 + nodes))
        weights = torch.from_numpy(0.5 * weights)
    else:
        rule = method.split("_")[1]
        start, end = {"left": (0, 1 - 1 / n_steps), "right": (1 / n_steps, 1),
                      "middle": (1 / (2 * n_steps), 1 - 1 / (2 * n_steps)), "trapezoid": (0, 1)}[rule]
        alphas = torch.linspace(start, end, n_steps, dtype=torch.float32).double()
        weights = torch.full((n_steps,), 1 / n_steps, dtype=torch.float64)
        if rule == "trapezoid":
            weights[[0, -1]] /= 2
    return alphas, weights.float().double()
