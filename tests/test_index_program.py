"""roll, flip, constant padding, slices (their bounds constants or computed from the input's shape), integer picks,
F.normalize and torch.einsum as entries of the graph program: against torch.func in float64 in both sweeps as one
op call (B = 0, 1, 3; a non-contiguous input; D != C), one capture at two input sizes (the program is rebuilt
per per-sample shape), opcheck, torch.export, clear errors for bad entries, the walker kept where an amount reads
the batch size, and torchvision's Swin (v1, v2) and MaxVit, whose nodes of these kinds all encode."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import jacobian_ext as jx
from conftest import assert_matches_reference, non_contiguous
from jacobian_ext.attention_rules import AttentionRule, AxisSoftmaxRule, MatmulRule
from jacobian_ext.program import replay
from test_graph_program import check, check_export_with_a_dynamic_batch, opcheck_program, planned, program_kinds

DOUBLE = torch.float64
MODES = ["forward", "reverse"]
KINDS = {"roll", "flip", "pad", "slice", "normalize", "einsum"}


class IndexKinds(nn.Module):
    """x [B, H, 4] through every new kind: padding (a crop, a pad by an amount from x's shape, value 0.5), a roll
    by a shift from the padded shape, a flip, slices bounded by x's shape, F.normalize, einsum of two carried
    values, of a carried value and a parameter, and of a value whose batch axis is not the first; integer picks
    (x[:, 2], a negative one, a part of unbind)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.mix = nn.Parameter(torch.randn(4, 3))
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        height, width = x.shape[1], x.shape[2]
        h = torch.tanh(self.embed(x))
        h = F.pad(h, (1, -1, 0, (-height) % 4), value=0.5)  # [B, ceil4(H), 6]
        h = torch.roll(h, (h.shape[1] // 2 + 1, -1), (1, 2))
        h = torch.flip(h, (2,))[:, 1:height + 1, :width]  # [B, H', 4]
        n = F.normalize(h, dim=1, eps=0.3)
        scores = torch.einsum("bhw,bgw->bhg", h, n)  # [B, H', H']
        mixed = torch.einsum("bhw,wk->bkh", h, self.mix)  # [B, 3, H']
        moved = torch.einsum("hbw,bhg->bwg", h.transpose(0, 1), scores)  # [B, 4, H']
        picked = moved.unbind(1)[0] * moved[:, 2] * mixed[:, :, -1].sum(1, keepdim=True)  # [B, H']
        return self.head(mixed.mean(2) * picked.mean(1, keepdim=True))


def model_and_input(batch, height=5, seed=0):
    torch.manual_seed(seed)
    model = IndexKinds().double().eval()
    return model, torch.randn(batch, height, 4, dtype=DOUBLE)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [0, 1, 3])
def test_every_new_kind_is_one_program(mode, batch):
    model, x = model_and_input(batch)
    plan, output, jacobian = planned(model, x, mode)
    assert KINDS <= set(program_kinds(plan)), program_kinds(plan)
    check(model, x, output, jacobian)


@pytest.mark.parametrize("mode", MODES)
def test_non_contiguous_input_and_replay_agree(mode):
    model, x = model_and_input(3, height=6)
    x = non_contiguous(x)
    assert not x.is_contiguous()
    plan, output, jacobian = planned(model, x, mode)
    assert KINDS <= set(program_kinds(plan))
    check(model, x, output, jacobian)
    layers, getters = plan.native_program()
    with torch.no_grad():
        assert_matches_reference(replay(x, layers, [get() for get in getters]), model(x), DOUBLE)


def test_one_capture_at_two_input_sizes_rebuilds_the_program():
    """Heights 5 and 8: other pad amounts, another roll shift, other slice bounds, each in its own program."""
    model, _ = model_and_input(1)
    jm = jx.compile(model, mode="reverse")
    programs = []
    for height, batch in ((5, 2), (8, 3), (5, 1)):
        x = torch.randn(batch, height, 4, dtype=DOUBLE)
        with torch.no_grad():
            output, jacobian = jm(x)
        plan = jm._last["plan"]
        programs.append(plan.native_program()[0])
        check(model, x, output, jacobian)
    assert programs[0] != programs[1] and programs[0] == programs[2]
    assert any(entry.startswith("pad pad=1,-1,0,3") for entry in programs[0])
    assert any(entry.startswith("pad pad=1,-1,0,0") for entry in programs[1])


class BatchSizeShift(nn.Module):
    """A roll whose shift reads the batch size (x.shape[0] * 0 + 1 is 1, but only at this batch size as far as the
    program can tell) and a pad by the whole shape's product over the batch: both stay on the walker."""

    def __init__(self, whole_shape: bool):
        super().__init__()
        self.whole_shape = whole_shape

    def forward(self, x):
        if self.whole_shape:
            amount = x.shape.numel() // x.size(0) % 3  # the shape's product reads the batch size
            return F.pad(torch.tanh(x), (0, amount))
        return torch.roll(torch.tanh(x), x.shape[0] * 0 + 1, 1)


@pytest.mark.parametrize("whole_shape", [False, True], ids=["roll-batch-axis", "pad-numel"])
@pytest.mark.parametrize("mode", MODES)
def test_an_amount_reading_the_batch_size_stays_on_the_walker(whole_shape, mode):
    model = BatchSizeShift(whole_shape)
    x = torch.randn(3, 5, dtype=DOUBLE)
    plan, output, jacobian = planned(model, x, mode)
    assert plan.native_program() is None and len(plan.unencoded) == 1, plan.unencoded
    label = "index map (pad)" if whole_shape else "index map (roll/flip)"
    assert [g.rule.label for g in plan.nodes if g.name in plan.unencoded] == [label]
    check(model, x, output, jacobian)


class ComputedConstants(nn.Module):
    """Constants computed in the forward from a parameter and x's per-sample shape (an additive bias gathered from a
    table, a positional ramp as a factor, an einsum operand), or from the batch size (not a program constant)."""

    def __init__(self, batch_sized: bool):
        super().__init__()
        self.table = nn.Parameter(torch.randn(7))
        self.register_buffer("index", torch.tensor([[0, 3, 6], [2, 2, 5]]))
        self.batch_sized = batch_sized

    def forward(self, x):  # x [B, 2, 3]
        bias = self.table[self.index]
        ramp = torch.arange(1, x.shape[2] + 1, dtype=x.dtype, device=x.device) / x.size(-1)
        h = torch.einsum("bij,jk->bik", torch.tanh(x + bias) * ramp, bias.t() * 2)
        if self.batch_sized:
            h = h + torch.arange(1.0, 3.0, dtype=torch.float64) / (x.shape[0] * 0 + 1)  # 1, from the batch size
        return h


@pytest.mark.parametrize("mode", MODES)
def test_constants_computed_from_parameters_and_shapes_are_params(mode):
    model = ComputedConstants(batch_sized=False).double()
    x = torch.randn(3, 2, 3, dtype=DOUBLE)
    plan, output, jacobian = planned(model, x, mode)
    assert {"add", "scale", "einsum"} <= set(program_kinds(plan))
    check(model, x, output, jacobian)
    layers, getters = plan.native_program()
    with torch.no_grad():
        model.table.mul_(-2)  # read at every call
        assert_matches_reference(replay(x, layers, [get() for get in getters]), model(x), DOUBLE)
    check(model, x, *jx.compile(model, mode=mode)(x))


def test_a_constant_reading_the_batch_size_stays_on_the_walker():
    model = ComputedConstants(batch_sized=True).double()
    x = torch.randn(3, 2, 3, dtype=DOUBLE)
    plan, output, jacobian = planned(model, x, "reverse")
    assert plan.native_program() is None and plan.unencoded == ["add_3"], plan.unencoded  # the last add
    check(model, x, output, jacobian)


def test_shape_reads_of_per_sample_axes_encode():
    """x.size(1), x.size(-1), x.shape[1:] and unpacking the shape (its batch entry unused) are per-sample."""
    def model(x):
        _, height, width = x.shape
        rows, cols = x.shape[1:]
        return torch.roll(torch.tanh(x), (x.size(1) // 2, width - x.size(-1) + rows - height + 1 + cols), (1, 2))

    x = torch.randn(2, 3, 4, dtype=DOUBLE)
    for mode in MODES:
        plan, output, jacobian = planned(model, x, mode)
        assert "roll" in program_kinds(plan)
        check(model, x, output, jacobian)


@pytest.mark.parametrize("gradient_mode", MODES)
def test_opcheck_of_a_program_with_the_new_kinds(gradient_mode):
    model, x = model_and_input(2)
    layers = opcheck_program(model, x, gradient_mode=gradient_mode)
    assert KINDS <= {layer.split()[0] for layer in layers}


def test_torch_export_of_the_new_kinds_is_one_op():
    model, _ = model_and_input(1)
    check_export_with_a_dynamic_batch(model, (5, 4))


@pytest.mark.parametrize("layers, params, message", [
    (["roll shifts=1 dims=0,1"], [], r"one shift per axis"),
    (["roll shifts=1 dims=2"], [], r"per-sample axis 2"),
    (["flip dims=5"], [], r"per-sample axis 5"),
    (["pad pad=1,1,1 value=0.0"], [], r"pairs of amounts"),
    (["pad pad=1,1,1,1,1,1 value=0.0"], [], r"at most the 2 per-sample axes"),
    (["pad pad=1,1 value=zero"], [], r"must be a number"),
    (["normalize dim=2 eps=1e-12"], [], r"per-sample axis 2"),
    (["einsum in=0 equation=bij constants=0"], [], r"explicit output"),
    (["einsum in=0 equation=b...->b constants=0"], [], r"letters, commas and one ->"),
    (["einsum in=0 equation=bii->bi constants=0"], [], r"repeats a letter"),
    (["einsum in=0 equation=bij,jk->bik constants=0"], [], r"2 operands in its equation but constants= names 1"),
    (["einsum in=0 equation=ibj->bij constants=0"], [], r"start with the output's batch letter"),
    (["einsum in=0 equation=bij,jk->bik constants=0,1"], [], r"takes 1 tensors of params but only 0"),
    (["einsum in=0,0 equation=bij,jk->bik constants=0,1"], [torch.ones(2, 2)], r"with a 0 for each of its 2 value slots"),
    (["einsum in=0 equation=bij,jk->bik constants=0,2"], [torch.ones(2, 2)], r"constants= flags \(0 or 1\), one per operand"),
    # cat reads constants= the same way (one decoder for both kinds)
    (["cat in=0 dim=0 constants=0,0"], [], r"with a 0 for each of its 1 value slots"),
    (["cat in=0 dim=0 constants=0,3"], [torch.ones(1, 2, 2)], r"constants= flags \(0 or 1\), one per operand"),
])
def test_bad_entries_raise_value_errors(layers, params, message):
    x = torch.randn(2, 2, 2, dtype=DOUBLE)
    with pytest.raises(ValueError, match=message):
        torch.ops.jacext.batch_jacobian(x, layers, [p.double() for p in params], "reverse")


def test_einsum_constant_of_another_dtype_raises():
    x = torch.randn(2, 2, 2, dtype=DOUBLE)
    with pytest.raises((TypeError, ValueError), match="einsum operand"):
        torch.ops.jacext.batch_jacobian(x, ["einsum in=0 equation=bij,jk->bik constants=0,1"],
                                        [torch.ones(2, 2)], "reverse")


# ---- torchvision's Swin and MaxVit ----

torchvision = pytest.importorskip("torchvision")

# The kinds of the attention helper's branch (matrix products of two carried values, softmax over an axis):
# until they have program entries, the only nodes these models may leave off the program.
OTHER_RULES = (MatmulRule, AxisSoftmaxRule, AttentionRule)


def maxvit_small():
    torch.manual_seed(0)
    return torchvision.models.MaxVit(input_size=(32, 32), stem_channels=16, partition_size=2, block_channels=[32, 64],
                                     block_layers=[1, 1], head_dim=16, stochastic_depth_prob=0.0,
                                     num_classes=10).double().eval()


def small_swin(v2):
    from test_swin_forms import small_swin as make
    return make(v2)


@pytest.mark.parametrize("make_model, shape", [
    (lambda: small_swin(False), (3, 5, 5)), (lambda: small_swin(True), (3, 5, 5)), (maxvit_small, (3, 32, 32))],
    ids=["swin-v1", "swin-v2", "maxvit"])
def test_swin_and_maxvit_encode_every_node_of_these_kinds(make_model, shape):
    """Every node left off the program is one of the attention helper's kinds (none of roll, pad, slice, normalize,
    einsum); with none left, the model is one op call matching torch.func."""
    model = make_model()
    x = torch.randn(2, *shape, dtype=DOUBLE)
    plan, output, jacobian = planned(model, x, "reverse")
    program = plan.native_program()
    left = [g for g in plan.nodes if g.rule is not None and g.rule.encode(plan, g, ()) is None]
    assert all(isinstance(g.rule, OTHER_RULES) for g in left), [(g.name, g.rule.label) for g in left]
    labels = {g.rule.label for g in plan.nodes if g.rule is not None}
    assert labels & {"index map (roll/flip)", "index map (pad)", "native normalize", "native einsum"}
    if program is not None:
        assert not left
    check(model, x, output, jacobian)


def test_torch_export_recomputes_computed_constants():
    """The constants' computation (the table's gather, the ramp) is traced into the exported program, from the
    parameters it reads: one op call, right at other batch sizes after save and load."""
    check_export_with_a_dynamic_batch(ComputedConstants(batch_sized=False).double(), (2, 3))


def test_torchscript_of_computed_constants_says_it_cannot():
    model = ComputedConstants(batch_sized=False).double()
    jm = jx.compile(model)
    jm(torch.randn(2, 2, 3, dtype=DOUBLE))
    with pytest.raises(NotImplementedError, match="TorchScript cannot recompute"):
        torch.jit.script(jm)


def test_torch_compile_of_computed_constants_says_it_cannot():
    torch._dynamo.reset()  # every JacobianModule is one more compile of the same forward code
    model = ComputedConstants(batch_sized=False).double()
    compiled = torch.compile(jx.compile(model), fullgraph=True, backend="eager")
    try:
        with pytest.raises(Exception, match="torch.compile cannot trace yet"):
            compiled(torch.randn(2, 2, 3, dtype=DOUBLE))
    finally:
        torch._dynamo.reset()  # the failed compile leaves no state for the tests after it
