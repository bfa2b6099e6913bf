"""Index maps parameterised by the input's shape (pad amounts, roll shifts, slice bounds computed from x.shape),
and F.normalize (cosine attention), against torch.func in float64."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from test_batch_axis import planned

MODES = ["forward", "reverse"]


# ---- the index maps of the forms, on their own ----

class ShapeParameterised(nn.Module):
    """Pad, roll, crop and slice by amounts computed from the input's shape, and normalise (x [B, H, W, C])."""

    def forward(self, x):
        height, width = x.shape[1], x.shape[2]
        padded = F.pad(torch.tanh(x), (-1, 0, 0, (-width) % 4, 1, (-height) % 4))  # crops a channel, pads H, W
        rolled = torch.roll(padded, (-(height // 2), width % 3), (1, 2))
        normalised = F.normalize(rolled, dim=1, eps=0.5)
        return normalised[:, 1:height + 1, :width] * x[..., 1:]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(5, 6, 3), (4, 4, 2)])
def test_index_maps_parameterised_by_the_input_shape_are_native(mode, shape):
    # The first sample's columns are longer than eps, the second's shorter: both sides of F.normalize's clamp.
    x = torch.randn(2, *shape, dtype=torch.float64) * torch.tensor([3.0, 0.01], dtype=torch.float64).view(2, 1, 1, 1)
    jm = planned(ShapeParameterised(), x, mode)
    assert jm.fallbacks == []
    plan = repr(jm)
    for label in ("index map (pad)", "index map (roll/flip)", "index map (slice)", "native normalize"):
        assert label in plan


def test_padding_in_another_mode_is_not_an_index_map():
    reflect = lambda t: F.pad(t, (1, 1), mode="reflect")  # noqa: E731  (reads the input's edge values)
    jm = planned(reflect, torch.randn(2, 3, 4, dtype=torch.float64), "reverse")
    assert "index map (pad)" not in repr(jm) and jm.fallbacks != []
