"""explain.LayerIntegratedGradients and LayerGradientXActivation against Captum's in float64 (to 1e-9):
attributions to an nn.Embedding's output of a text model fed integer token ids, and to a hidden layer of an
MLP; every target form, baselines, additional_forward_args, internal_batch_size, deltas; hooks removed."""
import pytest
import torch
from captum_checks import assert_close, quiet_captum  # noqa: F401  (quiet_captum: autouse)
from torch import nn

from jacobian_ext import explain

captum_attr = pytest.importorskip("captum.attr")
VOCABULARY, WIDTH, C = 30, 6, 4


class TextModel(nn.Module):
    """Token ids [B, T] -> class scores [B, C]; an optional per-sample mask [B, T] as an extra argument."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCABULARY, WIDTH)
        self.mix = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, C)

    def forward(self, ids, mask=None, temperature=1.0):
        hidden = torch.tanh(self.mix(self.embedding(ids)))
        weights = torch.ones(ids.shape, dtype=hidden.dtype) if mask is None else mask
        pooled = (hidden * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True)
        return torch.softmax(self.head(pooled) / temperature, dim=1)


def text_case(batch):
    model = TextModel().double()
    ids = torch.randint(1, VOCABULARY, (batch, 5))
    return model, ids


def both(name, model, layer, **kwargs):
    return getattr(explain, name)(model, layer, **kwargs), getattr(captum_attr, name)(model, layer, **kwargs)


def targets(batch):
    return [2, [b % C for b in range(batch)], torch.arange(batch) % C]


@pytest.mark.parametrize("batch", [1, 3])
def test_layer_integrated_gradients_on_an_embedding(batch):
    model, ids = text_case(batch)
    mask = torch.rand(batch, 5, dtype=torch.float64) + 0.5
    for target in targets(batch):
        for kwargs in (dict(), dict(baselines=0, method="riemann_trapezoid", n_steps=9),
                       dict(baselines=torch.zeros(1, 5, dtype=torch.long), n_steps=6, internal_batch_size=2 * batch),
                       dict(additional_forward_args=(mask, 0.5), n_steps=5)):
            for multiply in (True, False):
                ours, theirs = both("LayerIntegratedGradients", model, model.embedding, multiply_by_inputs=multiply)
                mine, delta = ours.attribute(ids, target=target, return_convergence_delta=True, **kwargs)
                expected, expected_delta = theirs.attribute(ids, target=target, return_convergence_delta=True, **kwargs)
                assert_close(mine, expected)
                assert_close(delta, expected_delta, scale=expected.abs().sum().item() + 1.0)


@pytest.mark.parametrize("batch", [1, 3])
def test_layer_gradient_x_activation(batch):
    model, ids = text_case(batch)
    for target in targets(batch):
        for layer in (model.embedding, model.mix):
            for multiply in (True, False):
                ours, theirs = both("LayerGradientXActivation", model, layer, multiply_by_inputs=multiply)
                assert_close(ours.attribute(ids, target=target), theirs.attribute(ids, target=target))


def test_layer_attributions_of_a_hidden_layer_with_tuple_inputs():
    first, second = nn.Linear(3, 5).double(), nn.Linear(5, C).double()
    model = lambda a, b: second(torch.relu(first(a * b)))  # noqa: E731
    inputs = (torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64))
    ours, theirs = both("LayerIntegratedGradients", model, first)
    assert_close(ours.attribute(inputs, baselines=(0.0, 1.0), target=[0, 1, 2, 3], n_steps=8),
                 theirs.attribute(inputs, baselines=(0.0, 1.0), target=[0, 1, 2, 3], n_steps=8))
    every = ours.attribute(inputs, target=explain.all_classes, n_steps=8)
    assert every.shape == (4, C, 5)
    assert_close(every[:, 2], theirs.attribute(inputs, target=2, n_steps=8))


class Pair(nn.Module):
    def forward(self, a, b):
        return torch.relu(a), torch.tanh(b)


class PairModel(nn.Module):
    """A layer returning a tuple of tensors: attributions are a tuple too."""

    def __init__(self):
        super().__init__()
        self.left, self.right, self.pair, self.head = nn.Linear(3, 4), nn.Linear(3, 2), Pair(), nn.Linear(6, C)

    def forward(self, x):
        a, b = self.pair(self.left(x), self.right(x))
        return self.head(torch.cat([a * b.sum(1, keepdim=True), b], dim=1))


def test_a_layer_returning_a_tuple():
    model = PairModel().double()
    x = torch.randn(3, 3, dtype=torch.float64)
    for target in (1, [0, 3, 2]):
        ours, theirs = both("LayerIntegratedGradients", model, model.pair)
        mine, delta = ours.attribute(x, baselines=0.5, target=target, n_steps=7, return_convergence_delta=True)
        expected, expected_delta = theirs.attribute(x, baselines=0.5, target=target, n_steps=7,
                                                    return_convergence_delta=True)
        assert_close(mine, expected)
        assert_close(delta, expected_delta, scale=sum(e.abs().sum().item() for e in expected))
        assert_close(*(m.attribute(x, target=target) for m in both("LayerGradientXActivation", model, model.pair)))


def test_a_list_of_layers():
    """LayerIntegratedGradients interpolates every layer's output at once (so layers in sequence cut each
    other off: Captum raises there, ours gives the upstream one zeros), LayerGradientXActivation takes each
    layer's full gradient; both as Captum."""
    model, ids = text_case(3)
    pair_model, x = PairModel().double(), torch.randn(3, 3, dtype=torch.float64)
    cases = [("LayerGradientXActivation", model, ids, [model.embedding, model.mix], {}),
             ("LayerGradientXActivation", model, ids, [model.mix, model.embedding], {}),
             ("LayerGradientXActivation", pair_model, x, [pair_model.pair, pair_model.left], {}),
             ("LayerIntegratedGradients", model, ids, [model.mix], dict(n_steps=5, baselines=0)),
             ("LayerIntegratedGradients", pair_model, x, [pair_model.left, pair_model.right], dict(n_steps=5))]
    for name, net, inputs, layers, kwargs in cases:
        ours, theirs = both(name, net, layers)
        mine, expected = ours.attribute(inputs, target=[0, 2, 1], **kwargs), theirs.attribute(inputs, target=[0, 2, 1],
                                                                                                 **kwargs)
        assert isinstance(mine, list) and len(mine) == len(expected)
        for m, e in zip(mine, expected):
            assert_close(m, e)
    cut_off = explain.LayerIntegratedGradients(model, [model.embedding, model.mix]).attribute(ids, target=0, n_steps=3)
    assert cut_off[0].abs().max() == 0


def test_attribute_to_layer_input():
    model, x = PairModel().double(), torch.randn(3, 3, dtype=torch.float64)
    # left's input is the model's input, which right reads too: LayerGradientXActivation's gradient is with
    # respect to that tensor (through both), as Captum's; LayerIntegratedGradients replaces it for left only.
    for name, layers, kwargs in (("LayerGradientXActivation", model.pair, {}),
                                 ("LayerGradientXActivation", [model.pair, model.left], {}),
                                 ("LayerIntegratedGradients", model.pair, dict(n_steps=6, baselines=0.2)),
                                 ("LayerIntegratedGradients", model.left, dict(n_steps=6))):
        ours, theirs = both(name, model, layers)
        assert_close(*(m.attribute(x, target=[1, 0, 3], attribute_to_layer_input=True, **kwargs)
                       for m in (ours, theirs)))
    fresh = x.detach().clone()
    explain.LayerGradientXActivation(model, model.left).attribute(fresh, target=0, attribute_to_layer_input=True)
    assert not fresh.requires_grad  # the flag set on the input for its gradient is undone (Captum leaves it)


def test_layer_errors_and_hooks_removed():
    model, ids = text_case(2)
    with pytest.raises(TypeError, match="non-empty list"):
        explain.LayerIntegratedGradients(model, [])
    for method in (explain.LayerIntegratedGradients(model, model.embedding),
                   explain.LayerGradientXActivation(model, model.embedding)):
        with pytest.raises(AssertionError, match="target=None needs a model with one output"):
            method.attribute(ids)
        with pytest.raises(ValueError, match="out of range"):
            method.attribute(ids, target=C)
        with pytest.raises(NotImplementedError, match="attribute_future"):
            method.attribute_future()
    with pytest.raises(ValueError, match="did not run"):
        explain.LayerGradientXActivation(model, nn.Linear(2, 2)).attribute(ids, target=0)
    shared = nn.Linear(4, 4).double()
    reused = lambda v: shared(torch.tanh(shared(v)))  # noqa: E731
    with pytest.raises(NotImplementedError, match="more than once"):
        explain.LayerIntegratedGradients(reused, shared).attribute(torch.randn(2, 4, dtype=torch.float64), target=0)
    for module in (*model.modules(), shared):
        assert not module._forward_hooks
