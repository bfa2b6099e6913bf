"""The cost model's decisions (benchmarks measure time; tests only check the choice)."""
import pytest
import torch
from torch import nn

import jacobian_ext as jx
from jacobian_ext import cost


def mlp(widths, activation=nn.ReLU, head=None):
    layers = []
    for i in range(len(widths) - 1):
        layers += [nn.Linear(widths[i], widths[i + 1]), activation()]
    layers = layers[:-1] + ([head] if head is not None else [])
    return nn.Sequential(*layers)


@pytest.mark.parametrize("widths, batch, expected", [
    ([784, 512, 512, 10], 256, "reverse"),      # mnist: C << D
    ([3072, 512, 512, 100], 128, "reverse"),    # cifar
    ([32, 256, 256, 256, 64], 256, "forward"),  # square: D < C
    ([2, 64, 64, 64, 64], 1024, "forward"),     # D = 2 < C = 64
    ([64, 64, 64, 1], 1024, "reverse"),         # C = 1
])
def test_auto_picks_the_cheaper_sweep(widths, batch, expected):
    jm = jx.compile(mlp(widths))
    x = torch.randn(2, widths[0])
    assert jm.plan_for(x).choose_mode(batch, "auto") == expected


def test_requested_mode_overrides_the_cost_model():
    jm = jx.compile(mlp([784, 16, 10]), mode="forward")
    x = torch.randn(3, 784)
    assert jm.plan_for(x).choose_mode(3, "forward") == "forward"
    jm(x)
    assert "forward sweep (requested" in repr(jm)


def test_lazy_seeds_make_linear_chains_free_until_a_per_sample_factor():
    linear_only = [cost.CostItem("linear", 8, 16), cost.CostItem("linear", 16, 4)]
    # Identity -> shared W1 (free) -> shared W2 W1: one [8, 16] x [16, 4] GEMM for all samples.
    assert cost.sweep_cost(linear_only, rows=8, batch=100) == 8 * 16 * 4
    with_activation = [cost.CostItem("linear", 8, 16), cost.CostItem("rowwise", 16, 16), cost.CostItem("linear", 16, 4)]
    assert cost.sweep_cost(with_activation, rows=8, batch=100) == 100 * 8 * 16 + 100 * 8 * 16 * 4


def test_fallback_cost_scales_with_the_rows_pushed():
    items = [cost.CostItem("fallback", 10, 10, passes=100)]
    assert cost.sweep_cost(items, rows=20, batch=3) == 2 * cost.sweep_cost(items, rows=10, batch=3)
