"""Nodes that move the batch axis without mixing samples (timm's qkv.permute(2, 0, 3, 1, 4), sequence-first
recurrent layouts): the graph path follows the axis instead of sending the whole model to the fallback."""
import pytest
import torch
from torch import nn

import jacobian_ext as jx
from conftest import assert_matches_reference, loop_jacobian, reference_jacobian

MODES = ["auto", "forward", "reverse"]


class Attention(nn.Module):
    """timm's ViT attention written out: the batch axis moves to position 1 and back."""

    def __init__(self, width=8, heads=2, unbind=True):
        super().__init__()
        self.heads, self.unbind = heads, unbind
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):  # x [B, N, width]
        batch, tokens, width = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0) if self.unbind else (qkv[0], qkv[1], qkv[2])
        attention = (q @ k.transpose(-2, -1) * (width // self.heads) ** -0.5).softmax(dim=-1)
        return self.proj((attention @ v).transpose(1, 2).reshape(batch, tokens, width))


class Block(nn.Module):
    def __init__(self, unbind=True):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.attn = Attention(unbind=unbind)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return self.head(x.mean(1))


class SequenceFirst(nn.Module):
    """[B, T, H] -> [T, B, H] and back, with sequence-first slicing, a Linear and an activation on the moved
    layout (their rules do not care where the batch axis is)."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 5)
        self.out = nn.Linear(6, 2)

    def forward(self, x):  # x [B, T, 4]
        steps = x.transpose(0, 1)  # [T, B, 4]
        steps = torch.tanh(self.inner(steps))[1:, :, ::2]  # [T-1, B, 3]: stays sequence-first
        last = steps[-1]  # [B, 3]
        return self.out(torch.cat([last, steps.permute(1, 0, 2)[:, 0]], dim=1))


def planned(model, x, mode, reference=reference_jacobian):
    """The compiled model after one call checked against the reference (a function of the model and x, or
    the expected Jacobian); not sent whole to the fallback."""
    jm = jx.compile(model, mode=mode)
    y, jacobian = jm(x)
    assert_matches_reference(y, model(x), x.dtype)
    assert_matches_reference(jacobian, reference(model, x) if callable(reference) else reference, x.dtype)
    assert "model" not in jm.fallbacks
    return jm


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [0, 1, 3])
@pytest.mark.parametrize("unbind", [True, False], ids=["unbind", "getitem"])
def test_attention_permuting_the_batch_axis_is_planned_per_node(mode, batch, unbind):
    torch.manual_seed(0)
    model = Block(unbind).double().eval()
    x = torch.randn(batch, 5, 8, dtype=torch.float64).transpose(0, 1).contiguous().transpose(0, 1)
    plan = repr(planned(model, x, mode))
    # The moved-batch permute and the q/k/v picks are index maps.
    assert "attn:permute" in plan and "index map (permute)" in plan.split("attn:permute")[1].splitlines()[0]
    picks = [line for line in plan.splitlines() if "attn:getitem" in line]
    assert len(picks) == 3 and all("index map (slice)" in line for line in picks)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [0, 1, 4])
def test_sequence_first_layouts(mode, batch):
    torch.manual_seed(1)
    model = SequenceFirst().double()
    x = torch.randn(batch, 6, 4, dtype=torch.float64)
    jm = planned(model, x, mode)
    assert jm.fallbacks == []
    plan = repr(jm)
    for node in ("transpose", "getitem", "getitem_1", "permute", "getitem_2"):
        line = next(line for line in plan.splitlines() if line.split() and line.split()[0] == node)
        assert "index map" in line, line


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_moved_batch_axis_agrees_in_both_dtypes_and_with_the_sample_by_sample_answer(dtype):
    torch.manual_seed(2)
    model = Block().to(dtype).eval()
    x = torch.randn(4, 5, 8, dtype=dtype)
    jacobian = jx.batch_jacobian(model, x)
    singles = torch.cat([jx.batch_jacobian(model, x[i:i + 1]) for i in range(4)])
    assert_matches_reference(jacobian, singles, dtype)
    assert_matches_reference(jacobian, reference_jacobian(model, x), dtype)


class LastHiddenState(nn.Module):
    """A classifier on h_n[-1]: h_n is [layers, B, H], batch second."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.rnn = getattr(nn, kind)(3, 5, num_layers=2, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        _, hidden = self.rnn(x)
        hidden = hidden[0] if self.kind == "LSTM" else hidden
        return self.head(torch.tanh(hidden[-1]))


@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("kind", ["GRU", "LSTM", "RNN"])
def test_classifier_on_the_last_hidden_state_falls_back_in_the_recurrent_layer_only(mode, kind):
    torch.manual_seed(3)
    model = LastHiddenState(kind).double()
    x = torch.randn(3, 4, 3, dtype=torch.float64)
    assert planned(model, x, mode, reference=loop_jacobian).fallbacks == ["rnn"]  # vmap cannot batch the RNN


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
def test_recurrent_fallback_under_no_grad(dtype, kind, monkeypatch):
    """Under torch.no_grad the CPU LSTM keeps no workspace for its backward unless the fallback's forward runs
    in grad mode (vjp_in_grad_mode): the batched vjp then runs, not the sample-by-sample last resort (made to
    fail here); the answer and the output carry no autograd history."""
    from jacobian_ext import fallback

    def not_this_slow_path(*args):
        raise AssertionError("the sample-by-sample fallback ran")

    monkeypatch.setattr(fallback, "per_sample_jacobians", not_this_slow_path)
    torch.manual_seed(5)
    model = LastHiddenState(kind).to(dtype)
    x = torch.randn(3, 4, 3, dtype=dtype)
    jm = jx.compile(model, mode="reverse")
    with torch.no_grad():
        y, jacobian = jm(x)
    assert not y.requires_grad and not jacobian.requires_grad
    assert_matches_reference(jacobian, loop_jacobian(model, x), dtype)


class Splits(nn.Module):
    """Parts picked from chunk / split / tensor_split / unbind along feature axes, also on a time-major view."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 6)

    def forward(self, x):  # x [B, 4, 6]
        first, second = self.linear(x).chunk(2, dim=-1)  # [B, 4, 3] each
        a, b, c = torch.split(x, [1, 2, 3], dim=2)
        left, right = torch.tensor_split(x, 2, dim=1)  # [B, 2, 6] each
        rows = x.transpose(0, 1).unbind(0)  # 4 x [B, 6]; picks from a value whose batch axis is 1
        parts = x.transpose(0, 1).chunk(2, dim=0)  # 2 x [2, B, 6]
        return torch.cat([
            (first * torch.sigmoid(second)).flatten(1), (a * 2).flatten(1), b.flatten(1), c[:, ::2].flatten(1),
            (left - right).flatten(1), rows[-1] + rows[1], parts[1].transpose(0, 1).flatten(1)], dim=1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [0, 1, 3])
def test_parts_of_splits_are_index_maps(mode, batch):
    torch.manual_seed(6)
    model = Splits().double()
    x = torch.randn(batch, 4, 6, dtype=torch.float64)
    jm = planned(model, x, mode)
    assert jm.fallbacks == []
    picks = [line for line in repr(jm).splitlines() if "getitem" in line]
    assert len(picks) == 11 and all("index map (slice)" in line for line in picks), picks


class Shifts(nn.Module):
    """swin's cyclic shift and flips, over feature axes, also on a time-major view."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):  # x [B, 3, 5, 4]
        rolled = torch.roll(self.linear(x), shifts=(-1, 2), dims=(1, 2))
        flipped = torch.tanh(x).flip(-1).flip([1, 2])
        steps = x.transpose(0, 1).roll(1, 0)  # [3, B, 5, 4], batch second
        return rolled * flipped + steps.transpose(0, 1).roll(-2, dims=3)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [0, 1, 3])
def test_roll_and_flip_over_feature_axes_are_index_maps(mode, batch):
    torch.manual_seed(7)
    model = Shifts().double()
    x = torch.randn(batch, 3, 5, 4, dtype=torch.float64)
    jm = planned(model, x, mode)
    assert jm.fallbacks == []
    assert repr(jm).count("index map (roll/flip)") == 5


def test_roll_over_the_flattened_tensor_mixes_samples():
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="mixes the samples"):
        jacobian = jx.batch_jacobian(lambda t: torch.roll(t, 1), x)
    assert_matches_reference(jacobian, reference_jacobian(lambda t: torch.roll(t, 1), x), torch.float64)


class MovedAndBackEncodable(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):  # x [B, 5, 4]
        steps = torch.tanh(x.transpose(0, 1)[1:, :, ::2]).permute(1, 2, 0)  # [T-1, B, 2] -> [B, 2, T-1]
        return self.linear(steps.flatten(1)[:, :4])


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_a_moved_batch_axis_runs_in_the_graph_program_and_exports(mode):
    """The program's values are batch-first: the moved-batch permute and slices are encoded in those terms,
    so the whole graph is one jacext call, also under torch.export."""
    torch.manual_seed(8)
    model = MovedAndBackEncodable().double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    jm = planned(model, x, mode)
    assert jm._last["plan"].native_program() is not None
    exported = torch.export.export(jm, (x,))
    assert_matches_reference(exported.module()(x)[1], reference_jacobian(model, x), torch.float64)


class SwapsAndMoves(nn.Module):
    """swapaxes / swapdims / movedim / moveaxis (maxvit's SwapAxes), over feature axes and moving the batch."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, x):  # x [B, 3, 5, 4]
        a = torch.swapaxes(x, 1, 3).swapdims(2, 3)  # [B, 4, 3, 5]
        b = self.linear(x.movedim(1, -1)).moveaxis(-1, 1)  # [B, 3, 5, 4]
        c = torch.movedim(x, (0, 1), (1, 0)).tanh().swapaxes(0, 1)  # batch moved to 1 and back
        return a.flatten(1) + (b * c).transpose(1, 3).flatten(1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [0, 1, 3])
def test_swapaxes_and_movedim_are_index_maps(mode, batch):
    torch.manual_seed(9)
    model = SwapsAndMoves().double()
    x = torch.randn(batch, 3, 5, 4, dtype=torch.float64)
    jm = planned(model, x, mode)
    assert jm.fallbacks == []
    assert repr(jm).count("index map (permute)") == 7, repr(jm)
