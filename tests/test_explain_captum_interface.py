"""Captum's whole interface of Saliency, InputXGradient, IntegratedGradients and NoiseTunnel against Captum
itself in float64 (to 1e-9 of the result's scale): tuple inputs with per-input baselines in every form,
one-element tuples, additional_forward_args, models with one output per sample and inputs without a
feature dimension (target=None), N-d outputs with tuple targets, internal_batch_size, convergence deltas
and compute_convergence_delta, attribute_future, Captum's errors for invalid targets, and bad input.
(make test-captum runs Captum's own test files on these classes.)"""
import pytest
import torch
from captum_checks import C, assert_close, quiet_captum, two_inputs  # noqa: F401  (quiet_captum: autouse)
from torch import nn

from jacobian_ext import explain

captum_attr = pytest.importorskip("captum.attr")


class GridOutput(nn.Module):
    """[B, 5] -> [B, 2, C]: an N-d output, targets as tuples."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(5, 2 * C)

    def forward(self, x):
        return torch.sigmoid(self.linear(x)).view(-1, 2, C)


def both(name, model, *args, **kwargs):
    """(ours, Captum's) attribution objects of the same class; NoiseTunnel(name) wraps the class `name`."""
    if name.startswith("NoiseTunnel"):
        inner = name[len("NoiseTunnel("):-1]
        return explain.NoiseTunnel(getattr(explain, inner)(model)), captum_attr.NoiseTunnel(getattr(captum_attr, inner)(model))
    return getattr(explain, name)(model, *args, **kwargs), getattr(captum_attr, name)(model, *args, **kwargs)


def run_both(ours, theirs, inputs, seed=None, **kwargs):
    results = []
    for method in (ours, theirs):
        if seed is not None:
            torch.manual_seed(seed)
        results.append(method.attribute(inputs, **kwargs))
    return results


def assert_same(ours, theirs, inputs, seed=None, **kwargs):
    mine, expected = run_both(ours, theirs, inputs, seed, **kwargs)
    if kwargs.get("return_convergence_delta"):
        (mine, delta), (expected, expected_delta) = mine, expected
        scale = sum(e.abs().sum().item() for e in (expected if isinstance(expected, tuple) else (expected,)))
        assert_close(delta, expected_delta, scale)  # a delta is a small difference of terms of that size
    assert_close(mine, expected)


# The forms Captum accepts for two inputs (a tuple with one number or tensor per input, or None).
BASELINE_FORMS = ("none", "numbers", "tensors like the inputs", "one-sample tensors", "tensor and number")


def baselines_for(form, inputs):
    return {"none": None, "numbers": (0.5, -0.25),
            "tensors like the inputs": tuple(0.1 * torch.randn_like(t) for t in inputs),
            "one-sample tensors": tuple(0.1 * torch.randn_like(t[:1]) for t in inputs),
            "tensor and number": (0.1 * torch.randn_like(inputs[0]), -0.3)}[form]


def test_baselines_forms_beyond_captums():
    """One number for every input, and None for an input's zeros inside the tuple."""
    model, inputs = two_inputs(2)
    ours, theirs = both("IntegratedGradients", model)
    assert_close(ours.attribute(inputs, baselines=0.5, target=1, n_steps=4),
                 theirs.attribute(inputs, baselines=(0.5, 0.5), target=1, n_steps=4))
    assert_close(ours.attribute(inputs, baselines=(None, 0.5), target=1, n_steps=4),
                 theirs.attribute(inputs, baselines=(0.0, 0.5), target=1, n_steps=4))


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("target", [1, "per-sample", "tensor"])
def test_tuple_inputs_for_gradients(batch, target):
    model, inputs = two_inputs(batch)
    target = {"per-sample": [b % C for b in range(batch)], "tensor": torch.arange(batch) % C}.get(target, target)
    for name, kwargs in (("Saliency", {"abs": False}), ("Saliency", {}), ("InputXGradient", {})):
        ours, theirs = both(name, model)
        assert_same(ours, theirs, inputs, target=target, **kwargs)


def test_one_element_tuple_returns_a_one_element_tuple():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, C)).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    for name in ("Saliency", "InputXGradient", "IntegratedGradients"):
        ours, theirs = both(name, model)
        result = ours.attribute((x,), target=2)
        assert isinstance(result, tuple) and len(result) == 1
        assert_close(result, theirs.attribute((x,), target=2))
        assert isinstance(ours.attribute(x, target=2), torch.Tensor)


@pytest.mark.parametrize("form", BASELINE_FORMS)
@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid"])
def test_integrated_gradients_tuple_inputs_every_baseline_form(form, method):
    model, inputs = two_inputs(3)
    baselines = baselines_for(form, inputs)
    for multiply in (True, False):
        ours, theirs = both("IntegratedGradients", model, multiply_by_inputs=multiply)
        assert_same(ours, theirs, inputs, baselines=baselines, target=[0, 2, 1], n_steps=7, method=method,
                    return_convergence_delta=True)
    assert_same(ours, theirs, inputs, baselines=baselines, target=1, n_steps=6, internal_batch_size=6)


@pytest.mark.parametrize("name", ["NoiseTunnel(Saliency)", "NoiseTunnel(InputXGradient)", "NoiseTunnel(IntegratedGradients)"])
@pytest.mark.parametrize("nt_type, batch_size", [("smoothgrad", None), ("smoothgrad_sq", 2), ("vargrad", 3)])
def test_noise_tunnel_tuple_inputs_same_noise(name, nt_type, batch_size):
    model, inputs = two_inputs(2)
    ours, theirs = both(name, model)
    kwargs = dict(nt_type=nt_type, nt_samples=5, nt_samples_batch_size=batch_size, stdevs=(0.2, 0.05), target=[1, 0])
    if "Integrated" in name:
        kwargs.update(baselines=(0.1 * torch.randn_like(inputs[0]), 0.0), n_steps=4, return_convergence_delta=True)
    seed = torch.randint(1 << 30, ()).item()
    mine, expected = run_both(ours, theirs, inputs, seed, **kwargs)
    if "Integrated" in name:
        (mine, delta), (expected, expected_delta) = mine, expected
        assert_close(delta, expected_delta, sum(e.abs().sum().item() for e in expected))
    # vargrad = mean(g^2) - mean(g)^2 cancels: compare at the scale of the mean squares.
    scale = None if nt_type != "vargrad" else max(e.abs().max().item() for e in expected) + 1.0
    assert_close(mine, expected, scale)


def test_additional_forward_args_per_sample_tensors_and_constants():
    model, inputs = two_inputs(3)
    shift = torch.randn(3, 10, dtype=torch.float64)  # per sample: expanded over steps and noise as in Captum
    for arguments in ((shift, 2, [0.5, -1.5]), (None, 3), 2, (shift,), (shift, torch.tensor(2.0)),
                      (torch.randint(-3, 4, (3, 10)),), (shift.float(),)):  # other dtypes ride exactly
        for name in ("Saliency", "InputXGradient", "IntegratedGradients"):
            ours, theirs = both(name, model)
            kwargs = dict(target=[2, 1, 0], additional_forward_args=arguments)
            if name == "IntegratedGradients":
                kwargs.update(baselines=(0.2, torch.randn_like(inputs[1])), n_steps=5, return_convergence_delta=True)
                assert_same(ours, theirs, inputs, internal_batch_size=7, **kwargs)
            assert_same(ours, theirs, inputs, **kwargs)
            nt_ours, nt_theirs = explain.NoiseTunnel(ours), captum_attr.NoiseTunnel(theirs)
            assert_same(nt_ours, nt_theirs, inputs, seed=11, nt_samples=3, nt_samples_batch_size=2, stdevs=0.1,
                        **kwargs)


def test_additional_tensors_without_the_batch_dimension_are_passed_unchanged():
    """As Captum's gradient methods pass them (its integration and noise expand them, which breaks for them)."""
    model, inputs = two_inputs(3)
    arguments = (torch.randn(1, 10, dtype=torch.float64), torch.tensor(2.0))
    for name in ("Saliency", "InputXGradient"):
        assert_same(*both(name, model), inputs, target=[2, 1, 0], additional_forward_args=arguments)


def test_additional_forward_args_do_not_replan_when_unchanged():
    model, inputs = two_inputs(2)
    ig = explain.IntegratedGradients(model)
    for _ in range(2):
        ig.attribute(inputs, target=0, additional_forward_args=(None, 2), n_steps=3)
    ig.attribute(inputs, target=0, n_steps=3)
    assert len(ig._engines._engines) == 2  # one per signature, not per call


class PerSampleScalar(nn.Module):
    """[B] (no feature dimension) or [B, D] -> [B]: one output per sample, so target=None."""

    def forward(self, x, y):
        return torch.relu(x * 2 - y.sum(1) * 0.5 + 0.1) * torch.tanh(y[:, 0])


@pytest.mark.parametrize("batch", [1, 4])
def test_models_with_one_output_per_sample_and_target_none(batch):
    model = PerSampleScalar()
    inputs = (torch.randn(batch, dtype=torch.float64), torch.randn(batch, 2, dtype=torch.float64))
    for name in ("Saliency", "InputXGradient"):
        assert_same(*both(name, model), inputs)
    ours, theirs = both("IntegratedGradients", model)
    baselines = (torch.zeros(batch, dtype=torch.float64), 0.5)
    assert_same(ours, theirs, inputs, baselines=baselines, n_steps=9, return_convergence_delta=True)
    attributions, _ = theirs.attribute(inputs, baselines=baselines, n_steps=9, return_convergence_delta=True)
    assert_close(ours.compute_convergence_delta(attributions, baselines, inputs),
                 theirs.compute_convergence_delta(attributions, baselines, inputs), scale=1.0)
    single = lambda x: torch.tanh(x * 3).sum(1, keepdim=True)  # noqa: E731  [B, 1]: one output too
    assert_same(*both("Saliency", single), inputs[1])


def test_nd_outputs_with_tuple_targets():
    model = GridOutput().double()
    x = torch.randn(3, 5, dtype=torch.float64)
    for target in ((1, 2), (0, -1), [(0, 1), (1, 0), (1, 2)]):
        for name in ("Saliency", "InputXGradient", "IntegratedGradients"):
            assert_same(*both(name, model), x, target=target)
    every = explain.Saliency(model).attribute(x, target=explain.all_classes, abs=False)
    assert every.shape == (3, 2, C, 5)
    expected = captum_attr.Saliency(model).attribute(x, target=(1, 2), abs=False)
    assert_close(every[:, 1, 2], expected)


def test_compute_convergence_delta_matches_captum():
    model, inputs = two_inputs(3)
    baselines = (0.1 * torch.randn_like(inputs[0]), 0.2)
    ours, theirs = both("IntegratedGradients", model)
    for target in (1, [0, 2, 1]):
        attributions = theirs.attribute(inputs, baselines=baselines, target=target, n_steps=4)
        expected = theirs.compute_convergence_delta(attributions, baselines, inputs, target=target)
        assert_close(ours.compute_convergence_delta(attributions, baselines, inputs, target=target), expected,
                     scale=sum(a.abs().sum().item() for a in attributions))
    x = torch.randn(2, 4, dtype=torch.float64)
    linear = nn.Linear(4, C).double()
    attributions = explain.IntegratedGradients(linear).attribute(x, target=explain.all_classes, n_steps=3)
    delta = explain.IntegratedGradients(linear).compute_convergence_delta(attributions, None, x, target=explain.all_classes)
    # Linear: integrated gradients are exact, up to Captum's float32 rounding of the step weights.
    assert delta.shape == (2, C) and delta.abs().max() < 1e-6 * attributions.abs().sum()


def test_attribute_future_is_not_implemented_as_in_captum():
    model = nn.Linear(3, 2)
    for method in (explain.Saliency(model), explain.InputXGradient(model), explain.IntegratedGradients(model),
                   explain.NoiseTunnel(explain.Saliency(model))):
        with pytest.raises(NotImplementedError, match="attribute_future"):
            method.attribute_future()


INVALID_TARGETS = [
    (None, "target=None needs a model with one output"), ((9999,) * 20, "20 indices"), ((1, 0), "2 indices"),
    (7, "out of range"), ([0, 1], "needs 3 entries"),
]


@pytest.mark.parametrize("target, message", INVALID_TARGETS)
def test_invalid_targets_raise_captums_assertion_error_and_a_value_error(target, message):
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C)).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    for name in ("Saliency", "InputXGradient", "IntegratedGradients", "NoiseTunnel(Saliency)"):
        ours, _ = both(name, model)
        for error in (AssertionError, ValueError):
            with pytest.raises(error, match=message) as info:
                ours.attribute(x, target=target)
            assert "target" in str(info.value)
    # a tuple that leaves several outputs per sample (Captum's test_multi_target_error)
    with pytest.raises(AssertionError, match="not one output"):
        explain.IntegratedGradients(GridOutput().double()).attribute(torch.randn(2, 5, dtype=torch.float64), target=(1,))
    with pytest.raises(TypeError, match="integer"):
        explain.Saliency(model).attribute(x, target=1.5)


def test_bad_input_raises_naming_the_argument():
    model, inputs = two_inputs(3)
    ig = explain.IntegratedGradients(model)
    with pytest.raises(ValueError, match=r"same batch size: inputs\[0\] has 3, inputs\[1\] has 2"):
        ig.attribute((inputs[0], inputs[1][:2]), target=0)
    with pytest.raises(TypeError, match=r"inputs\[1\] must be a torch.Tensor"):
        ig.attribute((inputs[0], 1.0), target=0)
    with pytest.raises(TypeError, match=r"inputs\[1\] must be a floating-point"):
        ig.attribute((inputs[0], inputs[1].long()), target=0)
    with pytest.raises(ValueError, match="baselines as a tuple needs one entry per input tensor"):
        ig.attribute(inputs, baselines=(0.0,), target=0)
    with pytest.raises(ValueError, match=r"baselines\[1\] must have the shape"):
        ig.attribute(inputs, baselines=(0.0, torch.zeros(3, 6, dtype=torch.float64)), target=0)
    with pytest.raises(TypeError, match=r"baselines\[0\] must be None, a number or a tensor"):
        ig.attribute(inputs, baselines=("zero", 0.0), target=0)
    with pytest.raises(NotImplementedError, match=r"additional_forward_args\[0\] is a per-sample tensor.*exactly"):
        ig.attribute(inputs, target=0, additional_forward_args=(torch.full((3, 10), 2**60),))
    with pytest.raises(ValueError, match="stdevs as a tuple needs one value per input"):
        explain.NoiseTunnel(ig).attribute(inputs, stdevs=(0.1,), target=0)
    with pytest.raises(ValueError, match="attributions"):
        ig.compute_convergence_delta((inputs[0],), 0.0, inputs, target=0)
    with pytest.raises(ValueError, match="forward_func must return a tensor"):
        explain.Saliency(lambda a, b: (a, b)).attribute(inputs)


def test_a_replaced_last_layer_is_seen_on_the_next_call():
    """The engines are cached per call signature; a new output width must not be served the old plan."""
    model, inputs = two_inputs(2)
    ours, theirs = both("Saliency", model)
    ours.attribute(inputs, target=explain.all_classes)
    model.second = nn.Linear(8, C + 2).double()
    every = ours.attribute(inputs, target=explain.all_classes)
    assert every[0].shape == (2, C + 2, 4)
    assert_close(tuple(e[:, C + 1] for e in every), theirs.attribute(inputs, target=C + 1, abs=True))
    mlp = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C)).double()
    ours, theirs = both("Saliency", mlp)
    x = inputs[0]
    ours.attribute(x, target=0)
    mlp.append(nn.Unflatten(1, (1, C)))  # now [B, 1, C]: targets are tuples
    assert_close(ours.attribute(x, target=(0, 2)), theirs.attribute(x, target=(0, 2)))


def test_an_empty_batch_gives_empty_results_of_every_form():
    model, inputs = two_inputs(0)
    for method, kwargs in ((explain.Saliency(model), {}), (explain.InputXGradient(model), {}),
                           (explain.NoiseTunnel(explain.Saliency(model)), dict(nt_samples=2)),
                           (explain.GradientShap(model), dict(baselines=(torch.zeros(2, 4, dtype=torch.float64), 0.0)))):
        result = method.attribute(inputs, target=1, **kwargs)
        assert [tuple(r.shape) for r in result] == [(0, 4), (0, 2, 3)]
    result, delta = explain.IntegratedGradients(model).attribute(inputs, target=[], n_steps=3,
                                                                 return_convergence_delta=True)
    assert [tuple(r.shape) for r in result] == [(0, 4), (0, 2, 3)] and delta.shape == (0,)
