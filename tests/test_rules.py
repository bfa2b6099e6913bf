"""Every per-layer rule alone against torch.func in float64 (and float32), both directions, with
identity, batch-shared and per-sample running blocks."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES, DTYPES, assert_matches_reference, non_contiguous, single_sample
import op_catalog
from jacobian_ext import ops

# Every activation string of op_catalog.ACTIVATIONS (parameters away from the defaults) and the parameterless
# forms of the parametrised ones (torch's defaults), with the torch function it stands for.
ACTIVATION_FUNCTIONS = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu6": F.relu6,
    "leaky_relu:0.2": lambda x: F.leaky_relu(x, 0.2),
    "elu:1.5": lambda x: F.elu(x, 1.5),
    "softplus:2.0:3.0": lambda x: F.softplus(x, 2.0, 3.0),
    "hardtanh:-0.5:1.25": lambda x: F.hardtanh(x, -0.5, 1.25),
    "leaky_relu": F.leaky_relu,
    "elu": F.elu,
    "softplus": F.softplus,
    "hardtanh": F.hardtanh,
    "hardswish": F.hardswish,
    "hardsigmoid": F.hardsigmoid,
    "mish": F.mish,
}
assert set(op_catalog.ACTIVATIONS) <= set(ACTIVATION_FUNCTIONS)


def layer_cases(features_in, features_out, dtype, device):
    """(name, function of x [B, H] in any dtype (the float64 reference), forward op, reverse op
    taking (x, y, cotangent))."""
    weight = torch.randn(features_out, features_in, dtype=dtype, device=device)
    bias = torch.randn(features_out, dtype=dtype, device=device)
    cases = [
        ("linear", lambda x: F.linear(x, weight.to(x.dtype), bias.to(x.dtype)),
         lambda x, jac: ops.linear_jac_forward(x, jac, weight, bias),
         lambda x, y, cot: ops.linear_jac_reverse(cot, weight)),
        ("linear_no_bias", lambda x: F.linear(x, weight.to(x.dtype)),
         lambda x, jac: ops.linear_jac_forward(x, jac, weight, None),
         lambda x, y, cot: ops.linear_jac_reverse(cot, weight)),
        ("softmax", lambda x: torch.softmax(x, -1),
         ops.softmax_jac_forward,
         lambda x, y, cot: ops.softmax_jac_reverse(y, cot)),
        ("log_softmax", lambda x: torch.log_softmax(x, -1),
         ops.log_softmax_jac_forward,
         lambda x, y, cot: ops.log_softmax_jac_reverse(y, cot)),
    ]
    for name, fn in ACTIVATION_FUNCTIONS.items():
        cases.append((name, fn,
                      lambda x, jac, name=name: ops.pointwise_jac_forward(x, jac, name),
                      lambda x, y, cot, name=name: ops.pointwise_jac_reverse(x, cot, name)))
    return cases


CASE_NAMES = ["linear", "linear_no_bias", "softmax", "log_softmax"] + list(ACTIVATION_FUNCTIONS)


def pick_case(name, features_in, features_out, dtype, device):
    return next(c for c in layer_cases(features_in, features_out, dtype, device) if c[0] == name)


def layer_jacobian(fn, x):
    return torch.func.vmap(torch.func.jacrev(single_sample(fn)))(x)  # [B, O, H]


def running_block(kind, batch, rows, cols, dtype, device):
    if kind == "identity":
        return None
    if kind == "shared":
        return torch.randn(rows, cols, dtype=dtype, device=device)
    return non_contiguous(torch.randn(batch, rows, cols, dtype=dtype, device=device))


def rounding_scale(name, block):
    """The softmax family's rule s * (r - <r, s>) rounds terms as large as the block's entries (1 for the
    identity) even where the result is tiny (a peaked softmax: s near 1, J entries s(1 - s) of 1e-4):
    errors are relative to that, not to the largest entry of J."""
    if name not in ("softmax", "log_softmax"):
        return 0.0
    return 1.0 if block is None or block.numel() == 0 else block.abs().max().item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("batch", [0, 1, 7])
@pytest.mark.parametrize("block", ["identity", "shared", "per_sample"])
def test_forward_rule_matches_torch_func(device, dtype, name, batch, block):
    features_in = 6
    features_out = 4 if name.startswith("linear") else features_in
    columns = features_in if block == "identity" else 9  # D != H
    fn, forward_op = pick_case(name, features_in, features_out, dtype, device)[1:3]
    # scaled so that the saturating activations (relu6, hardtanh, softplus) see both sides of their kinks
    x = non_contiguous(2.5 * torch.randn(batch, features_in, dtype=dtype, device=device))
    jac = running_block(block, batch, features_in, columns, dtype, device)

    output, jac_out = forward_op(x, jac)

    assert_matches_reference(output, fn(x.double()), dtype)
    layer_j = layer_jacobian(fn, x.double())
    if jac is None:
        expected = layer_j
    elif jac.dim() == 2:
        expected = torch.einsum("boh,hd->bod", layer_j, jac.double())
    else:
        expected = torch.einsum("boh,bhd->bod", layer_j, jac.double())
    if name.startswith("linear") and block != "per_sample":
        # A Linear keeps an identity or shared block shared: [O, D], the same for every sample.
        assert jac_out.dim() == 2
        expected = expected[0] if batch else expected.new_empty(features_out, columns)
        if batch == 0:
            assert tuple(jac_out.shape) == (features_out, columns)
            return
    assert_matches_reference(jac_out, expected, dtype, scale=rounding_scale(name, jac))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("batch", [0, 1, 7])
@pytest.mark.parametrize("block", ["identity", "shared", "per_sample"])
def test_reverse_rule_matches_torch_func(device, dtype, name, batch, block):
    features_in = 6
    features_out = 4 if name.startswith("linear") else features_in
    rows = features_out if block == "identity" else 3  # C != H
    fn, _, reverse_op = pick_case(name, features_in, features_out, dtype, device)[1:4]
    # scaled so that the saturating activations (relu6, hardtanh, softplus) see both sides of their kinks
    x = non_contiguous(2.5 * torch.randn(batch, features_in, dtype=dtype, device=device))
    y = fn(x)
    cot = running_block(block, batch, rows, features_out, dtype, device)

    cot_in = reverse_op(x, y, cot)

    layer_j = layer_jacobian(fn, x.double())
    if cot is None:
        expected = layer_j
    elif cot.dim() == 2:
        expected = torch.einsum("co,boh->bch", cot.double(), layer_j)
    else:
        expected = torch.einsum("bco,boh->bch", cot.double(), layer_j)
    if name.startswith("linear") and block != "per_sample":
        assert cot_in.dim() == 2
        if batch == 0:
            assert tuple(cot_in.shape) == (rows, features_in)
            return
        expected = expected[0]
    assert_matches_reference(cot_in, expected, dtype, scale=rounding_scale(name, cot))


# Shapes the CPU activation kernels treat apart: one row per sample (GELU, SiLU and ELU hand it whole to
# autograd's backward kernel), more features than one tile of the fused reverse kernel (a full tile and
# a partial one), and more rows than that kernel takes in one pass (derivative, then scaling: above 4 rows
# for tanh-like kinds, 16 for the others), with the shared and the per-sample blocks they read.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(ACTIVATION_FUNCTIONS))
@pytest.mark.parametrize("rows, features", [(1, 6), (1, 1500), (2, 1500), (5, 1500), (17, 300)],
                         ids=["one_row", "one_row_wide", "wide", "five_rows", "many_rows"])
@pytest.mark.parametrize("block", ["shared", "per_sample"])
def test_reverse_activation_rule_on_one_row_and_wide_blocks(device, dtype, name, rows, features, block):
    fn = ACTIVATION_FUNCTIONS[name]
    batch = 3
    x = non_contiguous(2.5 * torch.randn(batch, features, dtype=dtype, device=device))
    cot = running_block(block, batch, rows, features, dtype, device)

    cot_in = ops.pointwise_jac_reverse(x, cot, name)

    x_ref = x.double().requires_grad_()
    derivative = torch.autograd.grad(fn(x_ref).sum(), x_ref)[0]  # element-wise: the Jacobian's diagonal
    expected = cot.double() * derivative[:, None, :]
    assert_matches_reference(cot_in, expected, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_shared_linear_output_never_aliases_the_weight(device):
    weight = torch.randn(5, 3, device=device)
    x = torch.randn(2, 3, device=device)
    _, jac = ops.linear_jac_forward(x, None, weight, None)
    cot = ops.linear_jac_reverse(None, weight)
    assert torch.equal(jac, weight) and torch.equal(cot, weight)
    assert jac.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr()
    assert cot.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr()


@pytest.mark.parametrize("device", DEVICES)
def test_relu_derivative_at_zero_is_zero_like_autograd(device):
    x = torch.tensor([[0.0, 1.0, -1.0]], dtype=torch.float64, device=device)
    _, jac = ops.pointwise_jac_forward(x, None, "relu")
    assert torch.equal(jac[0].diagonal(), torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_softmax_rule_is_stable_for_large_logits(device):
    x = torch.tensor([[1000.0, 0.0, -1000.0]], dtype=torch.float64, device=device)
    for forward_op in (ops.softmax_jac_forward, ops.log_softmax_jac_forward):
        output, jac = forward_op(x, None)
        assert torch.isfinite(output).all() and torch.isfinite(jac).all()
