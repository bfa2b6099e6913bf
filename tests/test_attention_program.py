"""Attention as entries of the graph program (matmul, softmax_axis / log_softmax_axis, attention): each against
torch.func in float64 in both sweeps as ONE op call (B = 0, 1, 3, a non-contiguous input, D != C), saturated
softmax logits, opcheck, torch.export of a small transformer, timm's vit_tiny and an nn.TransformerEncoder
classifier as one op call, and clear errors for bad entries."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_matches_reference, non_contiguous
from jacobian_ext import ops
from jacobian_ext.program import replay
from test_graph_program import check, check_export_with_a_dynamic_batch, opcheck_program, planned, program_kinds
from test_softmax_saturation import analytic_jacobian, assert_relative

DOUBLE = torch.float64
MODES = ["forward", "reverse"]


class AttentionKinds(nn.Module):
    """Every form the attention entries take, on tokens [B, 3, 4]: q k^T and p v of two values, softmax over the
    last axis and log-softmax over one that is not, products with a parameter on either side and transposed (W.t(),
    W.mT of a 3-d weight), and F.scaled_dot_product_attention plain, causal, with a boolean mask buffer and with an
    additive one and an explicit scale."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 3 * 4)
        self.right = nn.Parameter(torch.randn(4, 4) / 2)        # x @ W
        self.left = nn.Parameter(torch.randn(5, 3) / 2)         # W @ x: 3 tokens to 5
        self.projection = nn.Parameter(torch.randn(6, 4) / 2)   # x @ W.t()
        self.per_head = nn.Parameter(torch.randn(2, 3, 10) / 2)  # [heads, out, in]: x @ W.mT
        self.register_buffer("keep", torch.tensor([[True, False, True], [True, True, False], [False, True, True]]))
        self.register_buffer("bias", torch.randn(2, 1, 3))      # [heads, 1, keys], broadcast over the queries
        self.head = nn.Linear(5 * 6 + 2 * 3 * 3 + 2 * 3 * 3, 5)

    def forward(self, x):  # x [B, 3, 4]
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 2)).permute(0, 2, 3, 1, 4).unbind(1)  # [B, 2 heads, 3, 2] each
        scores = q @ k.transpose(-2, -1) * 2 ** -0.5
        explicit = torch.matmul(scores.softmax(dim=-1), v)
        weights = F.log_softmax(scores, dim=1)  # over the heads
        mixed = (self.left @ (x @ self.right)) @ self.projection.t()  # [B, 5, 6]
        attended = [F.scaled_dot_product_attention(q, k, v),
                    F.scaled_dot_product_attention(q, k, v, is_causal=True),
                    F.scaled_dot_product_attention(q, k, v, attn_mask=self.keep),
                    F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias, scale=0.3)]
        heads = torch.cat([explicit, *attended], dim=-1) @ self.per_head.mT  # [B, 2, 3, 3]
        return self.head(torch.cat([mixed.flatten(1), weights.flatten(1), heads.flatten(1)], dim=1))


def one_op_call(model, x, mode, monkeypatch):
    """(plan, y, J) of jx.compile(model) at x, asserting that the plan has a program and that the Jacobian took
    exactly one op call (an empty batch takes none)."""
    calls = []
    original = ops.batch_jacobian
    monkeypatch.setattr(ops, "batch_jacobian", lambda *args: calls.append(args) or original(*args))
    plan, output, jacobian = planned(model, x, mode)
    assert plan.native_program() is not None, plan.unencoded
    assert len(calls) == (1 if x.shape[0] else 0), len(calls)
    return plan, output, jacobian


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [0, 1, 3])
def test_every_attention_kind_is_one_program(mode, batch, monkeypatch):
    torch.manual_seed(batch)
    model = AttentionKinds().double().eval()
    x = non_contiguous(torch.randn(batch, 3, 4, dtype=DOUBLE))
    plan, output, jacobian = one_op_call(model, x, mode, monkeypatch)
    layers = plan.native_program()[0]
    kinds = [layer.split()[0] for layer in layers]
    assert {"matmul", "softmax_axis", "log_softmax_axis", "attention"} <= set(kinds), kinds
    matmuls = [layer for layer in layers if layer.startswith("matmul")]
    assert {"constant=0", "constant=1", "transpose=1"} <= {part for m in matmuls for part in m.split()}, matmuls
    assert kinds.count("attention") == 4 and sum("causal=1" in layer for layer in layers) == 1, layers
    check(model, x, output, jacobian)
    with torch.no_grad():  # the plain-PyTorch replay (fake impl, backward) computes the same model
        layers, getters = plan.native_program()
        assert_matches_reference(replay(x, layers, [get() for get in getters]), model(x), DOUBLE)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_saturated_softmax_over_an_axis_keeps_its_tail(mode, log, monkeypatch):
    """Softmax over the first per-sample axis of [B, 5, 3] logits where one class leads by 40 in two of the three
    columns (tail mass about 1e-17, below float64's roundoff): within 1e-10 of J's largest entry of torch.func, and
    each row within a few roundoffs of its own scale of the analytic Jacobian (test_softmax_saturation.py), which
    resolves the sigma-sized entries that torch.func's cancellation loses."""
    torch.manual_seed(5)
    logits = torch.randn(3, 5, 3, dtype=DOUBLE)
    logits[:, 2, :2] += 40.0
    logits[1, 4, 1] += 80.0  # another leader in one column
    x = non_contiguous(logits)
    model = (lambda t: F.log_softmax(t, dim=1)) if log else (lambda t: torch.softmax(t, dim=1))  # noqa: E731
    plan, output, jacobian = one_op_call(model, x, mode, monkeypatch)
    assert program_kinds(plan)[0] == ("log_softmax_axis" if log else "softmax_axis")
    check(model, x, output, jacobian)
    # The analytic Jacobian, block-diagonal over the columns: [B, 5, 3, 5, 3].
    columns = analytic_jacobian(x.transpose(1, 2).reshape(-1, 5), log).reshape(3, 3, 5, 5)
    expected = torch.einsum("bjik,jl->bijkl", columns, torch.eye(3, dtype=DOUBLE)).reshape(3, 15, 15)
    assert_relative(jacobian.reshape(3, 15, 15), expected, expected.abs(), DOUBLE, f"{mode} {log}")


@pytest.mark.parametrize("mode", MODES)
def test_saturated_attention_scores(mode, monkeypatch):
    """Attention whose scores are huge (queries and keys scaled up): the probabilities saturate, within 1e-8 of
    torch.func."""
    torch.manual_seed(6)
    model = AttentionKinds().double().eval()
    with torch.no_grad():
        model.qkv.weight.mul_(60.0)
    x = torch.randn(3, 3, 4, dtype=DOUBLE)
    plan, output, jacobian = one_op_call(model, x, mode, monkeypatch)
    with torch.no_grad():
        scores = model.qkv(x)[..., :2] @ model.qkv(x)[..., 4:6].transpose(-2, -1)
    assert scores.abs().max() > 100, scores.abs().max()  # saturated
    check(model, x, output, jacobian)


def test_opcheck_of_a_program_with_attention():
    torch.manual_seed(7)
    opcheck_program(AttentionKinds().double().eval(), torch.randn(2, 3, 4, dtype=DOUBLE), gradient_mode="reverse")


def test_gradients_of_an_attention_program_jacobian_equal_torch_func():
    """The op's registered backward differentiates the replayed program: gradcheck through matmul, softmax over an
    axis and attention with a mask."""
    torch.manual_seed(8)

    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(2, 2))
            self.register_buffer("mask", torch.tensor([[0.0, -1.0], [0.5, 0.0]]))

        def forward(self, x):  # [B, 2, 2]
            h = F.scaled_dot_product_attention(x, x @ self.weight, x, attn_mask=self.mask)
            return F.log_softmax(h @ x.transpose(-2, -1), dim=1)

    model = Small().double().eval()
    x = torch.randn(2, 1, 2, 2, dtype=DOUBLE)[:, 0]
    plan, _, _ = planned(model, x, "reverse")
    layers, getters = plan.native_program()
    params = [get().detach().clone().requires_grad_() for get in getters]
    torch.autograd.gradcheck(lambda v, *p: torch.ops.jacext.batch_jacobian(v, layers, list(p), "forward")[1],
                             (x.clone().requires_grad_(), *params))


class TinyTransformer(nn.Module):
    """A pre-norm transformer block with a causal attention and a class token picked for the head."""

    def __init__(self, width=8, heads=2):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.head = nn.Linear(width, 3)

    def forward(self, x):  # [B, T, width]
        q, k, v = self.qkv(self.norm(x)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        x = x + self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2))
        x = x + self.mlp(x)
        return self.head(x[:, -1])


def test_torch_export_of_a_transformer_is_one_op():
    torch.manual_seed(9)
    check_export_with_a_dynamic_batch(TinyTransformer().double().eval(), (5, 8))


class TokenClassifier(nn.Module):
    """torch's TransformerEncoder on embedded tokens [B, T, E], mean-pooled (bench/models.py's)."""

    def __init__(self, width=16, layers=2, norm_first=False):
        super().__init__()
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, 5)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_transformer_encoder_classifier_is_one_op_call(mode, norm_first, monkeypatch):
    torch.manual_seed(10)
    model = TokenClassifier(norm_first=norm_first).double().eval()
    x = non_contiguous(torch.randn(3, 6, 16, dtype=DOUBLE))
    plan, output, jacobian = one_op_call(model, x, mode, monkeypatch)
    assert "attention" in program_kinds(plan)
    check(model, x, output, jacobian)


def test_timm_vit_tiny_is_one_op_call(monkeypatch):
    """In reverse mode (10 classes): the forward sweep's D = 3 * 32 * 32 rows would need tens of GiB. Its class
    token is a constant part of a cat, its q, k, v integer picks of qkv's batch-moved permute, its head's input
    the integer pick x[:, 0]."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(11)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32,
                              patch_size=8).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=DOUBLE)
    plan, output, jacobian = one_op_call(model, x, "reverse", monkeypatch)
    layers = plan.native_program()[0]
    assert [layer.split()[0] for layer in layers].count("attention") == 12
    assert any(layer.startswith("cat") and "constants=1,0" in layer for layer in layers), layers
    check(model, x, output, jacobian)


# ---- bad entries ----

@pytest.mark.parametrize("layers, params, message", [
    (["reshape shape=24", "matmul in=1,1"], [], r"per-sample matrices"),
    (["matmul in=0,0"], [], r"cannot multiply"),
    (["reshape shape=6,4", "matmul in=0,1"], [], r"two values of one rank"),
    (["matmul constant=2"], [torch.ones(2, 2)], r"must be 0 \(the left factor\) or 1"),
    (["matmul in=0,0 transpose=1"], [], r"transpose applies to a constant factor only"),
    (["matmul in=0,0 constant=1"], [torch.ones(2, 2)], r"reads 2 slots, expected 1"),
    (["matmul"], [], r"reads 1 slots, expected 2"),
    (["matmul constant=1"], [], r"takes 1 tensors of params but only 0"),
    (["matmul constant=1"], [torch.ones(3, 2)], r"cannot multiply"),
    (["matmul constant=1"], [torch.ones(1, 1, 4, 4)], r"constant factor with 2 to 3 axes"),
    (["softmax_axis dim=3"], [], r"per-sample axis 3"),
    (["softmax_axis"], [], r"needs the attribute dim="),
    (["attention in=0,0,0 causal=0"], [], r"needs the attribute mask="),
    (["attention in=0,0 causal=0 mask=0"], [], r"reads 2 slots, expected 3"),
    (["attention in=0,0,0 causal=0 mask=1"], [torch.ones(2, 1, 1, 1)], r"mask without the batch axis"),
    (["attention in=0,0,0 causal=0 mask=1"], [torch.ones(4, 4)], r"broadcasts to the scores"),
    (["reshape shape=3,4,2", "attention in=0,0,1 causal=0 mask=0"], [], r"query \[B, \.\.\., L, d\]"),
])
def test_bad_attention_entries_raise_value_errors(layers, params, message):
    x = torch.randn(2, 3, 2, 4, dtype=DOUBLE)
    with pytest.raises(ValueError, match=message):
        torch.ops.jacext.batch_jacobian(x, layers, [p.double() for p in params], "reverse")
