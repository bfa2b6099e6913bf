// The operators' C++ entry points (schemas in jacext/operators.def). All are device-generic: element-wise
// work runs on the backend kernel of the input's device.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <string_view>
#include <tuple>

namespace jacext {

// weight [out, in_features] and bias [out] (if any) match `input` in dtype and device.
void check_linear_params(const at::Tensor& input, int64_t in_features, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, const char* op);

std::tuple<at::Tensor, at::Tensor> linear_jac_forward(const at::Tensor& input, const std::optional<at::Tensor>& jac,
                                                      const at::Tensor& weight, const std::optional<at::Tensor>& bias);
at::Tensor linear_jac_reverse(const std::optional<at::Tensor>& cotangent, const at::Tensor& weight);

std::tuple<at::Tensor, at::Tensor> pointwise_jac_forward(const at::Tensor& input, const std::optional<at::Tensor>& jac,
                                                         std::string_view activation);
at::Tensor pointwise_jac_reverse(const at::Tensor& input, const std::optional<at::Tensor>& cotangent,
                                 std::string_view activation);

std::tuple<at::Tensor, at::Tensor> softmax_jac_forward(const at::Tensor& input, const std::optional<at::Tensor>& jac);
at::Tensor softmax_jac_reverse(const at::Tensor& output, const std::optional<at::Tensor>& cotangent);

std::tuple<at::Tensor, at::Tensor> log_softmax_jac_forward(const at::Tensor& input,
                                                           const std::optional<at::Tensor>& jac);
at::Tensor log_softmax_jac_reverse(const at::Tensor& output, const std::optional<at::Tensor>& cotangent);

// ---- Ops on N-d per-sample features: input [B, *features]; forward-mode jac None (identity) or
// [B, *features, D], returned as [B, *out_features, D] (D-major storage); reverse-mode cotangent None
// (identity) or [B, C, *out_features], returned as a contiguous [B, C, *features]. ----

// The convolution's value (the value pass of reverse mode), by the cheapest form of its geometry.
at::Tensor conv_value(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);
std::tuple<at::Tensor, at::Tensor> conv_jac_forward(const at::Tensor& input, const std::optional<at::Tensor>& jac,
                                                    const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                                    at::IntArrayRef dilation, int64_t groups);
at::Tensor conv_jac_reverse(const at::Tensor& input, const std::optional<at::Tensor>& cotangent,
                            const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups);
// conv_jac_reverse for callers that take blocks in any layout (the graph executor): a cotangent block goes to the
// transposed convolution as it is and comes back in the layout that leaves (channels last where the block was).
at::Tensor conv_jac_reverse_any_layout(const at::Tensor& input, const std::optional<at::Tensor>& cotangent,
                                       const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                                       at::IntArrayRef dilation, int64_t groups);

// The eval-mode batch norm's per-channel Jacobian, weight / sqrt(running_var + eps), as a [C] vector.
at::Tensor batch_norm_scale(const std::optional<at::Tensor>& weight, const at::Tensor& running_var, double eps);
std::tuple<at::Tensor, at::Tensor> batch_norm_jac_forward(const at::Tensor& input,
                                                          const std::optional<at::Tensor>& jac,
                                                          const std::optional<at::Tensor>& weight,
                                                          const std::optional<at::Tensor>& bias,
                                                          const at::Tensor& running_mean,
                                                          const at::Tensor& running_var, double eps);
at::Tensor batch_norm_jac_reverse(const at::Tensor& input, const std::optional<at::Tensor>& cotangent,
                                  const std::optional<at::Tensor>& weight, const at::Tensor& running_var,
                                  double eps);

std::tuple<at::Tensor, at::Tensor> max_pool2d_jac_forward(const at::Tensor& input,
                                                          const std::optional<at::Tensor>& jac,
                                                          at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                                          at::IntArrayRef padding, at::IntArrayRef dilation,
                                                          bool ceil_mode);
at::Tensor max_pool2d_jac_reverse(const at::Tensor& input, const std::optional<at::Tensor>& cotangent,
                                  at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                  at::IntArrayRef dilation, bool ceil_mode);
// The reverse rule in two halves, for a walker that evaluates the value first: the pooled value with its
// argmax (at::max_pool2d_with_indices's indices, [N, P, Ho, Wo]), then the rule from that argmax, so the
// pooling runs once per call.
std::tuple<at::Tensor, at::Tensor> max_pool2d_with_argmax(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                          at::IntArrayRef stride, at::IntArrayRef padding,
                                                          at::IntArrayRef dilation, bool ceil_mode);
at::Tensor max_pool2d_jac_reverse_from_argmax(const at::Tensor& input, const at::Tensor& argmax,
                                              const std::optional<at::Tensor>& cotangent);

std::tuple<at::Tensor, at::Tensor> avg_pool2d_jac_forward(const at::Tensor& input,
                                                          const std::optional<at::Tensor>& jac,
                                                          at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                                          at::IntArrayRef padding, bool ceil_mode,
                                                          bool count_include_pad,
                                                          std::optional<int64_t> divisor_override);
at::Tensor avg_pool2d_jac_reverse(const at::Tensor& input, const std::optional<at::Tensor>& cotangent,
                                  at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                  bool ceil_mode, bool count_include_pad, std::optional<int64_t> divisor_override);

std::tuple<at::Tensor, at::Tensor> adaptive_avg_pool2d_jac_forward(const at::Tensor& input,
                                                                   const std::optional<at::Tensor>& jac,
                                                                   at::IntArrayRef output_size);
at::Tensor adaptive_avg_pool2d_jac_reverse(const at::Tensor& input, const std::optional<at::Tensor>& cotangent,
                                           at::IntArrayRef output_size);

std::tuple<at::Tensor, at::Tensor> layer_norm_jac_forward(const at::Tensor& input, const std::optional<at::Tensor>& jac,
                                                          at::IntArrayRef normalized_shape,
                                                          const std::optional<at::Tensor>& weight,
                                                          const std::optional<at::Tensor>& bias, double eps);
at::Tensor layer_norm_jac_reverse(const at::Tensor& input, const std::optional<at::Tensor>& cotangent,
                                  at::IntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
                                  double eps);
// layer_norm_jac_reverse, the rows written over the cotangent block where `overwrite` (it must then be the
// caller's own, contiguous block) instead of into a fresh one.
at::Tensor layer_norm_rows_reverse(const at::Tensor& input, const std::optional<at::Tensor>& cotangent,
                                   at::IntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
                                   double eps, bool overwrite);

using LayerParams = at::TensorList;

std::tuple<at::Tensor, at::Tensor> sequential_jac_forward(const at::Tensor& input, const std::optional<at::Tensor>& jac,
                                                          c10::ArrayRef<std::string> layers, const LayerParams& params);
std::tuple<at::Tensor, at::Tensor> sequential_jac_reverse(const at::Tensor& input,
                                                          const std::optional<at::Tensor>& cotangent,
                                                          c10::ArrayRef<std::string> layers, const LayerParams& params);
std::tuple<at::Tensor, at::Tensor> batch_jacobian(const at::Tensor& input, c10::ArrayRef<std::string> layers,
                                                  const LayerParams& params, std::string_view mode);

}  // namespace jacext
