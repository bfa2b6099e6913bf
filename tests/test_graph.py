"""Graph capture (torch.fx): models that are not an nn.Sequential of fused layers, against torch.func."""
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import jacobian_ext as jx
from jacobian_ext.graph import GraphPlan
from conftest import DEVICES, DTYPES, assert_matches_reference, loop_jacobian, non_contiguous, reference_jacobian

MODES = ["auto", "forward", "reverse", "mixed"]


def check(model, x, mode, dtype, expect_fallbacks=None, reference=reference_jacobian):
    jm = jx.compile(model, mode=mode)
    y, jacobian = jm(x)
    assert_matches_reference(y, model(x), dtype)
    assert_matches_reference(jacobian, reference(model, x), dtype)
    if expect_fallbacks is not None:
        assert jm.fallbacks == expect_fallbacks
    return jm


class ResidualMLP(nn.Module):
    """Fan-out, residual adds, scalar multiply and subtract, functional activations and methods."""

    def __init__(self, width, out_features):
        super().__init__()
        self.inner = nn.Linear(width, width)
        self.gate = nn.Linear(width, width, bias=False)
        self.head = nn.Linear(width, out_features)

    def forward(self, x):
        h = x + 0.5 * torch.tanh(self.inner(x))
        h = h - F.relu(self.gate(h)) / 3.0
        h = -h + torch.sigmoid(h) + h.relu()
        return self.head(h)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [0, 1, 5])
@pytest.mark.parametrize("shape", [(6, 3), (4, 9)], ids=["D>C", "D<C"])
def test_residual_mlp_is_all_native(device, dtype, mode, batch, shape):
    width, out_features = shape
    model = ResidualMLP(width, out_features).to(device=device, dtype=dtype)
    x = torch.randn(batch, width, device=device, dtype=dtype)
    check(model, x, mode, dtype, expect_fallbacks=[])


class ClassifierHead(nn.Module):
    """Softmax-family heads on the graph path (a non-Sequential model)."""

    def __init__(self, head):
        super().__init__()
        self.linear, self.head = nn.Linear(5, 4), head

    def forward(self, x):
        return self.head(torch.tanh(self.linear(x)) * 3.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("head", [nn.Softmax(dim=-1), nn.LogSoftmax(dim=1)], ids=str)
def test_softmax_heads_on_the_graph_path(dtype, mode, head):
    model = ClassifierHead(head).to(dtype)
    x = torch.randn(6, 5, dtype=dtype)
    check(model, x, mode, dtype, expect_fallbacks=[])


class IndexMaps(nn.Module):
    """Views, permutes, slicing, concatenation with a constant, x + x and x - x."""

    def __init__(self):
        super().__init__()
        self.register_buffer("token", torch.randn(1, 1, 4))
        self.linear = nn.Linear(4, 4)

    def forward(self, x):  # x [B, 3, 4]
        t = self.linear(x).permute(0, 2, 1).transpose(1, 2)
        t = torch.cat([self.token.expand(x.shape[0], -1, -1), t, x], dim=1)  # [B, 7, 4]
        t = t[:, 1:, ::2] + t[..., 1:, 1::2]  # [B, 6, 2]
        t = t.unsqueeze(1).flatten(1) * torch.arange(12.0, dtype=x.dtype, device=x.device)
        return (t + t).view(x.shape[0], 3, 4).contiguous() - (t - t).reshape(x.shape[0], 3, 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [0, 1, 4])
def test_index_maps_are_native(device, mode, batch):
    model = IndexMaps().to(device=device, dtype=torch.float64)
    x = torch.randn(batch, 3, 4, device=device, dtype=torch.float64).transpose(1, 2).contiguous().transpose(1, 2)
    check(model, x, mode, torch.float64, expect_fallbacks=[])


class FanOutToTheOutput(nn.Module):
    """The output sums three uses of h through index maps that pass the lazy identity seed on, so all of
    h's reverse-mode cotangents are the identity (found by the graph property test)."""

    def __init__(self, first: nn.Module):
        super().__init__()
        self.first = first

    def forward(self, x):
        h = self.first(x)
        return (h + 1.5) + h.contiguous() + h


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [0, 1, 3])
@pytest.mark.parametrize("first", [nn.Identity, lambda: nn.Linear(3, 3)], ids=["at the input", "inside"])
def test_identity_cotangents_meeting_at_a_fan_out(device, mode, batch, first):
    model = FanOutToTheOutput(first()).to(device=device, dtype=torch.float64)
    check(model, torch.randn(batch, 3, device=device, dtype=torch.float64), mode, torch.float64, expect_fallbacks=[])


class SharedBlocks(nn.Module):
    """Cotangent blocks that several rules receive at once: a residual sum hands its block to both branches, and
    a value read by an activation, a layer norm and a sum gets three blocks summed. The reverse sweep writes a
    rule's result over its block (activations, layer norm, sums) only where no other node holds that block."""

    def __init__(self):
        super().__init__()
        self.proj, self.head = nn.Linear(6, 6), nn.Linear(4 * 6, 3)
        self.norm = nn.LayerNorm(6)

    def forward(self, x):  # x [B, 4, 6]
        h = self.proj(x)
        h = h + F.gelu(h)  # the sum's block reaches the GELU and h
        h = self.norm(h) + torch.tanh(h) + h  # h's three blocks meet
        h = F.silu(self.norm(h)) - 0.5 * h
        return self.head(h.flatten(1))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [0, 1, 3])
def test_blocks_read_by_several_rules(mode, batch):
    torch.manual_seed(3)
    model = SharedBlocks().double()
    check(model, torch.randn(batch, 4, 6, dtype=torch.float64), mode, torch.float64, expect_fallbacks=[])


class SharedBlocksAroundAttention(SharedBlocks):
    """SharedBlocks' pattern on the Python sweep (the test keeps the model off its program, which it has): an
    activation overwrites its block only where GraphPlan.owns_cotangent finds no other holder."""

    def forward(self, x):  # x [B, 4, 6]
        h = self.proj(x)
        h = h + F.gelu(h)  # the residual sum's block reaches the GELU and h
        a = F.scaled_dot_product_attention(h.unsqueeze(1), h.unsqueeze(1), h.unsqueeze(1)).squeeze(1)
        h = F.gelu(a) + torch.tanh(a) - a  # a read three times: a new block, the GELU's own
        h = F.silu(self.norm(h))  # the norm's fresh block
        return self.head(h.flatten(1))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [1, 3])
def test_blocks_read_by_several_rules_on_the_python_sweep(mode, batch, monkeypatch):
    monkeypatch.setattr(GraphPlan, "native_program", lambda self: None)
    torch.manual_seed(4)
    model = SharedBlocksAroundAttention().double()
    check(model, torch.randn(batch, 4, 6, dtype=torch.float64), mode, torch.float64, expect_fallbacks=[])


class WithUnsupportedNode(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.first(x)
        return self.second(torch.sin(h) * h)  # sin: fallback; the product of two carried values: native


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_unsupported_nodes_fall_back_alone(dtype, mode):
    model = WithUnsupportedNode().to(dtype)
    x = torch.randn(4, 5, dtype=dtype)
    jm = check(model, x, mode, dtype)
    assert jm.fallbacks == ["sin"]
    text = repr(jm)
    assert "first" in text and "native linear" in text and "fallback (torch.func)" in text


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        if x.abs().sum() > 0:  # data-dependent control flow: untraceable (always true for these inputs,
            return self.linear(x)  # so that the branch is the same per sample and per batch)
        return -self.linear(x)


class HasUntraceablePart(nn.Module):
    def __init__(self):
        super().__init__()
        self.part = DataDependent()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.relu(self.part(x)))


@pytest.mark.parametrize("mode", MODES)
def test_untraceable_model_runs_whole_on_the_fallback_with_a_warning(mode):
    model = DataDependent().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    # torch.func.vmap cannot run data-dependent control flow either: the fallback goes sample by
    # sample, and the reference is the classic loop over outputs.
    with pytest.warns(UserWarning, match="entirely on the torch.func fallback.*cannot trace"):
        check(model, x, mode, torch.float64, expect_fallbacks=["model"], reference=loop_jacobian)


@pytest.mark.parametrize("mode", MODES)
def test_untraceable_submodule_is_kept_whole(mode):
    model = HasUntraceablePart().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jm = check(model, x, mode, torch.float64, expect_fallbacks=["part"], reference=loop_jacobian)
    assert "not traceable, kept whole: part" in repr(jm)


class MixesSamples(nn.Module):
    def forward(self, x):
        return x - x.mean(0, keepdim=True).expand_as(x)


class SwapsSamples(nn.Module):
    def forward(self, x):
        return x.flip(0) * 2


@pytest.mark.parametrize("model, reason", [
    (MixesSamples(), "node 'mean' does not keep the batch dimension"), (SwapsSamples(), "node 'flip' mixes the samples"),
])
def test_model_that_mixes_samples_runs_whole_on_the_fallback(model, reason):
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match=reason):
        jacobian = jx.batch_jacobian(model, x)
    # The per-sample definition (each sample alone, as torch.func.vmap computes it).
    assert_matches_reference(jacobian, reference_jacobian(model, x), torch.float64)


class TwoOutputs(nn.Module):
    def forward(self, x):
        return x * 2, x


class TwoInputs(nn.Module):
    def forward(self, x, y):
        return x + y


def test_tuple_output_and_several_inputs_are_rejected_clearly_by_compile():
    x = torch.randn(2, 3)
    with pytest.raises(TypeError, match="returns a tuple.*single output tensor.*lambda x: model\\(x\\)\\[0\\]"):
        jx.compile(TwoOutputs())(x)
    with pytest.raises(TypeError, match="2 required inputs \\(x, y\\).*as a tuple.*lambda x: model\\(x, other\\)"):
        jx.batch_jacobian(TwoInputs(), x)
    # The wrappers the messages suggest work.
    assert_matches_reference(jx.batch_jacobian(lambda t: TwoOutputs()(t)[0], x), 2 * reference_jacobian(nn.Identity(), x), torch.float32)


@pytest.mark.parametrize("mode", MODES)
def test_output_independent_of_the_input_has_a_zero_jacobian(mode):
    class Constant(nn.Module):
        def forward(self, x):
            return torch.ones(x.shape[0], 2, dtype=x.dtype) + 0 * x.shape[1]

    x = torch.randn(3, 4, dtype=torch.float64)
    y, jacobian = jx.compile(Constant(), mode=mode)(x)
    assert jacobian.shape == (3, 2, 4) and not jacobian.any()


@pytest.mark.parametrize("mode", MODES)
def test_identity_model(mode):
    class Same(nn.Module):
        def forward(self, x):
            return x.reshape(x.shape[0], -1)

    x = torch.randn(2, 3, 2, dtype=torch.float64)
    check(Same(), x, mode, torch.float64, expect_fallbacks=[])


class EvalIdentities(nn.Module):
    """Stochastic depth and dropout, as modules and functional calls, in eval mode: identities that must
    not send their nodes to the fallback (torchvision's StochasticDepth is a traced call of its functional)."""

    def __init__(self):
        super().__init__()
        import torchvision

        self.stochastic_functional = torchvision.ops.stochastic_depth
        self.linear = nn.Linear(5, 5)
        self.depth = torchvision.ops.StochasticDepth(0.3, "row")
        self.dropout = nn.Dropout2d(0.4)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.linear(x))
        h = h + self.depth(h) + F.dropout(h, 0.5, training=self.training) + F.alpha_dropout(h, 0.2)
        h = self.stochastic_functional(h, 0.5, "batch", training=False) + self.dropout(h[:, :, None, None])[:, :, 0, 0]
        return self.head(h)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [0, 1, 4])
def test_eval_mode_dropout_and_stochastic_depth_are_native_identities(mode, batch):
    model = EvalIdentities().double().eval()
    check(model, torch.randn(batch, 5, dtype=torch.float64), mode, torch.float64, expect_fallbacks=[])
    with pytest.raises(ValueError, match=r"'depth' \(StochasticDepth\) is in training mode"):
        jx.batch_jacobian(model.train(), torch.randn(2, 5, dtype=torch.float64))


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's pattern: a BatchNorm2d subclass whose forward calls F.batch_norm and an activation."""

    def forward(self, x):
        return F.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                                   self.eps))


class LayerNorm2d(nn.LayerNorm):
    """convnext's pattern: layer norm over the channels of [B, C, H, W] through permutes."""

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ChannelsLastDepthwise(nn.Module):
    """Depthwise convolutions between layer norms over the channels (ConvNeXt's order): the permutes leave the
    convolutions' cotangents channels last, which the executor keeps (the flipped-kernel transpose)."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Conv2d(4, 4, 3, padding=1, dilation=1, groups=4)
        self.dilated = nn.Conv2d(4, 4, (3, 2), padding=(2, 1), dilation=(2, 1), groups=4, bias=False)
        self.norm1, self.norm2 = LayerNorm2d(4), LayerNorm2d(4)
        self.head = nn.Linear(4 * 5 * 7, 3)

    def forward(self, x):  # x [B, 4, 5, 6]; the (3, 2) kernel with padding (2, 1) widens the map to 5 x 7
        return self.head(self.norm2(self.dilated(self.norm1(self.dense(x)))).flatten(1))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [1, 3])  # torch.func's grouped convolution backward fails on an empty batch
def test_depthwise_convolutions_between_channel_norms(mode, batch):
    torch.manual_seed(5)
    model = ChannelsLastDepthwise().double()
    check(model, torch.randn(batch, 4, 5, 6, dtype=torch.float64), mode, torch.float64, expect_fallbacks=[])


class FunctionalNorms(nn.Module):
    def __init__(self, affine: bool):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.norm_act = BatchNormAct2d(3, affine=affine)
        self.channel_norm = LayerNorm2d(3, elementwise_affine=affine)
        self.head = nn.Linear(3 * 4 * 4, 2)
        with torch.no_grad():
            self.norm_act.running_mean.uniform_(-0.5, 0.5)
            self.norm_act.running_var.uniform_(0.5, 2.0)
            for parameter in (*self.norm_act.parameters(), *self.channel_norm.parameters()):
                parameter.uniform_(-1.5, 1.5)

    def forward(self, x):
        return self.head(self.channel_norm(self.norm_act(self.conv(x))).flatten(1))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [0, 1, 3])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_subclasses_calling_functional_norms_are_traced_into_and_native(mode, batch, affine):
    torch.manual_seed(4)
    model = FunctionalNorms(affine).double().eval()
    x = torch.randn(batch, 2, 4, 4, dtype=torch.float64)
    if batch == 0:  # torch.func's batch norm cannot vmap over an empty batch: the shapes are the reference
        jm = jx.compile(model, mode=mode)
        output, jacobian = jm(x)
        assert output.shape == (0, 2) and jacobian.shape == (0, 2, 2, 4, 4) and jm.fallbacks == []
        return
    jm = check(model, x, mode, torch.float64, expect_fallbacks=[])
    if affine:  # parameters are read at every call: an update after planning is seen
        with torch.no_grad():
            model.norm_act.weight.mul_(-2.0)
            model.channel_norm.bias.add_(1.0)
            model.norm_act.running_var.mul_(3.0)
        x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
        assert_matches_reference(jm(x)[1], reference_jacobian(model, x), torch.float64)


class FunctionalLinear(nn.Linear):
    """timm's classifier pattern: a Linear subclass whose forward calls F.linear with its own parameters."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class ScaledLinear(nn.Linear):
    def forward(self, x):  # a weight computed in the forward: not the model's parameter, so the fallback
        return F.linear(x, self.weight * 2.0, self.bias)


class FunctionalLinears(nn.Module):
    def __init__(self, computed_weight: bool):
        super().__init__()
        self.tokens = FunctionalLinear(4, 5)
        self.head = (ScaledLinear if computed_weight else FunctionalLinear)(15, 2, bias=False)

    def forward(self, x):  # x [B, 3, 4]
        return self.head(torch.tanh(self.tokens(x)).flatten(1))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [0, 1, 3])
@pytest.mark.parametrize("computed_weight", [False, True], ids=["parameters", "computed_weight"])
def test_functional_linear_on_the_models_parameters_is_native(mode, batch, computed_weight):
    torch.manual_seed(5)
    model = FunctionalLinears(computed_weight).double()
    x = torch.randn(batch, 3, 4, dtype=torch.float64)
    jm = check(model, x, mode, torch.float64, expect_fallbacks=["head"] if computed_weight else [])
    with torch.no_grad():  # parameters are read at every call
        model.tokens.weight.mul_(-3.0)
    assert_matches_reference(jm(x)[1], reference_jacobian(model, x), torch.float64)


class GroupNormNet(nn.Module):
    """GroupNorm over [C, H, W] and over [C, L], affine or not; with_fallback puts a node without a native
    rule in the middle, so that the Python walker runs the rule instead of the single op."""

    def __init__(self, affine: bool, with_fallback: bool):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4, affine=affine)
        self.norm1d = nn.GroupNorm(4, 4, affine=affine, eps=1e-3)
        self.head = nn.Linear(4 * 9, 3)
        self.with_fallback = with_fallback
        if affine:
            with torch.no_grad():
                for parameter in (*self.norm.parameters(), *self.norm1d.parameters()):
                    parameter.uniform_(-1.5, 1.5)

    def forward(self, x):
        h = self.norm(self.conv(x))
        if self.with_fallback:
            h = torch.sin(h) * torch.cos(h)  # sin and cos: no native rule
        return self.head(self.norm1d(h.flatten(2)).flatten(1))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("with_fallback", [False, True], ids=["one_op", "walker"])
def test_group_norm_is_native(mode, affine, with_fallback):
    torch.manual_seed(5)
    model = GroupNormNet(affine, with_fallback).double().eval()
    x = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    jm = check(model, x, mode, torch.float64)
    assert jm.fallbacks == (["sin", "cos"] if with_fallback else [])
    output, jacobian = jm(x[:0])
    assert output.shape == (0, 3) and jacobian.shape == (0, 3, 2, 3, 3)
    if not with_fallback:
        with torch.no_grad():
            program = torch.export.export(jm, (x,))
        assert sum("jacext" in str(n.target) for n in program.graph.nodes if n.op == "call_function") == 1
        assert_matches_reference(program.module()(x)[1], reference_jacobian(model, x), torch.float64)


class FunctionalPools(nn.Module):
    """Pools called functionally (inception's branches do), 2-d and 1-d, with defaults and keywords."""

    def forward(self, x):
        a = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)
        b = F.max_pool2d(x, 2, ceil_mode=True)
        c = F.adaptive_avg_pool2d(x, (2, 1))
        d = F.avg_pool1d(x.flatten(2), 2, count_include_pad=False)
        e = F.max_pool1d(x.flatten(2), kernel_size=3, stride=2, padding=1)
        return torch.cat([a.flatten(1), b.flatten(1), c.flatten(1), d.flatten(1), e.flatten(1)], dim=1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [1, 3])
def test_functional_pools_are_native(mode, batch):
    x = torch.randn(batch, 2, 5, 4, dtype=torch.float64)
    check(FunctionalPools(), x, mode, torch.float64, expect_fallbacks=[])


class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return F.dropout(self.linear(x), 0.5, training=self.training)


def test_a_training_flag_changed_after_planning_is_not_served_a_stale_eval_graph():
    """The capture bakes self.training in as a constant: model.train() after a call must re-capture,
    not keep the eval-mode identity (the Jacobian of a randomised layer is then that of its draw)."""
    torch.manual_seed(7)
    model = FunctionalDropout().double().eval()
    jm = jx.compile(model)
    x = torch.randn(3, 4, dtype=torch.float64)
    jm(x)
    assert jm.fallbacks == []
    model.train()
    with pytest.warns(UserWarning, match="mixes the samples"):  # the training graph: dropout draws per batch
        jm(x)
    assert jm.fallbacks == ["model"]
    model.eval()
    jm(x)
    assert jm.fallbacks == []


class RMSNormNet(nn.Module):
    """nn.RMSNorm over the last axis and over the last two, and F.rms_norm on a parameter of the model (a
    traced subclass's own forward), between Linear layers on [B, T, E] tokens."""

    def __init__(self, affine: bool, eps):
        super().__init__()
        self.embed = nn.Linear(5, 6)
        self.norm = nn.RMSNorm(6, eps=eps, elementwise_affine=affine)
        self.norm2d = nn.RMSNorm((3, 6), eps=1e-3, elementwise_affine=affine)
        self.scale = nn.Parameter(torch.rand(6) + 0.5)
        self.head = nn.Linear(3 * 6, 4)
        if affine:
            with torch.no_grad():
                for parameter in (*self.norm.parameters(), *self.norm2d.parameters()):
                    parameter.uniform_(-1.5, 1.5)

    def forward(self, x):
        h = self.norm(self.embed(x))
        h = F.rms_norm(torch.tanh(h), (6,), self.scale)
        return self.head(self.norm2d(h).flatten(1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [0, 1, 3])
@pytest.mark.parametrize("affine, eps", [(True, None), (False, 1e-2)], ids=["affine-dtype-eps", "plain-eps"])
def test_rms_norm_is_native(dtype, mode, batch, affine, eps):
    torch.manual_seed(7)
    model = RMSNormNet(affine, eps).to(dtype).eval()
    x = non_contiguous(torch.randn(batch, 3, 5, dtype=dtype))
    check(model, x, mode, dtype, expect_fallbacks=[])


def test_rms_norm_near_zero_input_is_dominated_by_eps():
    """Inputs far below sqrt(eps): r ~ eps^(-1/2), the x x^T term vanishes; both sweeps follow torch.func."""
    model = nn.Sequential(nn.RMSNorm(4, eps=1e-2), nn.Linear(4, 3)).double().eval()
    x = 1e-6 * torch.randn(2, 4, dtype=torch.float64)
    for mode in ("forward", "reverse"):
        check(model, x, mode, torch.float64, expect_fallbacks=[])


class RMSNormClassToken(nn.Module):
    """RMSNorm and a Linear over tokens, then the class token's row alone: the reverse sweep pulls the
    picked cotangent back through the norm on that token only (blocks.Picked)."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(6, 6)
        self.norm = nn.RMSNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # x [B, T, 6]
        h = self.mix(x).softmax(1) * x  # tokens mix, so the pick's box matters upstream of the norm
        return self.head(self.norm(h)[:, 0])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [0, 1, 3])
def test_rms_norm_under_a_picked_token(mode, batch):
    torch.manual_seed(11)
    model = RMSNormClassToken().double()
    x = torch.randn(batch, 4, 6, dtype=torch.float64)
    check(model, x, mode, torch.float64, expect_fallbacks=[])
