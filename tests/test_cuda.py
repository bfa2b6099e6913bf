"""The CUDA kernels against the CPU ones: float64 agreement over the launch geometry, the caller's
stream, a device other than the current one, and float16/bfloat16 against a float64 reference.
Skipped without a GPU; a GPU with a library built without CUDA fails instead, with the op's message."""
import pytest
import torch
from torch import nn

from conftest import assert_matches_reference
import op_catalog
from jacobian_ext import ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MODES = ["forward", "reverse"]
HEADS = [None, "softmax", "log_softmax"]
REDUCED_PRECISION = [torch.float16, torch.bfloat16]

# (batch, in_features, hidden widths, out_features). "wide" crosses every edge of the launch geometry:
# its blocks hold more elements than one wave of 256-thread blocks covers even on an H100 (132 SMs x 8
# blocks x 256 threads = 270k) and more rows than one wave of warps (8448), with feature counts that
# are multiples of neither the block size nor the 32-lane warp.
SHAPES = {"empty": (0, 5, (11,), 3), "small": (7, 5, (11, 13), 3), "wide": (97, 131, (300,), 70)}

# Cycles for torch.cuda._sleep to keep a stream busy: tens of milliseconds on current GPUs.
SLEEP_CYCLES = 50_000_000


def random_plan(in_features, widths, out_features, activation, head):
    """A random MLP as the op's plan (layers, params), float64 on the CPU. nn.Linear's initialisation
    keeps every layer's values of order one; every other Linear has no bias."""
    sizes = [in_features, *widths, out_features]
    layers, params = [], []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        linear = nn.Linear(fan_in, fan_out, bias=i % 2 == 0, dtype=torch.float64)
        layers.append("linear" if linear.bias is not None else "linear_no_bias")
        params += [p.detach() for p in linear.parameters()]
        if i < len(sizes) - 2:
            layers.append(activation)
    if head is not None:
        layers.append(head)
    return layers, params


def moved(tensors, device=None, dtype=None):
    return [t.to(device=device, dtype=dtype) for t in tensors]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("activation", op_catalog.ACTIVATIONS)
@pytest.mark.parametrize("head", HEADS, ids=str)
def test_cuda_matches_cpu_in_float64(shape, mode, activation, head):
    batch, in_features, widths, out_features = SHAPES[shape]
    layers, params = random_plan(in_features, widths, out_features, activation, head)
    x = torch.randn(batch, in_features, dtype=torch.float64)

    expected_output, expected_jacobian = ops.batch_jacobian(x, layers, params, mode)
    output, jacobian = ops.batch_jacobian(x.cuda(), layers, moved(params, "cuda"), mode)

    assert jacobian.is_cuda
    assert_matches_reference(output, expected_output, torch.float64)
    assert_matches_reference(jacobian, expected_jacobian, torch.float64)


@pytest.mark.parametrize("mode", MODES)
def test_runs_on_the_current_stream(mode):
    layers, params = random_plan(64, (256,), 10, "tanh", "softmax")
    x = torch.randn(512, 64, dtype=torch.float64)
    expected = ops.batch_jacobian(x, layers, params, mode)[1]
    x_cuda, params_cuda = x.cuda(), moved(params, "cuda")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # The inputs are copied behind a sleep on `side`: a kernel launched on any other stream would
        # run before they (and the layers' outputs computed from them) exist, and read stale memory.
        torch.cuda._sleep(SLEEP_CYCLES)
        jacobian = ops.batch_jacobian(x_cuda.clone(), layers, [p.clone() for p in params_cuda], mode)[1]
    torch.cuda.current_stream().wait_stream(side)

    assert_matches_reference(jacobian, expected, torch.float64)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("mode", MODES)
def test_runs_on_a_device_other_than_the_current_one(mode):
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    assert device.index != torch.cuda.current_device()
    layers, params = random_plan(9, (33,), 6, "sigmoid", "log_softmax")
    x = torch.randn(5, 9, dtype=torch.float64)

    expected = ops.batch_jacobian(x, layers, params, mode)[1]
    jacobian = ops.batch_jacobian(x.to(device), layers, moved(params, device), mode)[1]

    assert jacobian.device == device
    assert_matches_reference(jacobian, expected, torch.float64)


# ReLU is left out: a pre-activation within rounding error of zero flips its unit on or off, which
# changes Jacobian entries by O(1), a discontinuity of ReLU rather than an error of the kernels
# (test_relu_rules_in_reduced_precision covers its kernel on exact inputs).
@pytest.mark.parametrize("dtype", REDUCED_PRECISION, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
@pytest.mark.parametrize("head", HEADS, ids=str)
def test_reduced_precision_matches_float64(dtype, mode, activation, head):
    layers, params = random_plan(16, (32, 32), 10, activation, head)
    # The reference starts from the same rounded inputs, so only the computation's error is measured.
    x, params = torch.randn(64, 16).to(dtype), moved(params, dtype=dtype)

    expected_output, expected_jacobian = ops.batch_jacobian(x.double(), layers, moved(params, dtype=torch.float64),
                                                            mode)
    output, jacobian = ops.batch_jacobian(x.cuda(), layers, moved(params, "cuda"), mode)

    assert jacobian.dtype == dtype and jacobian.is_cuda
    assert_matches_reference(output, expected_output, dtype)
    assert_matches_reference(jacobian, expected_jacobian, dtype)


@pytest.mark.parametrize("dtype", REDUCED_PRECISION, ids=str)
def test_relu_rules_in_reduced_precision(dtype):
    x = torch.randn(64, 48).to(dtype)
    jac = torch.randn(64, 48, 20).to(dtype)  # per-sample running Jacobian [B, H, D]
    cotangent = torch.randn(10, 48).to(dtype)  # shared by every sample [C, H]

    expected_output, expected_jac = ops.pointwise_jac_forward(x.double(), jac.double(), "relu")
    expected_cotangent = ops.pointwise_jac_reverse(x.double(), cotangent.double(), "relu")
    output, jac_out = ops.pointwise_jac_forward(x.cuda(), jac.cuda(), "relu")
    cotangent_in = ops.pointwise_jac_reverse(x.cuda(), cotangent.cuda(), "relu")

    assert_matches_reference(output, expected_output, dtype)
    assert_matches_reference(jac_out, expected_jac, dtype)
    assert_matches_reference(cotangent_in, expected_cotangent, dtype)
