"""torchvision's Swin Transformer layers traced as the ops they are made of (jacobian_ext/traced_forms.py):
ShiftedWindowAttention(V2) and PatchMerging(V2) become native nodes for any input size (padding to whole
windows or not, the shift kept or dropped where one window covers the map), against torch.func in float64;
and the index maps they rely on, parameterised by the input's shape (pad amounts, roll shifts, slice bounds),
with F.normalize (cosine attention)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import jacobian_ext as jx
from conftest import assert_matches_reference, reference_jacobian
from test_batch_axis import planned

torchvision = pytest.importorskip("torchvision")
swin = torchvision.models.swin_transformer

MODES = ["forward", "reverse"]


def small_swin(v2: bool, window=(4, 4)):
    version = dict(block=swin.SwinTransformerBlockV2, downsample_layer=swin.PatchMergingV2) if v2 else {}
    torch.manual_seed(0)
    model = torchvision.models.SwinTransformer(patch_size=[1, 1], embed_dim=8, depths=[2, 2], num_heads=[2, 2],
                                               window_size=list(window), num_classes=3, **version)
    for module in model.modules():  # torchvision's zero biases and unit norms would hide a wrong layout
        if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
            nn.init.normal_(module.bias, std=0.5)
        if isinstance(module, nn.LayerNorm):
            nn.init.normal_(module.weight, 1.0, 0.5)
        if isinstance(module, swin.ShiftedWindowAttention) and not isinstance(module, swin.ShiftedWindowAttentionV2):
            nn.init.normal_(module.relative_position_bias_table)
    return model.double().eval()


# Input sizes (patches of one pixel, so the sizes are the maps') for window 4: 4 x 4, which one window covers
# (shift dropped, no padding); 5 x 5 padded to 8 x 8, shifted, then merged from an odd side; 8 x 8 shifted
# without padding; 4 x 8, the shift dropped down and kept across. The second stage's maps are at most 4 x 4:
# the shift dropped, padded where smaller.
SIZES = [(4, 4), (5, 5), (8, 8), (4, 8)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_swin_is_native_at_every_input_size(mode, size, v2):
    model = small_swin(v2)
    x = torch.randn(1, 3, *size, dtype=torch.float64)
    jm = planned(model, x, mode)
    assert jm.fallbacks == []


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_swin_with_an_oblong_window_and_two_samples(mode, v2):
    """Window 3 x 2 (shift 1 x 1) on a 5 x 7 map, padded to 6 x 8: an axis mixed up anywhere shows."""
    model = small_swin(v2, window=(3, 2))
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    jm = planned(model, x, mode)
    assert jm.fallbacks == []


def test_one_capture_serves_every_input_size():
    """The padding, the shift and the mask are recomputed from the input's shape at every call."""
    model = small_swin(v2=False)
    jm = jx.compile(model, mode="reverse")
    for size in [(5, 5), (8, 8), (4, 8), (5, 5)]:
        x = torch.randn(1, 3, *size, dtype=torch.float64)
        _, jacobian = jm(x)
        assert_matches_reference(jacobian, reference_jacobian(model, x), torch.float64)
        assert jm.fallbacks == []


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_layers_in_training_mode_stay_whole_on_the_fallback(v2):
    model = small_swin(v2)
    model.features[1][1].attn.train()
    model.features[2].train()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    jm = planned(model, x, "reverse")
    assert jm.fallbacks == ["features.1.1.attn", "features.2"]


@pytest.mark.parametrize("name", ["swin_t", "swin_v2_t"])
def test_torchvision_swin_has_no_fallback_node(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=4).eval()
    x = torch.randn(1, 3, 32, 32)
    jm = jx.compile(model)
    _, jacobian = jm(x)
    assert jm.fallbacks == []
    expected = torch.func.vmap(torch.func.jacrev(lambda sample: model(sample[None])[0]))(x)
    assert (jacobian - expected).abs().max() <= 1e-4 * expected.abs().max()


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


@pytest.mark.parametrize("index", [(slice(1, 3), 2), (slice(1, 3), 2, slice(0, 2))], ids=["rows", "into_the_axis"])
def test_normalize_pulls_a_sliced_cotangent_back_on_the_slice(index):
    """Positions before the normalised axis map one by one: reverse runs the rule on the picked rows alone, but
    not on part of the normalised axis."""
    x = torch.randn(2, 4, 5, 3, dtype=torch.float64)
    jm = planned(lambda t: F.normalize(t, dim=-1)[(slice(None), *index)], x, "reverse")
    assert "native normalize" in repr(jm)


def test_padding_in_another_mode_is_not_an_index_map():
    reflect = lambda t: F.pad(t, (1, 1), mode="reflect")  # noqa: E731  (reads the input's edge values)
    jm = planned(reflect, torch.randn(2, 3, 4, dtype=torch.float64), "reverse")
    assert "index map (pad)" not in repr(jm) and jm.fallbacks != []


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("size", [(2, 2), (5, 5), (8, 8)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_window_attention_projects_the_real_tokens_only(v2, size, monkeypatch):
    """The qkv and output projections run on the map's own tokens, not on the padded windows (torchvision's
    order): the same values as the module, and, on a 2 x 2 map padded to one 4 x 4 window, a quarter of the
    projected rows."""
    from jacobian_ext import traced_forms

    attention = small_swin(v2).features[1][1].attn  # a shifted block: pad, roll and mask where they apply
    x = torch.randn(2, *size, 8, dtype=torch.float64)
    projected = []
    original = traced_forms._projected
    monkeypatch.setattr(traced_forms, "_projected",
                        lambda t, weight, bias: projected.append(tuple(t.shape)) or original(t, weight, bias))
    attention.proj.register_forward_hook(lambda module, args, out: projected.append(tuple(args[0].shape)))
    form = traced_forms.form_for(attention, (x,), {})
    assert form is not None
    value = form()
    assert projected == [(2, *size, 8), (2, *size, 8)]  # qkv, then the output projection
    torch.testing.assert_close(value, attention(x), rtol=1e-12, atol=1e-12)
