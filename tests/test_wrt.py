"""Jacobians with respect to a layer's output: jx.batch_jacobian(model, x, wrt=module or name), against
torch.func in float64 (jacrev of the model with the layer's output replaced by a forward hook)."""
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import jacobian_ext as jx
from conftest import DTYPES, assert_matches_reference, non_contiguous

MODES = ["auto", "forward", "reverse"]


def layer_reference(model, x, layer_name: str):
    """(y, d model(x) / d layer output) per sample with torch.func.jacrev, in float64: the model is run with
    the layer's output replaced by the differentiated value through a forward hook."""
    model64 = copy.deepcopy(model).double()
    x64 = x.double() if x.is_floating_point() else x
    layer = model64.get_submodule(layer_name)
    recorded = []
    handle = layer.register_forward_hook(lambda module, args, output: recorded.append(output))
    with torch.no_grad():
        y = model64(x64)
    handle.remove()
    (activation,) = recorded

    def output_at(sample_x, value):
        handle = layer.register_forward_hook(lambda module, args, output: value.unsqueeze(0))
        try:
            return model64(sample_x.unsqueeze(0)).squeeze(0)
        finally:
            handle.remove()

    rows = [torch.func.jacrev(lambda v: output_at(x64[b], v))(activation[b]) for b in range(x.shape[0])]
    jacobian = torch.stack(rows) if rows else y.new_zeros(0, *y.shape[1:], *activation.shape[1:])
    return y, jacobian


class TextClassifier(nn.Module):
    """Token ids -> embedding -> transformer encoder layer -> mean over tokens -> MLP head."""

    def __init__(self, vocabulary=30, width=8, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.position = nn.Parameter(torch.randn(1, 5, width) * 0.1)
        self.encoder = nn.TransformerEncoderLayer(width, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Sequential(nn.Linear(width, 6), nn.Tanh(), nn.Linear(6, classes))

    def forward(self, ids):
        h = self.embed(ids) + self.position[:, :ids.shape[1]]
        return self.head(self.encoder(h).mean(1))


class SkipAround(nn.Module):
    """x also reaches the output around the layer (a per-sample constant for d y / d inner), and a ReLU
    mask that the layer's output does not control."""

    def __init__(self, width=5, classes=4):
        super().__init__()
        self.inner = nn.Linear(width, 7)
        self.back = nn.Linear(7, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = torch.tanh(self.back(F.relu(self.inner(x)))) + x * x.sigmoid()
        return self.head(h)


class Convolutional(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2),
                                      nn.ReLU())
        self.head = nn.Linear(4 * 3 * 3, classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def _ids(batch):
    return torch.randint(0, 30, (batch, 5))


CASES = {
    # name: (model factory, input factory, layer path)
    "text/embed": (TextClassifier, _ids, "embed"),
    "text/encoder": (TextClassifier, _ids, "encoder"),
    "text/head.0": (TextClassifier, _ids, "head.0"),
    "skip/inner": (SkipAround, lambda b: torch.randn(b, 5), "inner"),
    "skip/back": (SkipAround, lambda b: torch.randn(b, 5), "back"),
    "conv/features.0": (Convolutional, lambda b: torch.randn(b, 2, 8, 8), "features.0"),
    "conv/features.2": (Convolutional, lambda b: torch.randn(b, 2, 8, 8), "features.2"),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [0, 1, 3])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_torch_func(case, batch, mode, dtype):
    make_model, make_input, path = CASES[case]
    model = make_model().to(dtype).eval()
    x = make_input(batch)
    x = x.to(dtype) if x.is_floating_point() else x
    expected_y, expected = layer_reference(model, x, path)
    y, jacobian = jx.batch_jacobian(model, x, mode=mode, wrt=path, return_output=True)
    assert jacobian.dtype == dtype and y.dtype == dtype
    assert_matches_reference(y, expected_y, dtype)
    assert_matches_reference(jacobian, expected, dtype)


def test_module_and_name_agree_and_the_plan_is_kept():
    model = TextClassifier().double().eval()
    ids = _ids(4)
    by_module = jx.batch_jacobian(model, ids, wrt=model.embed)
    by_name = jx.batch_jacobian(model, ids, wrt="embed")
    assert by_module.shape == (4, 3, 5, 8)
    torch.testing.assert_close(by_module, by_name, rtol=0, atol=0)
    jm = jx.compile(model, wrt=model.embed)
    jm(ids)
    assert jm.fallbacks == [] and jm(ids)[1].shape == (4, 3, 5, 8)
    assert "wrt=" in repr(jm) and "plan for per-sample input [5, 8]" in repr(jm)
    ids[0, 0] = (ids[0, 0] + 1) % 30  # new values, same plan
    torch.testing.assert_close(jm(ids)[1], layer_reference(model, ids, "embed")[1])


def test_non_contiguous_input_and_a_replaced_layer():
    model = SkipAround().double().eval()
    x = non_contiguous(torch.randn(3, 5, dtype=torch.float64))
    jm = jx.compile(model, wrt="back")
    assert_matches_reference(jm(x)[1], layer_reference(model, x, "back")[1], torch.float64)
    model.back = nn.Linear(7, 5).double()  # a new object under the name: the plan is rebuilt for it
    assert_matches_reference(jm(x)[1], layer_reference(model, x, "back")[1], torch.float64)


def test_saturated_softmax_head():
    """A softmax head whose logits saturate (one class near probability 1), in every mode. torch.func's own
    softmax rule cancels there (1 - s_m), so the reference is the analytic (diag(s) - s s^T) W written
    through the other classes' probabilities; each row within 1e-12 of that row's |terms|."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3), nn.Softmax(dim=1)).double().eval()
    with torch.no_grad():
        model[1].bias.copy_(torch.tensor([40.0, 0.0, -3.0]))
    x = torch.randn(3, 4, dtype=torch.float64)
    with torch.no_grad():
        s = model(x)
        coupling = torch.diag_embed(s) - s.unsqueeze(2) * s.unsqueeze(1)
        dominant = s.argmax(1)
        for b, m in enumerate(dominant.tolist()):
            coupling[b, m, m] = s[b, m] * torch.cat([s[b, :m], s[b, m + 1:]]).sum()  # s_m (1 - s_m), no cancelling
        weight = model[1].weight
        expected = coupling @ weight
        row_scale = (coupling.abs() @ weight.abs()).amax(2, keepdim=True)
    for mode in MODES:
        jacobian = jx.batch_jacobian(model, x, mode=mode, wrt="0")
        assert ((jacobian - expected).abs() <= 1e-12 * row_scale).all(), mode

def test_an_output_that_ignores_the_layer_has_a_zero_jacobian():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.aux, self.main = nn.Linear(3, 2), nn.Linear(3, 4)

        def forward(self, x):
            self.aux(x)
            return self.main(x)

    jacobian = jx.batch_jacobian(Unused().double(), torch.randn(2, 3, dtype=torch.float64), wrt="aux")
    assert jacobian.shape == (2, 4, 2) and not jacobian.any()


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(3, 3)

    def forward(self, x):
        return self.shared(self.shared(x))


class ReturnsTuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0][:, -1]


class SplitsBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x):
        return self.linear(x).sum(0, keepdim=True).expand(x.shape[0], 2)


@pytest.mark.parametrize("model, wrt, error, match", [
    (lambda: nn.Sequential(nn.Linear(3, 2)), 5, TypeError, "wrt must be a submodule"),
    (lambda: nn.Sequential(nn.Linear(3, 2)), "missing", ValueError, "no submodule named 'missing'"),
    (lambda: nn.Sequential(nn.Linear(3, 2)), nn.Linear(3, 2), ValueError, "is not a submodule"),
    (lambda: Twice(), "shared", NotImplementedError, "runs 2 times"),
    (lambda: ReturnsTuple(), "rnn", NotImplementedError, "returns a tuple"),
    (lambda: SplitsBatch(), "linear", NotImplementedError, "batch dimension"),
])
def test_bad_wrt_raises_a_clear_error(model, wrt, error, match):
    with pytest.raises(error, match=match):
        jx.batch_jacobian(model(), torch.randn(2, 2, 3) if isinstance(model(), ReturnsTuple) else torch.randn(2, 3),
                          wrt=wrt)


def test_the_model_itself_is_not_a_layer():
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="the model itself"):
        jx.batch_jacobian(model, torch.randn(2, 3), wrt=model)


def test_bad_inputs_raise():
    model = TextClassifier()
    with pytest.raises(NotImplementedError, match="one input tensor"):
        jx.batch_jacobian(model, (_ids(2),), wrt="embed")
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        jx.compile(model, wrt="embed")([[1, 2, 3, 4, 5]])
    with pytest.raises(ValueError, match="batch dimension"):
        jx.batch_jacobian(model, torch.tensor(3), wrt="embed")


def test_integer_inputs_without_wrt_still_raise():
    with pytest.raises(TypeError, match="floating-point"):
        jx.batch_jacobian(TextClassifier(), _ids(2))


def test_export_says_it_runs_eagerly():
    model = SkipAround().eval()
    jm = jx.compile(model, wrt="inner")
    with pytest.raises(Exception, match="runs eagerly"):
        torch.export.export(jm, (torch.randn(2, 5),), strict=False)
