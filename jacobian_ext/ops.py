"""Thin wrappers over torch.ops.jacext.*, with a fake (meta) implementation for every operator.

Layout conventions (shared with csrc/):
- forward-mode ``jac``: the running Jacobian ``[B, H_in, D]``; ``[H_in, D]`` when it is the same for
  every sample; ``None`` for the identity (the layer input is the model input). Returned as
  ``[B, H_out, D]`` (``[H_out, D]`` for a Linear fed a shared or identity block), stored D-major.
- reverse-mode ``cotangent``: ``[B, C, H_out]``, ``[C, H_out]`` or ``None`` (identity); returns
  ``[B, C, H_in]``.
- a plan for the sequential ops: ``layers`` (names) and ``params`` (flat list of tensors: "linear"
  takes its weight and bias, "linear_no_bias" its weight; the activations, "softmax" and
  "log_softmax" take nothing).
- activation strings (``pointwise_jac_*``'s ``activation`` and activation entries of ``layers``)::

      relu | tanh | sigmoid | gelu | gelu_tanh | silu | relu6
      | leaky_relu[:negative_slope] | elu[:alpha] | softplus[:beta[:threshold]] | hardtanh[:min_val[:max_val]]
      | hardswish | hardsigmoid | mish

  (one row each in csrc/jacext/activations.def and rules.ACTIVATIONS)

  "gelu" is ``approximate='none'``, "gelu_tanh" ``approximate='tanh'``, "relu6" is "hardtanh:0:6";
  parameters are decimal numbers (``repr(float)`` round-trips exactly), omitted trailing ones take
  torch's defaults. ``rules.activation_spec(module)`` writes them for modules.
- N-d layers (layer norm) keep the per-sample feature shape: ``jac`` ``[B, *feat, D]`` or ``None``,
  returned as ``[B, *feat_out, D]`` (stored D-major: ``[B, D, *feat_out]`` moved); ``cotangent``
  ``[B, C, *feat_out]`` or ``None``, returning ``[B, C, *feat_in]``.
"""
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from . import program
from ._loader import load_library

build_info = load_library()
_ops = torch.ops.jacext



def linear_jac_forward(input: Tensor, jac: Optional[Tensor], weight: Tensor, bias: Optional[Tensor] = None):
    return _ops.linear_jac_forward.default(input, jac, weight, bias)


def linear_jac_reverse(cotangent: Optional[Tensor], weight: Tensor) -> Tensor:
    return _ops.linear_jac_reverse.default(cotangent, weight)


def pointwise_jac_forward(input: Tensor, jac: Optional[Tensor], activation: str):
    return _ops.pointwise_jac_forward.default(input, jac, activation)


def pointwise_jac_reverse(input: Tensor, cotangent: Optional[Tensor], activation: str) -> Tensor:
    return _ops.pointwise_jac_reverse.default(input, cotangent, activation)


def softmax_jac_forward(input: Tensor, jac: Optional[Tensor]):
    return _ops.softmax_jac_forward.default(input, jac)


def softmax_jac_reverse(output: Tensor, cotangent: Optional[Tensor]) -> Tensor:
    return _ops.softmax_jac_reverse.default(output, cotangent)


def log_softmax_jac_forward(input: Tensor, jac: Optional[Tensor]):
    return _ops.log_softmax_jac_forward.default(input, jac)


def log_softmax_jac_reverse(output: Tensor, cotangent: Optional[Tensor]) -> Tensor:
    return _ops.log_softmax_jac_reverse.default(output, cotangent)


def layer_norm_jac_forward(
    input: Tensor,
    jac: Optional[Tensor],
    normalized_shape: Sequence[int],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
):
    return _ops.layer_norm_jac_forward.default(input, jac, list(normalized_shape), weight, bias, float(eps))


def layer_norm_jac_reverse(
    input: Tensor,
    cotangent: Optional[Tensor],
    normalized_shape: Sequence[int],
    weight: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    return _ops.layer_norm_jac_reverse.default(input, cotangent, list(normalized_shape), weight, float(eps))


def sequential_jac_forward(input: Tensor, jac: Optional[Tensor], layers: Sequence[str], params: Sequence[Tensor]):
    return _ops.sequential_jac_forward.default(input, jac, list(layers), list(params))


def sequential_jac_reverse(
    input: Tensor, cotangent: Optional[Tensor], layers: Sequence[str], params: Sequence[Tensor]
):
    return _ops.sequential_jac_reverse.default(input, cotangent, list(layers), list(params))


def batch_jacobian(input: Tensor, layers: Sequence[str], params: Sequence[Tensor], mode: str):
    if torch.is_grad_enabled() and (input.requires_grad or any(p.requires_grad for p in params)):
        if torch.compiler.is_compiling() or torch.jit.is_tracing():  # they record the op, not a Python Function
            return _ops.batch_jacobian.default(input, list(layers), list(params), mode)
        return differentiable.FusedJacobian.apply(input, list(layers), mode, *params)
    # Nothing to differentiate: call the kernel below the Autograd key. The op's autograd kernel
    # (differentiable.py, torch.library.register_autograd) is Python, and its no-grad redispatch alone
    # cost 80 us per call, twice the kernel's time on the `tiny` bench case.
    with torch._C._AutoDispatchBelowAutograd():
        return _ops.batch_jacobian.default(input, list(layers), list(params), mode)


# ---- ops on N-d per-sample features: input [B, *features]; jac None or [B, *features, D] -> jac_out
# [B, *out_features, D]; cotangent None or [B, C, *out_features] -> [B, C, *features] ----

def conv_jac_forward(input: Tensor, jac: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                     stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int):
    return _ops.conv_jac_forward.default(input, jac, weight, bias, list(stride), list(padding), list(dilation), groups)


def conv_jac_reverse(input: Tensor, cotangent: Optional[Tensor], weight: Tensor, stride: Sequence[int],
                     padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    return _ops.conv_jac_reverse.default(input, cotangent, weight, list(stride), list(padding), list(dilation), groups)


def batch_norm_jac_forward(input: Tensor, jac: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                           running_mean: Tensor, running_var: Tensor, eps: float):
    return _ops.batch_norm_jac_forward.default(input, jac, weight, bias, running_mean, running_var, eps)


def batch_norm_jac_reverse(input: Tensor, cotangent: Optional[Tensor], weight: Optional[Tensor],
                           running_var: Tensor, eps: float) -> Tensor:
    return _ops.batch_norm_jac_reverse.default(input, cotangent, weight, running_var, eps)


def max_pool2d_jac_forward(input: Tensor, jac: Optional[Tensor], kernel_size: Sequence[int], stride: Sequence[int],
                           padding: Sequence[int], dilation: Sequence[int], ceil_mode: bool):
    return _ops.max_pool2d_jac_forward.default(
        input, jac, list(kernel_size), list(stride), list(padding), list(dilation), ceil_mode
    )


def max_pool2d_jac_reverse(input: Tensor, cotangent: Optional[Tensor], kernel_size: Sequence[int],
                           stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                           ceil_mode: bool) -> Tensor:
    return _ops.max_pool2d_jac_reverse.default(
        input, cotangent, list(kernel_size), list(stride), list(padding), list(dilation), ceil_mode
    )


def avg_pool2d_jac_forward(input: Tensor, jac: Optional[Tensor], kernel_size: Sequence[int], stride: Sequence[int],
                           padding: Sequence[int], ceil_mode: bool, count_include_pad: bool,
                           divisor_override: Optional[int]):
    return _ops.avg_pool2d_jac_forward.default(
        input, jac, list(kernel_size), list(stride), list(padding), ceil_mode, count_include_pad, divisor_override
    )


def avg_pool2d_jac_reverse(input: Tensor, cotangent: Optional[Tensor], kernel_size: Sequence[int],
                           stride: Sequence[int], padding: Sequence[int], ceil_mode: bool, count_include_pad: bool,
                           divisor_override: Optional[int]) -> Tensor:
    return _ops.avg_pool2d_jac_reverse.default(
        input, cotangent, list(kernel_size), list(stride), list(padding), ceil_mode, count_include_pad,
        divisor_override,
    )


def adaptive_avg_pool2d_jac_forward(input: Tensor, jac: Optional[Tensor], output_size: Sequence[int]):
    return _ops.adaptive_avg_pool2d_jac_forward.default(input, jac, list(output_size))


def adaptive_avg_pool2d_jac_reverse(input: Tensor, cotangent: Optional[Tensor], output_size: Sequence[int]) -> Tensor:
    return _ops.adaptive_avg_pool2d_jac_reverse.default(input, cotangent, list(output_size))


# ---- fake implementations: shapes and strides exactly as the C++ kernels produce them ----

def _tangent_columns(input: Tensor, jac: Optional[Tensor]):
    return input.shape[1] if jac is None else jac.shape[-1]


def _cotangent_rows(features, cotangent: Optional[Tensor]):
    return features if cotangent is None else cotangent.shape[-2]


def _per_sample_jac(input: Tensor, columns, features) -> Tensor:
    # Stored as [B, D, H] and returned as its [B, H, D] transpose.
    return input.new_empty(input.shape[0], columns, features).transpose(1, 2)


def _plan_output_width(input_width, layers: List[str], params: List[Tensor]):
    width, next_param = input_width, 0
    for name in layers:
        if name in ("linear", "linear_no_bias"):
            width = params[next_param].shape[0]
            next_param += 2 if name == "linear" else 1
    return width


@torch.library.register_fake("jacext::linear_jac_forward")
def _linear_jac_forward_fake(input, jac, weight, bias):
    output = input.new_empty(input.shape[0], weight.shape[0])
    columns = _tangent_columns(input, jac)
    if jac is None or jac.dim() == 2:
        return output, input.new_empty(columns, weight.shape[0]).t()
    return output, _per_sample_jac(input, columns, weight.shape[0])


@torch.library.register_fake("jacext::linear_jac_reverse")
def _linear_jac_reverse_fake(cotangent, weight):
    if cotangent is None:
        return weight.new_empty(weight.shape)
    return cotangent.new_empty(*cotangent.shape[:-1], weight.shape[1])


def _row_rule_forward_fake(input, jac, *unused):
    return input.new_empty(input.shape), _per_sample_jac(input, _tangent_columns(input, jac), input.shape[1])


def _row_rule_reverse_fake(state, cotangent, *unused):
    return state.new_empty(state.shape[0], _cotangent_rows(state.shape[1], cotangent), state.shape[1])


for _name in ("pointwise", "softmax", "log_softmax"):
    torch.library.register_fake(f"jacext::{_name}_jac_forward", _row_rule_forward_fake)
    torch.library.register_fake(f"jacext::{_name}_jac_reverse", _row_rule_reverse_fake)


def _features_size(shape):
    size = 1
    for extent in shape:
        size = size * extent
    return size


@torch.library.register_fake("jacext::layer_norm_jac_forward")
def _layer_norm_jac_forward_fake(input, jac, normalized_shape, weight, bias, eps):
    columns = _features_size(input.shape[1:]) if jac is None else jac.shape[-1]
    # Stored as [B, D, *feat] and returned with D moved last.
    jac_out = input.new_empty(input.shape[0], columns, *input.shape[1:]).movedim(1, -1)
    return input.new_empty(input.shape), jac_out


@torch.library.register_fake("jacext::layer_norm_jac_reverse")
def _layer_norm_jac_reverse_fake(input, cotangent, normalized_shape, weight, eps):
    rows = _features_size(input.shape[1:]) if cotangent is None else cotangent.shape[1]
    return input.new_empty(input.shape[0], rows, *input.shape[1:])


@torch.library.register_fake("jacext::sequential_jac_forward")
def _sequential_jac_forward_fake(input, jac, layers, params):
    width = _plan_output_width(input.shape[1], layers, params)
    return input.new_empty(input.shape[0], width), _per_sample_jac(input, _tangent_columns(input, jac), width)


@torch.library.register_fake("jacext::sequential_jac_reverse")
def _sequential_jac_reverse_fake(input, cotangent, layers, params):
    width = _plan_output_width(input.shape[1], layers, params)
    rows = _cotangent_rows(width, cotangent)
    return input.new_empty(input.shape[0], width), input.new_empty(input.shape[0], rows, input.shape[1])


@torch.library.register_fake("jacext::batch_jacobian")
def _batch_jacobian_fake(input, layers, params, mode):
    if program.is_graph_program(layers):  # shapes from the program replayed on the fake input
        width = _features_size(program.replay(input, layers, params).shape[1:])
    else:
        width = _plan_output_width(_features_size(input.shape[1:]), layers, params)
    return input.new_empty(input.shape[0], width), input.new_empty(input.shape[0], width, *input.shape[1:])


# N-d ops: the layer's output shape comes from the ATen op itself run on the fake input; results are fresh
# contiguous tensors (forward mode: stored [B, D, *out_features], returned as its movedim(1, -1) view).

def _nd_forward_results(input, jac, layer_output):
    out_features = layer_output.shape[1:]
    columns = _numel(input.shape[1:]) if jac is None else jac.shape[-1]
    output = input.new_empty(layer_output.shape)
    return output, input.new_empty(input.shape[0], columns, *out_features).movedim(1, -1)


def _nd_reverse_result(input, cotangent, out_features):
    rows = _numel(out_features) if cotangent is None else cotangent.shape[1]
    return input.new_empty(input.shape[0], rows, *input.shape[1:])


def _numel(shape):
    count = 1
    for size in shape:
        count = count * size
    return count


def _planes(input):
    """[B, *planes, H, W] as the [B, P, H, W] the pooling ops see."""
    return input.reshape(input.shape[0], _numel(input.shape[1:-2]), *input.shape[-2:])


def _pooled(input, planes_output):
    return planes_output.reshape(*input.shape[:-2], *planes_output.shape[-2:])


def _conv(input, weight, bias, stride, padding, dilation, groups):
    no_output_padding = [0] * len(stride)
    return torch.ops.aten.convolution(input, weight, bias, stride, padding, dilation, False, no_output_padding, groups)


def _max_pool(input, kernel_size, stride, padding, dilation, ceil_mode):
    pooled = torch.ops.aten.max_pool2d_with_indices(_planes(input), kernel_size, stride, padding, dilation, ceil_mode)
    return _pooled(input, pooled[0])


def _avg_pool(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    pooled = torch.ops.aten.avg_pool2d(
        _planes(input), kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
    )
    return _pooled(input, pooled)


@torch.library.register_fake("jacext::conv_jac_forward")
def _conv_jac_forward_fake(input, jac, weight, bias, stride, padding, dilation, groups):
    return _nd_forward_results(input, jac, _conv(input, weight, bias, stride, padding, dilation, groups))


@torch.library.register_fake("jacext::conv_jac_reverse")
def _conv_jac_reverse_fake(input, cotangent, weight, stride, padding, dilation, groups):
    output = _conv(input, weight, None, stride, padding, dilation, groups)
    return _nd_reverse_result(input, cotangent, output.shape[1:])


@torch.library.register_fake("jacext::batch_norm_jac_forward")
def _batch_norm_jac_forward_fake(input, jac, weight, bias, running_mean, running_var, eps):
    return _nd_forward_results(input, jac, input)


@torch.library.register_fake("jacext::batch_norm_jac_reverse")
def _batch_norm_jac_reverse_fake(input, cotangent, weight, running_var, eps):
    return _nd_reverse_result(input, cotangent, input.shape[1:])


@torch.library.register_fake("jacext::max_pool2d_jac_forward")
def _max_pool2d_jac_forward_fake(input, jac, *geometry):
    return _nd_forward_results(input, jac, _max_pool(input, *geometry))


@torch.library.register_fake("jacext::max_pool2d_jac_reverse")
def _max_pool2d_jac_reverse_fake(input, cotangent, *geometry):
    return _nd_reverse_result(input, cotangent, _max_pool(input, *geometry).shape[1:])


@torch.library.register_fake("jacext::avg_pool2d_jac_forward")
def _avg_pool2d_jac_forward_fake(input, jac, *geometry):
    return _nd_forward_results(input, jac, _avg_pool(input, *geometry))


@torch.library.register_fake("jacext::avg_pool2d_jac_reverse")
def _avg_pool2d_jac_reverse_fake(input, cotangent, *geometry):
    return _nd_reverse_result(input, cotangent, _avg_pool(input, *geometry).shape[1:])


@torch.library.register_fake("jacext::adaptive_avg_pool2d_jac_forward")
def _adaptive_avg_pool2d_jac_forward_fake(input, jac, output_size):
    return _nd_forward_results(input, jac, input.new_empty(*input.shape[:-2], *output_size))


@torch.library.register_fake("jacext::adaptive_avg_pool2d_jac_reverse")
def _adaptive_avg_pool2d_jac_reverse_fake(input, cotangent, output_size):
    return _nd_reverse_result(input, cotangent, (*input.shape[1:-2], *output_size))


# The whole-plan op's backward (gradients of the Jacobian), registered once the op is loaded.
from . import differentiable  # noqa: E402,F401
