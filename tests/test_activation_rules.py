"""The element-wise activations beyond ReLU/Tanh/Sigmoid: values equal to torch's forward (tanh's within a few
ulp of it: test_tanh.py), derivatives
equal to torch autograd at the kinks, the activation-string grammar, the module and functional
mappings of rules.py, and nn.Sequential models using them end to end. (test_rules.py runs every
activation string through both rules with every running-block kind.)"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import jacobian_ext as jx
from conftest import DEVICES, DTYPES, assert_matches_reference, non_contiguous, reference_jacobian
from jacobian_ext import ops, rules
from test_rules import ACTIVATION_FUNCTIONS


# Kinds whose CPU value the rule computes itself instead of with torch's kernel (activations.def).
OWN_CPU_VALUES = {"tanh"}


def op_derivative(x, spec):
    """(value, f'(x)) from the forward rule on the identity: the Jacobian is diag(f'(x))."""
    output, jac = ops.pointwise_jac_forward(x, None, spec)
    return output, jac.diagonal(dim1=1, dim2=2)


def autograd_derivative(fn, x):
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(x).sum(), x)
    return grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", list(ACTIVATION_FUNCTIONS))
def test_value_is_torch_forward(device, dtype, spec):
    x = non_contiguous(4 * torch.randn(5, 33, dtype=dtype, device=device))
    output, _ = ops.pointwise_jac_forward(x, None, spec)
    # On the contiguous copy the op works on: torch's CPU kernels round strided and vectorised loops
    # differently (by an ulp), so the layout is part of "torch's value".
    expected = ACTIVATION_FUNCTIONS[spec](x.contiguous())
    if device == "cpu" and spec not in OWN_CPU_VALUES:
        assert torch.equal(output, expected)  # computed by torch's own kernel
    else:
        assert_matches_reference(output, expected, dtype)


# Kinks and switches, with points just beside them (the derivative must take torch's branch exactly).
def around(*points):
    beside = [v for p in points for v in (p, math.nextafter(p, -math.inf), math.nextafter(p, math.inf))]
    return beside + [-5.0, -3.0, 0.5, 8.0]


KINK_POINTS = {
    "relu": around(0.0),
    "leaky_relu:0.2": around(0.0),
    "leaky_relu": around(0.0),
    "elu:1.5": around(0.0),
    "elu": around(0.0),
    "relu6": around(0.0, 6.0),
    "hardtanh:-0.5:1.25": around(-0.5, 1.25),
    "hardtanh": around(-1.0, 1.0),
    "softplus:2.0:3.0": around(1.5),  # the switch is at beta * x == threshold
    "softplus": around(20.0),
    "gelu": around(0.0),
    "gelu_tanh": around(0.0),
    "silu": around(0.0),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", list(KINK_POINTS))
def test_derivative_at_kinks_is_autograds(device, dtype, spec):
    x = torch.tensor([KINK_POINTS[spec]], dtype=torch.float64).to(dtype=dtype, device=device)
    fn = ACTIVATION_FUNCTIONS[spec]
    _, derivative = op_derivative(x, spec)
    # Autograd in float64 on the same (exactly representable) points: it takes the same branch, and its
    # smooth values are the accurate ones (torch's float32 GELU backward is off by up to ~1e-3 relative
    # far in the tail, ours by ~1e-7).
    expected = autograd_derivative(fn, x.double())
    # Branch constants (0, 1, the slope, alpha) to the rounding of the parameter; smooth values to a few
    # roundings of their O(1) terms (absolute: the tails cancel).
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(derivative.double(), expected, rtol=4 * eps, atol=4 * eps)


def test_kink_constants_explicitly():
    x = torch.tensor([[0.0, 6.0, -0.5, 1.25, 1.5]], dtype=torch.float64)
    assert op_derivative(x[:, :1], "leaky_relu:0.2")[1].item() == 0.2
    assert op_derivative(x[:, :1], "elu:1.5")[1].item() == 1.5
    assert op_derivative(x[:, :2], "relu6")[1].tolist() == [[0.0, 0.0]]
    assert op_derivative(x[:, 2:4], "hardtanh:-0.5:1.25")[1].tolist() == [[0.0, 0.0]]
    # at beta * x == threshold softplus still takes its smooth branch, sigmoid(beta x) = sigmoid(3)
    sigmoid_3 = torch.sigmoid(torch.tensor(3.0, dtype=torch.float64)).item()
    assert op_derivative(x[:, 4:], "softplus:2.0:3.0")[1].item() == pytest.approx(sigmoid_3, rel=1e-15)


def test_softplus_derivative_is_finite_for_a_large_threshold():
    # torch's exp(z) / (exp(z) + 1) is inf / inf = nan at z = 100 in float32; the value is sigmoid(z)
    x = torch.tensor([[100.0, -100.0]])
    _, derivative = op_derivative(x, "softplus:1.0:1000.0")
    assert derivative[0, 0] == 1.0 and 0.0 <= derivative[0, 1] < 1e-40


# ---- the activation-string grammar ----

@pytest.mark.parametrize("spec, equivalent", [
    ("leaky_relu", "leaky_relu:0.01"),
    ("elu", "elu:1"),
    ("softplus", "softplus:1:20"),
    ("softplus:2.0", "softplus:2:20.0"),
    ("hardtanh", "hardtanh:-1:1"),
    ("hardtanh:-2", "hardtanh:-2.0:1.0"),
    ("relu6", "hardtanh:0:6"),
    ("elu:1e-1", "elu:0.1"),
])
def test_defaults_and_number_forms(spec, equivalent):
    x = 4 * torch.randn(3, 9, dtype=torch.float64)
    cotangent = torch.randn(3, 2, 9, dtype=torch.float64)
    assert torch.equal(ops.pointwise_jac_forward(x, None, spec)[1], ops.pointwise_jac_forward(x, None, equivalent)[1])
    assert torch.equal(ops.pointwise_jac_reverse(x, cotangent, spec),
                       ops.pointwise_jac_reverse(x, cotangent, equivalent))


@pytest.mark.parametrize("spec", [
    "gelu_exact", "relu:1", "leaky_relu:", "leaky_relu:0.1:2", "leaky_relu:abc", "elu:1.0x", "softplus:1:2:3",
    "softplus:0", "hardtanh:1:-1", "elu:nan", "elu:inf", "LeakyReLU", "", ":0.1",
])
def test_bad_activation_strings_are_rejected(spec):
    x = torch.randn(2, 3)
    accepted = (r"expected an activation: relu, tanh, sigmoid, gelu, gelu_tanh, silu, relu6, "
                r"leaky_relu\[:negative_slope\]")
    reason = {"softplus:0": "nonzero beta", "hardtanh:1:-1": "min_val <= max_val"}.get(spec, accepted)
    with pytest.raises(ValueError, match=rf"jacext::pointwise_jac_forward: activation is '{spec}'.*{reason}"):
        ops.pointwise_jac_forward(x, None, spec)
    with pytest.raises(ValueError, match=r"jacext::pointwise_jac_reverse: activation is"):
        ops.pointwise_jac_reverse(x, None, spec)
    with pytest.raises(ValueError, match=r"jacext::batch_jacobian: layers\[1\] .* is"):
        ops.batch_jacobian(x, ["linear_no_bias", spec], [torch.randn(3, 3)], "forward")


# ---- module and functional mappings (rules.py) ----

MODULES = [
    (nn.ReLU(), "relu"), (nn.ReLU(inplace=True), "relu"), (nn.Tanh(), "tanh"), (nn.Sigmoid(), "sigmoid"),
    (nn.GELU(), "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"), (nn.SiLU(), "silu"), (nn.ReLU6(), "relu6"),
    (nn.LeakyReLU(), "leaky_relu:0.01"), (nn.LeakyReLU(0.3), "leaky_relu:0.3"), (nn.ELU(), "elu:1.0"),
    (nn.ELU(alpha=0.7), "elu:0.7"), (nn.Softplus(), "softplus:1.0:20.0"),
    (nn.Softplus(beta=2, threshold=5), "softplus:2.0:5.0"), (nn.Hardtanh(), "hardtanh:-1.0:1.0"),
    (nn.Hardtanh(-2.0, 0.1), "hardtanh:-2.0:0.1"), (nn.Hardswish(), "hardswish"), (nn.Hardsigmoid(), "hardsigmoid"),
]


@pytest.mark.parametrize("module, spec", MODULES, ids=lambda v: str(v))
def test_activation_spec_of_modules(module, spec):
    assert rules.activation_spec(module) == spec
    assert rules.native_rule(module, (4,)).layer == spec
    x = 3 * torch.randn(2, 4, dtype=torch.float64)
    output = ops.pointwise_jac_forward(x, None, spec)[0]
    if spec in OWN_CPU_VALUES:
        assert_matches_reference(output, module(x.clone()), torch.float64)
    else:
        assert torch.equal(output, module(x.clone()))


def test_activation_spec_is_none_for_other_modules():
    class ShiftedReLU(nn.ReLU):  # overrides forward: its own type, no rule
        def forward(self, x):
            return super().forward(x - 1)

    class ClampingReLU(nn.ReLU):  # overrides a method (as forward might call one): its own type too
        def extra_check(self):
            return True

    for module in (nn.Linear(2, 2), nn.Softmax(-1), nn.SELU(), nn.PReLU(), ShiftedReLU(), ClampingReLU(),
                   nn.LayerNorm(3)):
        assert rules.activation_spec(module) is None


def test_a_subclass_that_only_configures_its_parent_takes_the_parents_rule():
    class NamedReLU(nn.ReLU):
        """Only an __init__ and a repr: the parent's forward runs unchanged."""

        def __init__(self):
            super().__init__(inplace=False)
            self.tag = "mine"

        def extra_repr(self):
            return self.tag

    class SlopedLeaky(nn.LeakyReLU):
        def __init__(self):
            super().__init__(0.3)

    assert rules.activation_spec(NamedReLU()) == "relu"
    assert rules.activation_spec(SlopedLeaky()) == "leaky_relu:0.3"
    assert rules.rule_type(NamedReLU()) is nn.ReLU


@pytest.mark.parametrize("fn, args, kwargs, spec", [
    (torch.relu, ("x",), {}, "relu"),
    (F.relu, ("x",), {"inplace": True}, "relu"),
    (F.relu, ("x", False), {}, "relu"),
    (torch.relu_, ("x",), {}, "relu"),
    (torch.tanh, ("x",), {}, "tanh"),
    (torch.sigmoid, ("x",), {}, "sigmoid"),
    ("relu", ("x",), {}, "relu"),
    ("tanh", ("x",), {}, "tanh"),
    ("sigmoid", ("x",), {}, "sigmoid"),
    (F.gelu, ("x",), {}, "gelu"),
    (F.gelu, ("x",), {"approximate": "tanh"}, "gelu_tanh"),
    (F.silu, ("x",), {}, "silu"),
    (F.relu6, ("x",), {}, "relu6"),
    (F.leaky_relu, ("x",), {}, "leaky_relu:0.01"),
    (F.leaky_relu, ("x", 0.2), {}, "leaky_relu:0.2"),
    (F.leaky_relu, ("x", 0.2, True), {}, "leaky_relu:0.2"),
    (F.leaky_relu_, ("x",), {"negative_slope": 0.3}, "leaky_relu:0.3"),
    (F.elu, ("x",), {"alpha": 2}, "elu:2.0"),
    (F.softplus, ("x",), {}, "softplus:1.0:20.0"),
    (F.softplus, ("x", 2.0), {"threshold": 4}, "softplus:2.0:4.0"),
    (F.hardtanh, ("x", -2.0, 3.0), {}, "hardtanh:-2.0:3.0"),
    (F.hardtanh_, ("x",), {"max_val": 0.5}, "hardtanh:-1.0:0.5"),
    (F.hardswish, ("x",), {"inplace": False}, "hardswish"),
    (F.hardsigmoid, ("x", False), {}, "hardsigmoid"),
    # not native: unknown function, unknown approximation, a parameter that is not a number, unknown kwarg
    (torch.exp, ("x",), {}, None),
    ("add", ("x",), {}, None),
    (F.gelu, ("x",), {"approximate": "erf"}, None),
    (F.leaky_relu, ("x", torch.tensor(0.1)), {}, None),
    (F.elu, ("x",), {"scale": 2.0}, None),
    (F.softplus, ("x", 1.0, 2.0, 3.0), {}, None),
])
def test_functional_activation_spec(fn, args, kwargs, spec):
    assert rules.functional_activation_spec(fn, args, kwargs) == spec


# ---- nn.Sequential models end to end ----

ACTIVATION_MODULES = [
    nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.LeakyReLU(0.1), nn.ELU(alpha=0.5),
    nn.Softplus(beta=1.5, threshold=2.0), nn.Hardtanh(-0.7, 0.9), nn.ReLU6(),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["forward", "reverse", "auto"])
@pytest.mark.parametrize("activation", ACTIVATION_MODULES, ids=str)
@pytest.mark.parametrize("batch", [0, 1, 5])
def test_sequential_models_run_native(device, dtype, mode, activation, batch):
    model = nn.Sequential(
        activation, nn.Linear(6, 9), activation, nn.Linear(9, 9), nn.ReLU6(), activation, nn.Linear(9, 4), activation,
        nn.Softmax(-1),
    ).to(device=device, dtype=dtype)
    x = 3 * torch.randn(batch, 6, dtype=dtype, device=device)
    compiled = jx.compile(model, mode=mode)
    y, jacobian = compiled(x)
    assert compiled.plan_for(x).all_native
    assert_matches_reference(y, model(x), dtype)
    assert_matches_reference(jacobian, reference_jacobian(model, x), dtype)
