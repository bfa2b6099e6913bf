"""The CPU tanh of the activation rules (csrc/jacext/tanh_math.h: tanh = -t / (t + 2), t = expm1(-2|z|)),
which replaces torch's own kernel for the value: its error in ulps against the correctly rounded tanh over
every binade, its special values, the derivative 1 - y^2 taken from it, and tanh networks on the
walker's kernels against torch.func in float64.

The bound is 3 ulp of the exact value: the formula's roundings (expm1's polynomial and its 2^n scaling,
t + 2, the division) add up to at most 2.5 ulp in the error analysis and in an exhaustive scan of
every 97th float32 (max 2.48 ulp, near |z| = 4.5 where t + 2 rounds at the coarser spacing above 1);
3 leaves no room for a wrong coefficient or constant (a wrong ln 2 split or a polynomial one degree short
costs tens of ulps). torch.tanh's own error (about 1 ulp) is no part of it: the references are exact."""
import math

import mpmath
import pytest
import torch
from torch import nn

import jacobian_ext as jx
from conftest import reference_jacobian
from jacobian_ext import ops
from test_hostile import assert_same_values

MAX_ULPS = 3
MANTISSA_BITS = {torch.float32: 24, torch.float64: 53}
NAN, INF = float("nan"), float("inf")


def our_tanh(x):
    """(tanh(x), tanh'(x)) from the forward rule on the identity (the Jacobian is diag(tanh'(x)))."""
    output, jac = ops.pointwise_jac_forward(x.reshape(-1, 1), None, "tanh")  # one feature per sample
    return output.reshape(x.shape), jac.reshape(x.shape)


def exact_tanh(x):
    """tanh to 50 digits, as float64 (rounded once more; the float32 check sees float64's rounding as
    2^-29 ulp, and the float64 check uses exact_ulp_error, which does not round)."""
    with mpmath.workdps(50):
        return torch.tensor([float(mpmath.tanh(mpmath.mpf(v))) for v in x.double().tolist()], dtype=torch.float64)


def ulps(error, reference, dtype):
    """error in units of the last place of `reference` in dtype (the spacing of its binade; subnormals:
    the smallest spacing)."""
    _, exponent = torch.frexp(reference.double())
    spacing = torch.ldexp(torch.ones_like(error), exponent - MANTISSA_BITS[dtype])
    spacing = spacing.clamp_min(torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps)
    return error / spacing


def exact_ulp_error(actual, x, dtype):
    """|actual - tanh(x)| in ulps, with tanh(x) exact to 50 digits (no rounding to float64 first)."""
    errors = []
    with mpmath.workdps(50):
        for value, z in zip(actual.double().tolist(), x.double().tolist()):
            exact = mpmath.tanh(mpmath.mpf(z))
            _, exponent = math.frexp(float(exact))
            spacing = max(math.ldexp(1.0, exponent - MANTISSA_BITS[dtype]),
                          torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps)
            errors.append(float(abs(mpmath.mpf(value) - exact) / spacing))
    return torch.tensor(errors, dtype=torch.float64)


def binade_points(dtype, per_binade):
    """Random points of both signs in every binade from the smallest subnormal to saturation and beyond."""
    info = torch.finfo(dtype)
    low = math.frexp(info.smallest_normal * info.eps)[1] - 1
    exponents = torch.arange(low, 8, dtype=torch.float64).repeat_interleave(per_binade)
    mantissas = 0.5 + 0.5 * torch.rand(exponents.numel(), dtype=torch.float64)
    x = torch.ldexp(mantissas, exponents.to(torch.int64)).to(dtype)
    signs = torch.where(torch.rand(x.numel()) < 0.5, -1.0, 1.0).to(dtype)
    return x * signs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_value_within_three_ulp_of_exact_tanh(dtype):
    x = torch.cat([
        binade_points(dtype, per_binade=40),
        torch.linspace(-10, 10, 4001, dtype=dtype),  # where the reduction's n changes, and saturation
        torch.tensor([1e-4, -1e-4, 0.5, -0.5, 0.55, 4.5, -4.5, 5.0, -5.0, 9.0, 9.1, 18.7, 19.1], dtype=dtype),
    ])
    actual, _ = our_tanh(x)
    if dtype == torch.float64:
        error = exact_ulp_error(actual, x, dtype)
    else:
        exact = exact_tanh(x)
        error = ulps((actual.double() - exact).abs(), exact, dtype)
    worst = int(error.argmax())
    assert error.max() <= MAX_ULPS, f"{error.max():.2f} ulp at x = {x[worst].item()!r}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_special_values_are_torchs(dtype):
    info = torch.finfo(dtype)
    x = torch.tensor([0.0, -0.0, info.smallest_normal * info.eps, -info.smallest_normal * info.eps,
                      info.smallest_normal / 3, 1e-30, -1e-30, 20.0, -20.0, 1e30, -1e30, info.max, -info.max,
                      INF, -INF, NAN], dtype=dtype)
    actual, derivative = our_tanh(x)
    expected = torch.tanh(x)
    # The tiny ones are x itself and the large ones +-1: exactly torch's, signed zeros included.
    assert torch.equal(actual[:-1], expected[:-1]) and torch.equal(actual.signbit(), expected.signbit())
    assert actual[-1].isnan() and derivative[-1].isnan()
    assert torch.equal(derivative[:-1], 1 - expected[:-1] * expected[:-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_derivative_is_one_minus_the_square_of_the_value(dtype):
    x = torch.cat([binade_points(dtype, per_binade=4), 6 * torch.randn(1000, dtype=dtype)])
    value, derivative = our_tanh(x)
    eps = torch.finfo(dtype).eps
    # 1 - y^2 of our y, both roundings as torch's (every copy of the loop runs without FMA contraction)...
    assert torch.equal(derivative, 1 - value * value)
    # ...and so within 2 y dy + 2 roundings of the exact derivative
    exact = 1 - exact_tanh(x) ** 2
    assert (derivative.double() - exact).abs().max() <= (2 * MAX_ULPS + 1) * eps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [1, 4, 5, 33])  # the reverse rule's one pass (<= 4 rows) and its two passes
def test_reverse_rule_scales_by_the_same_derivative(dtype, rows):
    x = torch.cat([6 * torch.randn(3, 37, dtype=dtype),
                   torch.tensor([[0.0, -0.0, 1e-30, 20.0, -1e30, INF, -INF, NAN] * 4 + [0.5] * 5], dtype=dtype)])
    cotangent = torch.randn(4, rows, 37, dtype=dtype)
    _, derivative = our_tanh(x)  # the same loop computes it for either rule, so the products are exact
    expected = cotangent * derivative[:, None, :]
    assert_same_values(ops.pointwise_jac_reverse(x, cotangent, "tanh"), expected, relative=0.0)


def tanh_mlp(widths, dtype):
    layers = []
    for index, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(width_in, width_out))
        if index < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(dtype).eval()


@pytest.mark.parametrize("mode", ["forward", "reverse", "auto"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("scale", [1.0, 40.0], ids=["moderate", "saturating"])
def test_pinn_shaped_network_matches_torch_func(mode, dtype, scale):
    # The bench's pinn shape (2-64-64-64-1) at a batch that the walker, not the small-chain kernel, runs.
    model = tanh_mlp((2, 64, 64, 64, 1), dtype)
    x = scale * torch.randn(1024, 2, dtype=dtype)
    with torch.no_grad():
        y, jacobian = jx.batch_jacobian(model, x, mode=mode, return_output=True)
    expected = reference_jacobian(model, x)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert_same_values(jacobian, expected, relative=tolerance)
    assert_same_values(y, model.double()(x.double()), relative=tolerance)
