"""jacobian_ext.explain against torch.func: every target form, every method, chunking, bad input.
(Agreement with Captum itself: test_explain_captum.py.)"""
import copy

import pytest
import torch
from conftest import DEVICES, DTYPES, RELATIVE_TOLERANCE, assert_matches_reference, reference_jacobian
from torch import nn

from jacobian_ext import explain
from jacobian_ext.explain import budget, rows as rows_module
from jacobian_ext.explain.rows import JacobianRows
from jacobian_ext.explain.targets import parse_target
from jacobian_ext.graph import GraphPlan

D, H, C = 7, 12, 5  # D != C


def mlp(dtype, device):
    return nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, H), nn.ReLU(), nn.Linear(H, C),
                         nn.Softmax(dim=1)).to(dtype=dtype, device=device)


class ResidualMLP(nn.Module):
    """Not an nn.Sequential: runs on the graph path (the head is appended by a wrapper module)."""

    def __init__(self):
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(D, H), nn.Linear(H, H), nn.Linear(H, C)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(h + torch.relu(self.mid(h)))


def cnn(dtype, device):
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 3),
                         nn.Tanh(), nn.Flatten(), nn.Linear(4 * 2 * 2, C)).to(dtype=dtype, device=device)


MODELS = {"mlp": (mlp, (D,)), "residual": (lambda dt, dev: ResidualMLP().to(dt).to(dev), (D,)),
          "cnn": (cnn, (2, 8, 8))}

# Every target form for a batch of 3, with the reference's rows: (target, select(J [B, C, *in])).
TARGET_FORMS = {
    "all": (None, lambda j: j),
    "all_classes": (explain.all_classes, lambda j: j),
    "int": (3, lambda j: j[:, 3]),
    "negative int": (-1, lambda j: j[:, C - 1]),
    "one-element tensor": (torch.tensor([2]), lambda j: j[:, 2]),
    "per-sample list": ([4, 0, 4], lambda j: j[[0, 1, 2], [4, 0, 4]]),
    "per-sample tensor": (torch.tensor([1, 2, 3]), lambda j: j[[0, 1, 2], [1, 2, 3]]),
    "classes": (explain.classes(4, 1), lambda j: j[:, [4, 1]]),
    "classes list": (explain.classes([0, 0, 2, 3]), lambda j: j[:, [0, 0, 2, 3]]),
}


def times_input(rows, x):
    return rows * (x.double() if rows.dim() == x.dim() else x.double().unsqueeze(1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("form", list(TARGET_FORMS))
def test_saliency_and_input_x_gradient_match_torch_func(device, dtype, model_name, form):
    make, in_shape = MODELS[model_name]
    model = make(dtype, device)
    target, select = TARGET_FORMS[form]
    x = torch.randn(3, *in_shape, dtype=dtype, device=device)
    expected = select(reference_jacobian(model, x))
    assert_matches_reference(explain.saliency(model, x, target, abs=False), expected, dtype)
    assert_matches_reference(explain.saliency(model, x, target), expected.abs(), dtype)
    assert_matches_reference(explain.input_x_gradient(model, x, target), times_input(expected, x), dtype)


def reference_integrated_gradients(model, x, baseline, method, n_steps, select):
    alphas, weights = explain.points_and_weights(method, n_steps)
    x64, base64 = x.double(), baseline.double().expand_as(x)
    total = sum(w * select(reference_jacobian(model, base64 + a * (x64 - base64))) for a, w in zip(alphas, weights))
    return times_input(total, x64 - base64)


# Every quadrature on the MLP; the graph-path models with two of them.
IG_CASES = [("mlp", method) for method in explain.METHODS] + [
    (model, method) for model in ("residual", "cnn") for method in ("gausslegendre", "riemann_trapezoid")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model_name, method", IG_CASES)
@pytest.mark.parametrize("form", ["all", "per-sample list", "classes"])
def test_integrated_gradients_match_torch_func(dtype, model_name, method, form):
    make, in_shape = MODELS[model_name]
    model = make(dtype, "cpu")
    target, select = TARGET_FORMS[form]
    x = torch.randn(3, *in_shape, dtype=dtype)
    baseline = torch.randn(1, *in_shape, dtype=dtype)
    attributions, delta = explain.integrated_gradients(model, x, target, baselines=baseline, n_steps=4,
                                                       method=method, return_convergence_delta=True)
    expected = reference_integrated_gradients(model, x, baseline, method, 4, select)
    assert_matches_reference(attributions, expected, dtype)
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        outputs, base_outputs = model64(x.double()), model64(baseline.double().expand_as(x))
    total = expected.flatten(expected.dim() - len(in_shape)).sum(-1)
    expected_delta = total - (select(outputs.unsqueeze(-1)) - select(base_outputs.unsqueeze(-1))).squeeze(-1)
    # delta is a difference of terms as large as the attributions' sum: the error scales with those terms
    scale = max(total.abs().max().item(), outputs.abs().max().item(), 1e-300)
    assert delta.shape == expected_delta.shape
    assert (delta.double() - expected_delta).abs().max().item() <= 10 * RELATIVE_TOLERANCE[dtype] * scale


def test_quadrature_integrates_polynomials():
    # Gauss-Legendre with n points is exact to degree 2n - 1 (up to Captum's float32 weights); the
    # Riemann rules converge to the integral of 3 t^2 over [0, 1], which is 1.
    alphas, weights = explain.points_and_weights("gausslegendre", 4)
    assert abs((weights * 8 * alphas**7).sum().item() - 1) < 1e-7
    for method in explain.METHODS[:4]:
        alphas, weights = explain.points_and_weights(method, 64)
        assert abs((weights * 3 * alphas**2).sum().item() - 1) < 0.05, method
    assert abs((lambda a, w: (w * 3 * a**2).sum().item())(*explain.points_and_weights("riemann_middle", 64)) - 1) < 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
def test_smoothgrad_matches_mean_of_noisy_saliency(dtype):
    model = mlp(dtype, "cpu")
    x = torch.randn(3, D, dtype=dtype)
    result = explain.smoothgrad(model, x, [0, 1, 2], nt_samples=4, stdevs=0.2, seed=11)
    assert torch.equal(result, explain.smoothgrad(model, x, [0, 1, 2], nt_samples=4, stdevs=0.2, seed=11))
    generator = torch.Generator().manual_seed(11)
    noise = torch.normal(0, torch.tensor(0.2).repeat(12, D), generator=generator)
    noisy = x.repeat_interleave(4, 0) + noise
    grads = reference_jacobian(model, noisy)[torch.arange(12), torch.tensor([0, 1, 2]).repeat_interleave(4)]
    assert_matches_reference(result, grads.abs().view(3, 4, D).mean(1), dtype)
    # vargrad of the signed gradients: their variance over the noisy copies
    vargrad = explain.smoothgrad(model, x, 1, nt_samples=4, stdevs=0.2, seed=11, abs=False, nt_type="vargrad")
    grads = reference_jacobian(model, noisy)[:, 1].view(3, 4, D)
    # E[g^2] - E[g]^2 (Captum's formula) cancels: its error scales with E[g^2], not with the variance
    scale = grads.pow(2).mean(1).abs().max().item()
    assert (vargrad.double() - grads.var(1, unbiased=False)).abs().max().item() <= RELATIVE_TOLERANCE[dtype] * scale


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("batch", [0, 1])
def test_empty_and_single_sample_batches(model_name, batch):
    make, in_shape = MODELS[model_name]
    model = make(torch.float64, "cpu")
    x = torch.randn(batch, *in_shape, dtype=torch.float64)
    forms = ["all", "int", "per-sample list", "classes"] if model_name == "cnn" else list(TARGET_FORMS)  # time
    for target, select in (TARGET_FORMS[form] for form in forms):
        if isinstance(target, (list, torch.Tensor)) and len(target) != 1:
            target = [C - 1] * batch
            select = (lambda j: j[:, C - 1])
        expected = select(reference_jacobian(model, x)) if batch else None
        shape = select(torch.zeros(batch, C, *in_shape)).shape
        result = explain.saliency(model, x, target, abs=False)
        assert result.shape == shape
        if batch:
            assert_matches_reference(result, expected, torch.float64)
        if target is None or isinstance(target, list):
            assert explain.integrated_gradients(model, x, target, n_steps=2).shape == shape


def test_non_contiguous_and_channels_last_inputs():
    model = mlp(torch.float64, "cpu")
    x = torch.randn(D, 4, dtype=torch.float64).t()
    assert not x.is_contiguous()
    assert_matches_reference(explain.saliency(model, x, [0, 1, 2, 3], abs=False),
                             reference_jacobian(model, x)[torch.arange(4), torch.arange(4)], torch.float64)
    conv = cnn(torch.float64, "cpu")
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64).to(memory_format=torch.channels_last)
    assert_matches_reference(explain.integrated_gradients(conv, x, explain.classes(2), n_steps=3),
                             reference_integrated_gradients(conv, x, torch.zeros(1, 2, 8, 8), "gausslegendre", 3,
                                                            lambda j: j[:, [2]]), torch.float64)


def test_only_the_targeted_rows_are_computed_and_a_sequential_stays_fused():
    model = mlp(torch.float32, "cpu")
    x = torch.randn(4, D)
    engine = JacobianRows(model)
    for target, rows in ((1, 1), (explain.classes(0, 2, 3), 3), (None, C)):
        engine(x, parse_target(target, 4, C))
        compiled = next(reversed(engine._compiled.values()))
        plan = compiled._last["plan"]
        assert plan.output_shape == (rows,) and plan.all_native and not isinstance(plan, GraphPlan)
        assert plan.choose_mode(4, "auto") == "reverse"
    engine = JacobianRows(cnn(torch.float32, "cpu"))
    engine(torch.randn(2, 2, 8, 8), parse_target(3, 2, C))
    plan = next(iter(engine._compiled.values()))._last["plan"]
    assert isinstance(plan, GraphPlan) and plan.output_shape == (1,) and plan.fallbacks == []


@pytest.mark.parametrize("overhead", [0.0, float("inf")])
def test_per_sample_targets_grouped_or_as_their_union(monkeypatch, overhead):
    monkeypatch.setattr(rows_module, "CALL_OVERHEAD_MACS", overhead)  # 0: one call per class; inf: the union
    model = mlp(torch.float64, "cpu")
    x = torch.randn(6, D, dtype=torch.float64)
    target = torch.tensor([3, 1, 3, 0, 1, 4])
    engine = JacobianRows(model)
    outputs, rows = engine(x, parse_target(target, 6, C))
    assert_matches_reference(rows, reference_jacobian(model, x)[torch.arange(6), target], torch.float64)
    assert_matches_reference(outputs, model(x)[torch.arange(6), target], torch.float64)
    assert [key[0] for key in engine._compiled] == ([1] if overhead == 0 else [4])  # rows per call


def test_chunked_integrated_gradients_equal_one_call_and_show_progress(monkeypatch, capsys):
    model = mlp(torch.float64, "cpu")
    x = torch.randn(5, D, dtype=torch.float64)
    whole = explain.integrated_gradients(model, x, None, n_steps=9)
    stepwise = explain.IntegratedGradients(model).attribute(x, target=explain.all_classes, n_steps=9,
                                                            internal_batch_size=5)
    assert_matches_reference(stepwise, whole, torch.float64)
    with pytest.warns(UserWarning, match="internal_batch_size"):
        explain.IntegratedGradients(model).attribute(x, target=explain.all_classes, n_steps=9, internal_batch_size=2)
    # A memory budget of a few rows: chunks that split a step's batch.
    monkeypatch.setattr(budget, "available_bytes", lambda device: 7 * budget.WORKING_COPIES * (C + 2) * D * 8 / budget.MEMORY_FRACTION)
    assert budget.rows_per_call(45, 5, (C + 2) * D * 8, x.device) == 7
    chunked = explain.integrated_gradients(model, x, None, n_steps=9, progress=True)
    assert_matches_reference(chunked, whole, torch.float64)
    assert "integrated gradients" in capsys.readouterr().err
    explain.integrated_gradients(model, x, None, n_steps=9, progress=False)
    assert capsys.readouterr().err == ""


def test_progress_is_quiet_for_short_runs_and_shown_when_the_prediction_is_long(monkeypatch, capsys):
    from jacobian_ext.explain import progress
    bar = progress.Progress(4, "work")
    for _ in range(4):
        bar.update()
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress, "SHOW_AFTER_PREDICTED_S", 0.0)
    bar = progress.Progress(4, "work")
    for _ in range(4):
        bar.update()
    assert "work" in capsys.readouterr().err


BAD_TARGETS = [
    (C, ValueError, "out of range"), (-C - 1, ValueError, "out of range"),
    ([0, 1], ValueError, "needs 3 entries"), (torch.tensor([0.0, 1.0, 2.0]), TypeError, "integer"),
    (torch.tensor([[0, 1, 2]]), ValueError, "1-D"), (torch.tensor([0, 1, 9]), ValueError, "out of range"),
    ([0, 1.5, 2], TypeError, "integer"), (True, TypeError, "integer"), (2.0, TypeError, "integer"),
    ((1, 2), ValueError, "tuple"), (torch.tensor([True, False, True]), TypeError, "integer"),
]


@pytest.mark.parametrize("target, error, message", BAD_TARGETS)
def test_bad_targets_raise_naming_target(target, error, message):
    model = mlp(torch.float32, "cpu")
    x = torch.randn(3, D)
    for attribute in (lambda: explain.saliency(model, x, target),
                      lambda: explain.IntegratedGradients(model).attribute(x, target=target)):
        with pytest.raises(error, match=message) as info:
            attribute()
        assert "target" in str(info.value)
    with pytest.raises(ValueError, match="out of range"):
        explain.saliency(model, x, explain.classes(0, C))
    with pytest.raises(TypeError, match="integer"):
        explain.classes(0, "a")


def test_bad_inputs_raise_clear_errors():
    model = mlp(torch.float32, "cpu")
    x = torch.randn(3, D)
    with pytest.raises(TypeError, match="inputs must be a torch.Tensor"):
        explain.saliency(model, x.tolist())
    with pytest.raises(TypeError, match="floating-point"):
        explain.saliency(model, torch.ones(3, D, dtype=torch.long))
    with pytest.raises(ValueError, match=r"returning \[B, C\]"):
        explain.saliency(lambda v: model(v).sum(1), x)
    with pytest.raises(ValueError, match="method must be one of"):
        explain.integrated_gradients(model, x, method="simpson")
    with pytest.raises(ValueError, match="n_steps must be at least 2"):
        explain.integrated_gradients(model, x, method="riemann_left", n_steps=1)
    with pytest.raises(ValueError, match="baselines must have the shape"):
        explain.integrated_gradients(model, x, baselines=torch.zeros(2, D))
    with pytest.raises(ValueError, match="internal_batch_size"):
        explain.integrated_gradients(model, x, internal_batch_size=0)
    with pytest.raises(ValueError, match="nt_type"):
        explain.smoothgrad(model, x, nt_type="smooth")
    with pytest.raises(TypeError, match="attribution_method"):
        explain.NoiseTunnel(model)
    training = nn.Sequential(nn.Linear(D, H), nn.Dropout(0.5), nn.Linear(H, C))
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"model.eval\(\)"):
        explain.saliency(training, x)
    assert torch.equal(state, torch.get_rng_state())  # no probe ran
    with pytest.raises(ValueError, match=r"model.eval\(\)"):
        explain.Saliency(nn.Sequential(nn.Linear(D, H), nn.BatchNorm1d(H), nn.Linear(H, C))).attribute(x)


def test_integrated_gradients_sum_before_the_leading_affine_layers():
    """A Sequential starting with affine layers has its rows summed over the steps and pulled back through
    them once (prefix.py); a replaced layer is seen on the next call."""
    from jacobian_ext.explain.prefix import split_affine_prefix
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, H), nn.Linear(H, H), nn.Tanh(), nn.Linear(H, C)).double()
    prefix, rest = split_affine_prefix(model)
    assert len(prefix) == 3 and len(rest) == 2
    assert split_affine_prefix(nn.Sequential(nn.Flatten(), nn.ReLU(), nn.Linear(4, 2))) is None  # no weights
    assert split_affine_prefix(nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 2))) is None  # all affine
    assert split_affine_prefix(ResidualMLP()) is None
    x = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    ig = explain.IntegratedGradients(model)
    for target, select in (TARGET_FORMS["all_classes"], TARGET_FORMS["per-sample list"], TARGET_FORMS["int"]):
        assert_matches_reference(ig.attribute(x, target=target, n_steps=5),
                                 reference_integrated_gradients(model, x, torch.zeros(1, 2, 3, 3), "gausslegendre", 5,
                                                                select), torch.float64)
    model[1] = nn.Linear(2 * 3 * 3, H).double()
    model[4] = nn.Linear(H, C + 2).double()  # a new width: the selection head must follow
    assert_matches_reference(ig.attribute(x, target=C + 1, n_steps=5),
                             reference_integrated_gradients(model, x, torch.zeros(1, 2, 3, 3), "gausslegendre", 5,
                                                            lambda j: j[:, C + 1]), torch.float64)
    assert_matches_reference(explain.Saliency(model).attribute(x, target=[0, C + 1, 2], abs=False),
                             reference_jacobian(model, x)[[0, 1, 2], [0, C + 1, 2]], torch.float64)


def test_demo_picture(tmp_path):
    pytest.importorskip("matplotlib")
    from jacobian_ext.explain.demo import draw
    path = tmp_path / "out" / "demo.png"
    draw(str(path), steps=3)  # a short training: this checks the drawing, not the picture
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
