"""Hostile and edge inputs: non-finite values, extreme magnitudes, denormals, degenerate and very large
shapes, unusual layouts, autograd contexts, wrong devices and dtypes, and models changed after
jx.compile. Each case either matches torch.func or fails with a clear error; none is silently wrong."""
import copy

import pytest
import torch
from torch import nn

import jacobian_ext as jx
from conftest import Sin, assert_matches_reference, penalty_gradients, reference_jacobian, single_sample
from error_bound import Reference

MODES = ["auto", "forward", "reverse", "mixed"]
# For the large parametrised grids: auto runs one of the two sweeps (test_properties.py checks that
# its result is exactly that sweep's), so it adds nothing there but time.
SWEEPS = ["forward", "reverse"]
NAN, INF = float("nan"), float("inf")


def forward_reference(model, x):
    """vmap(jacfwd) in float64: its identity seed sits at the input instead of the output."""
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        return torch.func.vmap(torch.func.jacfwd(single_sample(model64)))(x.detach().double())


def assert_same_values(actual, expected, relative=1e-10):
    """NaN where the reference has NaN, the same infinities, and the finite entries close."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape
    assert torch.equal(actual.isnan(), expected.isnan()), (
        f"NaN at {actual.isnan().nonzero().tolist()} but the reference has NaN at {expected.isnan().nonzero().tolist()}")
    infinite = expected.isinf()
    assert torch.equal(actual.isinf(), infinite) and torch.equal(actual[infinite], expected[infinite])
    finite = expected.isfinite()
    if finite.any():
        scale = expected[finite].abs().max().clamp_min(1e-300)
        assert (actual[finite] - expected[finite]).abs().max() <= relative * scale


def mlp(activation=nn.ReLU, head=None, widths=(4, 5, 3)):
    layers = [nn.Linear(widths[0], widths[1]), activation(), nn.Linear(widths[1], widths[2])]
    return nn.Sequential(*layers, *([head] if head is not None else [])).double()


ACTIVATIONS = [nn.ReLU, nn.Tanh, nn.Sigmoid, Sin]
HEADS = [None, nn.Softmax(-1), nn.LogSoftmax(-1)]


# ---- non-finite values ----

@pytest.mark.parametrize("mode", SWEEPS)
@pytest.mark.parametrize("head", HEADS, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=lambda a: a.__name__)
def test_nan_and_inf_inputs_propagate_like_the_reference(activation, head, mode):
    model = mlp(activation, head)
    x = torch.randn(5, 4, dtype=torch.float64)
    x[1, 2], x[2, 0], x[3, 1] = NAN, INF, -INF
    x[4] = INF
    y, jacobian = jx.batch_jacobian(model, x, mode=mode, return_output=True)
    with torch.no_grad():
        assert_same_values(y, model(x))
    assert_same_values(jacobian, reference_jacobian(model, x))


@pytest.mark.parametrize("mode", SWEEPS)
@pytest.mark.parametrize("value", [NAN, -INF])
@pytest.mark.parametrize("layer", [0, 2], ids=["first-layer", "last-layer"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=lambda a: a.__name__)
def test_nan_and_inf_weights_propagate_like_the_reference(activation, layer, value, mode):
    # The reference multiplies its identity seed by the weights (0 * inf = NaN in every row), so the
    # comparison uses the reference whose seed is at the other end: jacrev for a non-finite first
    # layer, jacfwd for a non-finite last layer. Our seeds are lazy and never multiply by zeros.
    model = mlp(activation)
    with torch.no_grad():
        model[layer].weight[1, 2] = value
    x = torch.randn(4, 4, dtype=torch.float64)
    y, jacobian = jx.batch_jacobian(model, x, mode=mode, return_output=True)
    with torch.no_grad():
        assert_same_values(y, model(x))
    expected = reference_jacobian(model, x) if layer == 0 else forward_reference(model, x)
    assert_same_values(jacobian, expected)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("head", HEADS, ids=str)
def test_non_finite_weight_in_the_middle_never_adds_nans(head, mode):
    # Both references spread a middle layer's NaN over whole blocks (identity seed times the weights);
    # ours may be cleaner, but wherever the reference is finite ours must equal it.
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3),
                          *([head] if head is not None else [])).double()
    with torch.no_grad():
        model[2].weight[1, 3] = NAN
    x = torch.randn(3, 4, dtype=torch.float64)
    jacobian = jx.batch_jacobian(model, x, mode=mode)
    for expected in (reference_jacobian(model, x), forward_reference(model, x)):
        finite = expected.isfinite()
        assert torch.allclose(jacobian[finite], expected[finite], rtol=1e-10, atol=1e-12)


# ---- extreme magnitudes ----

@pytest.mark.parametrize("mode", SWEEPS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("scale", [1e-30, 1e4, 1e30], ids=lambda s: f"logits~{s:g}")
@pytest.mark.parametrize("head", [nn.Softmax(-1), nn.LogSoftmax(-1), nn.Tanh(), nn.Sigmoid()], ids=str)
def test_huge_and_tiny_logits_stay_stable(head, scale, dtype, mode):
    model = nn.Sequential(nn.Linear(4, 6), head).to(dtype)
    with torch.no_grad():
        model[0].weight.mul_(scale)
        model[0].bias.mul_(scale)
    x = torch.randn(5, 4, dtype=dtype)
    y, jacobian = jx.batch_jacobian(model, x, mode=mode, return_output=True)
    assert y.isfinite().all() and jacobian.isfinite().all()
    Reference(model, x).check(y, jacobian, f"{head} at {scale:g}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_denormal_inputs_and_weights(dtype, mode):
    tiny = torch.finfo(dtype).tiny  # smallest normal; tiny / 2**k for k >= 1 are denormals
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3),
                          nn.Softmax(-1)).to(dtype)
    with torch.no_grad():
        model[2].weight[:2] = tiny / 8  # denormal weights
        model[4].weight.mul_(tiny * 2**10)
    x = torch.randn(6, 4, dtype=dtype).clamp(-3.9, 3.9) * (tiny / 4)  # below tiny: |randn| < 4
    x[0] = tiny / 2**20  # deep in the denormal range
    assert (x.abs() < tiny).all()
    y, jacobian = jx.batch_jacobian(model, x, mode=mode, return_output=True)
    Reference(model, x).check(y, jacobian, "denormal")


# ---- degenerate and large shapes ----

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layers, in_features", [
    ([nn.Linear(5, 0)], 5),
    ([nn.Linear(5, 0), nn.ReLU()], 5),
    ([nn.Linear(0, 3), nn.Tanh()], 0),
    ([nn.Linear(5, 0), nn.Linear(0, 3), nn.Softmax(-1)], 5),
    ([nn.Linear(5, 0), Sin(), nn.Linear(0, 3)], 5),
], ids=["to-zero", "to-zero-relu", "from-zero", "through-zero", "through-zero-fallback"])
def test_zero_width_layers(layers, in_features, mode):
    model = nn.Sequential(*layers).double()
    x = torch.randn(3, in_features, dtype=torch.float64)
    y, jacobian = jx.batch_jacobian(model, x, mode=mode, return_output=True)
    with torch.no_grad():
        assert_matches_reference(y, model(x), torch.float64)
    assert_matches_reference(jacobian, reference_jacobian(model, x), torch.float64)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model", [
    nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.Softmax(-1)),
    nn.Sequential(nn.Linear(4, 5), Sin(), nn.Linear(5, 3)),
    nn.Sequential(nn.Flatten(), nn.Linear(12, 2)),
], ids=["native", "mixed", "flatten"])
def test_empty_batch(model, mode):
    model = model.double()
    in_shape = (3, 4) if isinstance(model[0], nn.Flatten) else (4,)
    x = torch.randn(0, *in_shape, dtype=torch.float64)
    for jm in (jx.compile(model, mode=mode), lambda t: jx.batch_jacobian(model, t, mode=mode, return_output=True)):
        y, jacobian = jm(x)
        out = model(torch.zeros(1, *in_shape, dtype=torch.float64)).shape[1:]
        assert y.shape == (0, *out) and jacobian.shape == (0, *out, *in_shape)


@pytest.mark.parametrize("mode", SWEEPS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layers", [
    [nn.Linear(1, 1)], [nn.Linear(1, 1), nn.ReLU()], [nn.Linear(1, 1, bias=False), nn.Sigmoid(), nn.Linear(1, 1)],
    [nn.Linear(1, 1), nn.Softmax(-1)], [nn.Linear(1, 1), nn.LogSoftmax(-1)], [nn.Tanh()], [Sin()],
], ids=["linear", "relu", "sigmoid", "softmax", "log_softmax", "tanh-only", "fallback-only"])
def test_one_feature(layers, dtype, mode):
    model = nn.Sequential(*layers).to(dtype)
    x = torch.randn(4, 1, dtype=dtype)
    y, jacobian = jx.batch_jacobian(model, x, mode=mode, return_output=True)
    assert jacobian.shape == (4, 1, 1)
    Reference(model, x).check(y, jacobian, "one feature")


@pytest.mark.parametrize("mode", MODES)
def test_very_wide_input(mode):
    model = nn.Sequential(nn.Linear(100_000, 8), nn.ReLU(), nn.Linear(8, 3), nn.LogSoftmax(-1))
    x = torch.randn(2, 100_000)
    y, jacobian = jx.batch_jacobian(model, x, mode=mode, return_output=True)
    assert jacobian.shape == (2, 3, 100_000)
    assert_matches_reference(jacobian, reference_jacobian(model, x), torch.float32)
    assert_matches_reference(y, model(x), torch.float32)


@pytest.mark.parametrize("mode, head", [(mode, None) for mode in MODES] + [("auto", nn.Softmax(-1)),
                                                                          ("forward", nn.Softmax(-1))])
def test_very_tall_output(mode, head):
    # (A reverse sweep through a 10,000-way softmax is [B, C, C] by nature; auto picks forward there.)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 10_000), *([head] if head else []))
    x = torch.randn(2, 3)
    y, jacobian = jx.batch_jacobian(model, x, mode=mode, return_output=True)
    assert jacobian.shape == (2, 10_000, 3)
    assert_matches_reference(jacobian, forward_reference(model, x), torch.float32)
    assert_matches_reference(y, model(x), torch.float32)


# ---- layouts ----

def transposed(x):
    return x.t().contiguous().t()


def expanded(x):
    return x[:1].expand(x.shape[0], *x.shape[1:])


def channels_last(x):
    return x.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("mode", SWEEPS)
@pytest.mark.parametrize("layout, rank", [
    (transposed, 2), (expanded, 2), (expanded, 4), (channels_last, 4), (lambda x: x[:, :, ::2], 3),
], ids=["transposed", "expanded", "expanded-4d", "channels-last", "strided-3d"])
@pytest.mark.parametrize("fallback", [False, True], ids=["native", "mixed"])
def test_unusual_input_layouts(layout, rank, fallback, mode):
    shape = {2: (5, 6), 3: (5, 4, 6), 4: (5, 2, 3, 2)}[rank]
    x = layout(torch.randn(*shape, dtype=torch.float64))
    if layout is not transposed:
        assert not x.is_contiguous()
    in_features = x[0].numel()
    model = nn.Sequential(nn.Flatten(), nn.Linear(in_features, 7), nn.Tanh(), *([Sin()] if fallback else []),
                          nn.Linear(7, 3), nn.Softmax(-1)).double()
    y, jacobian = jx.batch_jacobian(model, x, mode=mode, return_output=True)
    assert jacobian.shape == (5, 3, *x.shape[1:])
    assert_matches_reference(y, model(x), torch.float64)
    assert_matches_reference(jacobian, reference_jacobian(model, x), torch.float64)


# ---- autograd contexts ----

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fallback", [False, True], ids=["native", "mixed"])
def test_input_requiring_grad(fallback, mode):
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), *([Sin()] if fallback else []), nn.Linear(5, 3)).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y, jacobian = jx.batch_jacobian(model, x, mode=mode, return_output=True)
    assert_matches_reference(jacobian, reference_jacobian(model, x), torch.float64)
    assert_matches_reference(y, model(x), torch.float64)
    assert x.grad is None
    jacobian.sum().backward()  # differentiable: torch.func's gradient (tests/test_deploy.py has more)
    expected_x_grad, _ = penalty_gradients(model, x, torch.sum)
    assert_matches_reference(x.grad, expected_x_grad, torch.float64)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
@pytest.mark.parametrize("fallback", [False, True], ids=["native", "mixed"])
def test_inside_no_grad_and_inference_mode(context, fallback, mode):
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), *([Sin()] if fallback else []), nn.Linear(5, 3),
                          nn.LogSoftmax(-1)).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    jm = jx.compile(model, mode=mode)
    with context():
        y, jacobian = jm(x)
        again = jx.batch_jacobian(model, x, mode=mode)
    assert torch.equal(jacobian, again)
    assert_matches_reference(jacobian, reference_jacobian(model, x), torch.float64)
    assert_matches_reference(y, model(x), torch.float64)


# ---- wrong devices and dtypes ----

def test_meta_device_is_a_clear_error():
    model = mlp().to("meta")
    with pytest.raises(ValueError, match="meta device"):
        jx.batch_jacobian(model, torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="meta device"):
        jx.batch_jacobian(model, torch.randn(2, 4, dtype=torch.float64, device="meta"))
    with pytest.raises(ValueError, match="meta device"):
        jx.batch_jacobian(nn.Sequential(Sin()), torch.randn(2, 4, device="meta"))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64,
                                   torch.complex128])
def test_non_floating_inputs_are_a_clear_error(dtype):
    x = torch.ones(2, 4, dtype=dtype)
    with pytest.raises(TypeError, match=rf"floating-point tensor .*got dtype {dtype}"):
        jx.batch_jacobian(mlp(), x)


def test_complex_model_is_a_clear_error():
    with pytest.raises(ValueError, match=r"layer '0' .*ComplexDouble"):
        jx.batch_jacobian(mlp().to(torch.complex128), torch.randn(2, 4, dtype=torch.float64))


# ---- models changed after jx.compile ----

@pytest.mark.parametrize("mode", MODES)
def test_weights_changed_in_place_are_seen(mode):
    model = mlp(nn.Tanh, nn.Softmax(-1))
    jm = jx.compile(model, mode=mode)
    x = torch.randn(4, 4, dtype=torch.float64)
    before = jm(x)[1]
    with torch.no_grad():
        model[0].weight.mul_(-2)
        model[2].bias.add_(1)
    after = jm(x)[1]
    assert not torch.allclose(before, after)
    assert_matches_reference(after, reference_jacobian(model, x), torch.float64)


@pytest.mark.parametrize("mode", MODES)
def test_parameters_replaced_by_other_shapes_are_replanned(mode):
    model = mlp(nn.ReLU, nn.LogSoftmax(-1))
    jm = jx.compile(model, mode=mode)
    x = torch.randn(4, 4, dtype=torch.float64)
    jm(x)
    model[0].weight = nn.Parameter(torch.randn(9, 4, dtype=torch.float64))
    model[0].bias = nn.Parameter(torch.randn(9, dtype=torch.float64))
    model[2].weight = nn.Parameter(torch.randn(3, 9, dtype=torch.float64))
    y, jacobian = jm(x)
    assert_matches_reference(jacobian, reference_jacobian(model, x), torch.float64)
    assert_matches_reference(y, model(x), torch.float64)
    # An inconsistent replacement is the model's own error, reported with the layer's name.
    model[2].weight = nn.Parameter(torch.randn(3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"layer '2' .*expects 5 input features.* has 9"):
        jm(x)
    # A parameter of another dtype is caught as when planning afresh.
    model[2].weight = nn.Parameter(torch.randn(3, 9))
    with pytest.raises(TypeError, match=r"'2.weight' has dtype torch.float32"):
        jm(x)


class FunctionalBlock(nn.Module):
    """Traced into (its forward is not a torch layer's): its tensors are get_attr nodes of the graph."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 4, dtype=torch.float64))
        self.register_buffer("scale", torch.rand(5, dtype=torch.float64) + 0.5)

    def forward(self, x):
        return torch.tanh(nn.functional.linear(x, self.weight)) * self.scale


@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("model_of", [
    lambda: nn.Linear(4, 3).double(),  # the captured root is the Linear itself: F.linear on its own weight
    lambda: nn.Sequential(FunctionalBlock(), nn.Linear(5, 3).double()),
], ids=["linear_root", "traced_block"])
def test_parameters_and_buffers_replaced_by_new_tensors_of_the_same_shape_are_read(model_of, mode):
    model = model_of()
    jm = jx.compile(model, mode=mode)
    x = torch.randn(3, 4, dtype=torch.float64)
    before = jm(x)[1]
    replaced = {name: torch.randn_like(tensor) for name, tensor in model.state_dict().items()}
    model.load_state_dict(replaced, assign=True)  # new tensor objects, same layout: no replanning
    after = jm(x)[1]
    assert not torch.allclose(before, after)
    assert_matches_reference(after, reference_jacobian(model, x), torch.float64)
    first = next(iter(dict(model.named_parameters())))
    owner, _, name = first.rpartition(".")
    setattr(model.get_submodule(owner), name, nn.Parameter(torch.ones_like(model.get_parameter(first))))
    assert_matches_reference(jm(x)[1], reference_jacobian(model, x), torch.float64)


@pytest.mark.parametrize("mode", MODES)
def test_parameter_data_of_another_shape_and_a_plain_tensor_weight_are_seen(mode):
    model = mlp(nn.Tanh, nn.Softmax(-1))
    jm = jx.compile(model, mode=mode)
    x = torch.randn(4, 4, dtype=torch.float64)
    jm(x)
    with torch.no_grad():  # the same Parameter objects, new storage of other shapes
        model[0].weight.data = torch.randn(6, 4, dtype=torch.float64)
        model[0].bias.data = torch.randn(6, dtype=torch.float64)
        model[2].weight.data = torch.randn(3, 6, dtype=torch.float64)
    assert_matches_reference(jm(x)[1], reference_jacobian(model, x), torch.float64)
    # A weight that is no longer a registered parameter (a plain tensor attribute) is read as one.
    weight = model[2].weight.detach() * 2
    del model[2].weight
    model[2].weight = weight
    assert_matches_reference(jm(x)[1], reference_jacobian(model, x), torch.float64)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("replacement, native", [
    (nn.Tanh(), True), (Sin(), False), (nn.Sequential(nn.Sigmoid(), nn.Identity()), True),
], ids=["native", "fallback", "nested"])
def test_swapped_layers_are_replanned(replacement, native, mode):
    model = nn.Sequential(nn.Linear(4, 5), nn.Sequential(nn.Linear(5, 5), nn.ReLU()), nn.Linear(5, 3)).double()
    jm = jx.compile(model, mode=mode)
    x = torch.randn(4, 4, dtype=torch.float64)
    jm(x)
    model[1][1] = replacement.double()  # a layer inside a nested Sequential
    y, jacobian = jm(x)
    assert_matches_reference(jacobian, reference_jacobian(model, x), torch.float64)
    assert_matches_reference(y, model(x), torch.float64)
    assert jm.fallbacks == ([] if native else ["1.1"])


def test_swapped_in_training_mode_batchnorm_is_refused():
    model = mlp()
    jm = jx.compile(model)
    x = torch.randn(4, 4, dtype=torch.float64)
    jm(x)
    model[1] = nn.BatchNorm1d(5).double()
    with pytest.raises(ValueError, match=r"layer '1' \(BatchNorm1d\) is in training mode"):
        jm(x)
    model.eval()
    assert_matches_reference(jm(x)[1], reference_jacobian(model, x), torch.float64)
