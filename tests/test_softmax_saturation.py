"""Softmax and log-softmax where one class holds nearly all the probability (tail mass sigma = 1 - s_m far
below the unit roundoff): every entry of the Jacobian is then sigma-sized, and a rule that forms
r - <r, s> directly loses it all to the rounding of r_m (the forward rule was off by 57% of J's largest
entry in float64). torch.func's own rules cancel the same way, so the reference here is the analytic
Jacobian with the dominant class's entries taken through the other classes' probabilities:
softmax  J = diag(s) - s s^T with J_mm = s_m * sigma,  log-softmax  J = I - 1 s^T with J_mm = sigma."""
import copy

import pytest
import torch
from torch import nn

import jacobian_ext as jx
from conftest import DEVICES, DTYPES, non_contiguous
from jacobian_ext import ops

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}


def saturated_logits(batch, features, gap, dtype, device):
    """Logits [batch, features] whose class (b mod features) leads the others by about `gap`."""
    logits = torch.randn(batch, features, dtype=torch.float64)
    logits[torch.arange(batch), torch.arange(batch) % features] += gap
    return logits.to(dtype=dtype, device=device)


def analytic_jacobian(logits: torch.Tensor, log: bool) -> torch.Tensor:
    """[B, H, H] in float64 at the probabilities the rules see (computed in the logits' dtype, as the
    operators compute them), each entry to a few roundoffs of itself."""
    s = (torch.log_softmax(logits, -1).exp() if log else torch.softmax(logits, -1)).double()
    dominant = s.argmax(-1)
    tail_mass = (s * torch.ones_like(s).scatter(-1, dominant[:, None], 0.0)).sum(-1)  # the other classes only
    rows = torch.arange(s.shape[0])
    if log:
        jacobian = torch.eye(s.shape[1], dtype=s.dtype, device=s.device) - s[:, None, :]
        jacobian[rows, dominant, dominant] = tail_mass
    else:
        jacobian = torch.diag_embed(s) - s[:, :, None] * s[:, None, :]
        jacobian[rows, dominant, dominant] = s[rows, dominant] * tail_mass
    return jacobian


def assert_relative(actual, expected, magnitude, dtype, what, roundoffs=64):
    """Each row (a sample's output class, or a cotangent row) within `roundoffs` unit roundoffs of the
    largest entry of that row of `magnitude`, the product of the factors' absolute values (the scale a
    product's rounding and cancellation work at): no absolute slack, and no row judged by another's scale
    (log-softmax's dominant row is sigma-sized while the others are O(1))."""
    error = (actual.double().cpu() - expected.double().cpu()).abs().flatten(2).amax(2)
    scale = magnitude.double().cpu().flatten(2).amax(2)
    assert torch.all(error <= roundoffs * UNIT_ROUNDOFF[dtype] * scale), (
        f"{what}: worst error / row scale {(error / scale).max().item():.3g}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
# gap 0: no class holds half the probability (the direct form); then sigma about 1e-2, 1e-17, 1e-130 (0 in
# float32) and 0
@pytest.mark.parametrize("gap", [0.0, 5.0, 40.0, 300.0, 1e4])
@pytest.mark.parametrize("features", [1, 2, 10, 70])  # 70: more classes than a CUDA warp has lanes
def test_rules_keep_the_tail_at_saturation(device, dtype, log, gap, features):
    batch = 6
    logits = saturated_logits(batch, features, gap, dtype, device)
    expected = analytic_jacobian(logits, log)
    forward_op, reverse_op = ((ops.log_softmax_jac_forward, ops.log_softmax_jac_reverse) if log
                              else (ops.softmax_jac_forward, ops.softmax_jac_reverse))
    tangents = non_contiguous(torch.randn(batch, features, 3, dtype=dtype, device=device))  # [B, H, D], D != H
    cotangents = torch.randn(batch, 5, features, dtype=dtype, device=device)  # [B, C, H]
    output, identity_jac = forward_op(logits, None)
    size = expected.abs()
    assert_relative(identity_jac, expected, size, dtype, "forward, identity tangents")
    _, jac = forward_op(logits, tangents)
    assert_relative(jac, expected @ tangents.double(), size @ tangents.double().abs(), dtype, "forward")
    assert_relative(reverse_op(output, None), expected, size, dtype, "reverse, identity cotangents")
    assert_relative(reverse_op(output, cotangents), cotangents.double() @ expected,
                    cotangents.double().abs() @ size, dtype, "reverse")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("mode", ["forward", "reverse", "auto"])
# A small chain, and one past the small-chain kernel's limit (2^22 multiply-adds a call at batch 40 in either
# sweep): the ATen walker.
@pytest.mark.parametrize("hidden", [None, 2000])
def test_saturated_softmax_head_through_every_walker(dtype, log, mode, hidden):
    """A Linear + (log-)softmax head with one class leading by 60 (sigma about 1e-26), as a chain and as
    a subclass: J = J_softmax(z) W J_trunk to rounding, whichever sweep and kernel run it. The allowance
    is the products' rounding plus the sensitivity of sigma to the rounding of logits near 60."""
    torch.manual_seed(0)
    features_in, classes, batch = 4, 10, 40 if hidden else 5
    trunk = nn.Sequential(nn.Linear(features_in, hidden), nn.Tanh()) if hidden else nn.Sequential()
    head = nn.Linear(hidden or features_in, classes)
    with torch.no_grad():
        head.weight.mul_(0.1)
        head.bias.zero_()
        head.bias[3] = 60.0
    model = nn.Sequential(*trunk, head, nn.LogSoftmax(-1) if log else nn.Softmax(-1)).to(dtype).eval()
    x = torch.randn(batch, features_in, dtype=dtype)

    class Subclass(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk, self.head = trunk, head

        def forward(self, v):
            logits = self.head(self.trunk(v))
            return torch.log_softmax(logits, -1) if log else torch.softmax(logits, -1)

    with torch.no_grad():
        logits = head(trunk(x))
    trunk64 = copy.deepcopy(trunk).double()
    trunk_jacobian = (torch.func.vmap(torch.func.jacrev(trunk64))(x.double()) if hidden
                      else torch.eye(features_in, dtype=torch.float64).expand(batch, -1, -1))
    softmax_jacobian = analytic_jacobian(logits, log)
    expected = softmax_jacobian @ head.weight.double() @ trunk_jacobian
    magnitude = softmax_jacobian.abs() @ head.weight.double().abs() @ trunk_jacobian.abs()
    roundoffs = 8 * ((hidden or 0) + features_in + classes) + 4 * 60
    for name, form in (("Sequential", model), ("subclass", Subclass())):
        jacobian = jx.batch_jacobian(form, x, mode=mode)
        assert_relative(jacobian, expected, magnitude, dtype, f"{name} {mode}, hidden {hidden}", roundoffs)
