"""Several inputs and structured outputs (jacobian_ext/structured.py) against torch.func.jacrev(argnums=...)
in float64: tuple and list inputs, tuple / list / dict / nested outputs, argnums as an int, a tuple or
negative, both sweeps, float32, B = 0 and 1, non-contiguous inputs, and clear errors."""
import copy
import io

import pytest
import torch
from torch import nn
from torch.func import jacrev, vmap
from torch.utils import _pytree as pytree

import jacobian_ext as jx
from conftest import assert_matches_reference
from jacobian_ext.structured import _CACHE_ATTRIBUTE

DOUBLE = torch.float64


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Conv1d(2, 2, 3, padding=1)

    def forward(self, x, y):  # x [B, 3], y [B, 2, 4]
        h = torch.tanh(self.a(x) + self.b(y).sum(1))
        return {"h": h, "pair": (h.sum(-1, keepdim=True) * 2, [torch.relu(self.b(y))])}


def reference(model, inputs, argnums):
    def single(*samples):
        output = model(*(s.unsqueeze(0) for s in samples))
        return pytree.tree_map(lambda t: t.squeeze(0), output)

    return vmap(jacrev(single, argnums=argnums))(*inputs)


def assert_same_structure(actual, expected, dtype):
    actual_leaves, actual_spec = pytree.tree_flatten(actual)
    expected_leaves, expected_spec = pytree.tree_flatten(expected)
    assert actual_spec == expected_spec, (actual_spec, expected_spec)
    for got, want in zip(actual_leaves, expected_leaves):
        assert_matches_reference(got, want, dtype)


def inputs(batch, dtype=DOUBLE):
    return torch.randn(batch, 3, dtype=dtype), torch.randn(batch, 4, 2, dtype=dtype).transpose(1, 2)  # y not contiguous


@pytest.mark.parametrize("mode", ["auto", "forward", "reverse"])
@pytest.mark.parametrize("argnums", [None, 0, 1, -1, (1, 0), (0,)])
def test_several_inputs_and_a_nested_output_match_jacrev(mode, argnums):
    torch.manual_seed(0)
    model = TwoInputs().double().eval()
    x, y = inputs(3)
    J = jx.batch_jacobian(model, (x, y), mode=mode, argnums=argnums)
    assert_same_structure(J, reference(model, (x, y), (0, 1) if argnums is None else argnums), DOUBLE)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_inputs_without_a_feature_axis_through_an_activation_and_a_sum(mode):
    """x [B] (one number per sample) through tanh(x) + x: the chain executor returns a 0-d sample's activation
    as [B, 1], which the add once broadcast against [B] into [B, B] (a ValueError from the graph program)."""
    torch.manual_seed(1)
    x, y = torch.randn(4, dtype=DOUBLE), torch.randn(4, 3, dtype=DOUBLE)

    def model(x, y):
        return torch.tanh(x) + x * y.sum(1)

    J = jx.batch_jacobian(model, (x, y), mode=mode)
    assert_same_structure(J, reference(model, (x, y), (0, 1)), DOUBLE)


def test_output_values_and_float32_and_a_list_of_inputs():
    torch.manual_seed(1)
    model = TwoInputs().eval()
    x, y = inputs(2, torch.float32)
    output, J = jx.batch_jacobian(model, [x, y], return_output=True)
    with torch.no_grad():
        assert_same_structure(output, model(x, y), torch.float32)
    assert_same_structure(J, reference(model.double(), (x.double(), y.double()), (0, 1)), torch.float32)


@pytest.mark.parametrize("batch", [0, 1])
def test_empty_and_single_batches(batch):
    model = TwoInputs().double().eval()
    x, y = inputs(batch)
    J = jx.batch_jacobian(model, (x, y), argnums=1)
    assert J["h"].shape == (batch, 4, 2, 4) and J["pair"][0].shape == (batch, 1, 2, 4)
    if batch:
        assert_same_structure(J, reference(model, (x, y), 1), DOUBLE)


def test_one_input_and_a_tuple_output_gives_a_tuple_of_jacobians_and_stays_native():
    torch.manual_seed(2)
    mlp = nn.Sequential(nn.Linear(5, 6), nn.Tanh()).double()
    model = lambda t: (mlp(t), torch.relu(mlp(t)) * 3.0)  # noqa: E731
    x = torch.randn(4, 5, dtype=DOUBLE)
    for _ in range(2):  # the second call takes the remembered structured path
        J = jx.batch_jacobian(model, x)
        assert isinstance(J, tuple) and len(J) == 2
        assert_same_structure(J, reference(model, (x,), 0), DOUBLE)
    (packed, _, _), = model.__dict__[_CACHE_ATTRIBUTE].values()
    jm = jx.compile(packed)
    jm(torch.randn(2, 5, dtype=DOUBLE))
    assert jm.fallbacks == []
    assert jm._last["plan"].native_program() is not None  # slices and the concatenation: one op call


def test_jx_compile_of_a_structured_output_points_to_batch_jacobian():
    model = TwoInputs().double()
    with pytest.raises(TypeError, match="jx.batch_jacobian"):
        jx.compile(lambda t: (t * 2, t + 1))(torch.randn(2, 3))
    with pytest.raises(TypeError, match="2 required inputs"):
        jx.compile(model)(torch.randn(2, 3, dtype=DOUBLE))


@pytest.mark.parametrize("x, argnums, error, message", [
    (lambda: (), None, ValueError, "at least one input"),
    (lambda: (torch.randn(2, 3), torch.randn(3, 2, 4)), None, ValueError, "same batch size"),
    (lambda: (torch.randn(2, 3), torch.zeros(2, 2, 4, dtype=torch.long)), 0, NotImplementedError, "integer inputs"),
    (lambda: (torch.randn(2, 3), "y"), None, TypeError, r"x\[1\] must be a torch.Tensor"),
    (lambda: (torch.randn(2, 3), torch.randn(2, 2, 4)), 2, ValueError, "must name distinct inputs"),
    (lambda: (torch.randn(2, 3), torch.randn(2, 2, 4)), (0, 0), ValueError, "must name distinct inputs"),
    (lambda: (torch.randn(2, 3), torch.randn(2, 2, 4)), 1.0, TypeError, "argnums must be an int"),
    (lambda: (torch.randn(2, 3), torch.randn(2, 2, 4, dtype=DOUBLE)), None, TypeError, "share x\\[0\\]'s dtype"),
])
def test_bad_structured_calls_raise_clear_errors(x, argnums, error, message):
    with pytest.raises(error, match=message):
        jx.batch_jacobian(TwoInputs(), x(), argnums=argnums)


def test_copies_and_pickles_of_a_model_do_not_carry_its_packed_models():
    model = TwoInputs().double().eval()
    x, y = inputs(2)
    jx.batch_jacobian(model, (x, y))
    assert model.__dict__[_CACHE_ATTRIBUTE]
    assert not copy.deepcopy(model).__dict__[_CACHE_ATTRIBUTE]
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert not loaded.__dict__[_CACHE_ATTRIBUTE]
    assert_same_structure(jx.batch_jacobian(loaded, (x, y)), jx.batch_jacobian(model, (x, y)), DOUBLE)
