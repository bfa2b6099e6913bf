"""layer_norm_jac_forward / _reverse against torch.func (float64, and float32), on the N-d layout of
ND_CONVENTION: input [B, *feat] with feat ending in normalized_shape, jac [B, *feat, D], cotangent
[B, C, *feat], None for the identity."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES, DTYPES, assert_matches_reference, non_contiguous
from jacobian_ext import ops

# (per-sample features, normalized_shape): a [B, H] row, ViT tokens [B, T, E], a 2-D normalized shape
# with and without leading feature positions.
SHAPES = [((7,), (7,)), ((4, 6), (6,)), ((3, 5), (3, 5)), ((2, 3, 4), (3, 4))]


def make_params(normalized_shape, affine, dtype, device):
    if not affine:
        return None, None
    return (torch.randn(normalized_shape, dtype=dtype, device=device),
            torch.randn(normalized_shape, dtype=dtype, device=device))


def layer_jacobian(x, normalized_shape, weight, bias, eps):
    """[B, *feat, *feat] in float64 from vmap(jacrev)."""
    w = None if weight is None else weight.double()
    b = None if bias is None else bias.double()
    fn = lambda sample: F.layer_norm(sample, normalized_shape, w, b, eps)
    return torch.func.vmap(torch.func.jacrev(fn))(x.double())


def random_input(batch, features, dtype, device):
    # Features on a shifted, scaled scale: the mean and variance terms of the rule both matter.
    return non_contiguous(3 + 2 * torch.randn(batch, *features, dtype=dtype, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("features, normalized_shape", SHAPES, ids=str)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("batch", [0, 1, 5])
@pytest.mark.parametrize("seed", ["identity", "per_sample"])
def test_forward_rule_matches_torch_func(device, dtype, features, normalized_shape, affine, batch, seed):
    eps = 1e-3
    weight, bias = make_params(normalized_shape, affine, dtype, device)
    x = random_input(batch, features, dtype, device)
    feature_count = math.prod(features)
    columns = 11  # D != the feature count
    # The walker's storage: a contiguous T[B, D, *feat] passed as a view with D last.
    jac = None
    if seed == "per_sample":
        jac = torch.randn(batch, columns, *features, dtype=dtype, device=device).movedim(1, -1)

    output, jac_out = ops.layer_norm_jac_forward(x, jac, normalized_shape, weight, bias, eps)

    assert torch.equal(output, F.layer_norm(x, normalized_shape, weight, bias, eps))
    layer_j = layer_jacobian(x, normalized_shape, weight, bias, eps).reshape(batch, feature_count, feature_count)
    if jac is None:
        expected = layer_j
    else:
        expected = torch.einsum("boh,bhd->bod", layer_j, jac.double().reshape(batch, feature_count, columns))
    d = feature_count if jac is None else columns
    assert_matches_reference(jac_out, expected.reshape(batch, *features, d), dtype)
    assert jac_out.movedim(-1, 1).is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("features, normalized_shape", SHAPES, ids=str)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("batch", [0, 1, 5])
@pytest.mark.parametrize("seed", ["identity", "per_sample"])
def test_reverse_rule_matches_torch_func(device, dtype, features, normalized_shape, affine, batch, seed):
    eps = 1e-5
    weight, _ = make_params(normalized_shape, affine, dtype, device)
    x = random_input(batch, features, dtype, device)
    feature_count = math.prod(features)
    rows = 3  # C != the feature count
    cotangent = None if seed == "identity" else non_contiguous(torch.randn(batch, rows, *features, dtype=dtype,
                                                                           device=device))

    cotangent_in = ops.layer_norm_jac_reverse(x, cotangent, normalized_shape, weight, eps)

    layer_j = layer_jacobian(x, normalized_shape, weight, None, eps).reshape(batch, feature_count, feature_count)
    if cotangent is None:
        expected = layer_j
    else:
        expected = torch.einsum("bco,boh->bch", cotangent.double().reshape(batch, rows, feature_count), layer_j)
    c = feature_count if cotangent is None else rows
    assert_matches_reference(cotangent_in, expected.reshape(batch, c, *features), dtype)
    assert cotangent_in.is_contiguous()


def test_rule_is_not_the_diagonal_approximation():
    # The mean and variance terms make every output depend on every input of its group.
    x = torch.randn(2, 5, dtype=torch.float64)
    _, jac = ops.layer_norm_jac_forward(x, None, [5])
    off_diagonal = jac[:, ~torch.eye(5, dtype=torch.bool)]
    assert off_diagonal.abs().min() > 0


def test_groups_are_independent():
    # ViT tokens [B, T, E]: token t's outputs depend on token t's inputs only.
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    _, jac = ops.layer_norm_jac_forward(x, None, [4])
    blocks = jac.reshape(2, 3, 4, 3, 4)
    for t in range(3):
        for u in range(3):
            assert (blocks[:, t, :, u, :].abs().max() > 0) == (t == u)


def test_output_never_aliases_the_inputs():
    x = torch.randn(3, 4, dtype=torch.float64)
    jac = torch.randn(3, 4, 2, dtype=torch.float64)
    output, jac_out = ops.layer_norm_jac_forward(x, jac, [4])
    cotangent_in = ops.layer_norm_jac_reverse(x, torch.randn(3, 2, 4, dtype=torch.float64), [4])
    storages = {t.untyped_storage().data_ptr() for t in (x, jac)}
    assert all(t.untyped_storage().data_ptr() not in storages for t in (output, jac_out, cotangent_in))


@pytest.mark.parametrize("call, message", [
    (lambda: ops.layer_norm_jac_forward(torch.randn(2, 3, 4), None, [3]),
     r"layer_norm_jac_forward: input must be \[batch, \*features\] with features ending in normalized_shape \[3\]"),
    (lambda: ops.layer_norm_jac_forward(torch.randn(4), None, [4]), r"input must be \[batch, \*features\]"),
    (lambda: ops.layer_norm_jac_forward(torch.randn(2, 4), None, []), "normalized_shape must name at least one"),
    (lambda: ops.layer_norm_jac_forward(torch.randn(2, 4), None, [4], torch.randn(3)),
     r"weight must have shape normalized_shape \[4\], got \[3\]"),
    (lambda: ops.layer_norm_jac_forward(torch.randn(2, 4), None, [4], None, torch.randn(4, dtype=torch.float64)),
     "bias has dtype Double but the input has dtype Float"),
    (lambda: ops.layer_norm_jac_forward(torch.randn(2, 4), torch.randn(2, 5, 3), [4]),
     r"jac of shape \[2, 5, 3\] must be the input's shape \[2, 4\] followed by D tangent columns"),
    (lambda: ops.layer_norm_jac_reverse(torch.randn(2, 4), torch.randn(2, 3, 5), [4]),
     r"layer_norm_jac_reverse: cotangent of shape \[2, 3, 5\] must be \[2, C, \*features\]"),
    (lambda: ops.layer_norm_jac_reverse(torch.randn(2, 4).to(torch.int32), None, [4]), "float32 or float64"),
])
def test_argument_errors(call, message):
    # TORCH_CHECK_TYPE for a wrong dtype, TORCH_CHECK_VALUE for everything else
    expected = TypeError if "dtype" in message or "float32 or float64" in message else ValueError
    with pytest.raises(expected, match=message):
        call()
