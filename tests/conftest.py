import copy
import os
import random

import pytest
import torch

import hypothesis_profiles  # noqa: F401  (registers and loads the hypothesis profile)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float64, torch.float32]
# Max abs error allowed, relative to the reference's largest entry.
RELATIVE_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
# float16 and bfloat16 run on CUDA only (test_cuda.py). Every stored intermediate is rounded once to
# the storage type (our kernels and cuBLAS accumulate in float), so errors are a few unit roundoffs u;
# a CPU emulation of exactly these roundings on depth-3 networks like test_cuda.py's peaked at 3.0 u over
# 960 runs. 8 u leaves room for cuBLAS's own summation order.
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
RELATIVE_TOLERANCE.update({dtype: 8 * u for dtype, u in UNIT_ROUNDOFF.items()})  # 3.9e-3 and 3.1e-2


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """Fresh random inputs on every run (torch's default generator would repeat the same numbers);
    a failing test's report shows its seed, and JACEXT_TEST_SEED=N reruns with it."""
    seed = int(os.environ.get("JACEXT_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(seed)
    request.node.jacext_seed = seed
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and hasattr(item, "jacext_seed"):
        report.sections.append(("random seed", f"JACEXT_TEST_SEED={item.jacext_seed}"))


class Sin(torch.nn.Module):
    """A custom module: no native rule anywhere, so it runs on the torch.func fallback."""

    def forward(self, x):
        return torch.sin(x)


def assert_matches_reference(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 0.0):
    """Max abs error within RELATIVE_TOLERANCE[dtype] x the reference's largest entry, or x `scale` when that
    is larger: the size of the quantities the computation rounds, where they exceed the result's."""
    assert tuple(actual.shape) == tuple(expected.shape), f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    scale = max(expected.abs().max().item(), scale, 1e-300)
    error = (actual.detach().double().cpu() - expected.detach().double().cpu()).abs().max().item()
    assert error <= RELATIVE_TOLERANCE[dtype] * scale, (
        f"max abs error {error:.3e} exceeds {RELATIVE_TOLERANCE[dtype]:.0e} x reference max {scale:.3e}"
    )


def single_sample(fn):
    return lambda sample: fn(sample.unsqueeze(0)).squeeze(0)


def reference_jacobian(model, x: torch.Tensor) -> torch.Tensor:
    """torch.func.vmap(jacrev) in float64 on a float64 copy of the model: [B, *out, *in]."""
    model64 = copy.deepcopy(model).double() if isinstance(model, torch.nn.Module) else model
    with torch.no_grad():
        return torch.func.vmap(torch.func.jacrev(single_sample(model64)))(x.detach().double())


def loop_jacobian(model, x: torch.Tensor) -> torch.Tensor:
    """The classic answer, independent of torch.func: one backward per output with grad_outputs one-hot."""
    model64 = copy.deepcopy(model).double()
    x = x.detach().double().requires_grad_(True)
    y = model64(x)
    flat = y.reshape(y.shape[0], -1)
    rows = []
    for i in range(flat.shape[1]):
        (grad,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)
        rows.append(grad)
    return torch.stack(rows, 1).reshape(*y.shape, *x.shape[1:])


def non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values with a non-contiguous layout (every other column of a wider tensor)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    view = wide[..., ::2]
    assert not view.is_contiguous() or t.numel() <= 1
    return view


def penalty_gradients(model, x: torch.Tensor, penalty):
    """(d penalty(J)/dx, {name: d penalty(J)/dparam}) computed with torch.func alone: the reference for
    the gradients of our Jacobians."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def penalty_of(inputs, weights):
        per_sample = lambda s: torch.func.functional_call(model, weights, (s.unsqueeze(0),)).squeeze(0)  # noqa: E731
        return penalty(torch.func.vmap(torch.func.jacrev(per_sample))(inputs))

    return torch.func.grad(penalty_of, argnums=(0, 1))(x.detach(), params)


def output_terms_scale(model, x) -> float:
    """Largest output of the model run on |x| with |W| and |b|: a bound on the terms every output sums.
    Where they cancel (y ~ 6e-4, float32, 20% active, B = 1), another summation order than torch's
    GEMMs (the small-chain kernel's loops) moves y by about u times this."""
    with torch.no_grad():
        hidden = x.double().abs()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                hidden = hidden @ layer.weight.double().abs().T + (0 if layer.bias is None else layer.bias.double().abs())
    return float(hidden.max()) if hidden.numel() else 0.0
