"""gather / index_select with an index that carries no derivative (index maps, graph path): against torch.func
in float64 in both sweeps, as one program where the index is a parameter or buffer of the model (with RMSNorm:
export, TorchScript, opcheck, gradients), on the Python walker where it is computed in the forward, and on the
fallback wherever the index could carry samples into one another."""
import io

import pytest
import torch
from torch import nn

import jacobian_ext as jx
from conftest import assert_matches_reference, non_contiguous
from jacobian_ext.program import replay
from test_graph_program import check, check_export_with_a_dynamic_batch, opcheck_program, planned, program_kinds

DOUBLE = torch.float64
MODES = ["forward", "reverse", "auto"]


class Selections(nn.Module):
    """gather and index_select along per-sample axes of [B, T, E] tokens, with indices held by the model: a
    batch-1 buffer expanded over the batch (and narrower than the tokens on the other axes, so the output is
    smaller than the input), a buffer that reads some positions twice and others never, and an unregistered
    tensor attribute (a constant of the captured graph)."""

    def __init__(self, width=4, order_as_buffer=False):
        super().__init__()
        self.mix = nn.Linear(width, width)
        self.register_buffer("columns", torch.tensor([[[3, 0, 0], [1, 2, 3], [2, 2, 1]]]))  # [1, 3, 3]
        self.register_buffer("rows", torch.tensor([4, 0, 4, 2]))
        if order_as_buffer:
            self.register_buffer("order", torch.tensor([2, 1]))
        else:
            self.order = torch.tensor([2, 1])  # plain attribute: a tensor constant of the graph
        self.head = nn.Linear(3 * 3 + 4 * 2 + 2 * width, 3)

    def forward(self, x):  # x [B, 5, 4]
        h = torch.tanh(self.mix(x))
        a = h.gather(2, self.columns.expand(x.shape[0], -1, -1))        # [B, 3, 3]
        b = torch.index_select(h, 1, self.rows)[..., :2]                 # [B, 4, 2]
        c = x.index_select(dim=1, index=self.order)                      # [B, 2, 4]
        return self.head(torch.cat([a.flatten(1), b.flatten(1), c.flatten(1)], dim=1))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [0, 1, 3])
def test_gather_and_index_select_with_model_indices_are_one_program(mode, batch):
    torch.manual_seed(batch)
    model = Selections().double().eval()
    x = non_contiguous(torch.randn(batch, 5, 4, dtype=DOUBLE))
    plan, output, jacobian = planned(model, x, mode)
    assert plan.fallbacks == []
    kinds = program_kinds(plan)
    assert kinds.count("gather") == 1 and kinds.count("index_select") == 2, kinds
    check(model, x, output, jacobian)
    layers, getters = plan.native_program()
    with torch.no_grad():  # the plain-PyTorch replay (fake impl, backward) computes the same model
        assert_matches_reference(replay(x, layers, [get() for get in getters]), model(x), DOUBLE)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_the_walker_rules_agree_with_torch_func(mode):
    """The same selections with a fallback node after them: the Python walker runs the selection rules."""
    torch.manual_seed(4)
    selections = Selections().double().eval()
    model = lambda t: selections(t).cumsum(-1)  # noqa: E731  (cumsum: a fallback node, so no program)
    x = torch.randn(3, 5, 4, dtype=DOUBLE)
    plan, output, jacobian = planned(model, x, mode)
    assert plan.native_program() is None
    assert sum("index map (gather)" in line for line in plan.describe()) == 1
    assert sum("index map (index_select)" in line for line in plan.describe()) == 2
    check(model, x, output, jacobian)


def per_sample_blocks(function, x):
    """torch.func.jacrev of the whole batch, [B, *out, B, *in], checked zero across samples; its diagonal."""
    with torch.no_grad():
        full = torch.func.jacrev(function)(x)
    batch, in_axes = x.shape[0], x.dim() - 1
    blocks = []
    for b in range(batch):
        sample = full[b].movedim(-in_axes - 1, 0)  # [B (input's), *out, *in]
        blocks.append(sample[b].clone())
        sample[b] = 0
        assert not sample.any()
    return torch.stack(blocks)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_gather_entry_with_an_index_row_per_sample(mode):
    """A program's gather index may have the batch size itself (one row per sample), beside batch 1. A model
    cannot hold one (its plan probes two samples), so the op is called directly."""
    torch.manual_seed(5)
    x = torch.randn(3, 3, 6, dtype=DOUBLE)
    index = torch.randint(0, 6, (3, 2, 4))
    output, jacobian = torch.ops.jacext.batch_jacobian(x, ["gather dim=1"], [index], mode)  # output [B, C]
    assert_matches_reference(output, x.gather(2, index).flatten(1), DOUBLE)
    jacobian = jacobian.reshape(3, 2, 4, 3, 6)
    assert_matches_reference(jacobian, per_sample_blocks(lambda v: v.gather(2, index), x), DOUBLE)


def test_gradients_through_an_index_row_per_sample_are_not_implemented():
    """The backward replays the program one sample at a time, where rows of a per-sample index cannot be told
    apart: it says so instead of replaying the wrong row."""
    x = torch.randn(3, 3, 6, dtype=DOUBLE, requires_grad=True)
    _, jacobian = torch.ops.jacext.batch_jacobian(x, ["gather dim=1"], [torch.randint(0, 6, (3, 2, 4))], "reverse")
    with pytest.raises(NotImplementedError, match="per-sample index are not supported"):
        jacobian.sum().backward()

class ArgmaxPick(nn.Module):
    """The largest entry of each token, picked with gather at argmax indices computed in the forward (constant
    for the derivative, per sample): native on the Python walker, not a program (the index is no tensor of the
    model)."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(4, 4)

    def forward(self, x):  # x [B, 3, 4]
        h = self.mix(x)
        best = torch.gather(h, -1, h.argmax(-1, keepdim=True))          # [B, 3, 1]
        worst = h.gather(1, torch.argmin(h, dim=1, keepdim=True))       # [B, 1, 4]
        return best * worst


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [0, 1, 3])
def test_gather_at_argmax_indices_is_native_on_the_walker(mode, batch):
    torch.manual_seed(6)
    model = ArgmaxPick().double()
    x = torch.randn(batch, 3, 4, dtype=DOUBLE)
    plan, output, jacobian = planned(model, x, mode)
    assert plan.fallbacks == []
    assert plan.native_program() is None and len(plan.unencoded) == 2, plan.unencoded
    check(model, x, output, jacobian)


class ShapeIndices(nn.Module):
    """Indices computed in the forward from the input's shape alone (the same for every sample): native on the
    walker, no tensor of the model for a program to read."""

    def forward(self, x):  # x [B, 3, 4]
        backwards = x.index_select(1, torch.arange(x.shape[1] - 1, -1, -1))
        shifted = torch.gather(x, 2, (torch.arange(x.shape[2]) + 1).remainder(x.shape[2]).expand(x.shape[0], 2, -1))
        return torch.cat([backwards * backwards, shifted], dim=1)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("batch", [0, 1, 3])
def test_indices_from_the_shape_alone_are_native_on_the_walker(mode, batch):
    torch.manual_seed(14)
    model = ShapeIndices()
    x = torch.randn(batch, 3, 4, dtype=DOUBLE)
    plan, output, jacobian = planned(model, x, mode)
    assert plan.fallbacks == [] and plan.native_program() is None
    check(model, x, output, jacobian)

class ComputedIndices(nn.Module):
    """Indices the rules do not take, each left to a fallback node of its own: computed from the input's
    values by a comparison, and argmax without keepdim (then unsqueezed)."""

    def forward(self, x):  # x [B, 3, 4]
        a = x.gather(2, (x > 0).long())                                   # [B, 3, 4]
        b = x.gather(2, x.argmax(-1).unsqueeze(-1))                       # [B, 3, 1]
        return a * b


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_indices_computed_otherwise_fall_back(mode):
    torch.manual_seed(7)
    model = ComputedIndices()
    x = torch.randn(3, 3, 4, dtype=DOUBLE)
    plan, output, jacobian = planned(model, x, mode)
    fallback_nodes = [line for line in plan.describe() if "fallback" in line]
    assert len(fallback_nodes) == 2, plan.describe()
    check(model, x, output, jacobian)


class GatherOverTheBatch(nn.Module):
    def forward(self, x):  # x [B, 2]: out[b] = x[B - 1 - b], an index read from the shape alone, along the batch
        return torch.gather(x, 0, torch.arange(x.shape[0]).flip(0).unsqueeze(1).expand(-1, 2))


class BatchMixedArgmax(nn.Module):
    def forward(self, x):  # the index is the argmax over the batch: sample b's output reads the others
        return x.gather(1, x.sum(0, keepdim=True).argmax(1, keepdim=True).expand(x.shape[0], 1))


@pytest.mark.parametrize("model", [GatherOverTheBatch(), BatchMixedArgmax()], ids=["dim-0", "batch-mixed-index"])
def test_selections_that_mix_samples_are_not_native(model):
    x = torch.randn(3, 2, dtype=DOUBLE)
    jm = jx.compile(model)
    with pytest.warns(UserWarning, match="mixes the samples|does not keep the batch"):
        jm(x)
    assert jm.fallbacks == ["model"]


# ---- deployment: one exported op, opcheck ----

class Deployed(nn.Module):
    """RMSNorm, gather and index_select with buffer indices in one all-native model."""

    def __init__(self, order_as_buffer=True):
        super().__init__()
        self.selections = Selections(order_as_buffer=order_as_buffer)
        self.norm = nn.RMSNorm((5, 4))

    def forward(self, x):
        return self.selections(self.norm(x))


def test_torch_export_of_selections_and_rms_norm_is_one_op():
    torch.manual_seed(9)
    check_export_with_a_dynamic_batch(Deployed().double().eval(), (5, 4))


def test_torchscript_of_selections_and_rms_norm_saves_and_loads():
    torch.manual_seed(13)
    model = Deployed().double().eval()
    jm = jx.compile(model)
    jm(torch.randn(1, 5, 4, dtype=DOUBLE))  # the per-sample shape, which no first Linear fixes here
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(jm), buffer)
    buffer.seek(0)
    x = torch.randn(3, 5, 4, dtype=DOUBLE)
    check(model, x, *torch.jit.load(buffer)(x))

def test_export_of_an_index_that_is_a_tensor_constant_says_why_not():
    """A plain tensor attribute is no parameter or buffer for the exported graph to read (eagerly the model is
    still one program)."""
    model = Deployed(order_as_buffer=False).double().eval()
    with pytest.raises(NotImplementedError, match="not a parameter or buffer of the model"):
        torch.export.export(jx.compile(model), (torch.randn(3, 5, 4, dtype=DOUBLE),))

def test_opcheck_of_a_program_with_selections_and_rms_norm():
    torch.manual_seed(10)
    layers = opcheck_program(Deployed().double().eval(), torch.randn(2, 5, 4, dtype=DOUBLE), gradient_mode="forward")
    assert {"rms_norm", "gather", "index_select"} <= {entry.split()[0] for entry in layers}



def test_gradients_of_a_jacobian_through_selections_and_rms_norm():
    """The op's registered backward replays the program (the index a fixed integer tensor): finite differences
    over the input and every floating-point parameter agree."""
    torch.manual_seed(12)
    model = Deployed().double().eval()
    x = torch.randn(2, 5, 4, dtype=DOUBLE)
    plan, _, _ = planned(model, x, "reverse")
    layers, getters = plan.native_program()
    params = [get().detach() for get in getters]
    floating = [i for i, p in enumerate(params) if p.is_floating_point()]

    def jacobian(v, *weights):
        full = list(params)
        for i, weight in zip(floating, weights):
            full[i] = weight
        return torch.ops.jacext.batch_jacobian(v, layers, full, "forward")[1]

    inputs = (x.clone().requires_grad_(), *(params[i].clone().requires_grad_() for i in floating))
    assert torch.autograd.gradcheck(jacobian, inputs, fast_mode=True)

# ---- bad programs ----

def long(*values):
    return torch.tensor(values, dtype=torch.long)


@pytest.mark.parametrize("layers, params, error, message", [
    (["gather dim=1"], [long(0).reshape(1, 1, 1).float()], TypeError, r"needs an int64 index"),
    (["gather dim=1"], [long(0, 1)], ValueError, r"needs an index \[1 or 3, \.\.\.\] of the input's rank 3"),
    (["gather dim=1"], [long(0).reshape(1, 1, 1).expand(2, 1, 1)], ValueError, r"needs an index \[1 or 3"),
    (["gather dim=0"], [long(0).reshape(1, 1, 1).expand(1, 1, 5)], ValueError, r"larger than the input"),
    (["gather dim=2"], [long(0).reshape(1, 1, 1)], ValueError, r"names per-sample axis 2"),
    (["gather dim=1"], [], ValueError, r"takes 1 tensors of params but only 0"),
    (["index_select dim=0"], [long(0, 1).reshape(1, 2)], ValueError, r"needs a vector index"),
    (["index_select dim=0"], [torch.tensor([0.0])], TypeError, r"needs an int64 or int32 index"),
])
def test_bad_entries_raise_clear_errors(layers, params, error, message):
    x = torch.randn(3, 2, 4, dtype=DOUBLE)
    params = [p.double() if p.is_floating_point() else p for p in params]
    with pytest.raises(error, match=message):
        torch.ops.jacext.batch_jacobian(x, layers, params, "reverse")
