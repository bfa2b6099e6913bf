"""jacobian_ext.batch_jacobian / compile against torch.func (and the classic loop) on whole models."""
import pytest
import torch
from torch import nn

import jacobian_ext as jx
from jacobian_ext import ops
from conftest import (DEVICES, DTYPES, Sin, assert_matches_reference, loop_jacobian, non_contiguous, output_terms_scale,
                      reference_jacobian)

MODES = ["auto", "forward", "reverse", "mixed"]


def random_mlp(depth, in_features, out_features, head=None, activation=nn.ReLU):
    widths = [in_features] + [int(w) for w in torch.randint(3, 24, (depth - 1,))] + [out_features]
    layers = []
    for i in range(depth):
        layers.append(nn.Linear(widths[i], widths[i + 1], bias=bool(torch.rand(()) < 0.7)))
        if i < depth - 1:
            layers.append(activation())
    if head is not None:
        layers.append(head)
    return nn.Sequential(*layers)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [0, 1, 7])
@pytest.mark.parametrize("in_out", [(5, 11), (13, 3)], ids=["D<C", "D>C"])
def test_mlp_matches_torch_func(device, dtype, depth, mode, batch, in_out):
    model = random_mlp(depth, *in_out).to(device=device, dtype=dtype)
    x = torch.randn(batch, in_out[0], device=device, dtype=dtype)
    y, jacobian = jx.batch_jacobian(model, x, mode=mode, return_output=True)
    # Where y's terms cancel (|y| ~ 1e-3 from O(1) terms), another summation order (the small-chain
    # kernel's loops against torch's GEMM) moves y by u times the terms, not u times |y|.
    assert_matches_reference(y, model(x), dtype, scale=output_terms_scale(model, x))
    assert_matches_reference(jacobian, reference_jacobian(model, x), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head", [nn.Softmax(dim=-1), nn.LogSoftmax(dim=1), nn.Softmax(dim=None)], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("activation", [nn.ReLU, nn.Tanh, nn.Sigmoid])
def test_classifier_heads(device, dtype, head, mode, activation):
    model = random_mlp(3, 9, 6, head=head, activation=activation).to(device=device, dtype=dtype)
    x = torch.randn(7, 9, device=device, dtype=dtype)
    jm = jx.compile(model, mode=mode)
    y, jacobian = jm(x)
    assert jm.fallbacks == []
    assert_matches_reference(y, model(x), dtype)
    assert_matches_reference(jacobian, reference_jacobian(model, x), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_classic_loop_agrees(device, mode):
    model = random_mlp(3, 8, 4, head=nn.Softmax(-1)).to(device=device, dtype=torch.float64)
    x = torch.randn(5, 8, device=device, dtype=torch.float64)
    assert_matches_reference(jx.batch_jacobian(model, x, mode=mode), loop_jacobian(model, x), torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [0, 1, 7])
def test_multi_dim_input_with_flatten(device, mode, batch):
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 4, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 5),
                          nn.Unflatten(1, (5, 1)), nn.Identity()).to(device=device, dtype=torch.float64).eval()
    x = non_contiguous(torch.randn(batch, 2, 3, 4, device=device, dtype=torch.float64))
    jm = jx.compile(model, mode=mode)
    y, jacobian = jm(x)
    assert jacobian.shape == (batch, 5, 1, 2, 3, 4)
    assert jm.fallbacks == []
    assert_matches_reference(y, model(x), torch.float64)
    assert_matches_reference(jacobian, reference_jacobian(model, x), torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [0, 1, 7])
def test_unsupported_module_in_the_middle_runs_on_the_fallback(device, dtype, mode, batch):
    model = nn.Sequential(
        nn.Linear(6, 10), nn.ReLU(), Sin(), nn.Sequential(nn.Linear(10, 8), nn.Tanh()), nn.Linear(8, 3), Sin(), Sin(),
        nn.LogSoftmax(-1),
    ).to(device=device, dtype=dtype)
    x = torch.randn(batch, 6, device=device, dtype=dtype)
    jm = jx.compile(model, mode=mode)
    y, jacobian = jm(x)
    assert jm.fallbacks == ["2", "5", "6"]
    assert_matches_reference(y, model(x), dtype)
    assert_matches_reference(jacobian, reference_jacobian(model, x), dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layers", [
    [Sin()], [Sin(), nn.Linear(4, 3)], [nn.Linear(4, 3), Sin()], [nn.Flatten(), Sin(), nn.Flatten()],
], ids=["only", "first", "last", "between-reshapes"])
def test_fallback_at_either_end(mode, layers):
    model = nn.Sequential(*layers).double()
    x = torch.randn(4, 4, dtype=torch.float64)
    assert_matches_reference(jx.batch_jacobian(model, x, mode=mode), reference_jacobian(model, x), torch.float64)


def test_half_precision_runs_on_the_fallback():
    model = random_mlp(2, 4, 3).to(torch.bfloat16)
    x = torch.randn(2, 4, dtype=torch.bfloat16)
    jm = jx.compile(model)
    jacobian = jm(x)[1]
    assert jm.fallbacks == ["0", "1", "2"]
    expected = reference_jacobian(model, x)
    assert (jacobian.double() - expected).abs().max() <= 0.05 * expected.abs().max()


def test_plan_is_cached_and_params_are_read_on_every_call():
    model = random_mlp(2, 4, 3).double()
    jm = jx.compile(model)
    x = torch.randn(5, 4, dtype=torch.float64)
    jm(x)
    plan = jm.plan_for(x)
    model[0].weight = nn.Parameter(torch.randn(model[0].weight.shape, dtype=torch.float64))
    _, jacobian = jm(x)
    assert jm.plan_for(x) is plan
    assert_matches_reference(jacobian, reference_jacobian(model, x), torch.float64)


def test_print_shows_every_layer_path_and_the_mode_decision():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), Sin(), nn.Linear(8, 2))
    jm = jx.compile(model)
    assert "no plan yet" in repr(jm)
    with pytest.raises(RuntimeError, match="nothing is planned yet"):
        jm.fallbacks  # noqa: B018  (a claim before planning could only be a guess)
    jm(torch.randn(3, 4))
    text = repr(jm)
    for expected in ["native linear", "native relu", "fallback (torch.func)", "B=3:", "cost model", "fallbacks: ['2']"]:
        assert expected in text, text


def test_output_matches_the_model_and_jacobian_is_not_an_alias_of_the_input():
    model = nn.Sequential(nn.Flatten())  # identity on the features: J = I
    x = torch.randn(3, 2, 2, dtype=torch.float64)
    y, jacobian = jx.batch_jacobian(model, x, return_output=True)
    assert torch.equal(jacobian, torch.eye(4, dtype=torch.float64).expand(3, 4, 4).reshape(3, 4, 2, 2))
    y.zero_()
    assert x.abs().sum() > 0


@pytest.mark.parametrize("bias", [True, False])
def test_differentiating_through_a_per_layer_rule_raises_instead_of_a_wrong_gradient(bias):
    # The whole-plan op and the API are differentiable (tests/test_deploy.py); a per-layer rule op is not.
    linear = nn.Linear(4, 5, bias=bias)
    _, block = ops.linear_jac_forward(torch.randn(2, 4), None, linear.weight, linear.bias)
    assert block.requires_grad
    with pytest.raises(RuntimeError, match="derivative for jacext::linear_jac_forward is not implemented"):
        block.sum().backward()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layers", [
    # reverse: the shared block W3 [C=24, 24] meets ReLU then a Linear narrowing to 4 (< C): weight-side scaling
    lambda: [nn.Linear(10, 4), nn.ReLU(), nn.Linear(4, 24), nn.ReLU(), nn.Linear(24, 24)],
    # an activation first (forward: on the identity) and last (reverse: on the identity)
    lambda: [nn.Tanh(), nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 5), nn.Sigmoid()],
    # two activations in a row multiply their pending factors; one before a softmax is applied first
    lambda: [nn.Linear(10, 6), nn.ReLU(), nn.Tanh(), nn.Linear(6, 3), nn.Sigmoid(), nn.Softmax(-1)],
    # forward: shared W1^T [D=10, 3] meets ReLU then a Linear to 2 (< D)
    lambda: [nn.Linear(10, 3), nn.ReLU(), nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 30)],
], ids=["bottleneck", "activation-at-ends", "stacked-activations", "forward-narrowing"])
def test_pending_activation_factor_paths(dtype, mode, layers):
    model = nn.Sequential(*layers()).to(dtype)
    x = torch.randn(6, 10, dtype=dtype)
    y, jacobian = jx.batch_jacobian(model, x, mode=mode, return_output=True)
    # Where y's terms cancel (|y| ~ 1e-3 from O(1) terms), another summation order (the small-chain
    # kernel's loops against torch's GEMM) moves y by u times the terms, not u times |y|.
    assert_matches_reference(y, model(x), dtype, scale=output_terms_scale(model, x))
    assert_matches_reference(jacobian, reference_jacobian(model, x), dtype)


@pytest.mark.parametrize("mode", MODES)
def test_a_module_instance_used_twice_runs_twice(mode):
    # named_children() would list each instance once and drop the repeats from the plan.
    activation, square = nn.Tanh(), nn.Linear(5, 5)
    model = nn.Sequential(activation, square, activation, square, nn.Sequential(activation)).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    y, jacobian = jx.batch_jacobian(model, x, mode=mode, return_output=True)
    assert_matches_reference(y, model(x), torch.float64)
    assert_matches_reference(jacobian, reference_jacobian(model, x), torch.float64)
