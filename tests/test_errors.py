"""Bad input gets a clear exception naming the argument and what was expected."""
import pytest
import torch
import torchvision
from torch import nn

import jacobian_ext as jx
from jacobian_ext import ops


def mlp():
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3), nn.Softmax(-1))


@pytest.mark.parametrize("x, error, message", [
    (torch.arange(16).reshape(2, 8), TypeError, "floating-point"),
    (torch.randn(8), ValueError, r"\[B, \*in_shape\]"),
    (torch.tensor(1.0), ValueError, r"\[B, \*in_shape\]"),
    ([[1.0] * 8], TypeError, "must be a torch.Tensor"),
])
def test_bad_inputs(x, error, message):
    with pytest.raises(error, match=message):
        jx.batch_jacobian(mlp(), x)


def test_feature_size_mismatch_names_the_layer():
    model = nn.Sequential(nn.Flatten(), mlp())
    with pytest.raises(ValueError, match=r"layer '1.0' \(Linear\(in_features=8.*expects 8 input features.* has 5"):
        jx.batch_jacobian(model, torch.randn(2, 5))


def test_failing_fallback_layer_is_named():
    model = nn.Sequential(nn.Conv1d(3, 4, 3))
    with pytest.raises(ValueError, match=r"layer '0' \(Conv1d"):
        jx.batch_jacobian(model, torch.randn(2, 5, 7))


def test_dtype_mismatch_between_input_and_weights():
    with pytest.raises(TypeError, match=r"x has dtype torch.float64 but the model's '0.weight' has dtype torch.float32"):
        jx.batch_jacobian(mlp(), torch.randn(2, 8, dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_device_mismatch_between_input_and_weights():
    with pytest.raises(ValueError, match="is on"):
        jx.batch_jacobian(mlp().cuda(), torch.randn(2, 8))


def test_unknown_mode():
    with pytest.raises(ValueError, match="mode must be one of 'auto', 'forward', 'reverse', 'mixed'; got 'sideways'"):
        jx.batch_jacobian(mlp(), torch.randn(2, 8), mode="sideways")


def test_model_must_be_callable():
    with pytest.raises(TypeError, match="model must be an nn.Module or a callable"):
        jx.compile(42)


@pytest.mark.parametrize("layer", [nn.BatchNorm1d(6), nn.Dropout(0.2), torchvision.ops.StochasticDepth(0.2, "row")],
                         ids=["batchnorm", "dropout", "stochastic_depth"])
def test_training_mode_batch_coupling_layers_ask_for_eval(layer):
    model = nn.Sequential(nn.Linear(8, 6), layer, nn.Linear(6, 2))
    with pytest.raises(ValueError, match=r"layer '1' .* training mode.*model.eval\(\)"):
        jx.batch_jacobian(model, torch.randn(4, 8))
    model.eval()
    assert jx.batch_jacobian(model, torch.randn(4, 8)).shape == (4, 2, 8)


class TupleOut(nn.Module):
    def forward(self, x):
        return x, x


def test_non_tensor_output_is_rejected_by_compile_and_structured_by_batch_jacobian():
    with pytest.raises(TypeError, match="returns a tuple; .* single output tensor .*jx.batch_jacobian"):
        jx.compile(lambda x: (x, x))(torch.randn(2, 3))
    with pytest.raises(TypeError, match="returns a tuple; .* single output tensor"):
        jx.compile(nn.Sequential(nn.Linear(3, 3), TupleOut()))(torch.randn(2, 3))
    first, second = jx.batch_jacobian(lambda x: (x, 2 * x), torch.randn(2, 3))
    assert torch.equal(second, 2 * first) and torch.equal(first[0], torch.eye(3))
    with pytest.raises(TypeError, match="must return a tensor .* or a tuple, list or dict of them"):
        jx.batch_jacobian(lambda x: (x, "label"), torch.randn(2, 3))


def test_output_without_batch_dimension_is_rejected():
    with pytest.raises(ValueError, match="must keep the batch dimension"):
        jx.batch_jacobian(lambda x: x.sum(), torch.randn(2, 3))


# ---- the operators validate their arguments too (ValueError and TypeError from TORCH_CHECK_VALUE / TORCH_CHECK_TYPE) ----

@pytest.mark.parametrize("call, message", [
    (lambda: ops.batch_jacobian(torch.randn(2, 3), ["linear"], [torch.randn(4, 3), torch.randn(4)], "auto"),
     "mode must be 'forward' or 'reverse'"),
    (lambda: ops.batch_jacobian(torch.randn(2, 3), ["convolution"], [], "forward"),
     r"batch_jacobian: layers\[0\] \(linear, linear_no_bias, softmax, log_softmax, an activation, or an entry of a "
     r"graph program: conv, .*\) is 'convolution'; expected an activation: relu, .*hardtanh\[:min_val\[:max_val\]\]"),
    (lambda: ops.batch_jacobian(torch.randn(2, 3), ["conv"], [], "forward"),
     r"batch_jacobian: layers\[0\] \(conv\) needs the attribute stride="),
    (lambda: ops.batch_jacobian(torch.randn(2, 3), ["linear"], [torch.randn(4, 3)], "forward"),
     r"layer 0 \(linear\) needs 2 entries"),
    (lambda: ops.batch_jacobian(torch.randn(2, 3), ["linear_no_bias"], [torch.randn(4, 5)], "forward"),
     "expects 5 input features, got 3"),
    (lambda: ops.batch_jacobian(torch.randn(2, 3), ["relu"], [torch.randn(4, 3)], "forward"),
     "params has 1 entries but the layers use 0"),
    (lambda: ops.batch_jacobian(torch.randn(2, 3), ["linear_no_bias"], [torch.randn(4, 3, dtype=torch.float64)],
                                "forward"), "weight has dtype Double but the input has dtype Float"),
    (lambda: ops.batch_jacobian(torch.randn(2), [], [], "forward"), "at least one feature dimension"),
    (lambda: ops.batch_jacobian(torch.ones(2, 3, dtype=torch.int32), [], [], "forward"), "float32 or float64"),
    (lambda: ops.batch_jacobian(torch.randn(2, 3, dtype=torch.bfloat16), [], [], "forward"),
     r"float32 or float64 \(float16 and bfloat16 on CUDA only\), got BFloat16"),
    (lambda: ops.pointwise_jac_forward(torch.randn(2, 3), None, "swish"),
     r"pointwise_jac_forward: activation is 'swish'; expected an activation: relu, tanh, sigmoid, gelu, "),
    (lambda: ops.pointwise_jac_forward(torch.randn(2, 3), torch.randn(2, 4, 5), "relu"),
     r"jac of shape \[2, 4, 5\] must be \[2, 3, D\]"),
    (lambda: ops.softmax_jac_reverse(torch.randn(2, 3), torch.randn(2, 4, 5)), r"cotangent of shape .* must be"),
    (lambda: ops.linear_jac_forward(torch.randn(2, 3), None, torch.randn(4, 3), torch.randn(5)),
     r"bias must be \[4\]"),
    (lambda: ops.sequential_jac_forward(torch.randn(2, 3), None, [], []), "at least one layer"),
])
def test_operator_argument_errors(call, message):
    # TORCH_CHECK_TYPE for a wrong dtype, TORCH_CHECK_VALUE for everything else
    expected = TypeError if "dtype" in message or "float32 or float64" in message else ValueError
    with pytest.raises(expected, match=message):
        call()
