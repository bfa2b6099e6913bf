"""The rules attention written out by hand is made of: matmul of two carried values (q k^T, p v) or of a carried
value and a constant, and softmax over one axis of N-d features, each against torch.func in float64, in both
sweeps, at B = 0 and 1, on non-contiguous inputs, and softmax also at saturation."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import jacobian_ext as jx
from jacobian_ext.graph import GraphPlan
from conftest import assert_matches_reference, non_contiguous, reference_jacobian
from test_batch_axis import Block, planned
from test_softmax_saturation import analytic_jacobian, assert_relative, saturated_logits

MODES = ["forward", "reverse"]


class Matmuls(nn.Module):
    """Both operands carried (with per-sample broadcasting and x @ x), carried @ weight, weight @ carried."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.weight = nn.Parameter(torch.randn(4, 3))
        self.left = nn.Parameter(torch.randn(5, 4))
        self.lift = nn.Linear(4, 4)

    def forward(self, x):  # x [B, 2, 4, 4]
        if self.kind == "both":
            return self.lift(x) @ torch.tanh(x).transpose(-1, -2)
        if self.kind == "broadcast":  # [B, 2, 4, 4] @ [B, 1, 4, 4]
            return x @ torch.tanh(x[:, :1])
        if self.kind == "square":
            return x @ x
        if self.kind == "bmm":
            flat = x.flatten(1, 2)  # [B, 8, 4]
            return torch.bmm(flat, self.lift(flat).transpose(1, 2))
        if self.kind == "weight_right":
            return x @ self.weight
        return torch.matmul(self.left, x)  # weight_left


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [0, 1, 3])
@pytest.mark.parametrize("kind", ["both", "broadcast", "square", "bmm", "weight_right", "weight_left"])
def test_matmul_rule_matches_torch_func(mode, batch, kind):
    torch.manual_seed(0)
    model = Matmuls(kind).double()
    x = non_contiguous(torch.randn(batch, 2, 4, 4, dtype=torch.float64))
    jm = planned(model, x, mode)
    assert jm.fallbacks == []
    assert "native matmul" in repr(jm)


class AxisSoftmax(nn.Module):
    def __init__(self, how, dim):
        super().__init__()
        self.how, self.dim = how, dim
        self.module = nn.Softmax(dim) if how == "module" else nn.LogSoftmax(dim)

    def forward(self, x):  # x [B, 5, 3, 2]
        if self.how in ("module", "log_module"):
            return self.module(x)
        if self.how == "method":
            return x.softmax(dim=self.dim)
        return torch.log_softmax(x, self.dim)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [0, 1, 3])
@pytest.mark.parametrize("how", ["module", "log_module", "method", "log_function"])
@pytest.mark.parametrize("dim", [1, 2, -1])
def test_softmax_over_an_axis_of_nd_features(mode, batch, how, dim):
    torch.manual_seed(1)
    model = AxisSoftmax(how, dim)
    x = non_contiguous(torch.randn(batch, 5, 3, 2, dtype=torch.float64) * 3)
    jm = planned(model, x, mode)
    assert jm.fallbacks == []
    assert "(axis)" in repr(jm)


def test_softmax_over_the_batch_axis_is_not_a_per_sample_rule():
    x = torch.randn(3, 4, 2, dtype=torch.float64)
    with pytest.warns(UserWarning, match="mixes the samples"):
        jacobian = jx.batch_jacobian(lambda t: t.softmax(dim=0), x)
    assert_matches_reference(jacobian, reference_jacobian(lambda t: t.softmax(dim=0), x), torch.float64)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("gap", [0.0, 40.0, 300.0])
def test_axis_softmax_is_stable_at_saturation(mode, log, gap):
    """Softmax over axis 1 of [B, H, W]: per column a saturated head; the Jacobian is block diagonal over W."""
    batch, features, width = 4, 6, 3
    columns = saturated_logits(batch * width, features, gap, torch.float64, "cpu")  # [B * W, H]
    x = columns.reshape(batch, width, features).transpose(1, 2)  # [B, H, W], each column one saturated head
    model = (lambda t: t.log_softmax(1)) if log else (lambda t: t.softmax(1))
    jacobian = jx.batch_jacobian(model, x, mode=mode)  # [B, H, W, H, W]
    blocks = analytic_jacobian(columns, log).reshape(batch, width, features, features)
    expected = torch.zeros(batch, features, width, features, width, dtype=torch.float64)
    for w in range(width):
        expected[:, :, w, :, w] = blocks[:, w]
    magnitude = expected.abs() + (expected == 0).double() * expected.abs().amax()
    assert_relative(jacobian.flatten(1, 2), expected.flatten(1, 2), magnitude.flatten(1, 2), torch.float64,
                    f"{mode} axis softmax", roundoffs=64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["auto", "forward", "reverse"])
def test_attention_written_out_is_all_native(dtype, mode):
    torch.manual_seed(2)
    model = Block().to(dtype).eval()
    x = torch.randn(3, 5, 8, dtype=dtype)
    jm = planned(model, x, mode)
    assert jm.fallbacks == []


class FusedAttention(nn.Module):
    """F.scaled_dot_product_attention on heads split from one projection; `memory`: keys and values from a
    constant buffer (cross-attention to fixed memory), only the queries carried."""

    def __init__(self, variant):
        super().__init__()
        self.variant = variant
        self.qkv = nn.Linear(6, 18)
        self.register_buffer("memory", torch.randn(1, 2, 7, 3))
        self.register_buffer("additive", torch.randn(5, 5))
        self.register_buffer("allowed", (torch.rand(5, 5) > 0.3) | torch.eye(5, dtype=torch.bool))

    def forward(self, x):  # x [B, 5, 6]
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, 2, 3).permute(2, 0, 3, 1, 4).unbind(0)
        if self.variant == "memory":
            return F.scaled_dot_product_attention(q, self.memory, torch.tanh(self.memory))
        if self.variant == "causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if self.variant == "additive_mask":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.additive, scale=0.7)
        if self.variant == "bool_mask":
            return F.scaled_dot_product_attention(q, k, v, self.allowed)
        if self.variant == "self":  # q = k = v
            return F.scaled_dot_product_attention(q, q, q)
        return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [0, 1, 3])
@pytest.mark.parametrize("variant", ["plain", "causal", "additive_mask", "bool_mask", "self", "memory"])
def test_scaled_dot_product_attention_is_one_native_node(mode, batch, variant):
    torch.manual_seed(4)
    model = FusedAttention(variant).double()
    x = non_contiguous(torch.randn(batch, 5, 6, dtype=torch.float64))
    # vmap has no batching rule for the CPU flash-attention kernel over an empty batch
    expected = reference_jacobian if batch else torch.zeros(0, 2, 5, 3, 5, 6, dtype=torch.float64)
    jm = planned(model, x, mode, expected)
    assert jm.fallbacks == []
    assert "native attention" in repr(jm)


def test_attention_with_dropout_in_training_is_not_native():
    class Dropped(FusedAttention):
        def forward(self, x):
            q = self.qkv(x)[..., :6].reshape(x.shape[0], 5, 2, 3).transpose(1, 2)
            return F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)

    jm = jx.compile(Dropped("plain").double())
    with pytest.warns(UserWarning, match="mixes the samples"):
        jm(torch.randn(3, 5, 6, dtype=torch.float64))
    assert jm.fallbacks == ["model"]


class PickedTokens(nn.Module):
    """A vision transformer's tail: attention mixes the tokens, per-token layers follow (layer norm, a GELU MLP,
    residual adds), and the head reads some tokens. The reverse sweep keeps the cotangent on the picked tokens
    (blocks.Picked) through the per-token layers; picks it cannot keep so fall back to the dense block."""

    WIDTHS = {"first": 6, "last": 6, "slice": 12, "strided": 18, "two": 6, "with_mean": 6, "feature": 5}

    def __init__(self, pick):
        super().__init__()
        self.pick = pick
        self.qkv = nn.Linear(6, 18)
        self.norm = nn.LayerNorm(6)
        self.fc1, self.fc2 = nn.Linear(6, 10), nn.Linear(10, 6)
        self.drop = nn.Identity()  # timm's eval-mode dropout, drop-path and layer-scale slots
        self.head = nn.Linear(self.WIDTHS[pick], 3)

    def forward(self, x):  # x [B, 5, 6]
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, 2, 3).permute(2, 0, 3, 1, 4).unbind(0)
        h = x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, 6)
        hidden = self.drop(F.gelu(self.fc1(self.norm(h)))).unflatten(-1, (2, 5)).flatten(-2)  # per token
        h = h + self.drop(self.fc2(hidden))
        picked = {
            "first": lambda: h[:, 0],
            "last": lambda: h[:, -1],
            "slice": lambda: h[:, 1:3].flatten(1),
            "strided": lambda: h[:, ::2].flatten(1),  # a step: written into zeros, not boxed
            "two": lambda: h[:, 0] + h[:, 3],  # boxes that do not join: one dense block
            "with_mean": lambda: h[:, 0] + h.mean(1),  # a box meeting a dense cotangent
            "feature": lambda: h[:, :, 0],  # a box over the normalised axis: dense from the layer norm on
        }[self.pick]()
        return self.head(picked)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [0, 1, 3])
@pytest.mark.parametrize("pick", list(PickedTokens.WIDTHS))
def test_per_token_layers_after_a_pick_match_torch_func(mode, batch, pick):
    torch.manual_seed(5)
    model = PickedTokens(pick).double()
    x = non_contiguous(torch.randn(batch, 5, 6, dtype=torch.float64))
    # vmap has no batching rule for the CPU flash-attention kernel over an empty batch
    expected = reference_jacobian if batch else torch.zeros(0, 3, 5, 6, dtype=torch.float64)
    jm = planned(model, x, mode, expected)
    assert jm.fallbacks == []


def test_a_picked_token_runs_the_layers_after_attention_on_that_token_only(monkeypatch):
    from jacobian_ext import feature_rules

    tokens_seen, contiguous = {}, {}
    reverse = feature_rules.LastAxisLinearRule.reverse

    def spy(self, plan, g, env, cotangent):
        tokens_seen[g.name] = cotangent.shape[2]
        contiguous[g.name] = cotangent.is_contiguous()
        return reverse(self, plan, g, env, cotangent)

    monkeypatch.setattr(feature_rules.LastAxisLinearRule, "reverse", spy)
    # The model is one op call (its program's slices write the cotangent into zeros): the Python walker's rules
    # run where a node keeps it off that path, as here.
    monkeypatch.setattr(GraphPlan, "native_program", lambda self: None)
    torch.manual_seed(6)
    model = PickedTokens("first").double()
    planned(model, torch.randn(2, 5, 6, dtype=torch.float64), "reverse")
    # Through the identities and the per-token reshape; attention mixes the tokens again.
    assert tokens_seen == {"fc2": 1, "fc1": 1, "qkv": 5}
    # q, k and v's blocks are written into one block laid out like qkv's permuted view: after the permute and
    # reshape back, the qkv Linear reads it as it is.
    assert contiguous["qkv"]
