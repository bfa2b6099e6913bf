"""explain.GradientShap against Captum's in float64 (to 1e-9): the same random draws for the same torch and
NumPy seeds (baseline rows, noise, points on the segments), tuple inputs, deltas, callable baselines."""
import numpy as np
import pytest
import torch
from captum_checks import assert_close, quiet_captum, two_inputs  # noqa: F401  (quiet_captum: autouse)

from jacobian_ext import explain

captum_attr = pytest.importorskip("captum.attr")


def both_with_one_seed(model, inputs, multiply_by_inputs=True, **kwargs):
    seed = int(torch.randint(1 << 30, ()))
    results = []
    for cls in (explain.GradientShap, captum_attr.GradientShap):
        torch.manual_seed(seed)
        np.random.seed(seed)
        results.append(cls(model, multiply_by_inputs=multiply_by_inputs).attribute(inputs, **kwargs))
    return results


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("multiply_by_inputs", [True, False])
def test_gradient_shap_matches_captum(batch, multiply_by_inputs):
    model, inputs = two_inputs(batch)
    distribution = tuple(torch.randn(6, *t.shape[1:], dtype=torch.float64) for t in inputs)
    target = [b % 3 for b in range(batch)]
    for kwargs in (dict(target=1), dict(target=target, n_samples=4, stdevs=(0.2, 0.05)),
                   dict(target=torch.tensor(2), n_samples=3, stdevs=0.1, additional_forward_args=(None, 2))):
        ours, theirs = both_with_one_seed(model, inputs, multiply_by_inputs, baselines=distribution,
                                          return_convergence_delta=True, **kwargs)
        assert_close(ours[0], theirs[0])
        assert ours[1].shape == (batch * kwargs.get("n_samples", 5),)
        assert_close(ours[1], theirs[1], scale=sum(a.abs().sum().item() for a in theirs[0]))


def test_gradient_shap_one_tensor_and_callable_baselines():
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    for baselines in (torch.randn(5, 4, dtype=torch.float64), lambda: torch.zeros(3, 4, dtype=torch.float64),
                      lambda given: given * 0.5):
        ours, theirs = both_with_one_seed(model, x, baselines=baselines, target=0, stdevs=0.3)
        assert isinstance(ours, torch.Tensor)
        assert_close(ours, theirs)


def test_gradient_shap_bad_baselines_raise_captums_assertion_error():
    model, inputs = two_inputs(2)
    shap = explain.GradientShap(model)
    with pytest.raises(AssertionError, match="one distribution per input"):
        shap.attribute(inputs, baselines=torch.zeros(3, 4, dtype=torch.float64), target=0)
    with pytest.raises(TypeError, match=r"baselines\[1\] must be a tensor"):
        shap.attribute(inputs, baselines=(torch.zeros(3, 4, dtype=torch.float64), np.zeros((3, 2, 3))), target=0)
    with pytest.raises(ValueError, match=r"baselines\[0\] must be \[N, \*in\]"):
        shap.attribute(inputs, baselines=(torch.zeros(3, 5, dtype=torch.float64), 0.0), target=0)
    with pytest.raises(ValueError, match="n_samples"):
        shap.attribute(inputs, baselines=(0.0, 0.0), n_samples=0, target=0)
    with pytest.raises(NotImplementedError, match="NoiseTunnel around GradientShap"):
        explain.NoiseTunnel(shap)
