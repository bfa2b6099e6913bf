"""The rules on N-d per-sample features (convolution, eval-mode batch norm, pooling), each alone against
torch.func in float64 (and float32), both directions, identity and per-sample running blocks; then a
chain of them against vmap(jacrev) of the composed model, and the module -> parameters mapping."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import (DEVICES, DTYPES, assert_matches_reference, loop_jacobian, non_contiguous, reference_jacobian,
                      single_sample)
from jacobian_ext import ops, spatial_rules


def make_conv(in_shape, out_channels, kernel_size, stride, padding, dilation, groups, bias):
    def build(dtype, device):
        spatial_dims = len(in_shape) - 1
        weight = torch.randn(out_channels, in_shape[0] // groups, *kernel_size, dtype=dtype, device=device)
        b = torch.randn(out_channels, dtype=dtype, device=device) if bias else None
        functional = (F.conv1d, F.conv2d, F.conv3d)[spatial_dims - 1]
        geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)

        def layer(x):
            return functional(x, weight.to(x.dtype), None if b is None else b.to(x.dtype), **geometry)

        return (layer,
                lambda x, jac: ops.conv_jac_forward(x, jac, weight, b, **geometry),
                lambda x, cot: ops.conv_jac_reverse(x, cot, weight, **geometry))

    return build


def make_batch_norm(in_shape, affine):
    def build(dtype, device):
        channels = in_shape[0]
        options = dict(dtype=dtype, device=device)
        mean, var = torch.randn(channels, **options), torch.rand(channels, **options) + 0.1
        weight = torch.randn(channels, **options) if affine else None
        bias = torch.randn(channels, **options) if affine else None
        eps = 1e-3

        def layer(x):
            to = (lambda t: None if t is None else t.to(x.dtype))
            return F.batch_norm(x, to(mean), to(var), to(weight), to(bias), training=False, eps=eps)

        return (layer,
                lambda x, jac: ops.batch_norm_jac_forward(x, jac, weight, bias, mean, var, eps),
                lambda x, cot: ops.batch_norm_jac_reverse(x, cot, weight, var, eps))

    return build


def per_plane(pool, spatial_dims=2):
    """A pooling reference for [B, *planes, *spatial] inputs: [B, *spatial] gets an explicit plane axis,
    since torch reads it as one unbatched sample [C, *spatial] (and refuses C = 0)."""
    def reference(x):
        return pool(x.unsqueeze(1)).squeeze(1) if x.dim() == spatial_dims + 1 else pool(x)

    return reference


def make_max_pool(kernel_size, stride, padding, dilation, ceil_mode):
    geometry = dict(kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil_mode)

    def build(dtype, device):
        return (per_plane(lambda x: F.max_pool2d(x, **geometry)),
                lambda x, jac: ops.max_pool2d_jac_forward(x, jac, **geometry),
                lambda x, cot: ops.max_pool2d_jac_reverse(x, cot, **geometry))

    return build


def make_avg_pool(kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    geometry = dict(kernel_size=kernel_size, stride=stride, padding=padding, ceil_mode=ceil_mode,
                    count_include_pad=count_include_pad, divisor_override=divisor_override)

    def build(dtype, device):
        return (per_plane(lambda x: F.avg_pool2d(x, **geometry)),
                lambda x, jac: ops.avg_pool2d_jac_forward(x, jac, **geometry),
                lambda x, cot: ops.avg_pool2d_jac_reverse(x, cot, **geometry))

    return build


def make_adaptive_avg_pool(output_size):
    def build(dtype, device):
        return (per_plane(lambda x: F.adaptive_avg_pool2d(x, output_size)),
                lambda x, jac: ops.adaptive_avg_pool2d_jac_forward(x, jac, output_size),
                lambda x, cot: ops.adaptive_avg_pool2d_jac_reverse(x, cot, output_size))

    return build


# name -> (per-sample input shape, builder of (layer, forward op, reverse op))
CASES = {
    "conv2d": ((3, 6, 5), make_conv((3, 6, 5), 4, (3, 3), [1, 1], [1, 1], [1, 1], 1, True)),
    "conv2d_strided_dilated": ((2, 7, 9), make_conv((2, 7, 9), 3, (3, 2), [2, 3], [1, 0], [1, 2], 1, False)),
    "conv2d_depthwise": ((4, 5, 6), make_conv((4, 5, 6), 8, (3, 3), [2, 2], [1, 1], [1, 1], 4, True)),
    "conv2d_groups_output_padding": ((4, 8, 7), make_conv((4, 8, 7), 6, (2, 3), [3, 2], [2, 1], [1, 1], 2, True)),
    "conv1d": ((2, 11), make_conv((2, 11), 3, (3,), [2], [1], [2], 1, True)),
    "conv3d": ((2, 3, 4, 5), make_conv((2, 3, 4, 5), 2, (2, 2, 3), [1, 2, 2], [0, 1, 1], [1, 1, 1], 1, True)),
    # The kernel window covers the whole input (one output position): the matrix-product path.
    "conv2d_window_center_tap": ((5, 1, 1), make_conv((5, 1, 1), 6, (3, 3), [1, 1], [1, 1], [1, 1], 1, True)),
    "conv2d_window_strided": ((4, 2, 2), make_conv((4, 2, 2), 3, (3, 3), [2, 2], [1, 1], [1, 1], 1, True)),
    "conv2d_window_unpadded_rectangular": ((3, 2, 3), make_conv((3, 2, 3), 2, (2, 3), [1, 1], [0, 0], [1, 1], 1,
                                                                False)),
    "conv3d_window": ((2, 1, 2, 1), make_conv((2, 1, 2, 1), 3, (3, 3, 1), [1, 1, 1], [1, 1, 0], [1, 1, 1], 1, True)),
    # One output position, but the input reaches past the window (an unread row): the convolution path.
    "conv2d_window_partial": ((2, 3, 1), make_conv((2, 3, 1), 3, (2, 1), [2, 1], [0, 0], [1, 1], 1, True)),
    # Strided, at most 4 input channels (an RGB stem, and "conv2d_strided_dilated" above): on the CPU the
    # cotangents go through a matrix product into the taps' columns and col2im; 5 channels keep ATen's.
    "conv2d_stem": ((3, 9, 10), make_conv((3, 9, 10), 4, (7, 7), [2, 2], [3, 3], [1, 1], 1, True)),
    "conv2d_five_channels": ((5, 6, 5), make_conv((5, 6, 5), 3, (3, 3), [2, 1], [1, 1], [1, 1], 1, False)),
    # Stride 1 takes the columns too from 16 x 16 input positions on (a grey or RGB stem on a full image).
    "conv2d_unstrided_stem": ((1, 16, 17), make_conv((1, 16, 17), 3, (3, 3), [1, 1], [1, 1], [1, 1], 1, True)),
    "conv2d_unstrided_dilated_stem": ((2, 17, 16), make_conv((2, 17, 16), 2, (3, 2), [1, 1], [2, 0], [2, 1], 1,
                                                             False)),
    # Depthwise kernel taps that only ever read padding (stride 1, kernel wider than the padded map needs) are
    # cut off: a 7 x 7 kernel on a 2 x 3 map keeps its 3 x 5 centre; on a 1 x 1 map one tap is left, and the
    # convolution is a per-channel scale. Dilation keeps the whole kernel along its axis; other convolutions keep
    # theirs.
    "conv2d_depthwise_cropped": ((4, 2, 3), make_conv((4, 2, 3), 4, (7, 7), [1, 1], [3, 3], [1, 1], 4, True)),
    "conv2d_depthwise_one_tap": ((3, 1, 1), make_conv((3, 1, 1), 3, (7, 7), [1, 1], [3, 3], [1, 1], 3, True)),
    "conv1d_depthwise_cropped": ((2, 2), make_conv((2, 2), 2, (5,), [1], [2], [1], 2, False)),
    "conv2d_depthwise_cropped_one_axis_dilated": ((2, 1, 2), make_conv((2, 1, 2), 2, (5, 3), [1, 1], [2, 2], [1, 2],
                                                                       2, True)),
    "conv2d_grouped_wide_kernel": ((4, 1, 2), make_conv((4, 1, 2), 4, (5, 5), [1, 1], [2, 2], [1, 1], 2, True)),
    # Stride equal to the kernel, no padding (patch embeddings, downsampling): on the CPU the cotangents go
    # through one matrix product into the patches; a map the patches do not cover ends in zero positions.
    "conv2d_patches": ((3, 8, 6), make_conv((3, 8, 6), 5, (4, 2), [4, 2], [0, 0], [1, 1], 1, True)),
    "conv2d_patches_uncovered": ((6, 5, 7), make_conv((6, 5, 7), 4, (2, 3), [2, 3], [0, 0], [1, 1], 1, False)),
    "conv1d_patches": ((2, 9), make_conv((2, 9), 3, (3,), [3], [0], [1], 1, True)),
    "conv3d_patches": ((2, 4, 2, 4), make_conv((2, 4, 2, 4), 3, (2, 1, 2), [2, 1, 2], [0, 0, 0], [1, 1, 1], 1, True)),
    "batch_norm2d": ((3, 4, 5), make_batch_norm((3, 4, 5), True)),
    "batch_norm1d_flat": ((5,), make_batch_norm((5,), True)),
    "batch_norm1d_sequence_no_affine": ((3, 6), make_batch_norm((3, 6), False)),
    "max_pool": ((3, 6, 6), make_max_pool([2, 2], [2, 2], [0, 0], [1, 1], False)),
    "max_pool_overlapping_padded": ((2, 7, 5), make_max_pool([3, 3], [2, 2], [1, 1], [1, 1], False)),
    "max_pool_dilated_ceil": ((2, 9, 6), make_max_pool([3, 2], [2, 1], [1, 0], [2, 1], True)),
    "max_pool_planes_only": ((7, 7), make_max_pool([3, 3], [2, 2], [0, 0], [1, 1], True)),
    "avg_pool": ((3, 6, 6), make_avg_pool([2, 2], [2, 2], [0, 0], False, True, None)),
    "avg_pool_ceil_exclude_pad": ((2, 7, 5), make_avg_pool([3, 3], [2, 2], [1, 1], True, False, None)),
    "avg_pool_divisor_override": ((2, 5, 8), make_avg_pool([2, 3], [1, 2], [1, 1], False, True, 4)),
    "avg_pool_planes_only": ((7, 6), make_avg_pool([3, 2], [2, 2], [1, 0], True, True, None)),
    "adaptive_avg_pool_not_dividing": ((3, 7, 5), make_adaptive_avg_pool([3, 2])),
    "adaptive_avg_pool_global": ((4, 5, 6), make_adaptive_avg_pool([1, 1])),
    "adaptive_avg_pool_upsampling_planes_only": ((5, 3), make_adaptive_avg_pool([4, 4])),
    # From 8 planes on, the CPU pulls average-pooling cotangents back in channels-last planes.
    "avg_pool_many_planes_same_size": ((9, 5, 4), make_avg_pool([3, 3], [1, 1], [1, 1], False, True, None)),
    "avg_pool_many_planes_ceil_exclude_pad": ((8, 7, 5), make_avg_pool([2, 3], [2, 2], [1, 1], True, False, None)),
    "adaptive_avg_pool_many_planes": ((10, 5, 7), make_adaptive_avg_pool([2, 3])),
    "adaptive_avg_pool_many_planes_global": ((8, 3, 3), make_adaptive_avg_pool([1, 1])),
}
LAYOUTS = ["contiguous", "non_contiguous", "channels_last"]


def make_input(shape, batch, layout, dtype, device):
    x = torch.randn(batch, *shape, dtype=dtype, device=device)
    if layout == "non_contiguous":
        return non_contiguous(x)
    if layout == "channels_last":
        if x.dim() != 4:
            pytest.skip("channels-last applies to 4-d inputs")
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def layer_jacobian(layer, x):
    """The layer's Jacobian on each sample in float64, flattened to [B, O, I], and its output shape."""
    out_shape = layer(torch.zeros(1, *x.shape[1:], dtype=torch.float64, device=x.device)).shape[1:]
    shape = (x.shape[0], out_shape.numel(), x.shape[1:].numel())
    if x.shape[0] == 0:  # vmap over an empty batch fails inside some ATen backward functions
        return x.new_zeros(shape, dtype=torch.float64), out_shape
    return torch.func.vmap(torch.func.jacrev(single_sample(layer)))(x.detach().double()).reshape(shape), out_shape


def flat_features(shape):
    return int(torch.Size(shape).numel())


def assert_walker_layout(jac_out):
    """jac_out is the movedim(-1, 1) view of fresh contiguous [B, D, *out] storage."""
    assert jac_out.movedim(-1, 1).is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch", [0, 1, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_forward_rule_matches_torch_func(device, dtype, layout, batch, name):
    in_shape, build = CASES[name]
    layer, forward_op, _ = build(dtype, device)
    x = make_input(in_shape, batch, layout, dtype, device)
    layer_j, out_shape = layer_jacobian(layer, x)
    in_features = flat_features(in_shape)

    output, jac_out = forward_op(x, None)  # identity: D = prod(in_shape)
    assert_matches_reference(output, layer(x.double()), dtype)
    assert output.is_contiguous()
    assert_matches_reference(jac_out, layer_j.reshape(batch, *out_shape, in_features), dtype)
    assert_walker_layout(jac_out)

    columns = 7  # D != C, != prod(in_shape)
    tangents = torch.randn(batch, columns, *in_shape, dtype=dtype, device=device)
    expected = (layer_j @ tangents.double().reshape(batch, columns, in_features).transpose(1, 2))
    for jac in (tangents.movedim(1, -1), non_contiguous(tangents.movedim(1, -1).contiguous())):
        _, jac_out = forward_op(x, jac)
        assert_matches_reference(jac_out, expected.reshape(batch, *out_shape, columns), dtype)
        assert_walker_layout(jac_out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch", [0, 1, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_reverse_rule_matches_torch_func(device, dtype, layout, batch, name):
    in_shape, build = CASES[name]
    layer, _, reverse_op = build(dtype, device)
    x = make_input(in_shape, batch, layout, dtype, device)
    layer_j, out_shape = layer_jacobian(layer, x)
    out_features = flat_features(out_shape)

    result = reverse_op(x, None)  # identity: C = prod(out_shape)
    assert_matches_reference(result, layer_j.reshape(batch, out_features, *in_shape), dtype)
    assert result.is_contiguous()

    rows = 5
    cotangents = torch.randn(batch, rows, *out_shape, dtype=dtype, device=device)
    expected = (cotangents.double().reshape(batch, rows, out_features) @ layer_j).reshape(batch, rows, *in_shape)
    for cotangent in (cotangents, non_contiguous(cotangents)):
        result = reverse_op(x, cotangent)
        assert_matches_reference(result, expected, dtype)
        assert result.is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", [([2, 2], [2, 2], [0, 0]), ([3, 3], [1, 1], [1, 1]), ([3, 2], [2, 1], [1, 0])])
def test_max_pool_ties_pick_autograd_argmax(device, dtype, geometry):
    """Constant regions and a few distinct values: many windows hold several maxima, and overlapping
    windows share them. Every Jacobian entry must land where autograd puts it."""
    kernel_size, stride, padding = geometry
    x = torch.randint(0, 3, (3, 2, 7, 6), device=device).to(dtype)
    x[:, :, :3, :3] = 1.0  # a constant block
    params = dict(kernel_size=kernel_size, stride=stride, padding=padding, dilation=[1, 1], ceil_mode=True)
    layer = nn.MaxPool2d(**params)
    expected = loop_jacobian(layer, x)  # autograd, one backward per output: [B, *out, *in]
    batch, out_shape = x.shape[0], expected.shape[1:4]
    assert torch.equal(torch.func.vmap(torch.func.jacrev(single_sample(layer)))(x.double()), expected)

    _, jac_out = ops.max_pool2d_jac_forward(x, None, **params)
    assert torch.equal(jac_out.double(), expected.reshape(batch, *out_shape, -1))
    rows = ops.max_pool2d_jac_reverse(x, None, **params)
    assert torch.equal(rows.double(), expected.reshape(batch, -1, *x.shape[1:]))
    cotangent = torch.randn(batch, 4, *out_shape, dtype=dtype, device=device)
    pulled_back = cotangent.double().reshape(batch, 4, -1) @ expected.reshape(batch, out_shape.numel(), -1)
    assert_matches_reference(ops.max_pool2d_jac_reverse(x, cotangent, **params),
                             pulled_back.reshape(batch, 4, *x.shape[1:]), dtype)


class SpatialChain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, stride=1)
        self.norm = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.head = nn.AdaptiveAvgPool2d((2, None))
        with torch.no_grad():
            self.norm.running_mean.normal_()
            self.norm.running_var.uniform_(0.5, 2.0)
            self.norm.weight.normal_()
            self.norm.bias.normal_()
        self.eval()

    def layers(self):
        return [self.conv, self.norm, self.pool, self.head]

    def forward(self, x):
        for layer in self.layers():
            x = layer(x)
        return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [0, 1, 3])
def test_chain_matches_vmap_jacrev(device, dtype, batch):
    model = SpatialChain().to(device=device, dtype=dtype)
    x = torch.randn(batch, 3, 7, 5, dtype=dtype, device=device)
    # vmap over an empty batch fails in conv's backward: take the empty reference from one sample
    expected = reference_jacobian(model, x if batch else x.new_zeros(1, *x.shape[1:]))[:batch]

    inputs, calls, h = [], [], x
    for layer in model.layers():
        call = spatial_rules.native_call(layer, h.shape[1:])
        assert call is not None, layer
        inputs.append(h)
        calls.append(call)
        h = layer(h)

    jac = None
    for call, layer_input in zip(calls, inputs):
        output, jac = call.forward(layer_input, jac)
    assert_matches_reference(output, model(x), dtype)
    out_shape, in_features = expected.shape[1:4], x.shape[1:].numel()
    assert_matches_reference(jac, expected.reshape(batch, *out_shape, in_features), dtype)

    cotangent = None
    for call, layer_input in reversed(list(zip(calls, inputs))):
        cotangent = call.reverse(layer_input, cotangent)
    assert_matches_reference(cotangent, expected.reshape(batch, out_shape.numel(), *x.shape[1:]), dtype)


# ---- module -> parameters ----

def test_conv_params_map_padding_modes():
    assert spatial_rules.conv_params(nn.Conv2d(2, 3, 3, padding="same"), (2, 5, 5))["padding"] == [1, 1]
    assert spatial_rules.conv_params(nn.Conv2d(2, 3, 3, padding="valid"), (2, 5, 5))["padding"] == [0, 0]
    assert spatial_rules.conv_params(nn.Conv1d(2, 3, 3, padding="same", dilation=2), (2, 9))["padding"] == [2]
    assert spatial_rules.conv_params(nn.Conv2d(2, 3, (3, 4), padding="same"), (2, 5, 5)) is None  # asymmetric
    assert spatial_rules.conv_params(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (2, 5, 5)) is None
    assert spatial_rules.conv_params(nn.Conv2d(2, 3, 3), (5, 5)) is None  # unbatched [C, H, W] misread
    assert spatial_rules.native_call(nn.ConvTranspose2d(2, 3, 3), (2, 5, 5)) is None


def test_batch_norm_params_need_eval_mode_and_running_stats():
    norm = nn.BatchNorm2d(3)
    assert spatial_rules.batch_norm_params(norm, (3, 4, 4)) is None  # training mode
    norm.eval()
    assert spatial_rules.batch_norm_params(norm, (3, 4, 4))["eps"] == norm.eps
    assert spatial_rules.batch_norm_params(norm, (3, 4)) is None  # BatchNorm2d wants [C, H, W]
    assert spatial_rules.batch_norm_params(nn.BatchNorm1d(3, track_running_stats=False).eval(), (3,)) is None
    assert spatial_rules.batch_norm_params(nn.BatchNorm1d(3).eval(), (3, 7)) is not None


def test_pool_params():
    assert spatial_rules.max_pool2d_params(nn.MaxPool2d(2, return_indices=True), (3, 4, 4)) is None
    assert spatial_rules.max_pool2d_params(nn.MaxPool2d(3), (3, 4, 4))["stride"] == [3, 3]
    params = spatial_rules.avg_pool2d_params(nn.AvgPool2d((2, 3), stride=1, divisor_override=2), (4, 4))
    assert params["kernel_size"] == [2, 3] and params["stride"] == [1, 1] and params["divisor_override"] == 2
    adaptive = nn.AdaptiveAvgPool2d((None, 2))
    assert spatial_rules.adaptive_avg_pool2d_params(adaptive, (3, 7, 5)) == {"output_size": [7, 2]}
    assert spatial_rules.adaptive_avg_pool2d_params(nn.AdaptiveAvgPool2d(3), (3, 7, 5)) == {"output_size": [3, 3]}
    assert spatial_rules.native_call(nn.AdaptiveAvgPool2d(3), (5,)) is None


# ---- bad input ----

def test_bad_arguments_name_the_op_and_argument():
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    conv = dict(stride=[1, 1], padding=[0, 0], dilation=[1, 1], groups=1)
    with pytest.raises(ValueError, match=r"conv_jac_forward: jac of shape \[2, 3, 6, 5, 7\]"):
        ops.conv_jac_forward(x, torch.randn(2, 3, 6, 5, 7, dtype=torch.float64), weight, None, **conv)
    with pytest.raises(ValueError, match=r"conv_jac_reverse: cotangent of shape .* out_features = \[4, 4, 4\]"):
        ops.conv_jac_reverse(x, torch.randn(2, 5, 4, 4, 3, dtype=torch.float64), weight, **conv)
    with pytest.raises(ValueError, match="conv_jac_forward: stride must have 2 entries"):
        ops.conv_jac_forward(x, None, weight, None, **{**conv, "stride": [1]})
    with pytest.raises(ValueError, match="conv_jac_forward: weight of shape .* groups = 2"):
        ops.conv_jac_forward(x, None, weight, None, **{**conv, "groups": 2})
    with pytest.raises(TypeError, match="conv_jac_forward: input must be float32 or float64"):
        ops.conv_jac_forward(x.long(), None, weight.long(), None, **conv)
    with pytest.raises(TypeError, match="conv_jac_forward: jac has dtype"):
        ops.conv_jac_forward(x, torch.randn(2, 3, 6, 6, 1), weight, None, **conv)
    with pytest.raises(ValueError, match="batch_norm_jac_reverse: running_var must be \\[3\\]"):
        ops.batch_norm_jac_reverse(x, None, None, torch.ones(4, dtype=torch.float64), 1e-5)
    with pytest.raises(ValueError, match="max_pool2d_jac_forward: input must be \\[batch, \\*features\\]"):
        ops.max_pool2d_jac_forward(x[0, 0], None, [2, 2], [2, 2], [0, 0], [1, 1], False)
    with pytest.raises(ValueError, match="avg_pool2d_jac_reverse: kernel_size must have 2 entries"):
        ops.avg_pool2d_jac_reverse(x, None, [2], [2, 2], [0, 0], False, True, None)
    with pytest.raises(ValueError, match="adaptive_avg_pool2d_jac_reverse: cotangent of shape"):
        ops.adaptive_avg_pool2d_jac_reverse(x, torch.randn(2, 1, 3, 3, 3, dtype=torch.float64), [2, 2])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [0, 1, 3])
@pytest.mark.parametrize("in_shape", [(3, 11), (10,)])
@pytest.mark.parametrize("module", [
    nn.MaxPool1d(3, stride=2, padding=1, dilation=2, ceil_mode=True),
    nn.MaxPool1d(2),
    nn.AvgPool1d(4, stride=3, padding=2, ceil_mode=True, count_include_pad=False),
    nn.AdaptiveAvgPool1d(4),
], ids=["max_dilated_ceil", "max", "avg_ceil_exclude_pad", "adaptive"])
def test_1d_pooling_runs_on_the_2d_ops(dtype, batch, in_shape, module):
    call = spatial_rules.native_call(module, in_shape)
    assert call is not None and call.as_2d
    layer = per_plane(module, spatial_dims=1)
    x = torch.randn(batch, *in_shape, dtype=dtype)
    layer_j, out_shape = layer_jacobian(layer, x)
    in_features, out_features = flat_features(in_shape), flat_features(out_shape)

    output, jac_out = call.forward(x, None)
    assert_matches_reference(output, layer(x.double()), dtype)
    assert_matches_reference(jac_out, layer_j.reshape(batch, *out_shape, in_features), dtype)
    tangents = torch.randn(batch, 6, *in_shape, dtype=dtype)
    _, jac_out = call.forward(x, tangents.movedim(1, -1))
    expected = layer_j @ tangents.double().reshape(batch, 6, in_features).transpose(1, 2)
    assert_matches_reference(jac_out, expected.reshape(batch, *out_shape, 6), dtype)
    assert_walker_layout(jac_out)

    assert_matches_reference(call.reverse(x, None), layer_j.reshape(batch, out_features, *in_shape), dtype)
    cotangents = torch.randn(batch, 5, *out_shape, dtype=dtype)
    expected = cotangents.double().reshape(batch, 5, out_features) @ layer_j
    assert_matches_reference(call.reverse(x, cotangents), expected.reshape(batch, 5, *in_shape), dtype)
