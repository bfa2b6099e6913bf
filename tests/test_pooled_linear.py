"""An adaptive average pooling read by a flatten and a Linear (AlexNet's and VGG's heads): one program node
(csrc/pooled_linear.cpp) that folds the pooling into the Linear's weight where the pooling spreads a smaller
map, and pools then applies the weight where it does not. Against torch.func in float64 in both sweeps, for
spreading, identity and shrinking poolings, a Linear alone or leading a chain run, with and without bias, on
a per-sample [H, W] model input, a pooling that something else also reads, opcheck with gradients, and the
fused node's own weight check."""
import pytest
import torch
from torch import nn

from test_graph_program import check, opcheck_program, planned, program_kinds

DOUBLE = torch.float64


class PooledHead(nn.Module):
    """Convolutional features (`channels` maps of the input's size) pooled to `size`, then a Linear head (alone,
    or followed by ReLU and a second Linear); with also_read, a second reader of the pooling."""

    def __init__(self, size, channels=3, bias=True, deep=True, also_read=False):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, channels, 3, padding=1), nn.Tanh())
        self.also_read = also_read
        self.pool = nn.AdaptiveAvgPool2d(size)
        pooled = channels * size[0] * size[1]
        layers = [nn.Linear(pooled, 6, bias=bias)] + ([nn.ReLU(), nn.Linear(6, 4)] if deep else [])
        self.head = nn.Sequential(*layers)

    def forward(self, x):  # x [B, 2, side, side]
        pooled = self.pool(self.features(x))
        y = self.head(pooled.flatten(1))
        return y + pooled.flatten(1)[:, :4] if self.also_read else y


CASES = {
    "spreads_1x1_to_3x3": dict(side=1, size=(3, 3)),
    "spreads_2x2_to_3x5_not_dividing": dict(side=2, size=(3, 5)),
    "spreads_linear_alone_no_bias": dict(side=1, size=(2, 2), bias=False, deep=False),
    "identity_2x2": dict(side=2, size=(2, 2)),
    "shrinks_5x5_to_2x3": dict(side=5, size=(2, 3)),
    "pooling_also_read_elsewhere": dict(side=1, size=(2, 2), also_read=True),
}


@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("batch", [0, 1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_pooled_linear_matches_torch_func(case, batch, mode):
    torch.manual_seed(batch)
    settings = dict(CASES[case])
    side = settings.pop("side")
    model = PooledHead(**settings).double().eval()
    x = torch.randn(batch, 2, side, side, dtype=DOUBLE)
    plan, output, jacobian = planned(model, x, mode)
    kinds = program_kinds(plan)  # the encoding keeps its entries: the fusion happens where the op reads them
    linear = "linear" if settings.get("bias", True) else "linear_no_bias"
    assert kinds.index("adaptive_avg_pool2d") < kinds.index("reshape") < kinds.index(linear), kinds
    check(model, x, output, jacobian)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_pooling_of_the_model_input_into_a_linear(mode):
    """Per-sample [H, W] maps (a 3-d pooling input) and the model input itself pooled: the identity tangent."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.AdaptiveAvgPool2d((3, 4)), nn.Flatten(), nn.Linear(12, 5), nn.Tanh(),
                          nn.Linear(5, 3)).double().eval()
    x = torch.randn(3, 2, 3, dtype=DOUBLE)
    plan, output, jacobian = planned(model, x, mode)
    check(model, x, output, jacobian)


def test_opcheck_of_a_spreading_pooled_linear():
    torch.manual_seed(5)
    model = PooledHead(size=(2, 3)).double().eval()
    layers = opcheck_program(model, torch.randn(2, 2, 1, 1, dtype=DOUBLE), "reverse")
    assert "adaptive_avg_pool2d" in " ".join(layers)


def test_a_pooled_linear_checks_its_weight():
    x = torch.randn(2, 3, 1, 1)
    layers = ["adaptive_avg_pool2d size=2,2", "reshape shape=12", "linear"]
    with pytest.raises(ValueError, match=r"adaptive_avg_pool2d\+linear\) needs a linear weight \[out, 12\]"):
        torch.ops.jacext.batch_jacobian(x, layers, [torch.randn(5, 13), torch.randn(5)], "reverse")
