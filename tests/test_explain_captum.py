"""jacobian_ext.explain agrees with Captum: the same attributions and convergence deltas for Saliency,
InputXGradient, IntegratedGradients (same n_steps and method) and NoiseTunnel (same seed), per target
form, and the all-class results equal Captum's per-target results stacked."""
import warnings

import pytest
import torch
from conftest import DTYPES, RELATIVE_TOLERANCE
from torch import nn

from jacobian_ext import explain

captum_attr = pytest.importorskip("captum.attr")
torchvision = pytest.importorskip("torchvision")

C = 4


def mlp():
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, C),
                         nn.Softmax(dim=1)), (10,)


def cnn():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, stride=2),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, C)), (3, 10, 10)


def resnet18():
    return torchvision.models.resnet18(num_classes=3), (3, 32, 32)


MODELS = {"mlp": mlp, "cnn": cnn, "resnet18": resnet18}
_built = {}


def model_and_input(name, dtype, batch):
    if name not in _built:  # resnet18's construction is slow: build each model once, convert per test
        _built[name] = MODELS[name]()
    model, in_shape = _built[name]
    return model.eval().to(dtype), torch.randn(batch, *in_shape, dtype=dtype)


def assert_close(actual, expected, dtype, scale=None):
    assert actual.shape == expected.shape, f"{tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = scale if scale is not None else max(expected.abs().max().item(), 1e-30)
    error = (actual - expected).abs().max().item()
    assert error <= RELATIVE_TOLERANCE[dtype] * scale, f"error {error:.3e}, scale {scale:.3e}"


def captum_all_classes(attribute, **kwargs):
    """Captum's attributions for every class, stacked into [B, C, *in] (deltas into [B, C])."""
    classes = attribute.__self__.forward_func(kwargs["inputs"][:1]).shape[1]
    results = [attribute(target=k, **kwargs) for k in range(classes)]
    if isinstance(results[0], tuple):
        return torch.stack([r[0] for r in results], 1), torch.stack([r[1] for r in results], 1)
    return torch.stack(results, 1)


@pytest.fixture(autouse=True)
def quiet_captum():
    with warnings.catch_warnings():  # Captum warns that it set requires_grad on our inputs
        warnings.simplefilter("ignore", UserWarning)
        yield


def targets_for(batch):
    return {"int": 1, "per-sample": [(3 * b + 1) % C for b in range(batch)], "tensor": torch.arange(batch) % C}


# resnet18 (graph path, BatchNorm, residual adds) once per dtype with few calls: it is the slow model here.
SALIENCY_CASES = [(model, dtype) for model in ("mlp", "cnn") for dtype in DTYPES]


@pytest.mark.parametrize("model_name, dtype", SALIENCY_CASES)
def test_saliency_and_input_x_gradient(model_name, dtype):
    model, x = model_and_input(model_name, dtype, 2)
    ours, theirs = explain.Saliency(model), captum_attr.Saliency(model)
    ours_ixg, theirs_ixg = explain.InputXGradient(model), captum_attr.InputXGradient(model)
    for target in targets_for(2).values():
        for absolute in (True, False):
            assert_close(ours.attribute(x, target=target, abs=absolute),
                         theirs.attribute(x, target=target, abs=absolute), dtype)
        assert_close(ours_ixg.attribute(x, target=target), theirs_ixg.attribute(x, target=target), dtype)
    assert_close(ours.attribute(x, target=explain.all_classes, abs=False),
                 captum_all_classes(theirs.attribute, inputs=x, abs=False), dtype)
    assert_close(explain.input_x_gradient(model, x), captum_all_classes(theirs_ixg.attribute, inputs=x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_resnet18(dtype):
    """The graph path (BatchNorm, residual adds, pooling) on a real architecture; few calls: it is slow here."""
    model, x = model_and_input("resnet18", dtype, 2)
    assert_close(explain.Saliency(model).attribute(x, target=explain.all_classes, abs=False),
                 captum_all_classes(captum_attr.Saliency(model).attribute, inputs=x, abs=False), dtype)
    kwargs = dict(target=[1, 2], n_steps=2, method="riemann_trapezoid", return_convergence_delta=True)
    attributions, delta = explain.IntegratedGradients(model).attribute(x, **kwargs)
    expected, expected_delta = captum_attr.IntegratedGradients(model).attribute(x, **kwargs)
    assert_close(attributions, expected, dtype)
    assert_close(delta, expected_delta, dtype, scale=expected.abs().sum().item())


IG_CASES = [("mlp", method, 8) for method in explain.METHODS] + [
    ("cnn", "gausslegendre", 4)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model_name, method, n_steps", IG_CASES)
def test_integrated_gradients_and_convergence_deltas(dtype, model_name, method, n_steps):
    model, x = model_and_input(model_name, dtype, 2)
    baselines = 0.1 * torch.randn_like(x)
    ours, theirs = explain.IntegratedGradients(model), captum_attr.IntegratedGradients(model)
    kwargs = dict(baselines=baselines, n_steps=n_steps, method=method, return_convergence_delta=True)
    for target in targets_for(2).values():
        attributions, delta = ours.attribute(x, target=target, **kwargs)
        expected, expected_delta = theirs.attribute(x, target=target, **kwargs)
        assert_close(attributions, expected, dtype)
        # A delta is a small difference of O(|attributions|) terms: compare at their scale.
        assert_close(delta, expected_delta, dtype, scale=expected.abs().sum().item())
    # every class, chunked by steps
    attributions, delta = ours.attribute(x, target=explain.all_classes, internal_batch_size=2, **kwargs)
    expected, expected_delta = captum_all_classes(theirs.attribute, inputs=x, **kwargs)
    assert_close(attributions, expected, dtype)
    assert_close(delta, expected_delta, dtype, scale=expected.abs().sum().item())


@pytest.mark.parametrize("dtype", DTYPES)
def test_integrated_gradients_scalar_baseline_and_without_inputs_factor(dtype):
    model, x = model_and_input("mlp", dtype, 3)
    for multiply in (True, False):
        ours = explain.IntegratedGradients(model, multiply_by_inputs=multiply)
        theirs = captum_attr.IntegratedGradients(model, multiply_by_inputs=multiply)
        assert_close(ours.attribute(x, baselines=0.5, target=2, n_steps=7, internal_batch_size=7),
                     theirs.attribute(x, baselines=0.5, target=2, n_steps=7, internal_batch_size=7), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_noise_tunnel_with_the_same_seed(dtype, model_name):
    model, x = model_and_input(model_name, dtype, 3)
    target = [0, 3, 1]
    mean_square = None
    for nt_type, batch_size in (("smoothgrad", None), ("smoothgrad_sq", 2), ("vargrad", 4)):
        kwargs = dict(nt_type=nt_type, nt_samples=5, nt_samples_batch_size=batch_size, stdevs=0.3, target=target)
        torch.manual_seed(7)
        ours = explain.NoiseTunnel(explain.Saliency(model)).attribute(x, **kwargs)
        torch.manual_seed(7)
        theirs = captum_attr.NoiseTunnel(captum_attr.Saliency(model)).attribute(x, **kwargs)
        # vargrad = mean(g^2) - mean(g)^2 cancels: its rounding error scales with mean(g^2), not with the
        # (smaller) variance (float32, seen: 1.2e-10 on a variance of 8.5e-6, where this model's mean
        # squares are 3e-4 to 6e-4).
        assert_close(ours, theirs, dtype, scale=mean_square if nt_type == "vargrad" else None)
        if nt_type == "smoothgrad_sq":
            mean_square = theirs.abs().max().item()
    torch.manual_seed(3)
    ours = explain.smoothgrad(model, x, target, nt_samples=4, stdevs=0.2)
    torch.manual_seed(3)
    theirs = captum_attr.NoiseTunnel(captum_attr.Saliency(model)).attribute(x, nt_samples=4, stdevs=0.2, target=target)
    assert_close(ours, theirs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_noise_tunnel_around_integrated_gradients_with_deltas(dtype):
    model, x = model_and_input("mlp", dtype, 2)
    baselines = torch.randn_like(x)
    kwargs = dict(nt_samples=3, nt_samples_batch_size=2, stdevs=0.1, target=[2, 0], baselines=baselines, n_steps=5,
                  return_convergence_delta=True)
    torch.manual_seed(5)
    ours, delta = explain.NoiseTunnel(explain.IntegratedGradients(model)).attribute(x, **kwargs)
    torch.manual_seed(5)
    theirs, expected_delta = captum_attr.NoiseTunnel(captum_attr.IntegratedGradients(model)).attribute(x, **kwargs)
    assert_close(ours, theirs, dtype)
    assert_close(delta, expected_delta, dtype, scale=theirs.abs().sum().item())
