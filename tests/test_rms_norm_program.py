"""RMSNorm (nn.RMSNorm, F.rms_norm) as an entry of the graph program: against torch.func in float64 in both
sweeps as one op call (eps None or a number, with and without weight, one or two normalised axes), the dtype's
epsilon in float32, one exported op with opcheck, clear errors for bad entries, and the Python walker's rule
where another node keeps the model off the single-op path."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_matches_reference, non_contiguous, reference_jacobian
from jacobian_ext.program import replay
from test_graph_program import check, check_export_with_a_dynamic_batch, opcheck_program, planned, program_kinds

DOUBLE = torch.float64
MODES = ["forward", "reverse", "auto"]


class RMSNorms(nn.Module):
    """nn.RMSNorm over the last axis and the last two (eps None: the dtype's epsilon, or a number; with and
    without weight) and F.rms_norm on a parameter, on [B, T, E] tokens."""

    def __init__(self, affine: bool, eps):
        super().__init__()
        self.embed = nn.Linear(5, 6)
        self.norm = nn.RMSNorm(6, eps=eps, elementwise_affine=affine)
        self.norm2d = nn.RMSNorm((3, 6), eps=1e-3, elementwise_affine=not affine)
        self.scale = nn.Parameter(torch.rand(6) + 0.5)
        self.head = nn.Linear(3 * 6, 4)
        with torch.no_grad():
            for parameter in (*self.norm.parameters(), *self.norm2d.parameters()):
                parameter.uniform_(-1.5, 1.5)

    def forward(self, x):  # x [B, 3, 5]
        h = self.norm(self.embed(x))
        h = F.rms_norm(torch.tanh(h), (6,), self.scale, eps=None)
        return self.head(self.norm2d(h).flatten(1))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [0, 1, 3])
@pytest.mark.parametrize("affine, eps", [(True, None), (False, 1e-2)], ids=["affine-dtype-eps", "plain-eps"])
def test_rms_norm_is_one_program(mode, batch, affine, eps):
    torch.manual_seed(8)
    model = RMSNorms(affine, eps).double().eval()
    x = non_contiguous(torch.randn(batch, 3, 5, dtype=DOUBLE))
    plan, output, jacobian = planned(model, x, mode)
    entries = [entry for entry in plan.native_program()[0] if entry.startswith("rms_norm")]
    assert len(entries) == 3, plan.native_program()[0]
    assert sum("eps=" not in entry for entry in entries) == (2 if eps is None else 1), entries
    check(model, x, output, jacobian)
    layers, getters = plan.native_program()
    with torch.no_grad():
        assert_matches_reference(replay(x, layers, [get() for get in getters]), model(x), DOUBLE)


def test_rms_norm_entry_follows_the_dtype_epsilon_in_float32():
    """eps=None is float32's epsilon for a float32 model: on inputs far below its square root eps dominates r,
    and the reference is the float64 model with that eps spelled out (float64's own would give another r)."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(4, 4), nn.RMSNorm(4), nn.Linear(4, 2)).float().eval()
    with torch.no_grad():
        model[0].weight.mul_(1e-5)
        model[0].bias.zero_()
    spelled_out = copy.deepcopy(model).double()
    spelled_out[1].eps = torch.finfo(torch.float32).eps
    x = torch.randn(3, 4)
    expected = reference_jacobian(spelled_out, x.double())
    assert not torch.allclose(expected, reference_jacobian(model, x), rtol=0.1)  # the epsilon matters here
    for mode in ("forward", "reverse"):
        plan, output, jacobian = planned(model, x, mode)
        assert "rms_norm" in program_kinds(plan)
        assert_matches_reference(jacobian, expected.float(), torch.float32)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_the_walker_rule_agrees_with_torch_func(mode):
    """The same norms with a fallback node after them: the Python walker runs the RMSNorm rule."""
    torch.manual_seed(9)
    norms = RMSNorms(True, None).double().eval()
    model = lambda t: norms(t).cumsum(-1)  # noqa: E731  (cumsum: a fallback node, so no program)
    x = torch.randn(3, 3, 5, dtype=DOUBLE)
    plan, output, jacobian = planned(model, x, mode)
    assert plan.native_program() is None
    assert sum("native rms_norm" in line for line in plan.describe()) == 3, plan.describe()
    check(model, x, output, jacobian)


class TokenNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm((5, 4))
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)

    def forward(self, x):  # x [B, 5, 4]
        return self.head(self.norm(x))


def test_torch_export_of_rms_norm_is_one_op():
    torch.manual_seed(10)
    check_export_with_a_dynamic_batch(TokenNorm().double().eval(), (5, 4))


@pytest.mark.parametrize("eps", [None, 1e-3])
def test_opcheck_of_a_program_with_rms_norm(eps):
    torch.manual_seed(11)
    model = RMSNorms(eps is None, eps).double().eval()
    opcheck_program(model, torch.randn(2, 3, 5, dtype=DOUBLE), gradient_mode="forward")


@pytest.mark.parametrize("layers, params, message", [
    (["rms_norm shape=3 weight=0"], [], r"per-sample shape ending in shape=\[3\]"),
    (["rms_norm shape=2,4 weight=0"], [], r"per-sample shape ending in shape=\[2, 4\]"),
    (["rms_norm shape= weight=0"], [], r"per-sample shape ending in shape=\[\]"),
    (["rms_norm shape=4 eps=x weight=0"], [], r"must be a number"),
    (["rms_norm shape=4 weight=1"], [torch.ones(3)], r"needs a weight of shape \[4\]"),
    (["rms_norm shape=4 weight=1"], [], r"takes 1 tensors of params but only 0"),
    (["rms_norm shape=4 bias=1 weight=0"], [], r"takes no attribute bias"),
])
def test_bad_rms_norm_entries_raise_value_errors(layers, params, message):
    x = torch.randn(3, 3, 4, dtype=DOUBLE)
    with pytest.raises(ValueError, match=message):
        torch.ops.jacext.batch_jacobian(x, layers, [p.double() for p in params], "reverse")
