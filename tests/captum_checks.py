"""Shared by the tests that compare explain with Captum in float64: the tolerance and comparison, Captum's
warnings silenced, and a model of two inputs."""
import warnings

import pytest
import torch
from torch import nn

TOLERANCE = 1e-9
C = 3


@pytest.fixture(autouse=True)
def quiet_captum():
    """(Autouse in the modules that import it.)"""
    with warnings.catch_warnings():  # Captum warns that it set requires_grad on our inputs
        warnings.simplefilter("ignore", UserWarning)
        yield


def assert_close(actual, expected, scale=None):
    """Tensors, or tuples or lists of them (nested), equal to TOLERANCE times the expected values' largest
    entry."""
    if isinstance(expected, (tuple, list)):
        assert type(actual) is type(expected) and len(actual) == len(expected), (
            f"{type(actual).__name__} vs a {type(expected).__name__} of {len(expected)}")
        scale = scale if scale is not None else max(_largest(e) for e in expected)
        for a, e in zip(actual, expected):
            assert_close(a, e, scale)
        return
    assert isinstance(actual, torch.Tensor), f"got {type(actual).__name__}, expected a tensor"
    assert actual.shape == expected.shape, f"{tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(scale if scale is not None else expected.abs().max().item(), 1e-30)
    error = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert error <= TOLERANCE * scale, f"error {error:.3e}, scale {scale:.3e}"


def _largest(expected) -> float:
    if isinstance(expected, (tuple, list)):
        return max(_largest(e) for e in expected)
    return expected.abs().max().item() if expected.numel() else 0.0


class TwoInputs(nn.Module):
    """model(a [B, 4], b [B, 2, 3]) -> [B, C]; optional additional arguments as Captum passes them."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(10, 8), nn.Linear(8, C)

    def forward(self, a, b, shift=None, power=1, weights=(1.0, 1.0)):
        h = torch.cat([a * weights[0], b.flatten(1) * weights[1]], dim=1)
        if shift is not None:
            h = h + shift
        return self.second(torch.tanh(self.first(h)) ** power)


def two_inputs(batch):
    return TwoInputs().double(), (torch.randn(batch, 4, dtype=torch.float64), torch.randn(batch, 2, 3, dtype=torch.float64))
