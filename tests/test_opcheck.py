"""torch.library.opcheck on every operator: schema, fake (meta) implementation against the real
kernel (shapes and strides), autograd registration and AOT dispatch with dynamic shapes."""
import pytest
import torch

from conftest import DEVICES
import op_catalog
from jacobian_ext import ops


def sample_inputs(device):
    """(op name, args) covering identity, shared and per-sample blocks and B = 0."""
    options = dict(dtype=torch.float64, device=device)
    x = torch.randn(3, 5, **options)
    x_empty = torch.randn(0, 5, **options)
    weight, bias = torch.randn(4, 5, **options), torch.randn(4, **options)
    weight2 = torch.randn(2, 4, **options)
    jac_shared, jac = torch.randn(5, 7, **options), torch.randn(3, 5, 7, **options)
    cot_shared, cot = torch.randn(6, 4, **options), torch.randn(3, 6, 4, **options)
    cot5 = torch.randn(3, 6, 5, **options)
    probabilities = torch.softmax(x, 1)
    layers = ["linear", "relu", "linear_no_bias", "log_softmax"]
    params = [weight, bias, weight2]
    samples = [
        ("linear_jac_forward", (x, None, weight, bias)),
        ("linear_jac_forward", (x, jac_shared, weight, None)),
        ("linear_jac_forward", (x, jac, weight, bias)),
        ("linear_jac_reverse", (None, weight)),
        ("linear_jac_reverse", (cot_shared, weight)),
        ("linear_jac_reverse", (cot, weight)),
        ("sequential_jac_forward", (x, None, layers, params)),
        ("sequential_jac_forward", (x, jac, layers, params)),
        ("sequential_jac_forward", (x_empty, None, layers, params)),
        ("sequential_jac_reverse", (x, None, layers, params)),
        ("sequential_jac_reverse", (x, torch.randn(3, 6, 2, **options), layers, params)),
        ("batch_jacobian", (x, layers, params, "forward")),
        ("batch_jacobian", (x, layers, params, "reverse")),
        ("batch_jacobian", (x.reshape(3, 5, 1), layers, params, "reverse")),
        ("batch_jacobian", (x_empty, layers, params, "forward")),
        ("batch_jacobian", (x, [], [], "forward")),
        # Inputs requiring grad: the registered backward (gradients of the Jacobian) is exercised too.
        ("batch_jacobian", (x.clone().requires_grad_(), ["linear", "tanh", "linear_no_bias", "softmax"],
                            [weight.clone().requires_grad_(), bias, weight2.clone().requires_grad_()], "forward")),
        ("batch_jacobian", (x.clone().requires_grad_(), layers, [weight, bias, weight2.clone().requires_grad_()],
                            "reverse")),
    ]
    for activation in op_catalog.ACTIVATIONS:
        samples += [
            ("pointwise_jac_forward", (x, None, activation)),
            ("pointwise_jac_forward", (x, jac, activation)),
            ("pointwise_jac_reverse", (x, cot5, activation)),
            ("pointwise_jac_reverse", (x, None, activation)),
        ]
    samples += [
        ("sequential_jac_forward", (x, jac, ["gelu_tanh", "linear", "leaky_relu:0.2", "linear_no_bias", "softplus"],
                                    params)),
        ("batch_jacobian", (x, ["elu:0.5", "linear", "relu6", "linear_no_bias", "silu"], params, "reverse")),
    ]
    # Layer norm on N-d features: ViT tokens [B, T, E] normalised over E, and a 2-D normalized_shape.
    tokens, tokens_empty = torch.randn(3, 4, 6, **options), torch.randn(0, 4, 6, **options)
    ln_weight, ln_bias = torch.randn(6, **options), torch.randn(6, **options)
    tokens_jac = torch.randn(3, 7, 4, 6, **options).movedim(1, -1)  # the walker's D-major storage
    samples += [
        ("layer_norm_jac_forward", (tokens, None, [6], ln_weight, ln_bias, 1e-5)),
        ("layer_norm_jac_forward", (tokens, tokens_jac, [6], None, None, 1e-3)),
        ("layer_norm_jac_forward", (tokens, tokens_jac, [4, 6], None, ln_bias.repeat(4, 1), 1e-5)),
        ("layer_norm_jac_forward", (tokens_empty, None, [6], ln_weight, None, 1e-5)),
        ("layer_norm_jac_reverse", (tokens, None, [6], ln_weight, 1e-5)),
        ("layer_norm_jac_reverse", (tokens, torch.randn(3, 2, 4, 6, **options), [4, 6], None, 1e-5)),
        ("layer_norm_jac_reverse", (tokens_empty, torch.randn(0, 2, 4, 6, **options), [6], ln_weight, 1e-5)),
    ]
    for name in ("softmax", "log_softmax"):
        samples += [
            (f"{name}_jac_forward", (x, None)),
            (f"{name}_jac_forward", (x, jac_shared)),
            (f"{name}_jac_forward", (x, jac)),
            (f"{name}_jac_reverse", (probabilities, cot5)),
            (f"{name}_jac_reverse", (probabilities, None)),
        ]
    return samples + spatial_samples(device)


def spatial_samples(device):
    """The ops on N-d per-sample features: identity and per-sample blocks (in the walker's layout and
    not), B = 0, a channels-last input."""
    options = dict(dtype=torch.float64, device=device)
    x = torch.randn(2, 3, 6, 5, **options)
    x_empty = torch.randn(0, 3, 6, 5, **options)
    x_channels_last = x.contiguous(memory_format=torch.channels_last)
    jac = torch.randn(2, 4, 3, 6, 5, **options).movedim(1, -1)  # D = 4
    jac_dense = torch.randn(2, 3, 6, 5, 4, **options)

    weight, bias = torch.randn(6, 1, 3, 2, **options), torch.randn(6, **options)
    conv = ([2, 1], [1, 1], [1, 2], 3)  # stride, padding, dilation, groups (depthwise)
    conv_cot = torch.randn(2, 5, 6, 3, 5, **options)
    mean, var = torch.randn(3, **options), torch.rand(3, **options) + 0.5
    scale, shift = torch.randn(3, **options), torch.randn(3, **options)
    cot = torch.randn(2, 5, 3, 6, 5, **options)
    max_pool = ([3, 2], [2, 2], [1, 0], [1, 2], True)
    max_cot = torch.randn(2, 5, 3, 4, 2, **options)
    avg_pool = ([3, 3], [2, 1], [1, 1], True, False, 5)
    avg_cot = torch.randn(2, 5, 3, 4, 5, **options)
    adaptive_cot = torch.randn(2, 5, 3, 4, 3, **options)
    return [
        ("conv_jac_forward", (x, None, weight, bias, *conv)),
        ("conv_jac_forward", (x, jac, weight, None, *conv)),
        ("conv_jac_forward", (x_empty, None, weight, bias, *conv)),
        ("conv_jac_reverse", (x, None, weight, *conv)),
        ("conv_jac_reverse", (x_channels_last, conv_cot, weight, *conv)),
        ("batch_norm_jac_forward", (x, None, scale, shift, mean, var, 1e-5)),
        ("batch_norm_jac_forward", (x_channels_last, jac_dense, None, None, mean, var, 1e-3)),
        ("batch_norm_jac_reverse", (x, cot, scale, var, 1e-5)),
        ("batch_norm_jac_reverse", (x_empty, None, None, var, 1e-5)),
        ("max_pool2d_jac_forward", (x, None, *max_pool)),
        ("max_pool2d_jac_forward", (x_channels_last, jac, *max_pool)),
        ("max_pool2d_jac_reverse", (x, max_cot, *max_pool)),
        ("max_pool2d_jac_reverse", (x_empty, None, *max_pool)),
        ("avg_pool2d_jac_forward", (x, jac_dense, *avg_pool)),
        ("avg_pool2d_jac_forward", (x_empty, None, *avg_pool)),
        ("avg_pool2d_jac_reverse", (x, avg_cot, *avg_pool)),
        ("avg_pool2d_jac_reverse", (x[:, 0], None, *avg_pool)),
        ("adaptive_avg_pool2d_jac_forward", (x, None, [4, 3])),
        ("adaptive_avg_pool2d_jac_forward", (x_channels_last, jac, [4, 3])),
        ("adaptive_avg_pool2d_jac_reverse", (x, adaptive_cot, [4, 3])),
        ("adaptive_avg_pool2d_jac_reverse", (x_empty, None, [4, 3])),
    ]


def test_every_op_has_samples():
    assert {name for name, _ in sample_inputs("cpu")} == set(op_catalog.OP_NAMES)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", range(len(sample_inputs("cpu"))))
def test_opcheck(device, index):
    name, args = sample_inputs(device)[index]
    torch.library.opcheck(getattr(torch.ops.jacext, name).default, args)
