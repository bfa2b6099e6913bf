// Every schema of the jacext library (one block), and the kernels registered per backend.
// The op functions are device-generic (their element-wise work dispatches on the input's device), so
// the CPU and CUDA registrations share one list.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <string_view>

#include "jacext/ops.h"

TORCH_LIBRARY(jacext, m) {
  // Per-layer rules. Forward mode: `jac` is the running Jacobian [B, H_in, D], or [H_in, D] when the
  // same for every sample, or None for the identity (the layer input is the model input).
  // Reverse mode: `cotangent` is the running block [B, C, H_out], [C, H_out] or None (identity).
  m.def("linear_jac_forward(Tensor input, Tensor? jac, Tensor weight, Tensor? bias) -> (Tensor output, Tensor jac_out)");
  m.def("linear_jac_reverse(Tensor? cotangent, Tensor weight) -> Tensor");
  m.def("pointwise_jac_forward(Tensor input, Tensor? jac, str activation) -> (Tensor output, Tensor jac_out)");
  m.def("pointwise_jac_reverse(Tensor input, Tensor? cotangent, str activation) -> Tensor");
  m.def("softmax_jac_forward(Tensor input, Tensor? jac) -> (Tensor output, Tensor jac_out)");
  m.def("softmax_jac_reverse(Tensor output, Tensor? cotangent) -> Tensor");
  m.def("log_softmax_jac_forward(Tensor input, Tensor? jac) -> (Tensor output, Tensor jac_out)");
  m.def("log_softmax_jac_reverse(Tensor output, Tensor? cotangent) -> Tensor");
  // Rules on N-d per-sample features (conv, batch norm, pooling): input [B, *features]; `jac` None or
  // [B, *features, D] -> jac_out [B, *out_features, D]; `cotangent` None or [B, C, *out_features] ->
  // [B, C, *features]. Convolution: zero padding, 1 to 3 spatial dims; batch norm: eval mode.
  m.def("conv_jac_forward(Tensor input, Tensor? jac, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] dilation, int groups) -> (Tensor output, Tensor jac_out)");
  m.def("conv_jac_reverse(Tensor input, Tensor? cotangent, Tensor weight, int[] stride, int[] padding, int[] dilation, int groups) -> Tensor");
  m.def("batch_norm_jac_forward(Tensor input, Tensor? jac, Tensor? weight, Tensor? bias, Tensor running_mean, Tensor running_var, float eps) -> (Tensor output, Tensor jac_out)");
  m.def("batch_norm_jac_reverse(Tensor input, Tensor? cotangent, Tensor? weight, Tensor running_var, float eps) -> Tensor");
  m.def("max_pool2d_jac_forward(Tensor input, Tensor? jac, int[] kernel_size, int[] stride, int[] padding, int[] dilation, bool ceil_mode) -> (Tensor output, Tensor jac_out)");
  m.def("max_pool2d_jac_reverse(Tensor input, Tensor? cotangent, int[] kernel_size, int[] stride, int[] padding, int[] dilation, bool ceil_mode) -> Tensor");
  m.def("avg_pool2d_jac_forward(Tensor input, Tensor? jac, int[] kernel_size, int[] stride, int[] padding, bool ceil_mode, bool count_include_pad, int? divisor_override) -> (Tensor output, Tensor jac_out)");
  m.def("avg_pool2d_jac_reverse(Tensor input, Tensor? cotangent, int[] kernel_size, int[] stride, int[] padding, bool ceil_mode, bool count_include_pad, int? divisor_override) -> Tensor");
  m.def("adaptive_avg_pool2d_jac_forward(Tensor input, Tensor? jac, int[] output_size) -> (Tensor output, Tensor jac_out)");
  m.def("adaptive_avg_pool2d_jac_reverse(Tensor input, Tensor? cotangent, int[] output_size) -> Tensor");
  // Layer norm on N-d per-sample features (layout: the N-d conventions in jacobian_ext/ops.py): input [B, *feat], feat
  // ending in normalized_shape; jac [B, *feat, D] or None; cotangent [B, C, *feat] or None.
  m.def("layer_norm_jac_forward(Tensor input, Tensor? jac, int[] normalized_shape, Tensor? weight, Tensor? bias, float eps) -> (Tensor output, Tensor jac_out)");
  m.def("layer_norm_jac_reverse(Tensor input, Tensor? cotangent, int[] normalized_shape, Tensor? weight, float eps) -> Tensor");
  // A segment of native layers (see sequential.cpp for the plan encoding).
  m.def("sequential_jac_forward(Tensor input, Tensor? jac, str[] layers, Tensor[] params) -> (Tensor output, Tensor jac_out)");
  m.def("sequential_jac_reverse(Tensor input, Tensor? cotangent, str[] layers, Tensor[] params) -> (Tensor output, Tensor cotangent_in)");
  // The whole plan: input [B, *in] -> (output [B, C], jacobian [B, C, *in]).
  m.def("batch_jacobian(Tensor input, str[] layers, Tensor[] params, str mode) -> (Tensor output, Tensor jacobian)");
}

namespace {

constexpr const char* kOpNames[] = {
    "linear_jac_forward",    "linear_jac_reverse",      "pointwise_jac_forward",  "pointwise_jac_reverse",
    "softmax_jac_forward",   "softmax_jac_reverse",     "log_softmax_jac_forward", "log_softmax_jac_reverse",
    "sequential_jac_forward", "sequential_jac_reverse", "batch_jacobian",
    // N-d per-sample features
    "conv_jac_forward", "conv_jac_reverse", "batch_norm_jac_forward", "batch_norm_jac_reverse",
    "max_pool2d_jac_forward", "max_pool2d_jac_reverse", "avg_pool2d_jac_forward", "avg_pool2d_jac_reverse",
    "adaptive_avg_pool2d_jac_forward", "adaptive_avg_pool2d_jac_reverse",
    "layer_norm_jac_forward", "layer_norm_jac_reverse",
};

void register_kernels(torch::Library& m) {
  m.impl("linear_jac_forward", TORCH_FN(jacext::linear_jac_forward));
  m.impl("linear_jac_reverse", TORCH_FN(jacext::linear_jac_reverse));
  m.impl("pointwise_jac_forward", TORCH_FN(jacext::pointwise_jac_forward));
  m.impl("pointwise_jac_reverse", TORCH_FN(jacext::pointwise_jac_reverse));
  m.impl("softmax_jac_forward", TORCH_FN(jacext::softmax_jac_forward));
  m.impl("softmax_jac_reverse", TORCH_FN(jacext::softmax_jac_reverse));
  m.impl("log_softmax_jac_forward", TORCH_FN(jacext::log_softmax_jac_forward));
  m.impl("log_softmax_jac_reverse", TORCH_FN(jacext::log_softmax_jac_reverse));
  m.impl("sequential_jac_forward", TORCH_FN(jacext::sequential_jac_forward));
  m.impl("sequential_jac_reverse", TORCH_FN(jacext::sequential_jac_reverse));
  m.impl("batch_jacobian", TORCH_FN(jacext::batch_jacobian));
  // N-d per-sample features
  m.impl("conv_jac_forward", TORCH_FN(jacext::conv_jac_forward));
  m.impl("conv_jac_reverse", TORCH_FN(jacext::conv_jac_reverse));
  m.impl("batch_norm_jac_forward", TORCH_FN(jacext::batch_norm_jac_forward));
  m.impl("batch_norm_jac_reverse", TORCH_FN(jacext::batch_norm_jac_reverse));
  m.impl("max_pool2d_jac_forward", TORCH_FN(jacext::max_pool2d_jac_forward));
  m.impl("max_pool2d_jac_reverse", TORCH_FN(jacext::max_pool2d_jac_reverse));
  m.impl("avg_pool2d_jac_forward", TORCH_FN(jacext::avg_pool2d_jac_forward));
  m.impl("avg_pool2d_jac_reverse", TORCH_FN(jacext::avg_pool2d_jac_reverse));
  m.impl("adaptive_avg_pool2d_jac_forward", TORCH_FN(jacext::adaptive_avg_pool2d_jac_forward));
  m.impl("adaptive_avg_pool2d_jac_reverse", TORCH_FN(jacext::adaptive_avg_pool2d_jac_reverse));
  m.impl("layer_norm_jac_forward", TORCH_FN(jacext::layer_norm_jac_forward));
  m.impl("layer_norm_jac_reverse", TORCH_FN(jacext::layer_norm_jac_reverse));
}

}  // namespace

TORCH_LIBRARY_IMPL(jacext, CPU, m) { register_kernels(m); }

// The whole-plan op batch_jacobian is differentiable: jacobian_ext/differentiable.py registers its
// backward (torch.library.register_autograd). The per-layer rules are not: this C++ fallback records a
// node that raises "not implemented" on backward whenever an input (a weight included) requires grad,
// never a silently wrong gradient, and no Python on the call path.
TORCH_LIBRARY_IMPL(jacext, Autograd, m) {
  for (const char* name : kOpNames) {
    if (std::string_view(name) != "batch_jacobian") m.impl(name, torch::autograd::autogradNotImplementedFallback());
  }
}

#ifdef JACEXT_WITH_CUDA
TORCH_LIBRARY_IMPL(jacext, CUDA, m) { register_kernels(m); }
#endif
