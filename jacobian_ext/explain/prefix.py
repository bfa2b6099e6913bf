"""Integrated gradients sum Jacobians over the path points: Σ_s w_s J(p_s). When the model starts with
affine layers (Linear, convolutions, reshapes), J(p) = J_rest(h(p)) · A with A their constant Jacobian,
so Σ_s w_s J(p_s) = (Σ_s w_s J_rest(h_s)) · A: the rows are summed over the steps before they go back
through the leading affine layers, which then run once per sample and class instead of once per step.
For an MLP the first Linear (D inputs) is usually the largest matrix of the reverse sweep."""
from typing import Optional, Tuple

import torch
from torch import nn

from ..plan import flatten_sequential

# Layers whose Jacobian is the same at every input (no batch statistics: Dropout is excluded, since in
# training mode it is random; BatchNorm, affine in eval mode only, likewise left to the sweep).
_AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Flatten, nn.Unflatten, nn.Identity)
_WITH_WEIGHTS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def split_affine_prefix(model) -> Optional[Tuple[nn.Sequential, nn.Sequential]]:
    """(leading affine layers, the rest) of an nn.Sequential that starts with a Linear or convolution
    and has a non-affine layer after it; None otherwise (nothing to gain)."""
    if type(model) is not nn.Sequential:
        return None
    layers = [module for _, module in flatten_sequential(model)]
    count = 0
    while count < len(layers) and type(layers[count]) in _AFFINE:
        count += 1
    if count == len(layers) or not any(type(m) in _WITH_WEIGHTS for m in layers[:count]):
        return None
    return nn.Sequential(*layers[:count]), nn.Sequential(*layers[count:])


def pull_back(prefix: nn.Module, cotangents: torch.Tensor, rows_axis: bool, in_shape) -> torch.Tensor:
    """cotangents [B, (K,) *h] through the affine prefix to [B, (K,) *in]: one vector-Jacobian product of
    all B*K rows (the prefix maps rows independently; its Jacobian does not depend on the point)."""
    lead = cotangents.shape[:2] if rows_axis else cotangents.shape[:1]
    flat = cotangents.reshape(-1, *cotangents.shape[len(lead):])
    with torch.enable_grad():
        point = flat.new_zeros((flat.shape[0], *in_shape), requires_grad=True)
        (grad,) = torch.autograd.grad(prefix(point), point, grad_outputs=flat)
    return grad.reshape(*lead, *in_shape)
