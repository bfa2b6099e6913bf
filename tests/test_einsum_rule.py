"""torch.einsum of carried values and constants (maxvit's attention writes q k^T and p v so): one native node per
call form and equation, against torch.func's jacrev and jacfwd in float64, in both sweeps, at B = 0, 1 and 3, on
non-contiguous inputs; what the rule leaves out (diagonals) stays correct on the fallback."""
import pytest
import torch
import torchvision
from torch import nn

import jacobian_ext as jx
from conftest import assert_matches_reference, non_contiguous, reference_jacobian, single_sample
from test_batch_axis import planned

MODES = ["forward", "reverse"]


def jacrev_and_jacfwd(model, x):
    """torch.func's Jacobian in reverse mode, checked against its forward mode."""
    expected = reference_jacobian(model, x)
    with torch.no_grad():
        forward = torch.func.vmap(torch.func.jacfwd(single_sample(model)))(x)
    assert_matches_reference(forward, expected, torch.float64)
    return expected


class Einsums(nn.Module):
    """One einsum per kind on x [B, 2, 3, 4], its flattening f [B, 24] and values computed from them."""

    EQUATIONS = {
        # maxvit's attention: scores over heads and windows, then the probabilities times the values
        "scores": lambda m, x, f: torch.einsum("B G H I D, B G H J D -> B G H I J", x.unsqueeze(1),
                                               torch.tanh(x).unsqueeze(1)),
        "values": lambda m, x, f: torch.einsum("B G H I J, B G H J D -> B G H I D",
                                               x[..., :3].softmax(-1).unsqueeze(1), torch.tanh(x).unsqueeze(1)),
        "bilinear": lambda m, x, f: torch.einsum("bi,bj->bij", f, torch.tanh(f[:, :5])),
        "square": lambda m, x, f: torch.einsum("bi,bj->bij", f, f),
        "outer_constant": lambda m, x, f: torch.einsum("bi,j->bij", f, m.vector),
        "weight": lambda m, x, f: torch.einsum("bij,jk->bik", x.flatten(1, 2), m.weight),
        "three": lambda m, x, f: torch.einsum("bi,ij,bj->bi", f[:, :4], m.weight[:, :4], torch.tanh(f[:, 4:8])),
        "ellipsis": lambda m, x, f: torch.einsum("...ij,...jk->...ik", x, torch.tanh(x).transpose(-1, -2)),
        "ellipsis_broadcast": lambda m, x, f: torch.einsum("...ij,jk", x, m.weight),
        "size_one_broadcast": lambda m, x, f: torch.einsum("bhij,bhjk->bhik", x,
                                                           torch.tanh(x[:, :1]).transpose(-1, -2)),
        "implicit": lambda m, x, f: (torch.einsum("ji,bjk", m.weight[:, :3], x[:, 0].transpose(1, 2))
                                     + torch.einsum("bki", x[:, 1, :, :3])),
        "summed_inside": lambda m, x, f: torch.einsum("bij,bk->bk", x[:, 0], torch.tanh(f)),
        "transposed": lambda m, x, f: torch.einsum("bhij,bhjk->bkhi", x, torch.tanh(x).transpose(-1, -2)),
        "batch_out_first": lambda m, x, f: torch.einsum("bij,bjk->kbi", x[:, 0],
                                                        torch.tanh(x[:, 1]).transpose(1, 2)).transpose(0, 1),
        "batch_in_second": lambda m, x, f: torch.einsum("ib,bj->bij", f.transpose(0, 1), torch.tanh(f[:, :3])),
        "operand_list": lambda m, x, f: torch.einsum("bi,bi->b", [f, torch.tanh(f)]),
        "sublist": lambda m, x, f: torch.einsum(f, [0, 1], torch.tanh(f[:, :3]), [0, 2], [0, 2, 1]),
    }

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.weight = nn.Parameter(torch.randn(4, 5))
        self.vector = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return self.EQUATIONS[self.kind](self, x, x.flatten(1))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [0, 1, 3])
@pytest.mark.parametrize("kind", list(Einsums.EQUATIONS))
def test_einsum_rule_matches_torch_func(mode, batch, kind):
    model = Einsums(kind).double()
    x = non_contiguous(torch.randn(batch, 2, 3, 4, dtype=torch.float64))
    jm = planned(model, x, mode, jacrev_and_jacfwd)
    assert jm.fallbacks == []
    assert "native einsum" in repr(jm)


@pytest.mark.parametrize("mode", MODES)
def test_a_diagonal_stays_on_the_fallback(mode):
    model = lambda x: torch.einsum("bii->bi", x[:, 0, :, :3]) * x[:, 1, :, 0]  # noqa: E731
    jm = planned(model, torch.randn(3, 2, 3, 4, dtype=torch.float64), mode, jacrev_and_jacfwd)
    assert "native einsum" not in repr(jm) and jm.fallbacks


def test_an_einsum_over_the_batch_is_not_a_per_sample_rule():
    x = torch.randn(3, 4, dtype=torch.float64)
    model = lambda t: t * torch.einsum("bi,bi->i", t, t)  # noqa: E731
    with pytest.warns(UserWarning, match="runs entirely on the torch.func fallback"):
        jacobian = jx.batch_jacobian(model, x)
    assert_matches_reference(jacobian, reference_jacobian(model, x), torch.float64)


def test_small_maxvit_is_all_native():
    """torchvision's MaxVit: window and grid attention through einsum, squeeze-excitation, depthwise convs. In
    reverse mode, the one its classifier runs in (forward mode through these equations is tested above)."""
    model = torchvision.models.MaxVit(input_size=(16, 16), stem_channels=8, partition_size=2, block_channels=[16, 32],
                                      block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0,
                                      num_classes=4).double().eval()
    jm = planned(model, torch.randn(1, 3, 16, 16, dtype=torch.float64), "reverse")
    assert jm.fallbacks == []
    assert repr(jm).count("native einsum") == 8  # q k^T and p v in each stage's window and grid attention
