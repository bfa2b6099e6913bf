"""torch's composite layers traced as the ops they are made of (jacobian_ext/traced_forms.py):
nn.MultiheadAttention, nn.TransformerEncoderLayer and nn.TransformerEncoder become native nodes; calls the
forms do not cover (masks, training mode) keep the layer whole on the fallback. Against torch.func in float64."""
import pytest
import torch
from torch import nn

import jacobian_ext as jx
from conftest import non_contiguous, reference_jacobian
from test_batch_axis import planned

MODES = ["forward", "reverse"]


class Attend(nn.Module):
    def __init__(self, batch_first, need_weights, average, cross, bias):
        super().__init__()
        self.batch_first, self.need_weights, self.average, self.cross = batch_first, need_weights, average, cross
        self.attention = nn.MultiheadAttention(6, 2, bias=bias, batch_first=batch_first)
        self.key = nn.Linear(6, 6)

    def forward(self, x):  # x [B, L, 6]
        x = x if self.batch_first else x.transpose(0, 1)
        key = torch.tanh(self.key(x)) if self.cross else x
        value = self.key(x) if self.cross else x
        out, weights = self.attention(x, key, value, need_weights=self.need_weights,
                                      average_attn_weights=self.average)
        out = out if self.batch_first else out.transpose(0, 1)
        if self.need_weights:  # [B, L, L] or [B, heads, L, L]: use them too
            return torch.cat([out.flatten(1), weights.flatten(1)], dim=1)
        return out


def _expected(batch, model, x):
    """torch.func's Jacobian; vmap has no batching rule for CPU flash attention over an empty batch."""
    if batch:
        return reference_jacobian
    return torch.zeros(0, *model(x).shape[1:], *x.shape[1:], dtype=x.dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [0, 1, 3])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_major"])
@pytest.mark.parametrize("need_weights, average", [(False, True), (True, True), (True, False)],
                         ids=["no_weights", "mean_weights", "head_weights"])
@pytest.mark.parametrize("cross, bias", [(False, True), (True, False)], ids=["self", "cross_no_bias"])
def test_multihead_attention_is_native(mode, batch, batch_first, need_weights, average, cross, bias):
    torch.manual_seed(0)
    model = Attend(batch_first, need_weights, average, cross, bias).double().eval()
    x = non_contiguous(torch.randn(batch, 5, 6, dtype=torch.float64))
    jm = planned(model, x, mode, _expected(batch, model, x))
    assert jm.fallbacks == []


class Encoder(nn.Module):
    def __init__(self, norm_first, activation, final_norm):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, activation=activation, batch_first=True,
                                           norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(8) if final_norm else None,
                                             enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [0, 1, 3])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_transformer_encoder_is_native(mode, batch, norm_first, activation):
    torch.manual_seed(1)
    model = Encoder(norm_first, activation, final_norm=norm_first).double().eval()
    x = torch.randn(batch, 4, 8, dtype=torch.float64)
    jm = planned(model, x, mode, _expected(batch, model, x))
    assert jm.fallbacks == []


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(6, 2, batch_first=True)
        self.register_buffer("mask", torch.triu(torch.ones(5, 5, dtype=torch.bool), 1))

    def forward(self, x):
        return self.attention(x, x, x, attn_mask=self.mask, need_weights=False)[0]


def test_a_call_the_forms_do_not_cover_keeps_the_layer_on_the_fallback():
    model = Masked().double().eval()
    jm = planned(model, torch.randn(3, 5, 6, dtype=torch.float64), "reverse")
    assert jm.fallbacks == ["attention"]


def test_training_mode_is_not_traced_into():
    model = Encoder(False, "relu", False).double().train()
    with pytest.raises(ValueError, match="training mode"):
        jx.compile(model)(torch.randn(2, 4, 8, dtype=torch.float64))


def test_a_form_that_fails_to_trace_leaves_the_layer_whole(monkeypatch):
    """A torch release whose private helpers differ (here: the encoder layer's form raising) gets the layer as
    one fallback node, not a failed capture."""
    from jacobian_ext import traced_forms

    def other_release(module, x):
        raise TypeError("_sa_block() takes 3 positional arguments")

    monkeypatch.setattr(traced_forms, "_encoder_layer", other_release)
    model = Encoder(False, "relu", False).double().eval()
    jm = planned(model, torch.randn(2, 4, 8, dtype=torch.float64), "reverse")
    assert jm.fallbacks == ["encoder.layers.0", "encoder.layers.1"]
