// Batch normalisation in eval mode: y = (x - running_mean) / sqrt(running_var + eps) * weight + bias,
// per channel (axis 1 of [B, C_ch, *spatial]). Its Jacobian is the diagonal per-channel scale
// weight / sqrt(running_var + eps), the same for every sample and in both directions.
#include "jacext/checks.h"
#include "jacext/nd_rows.h"
#include "jacext/ops.h"

namespace jacext {
namespace {

void check_channel_vector(const at::Tensor& input, const std::optional<at::Tensor>& vector, const char* op,
                          const char* arg) {
  if (!vector.has_value()) return;
  check_same_dtype_device(input, *vector, op, arg);
  TORCH_CHECK_VALUE(vector->dim() == 1 && vector->size(0) == input.size(1), op, ": ", arg, " must be [", input.size(1),
                    "] (one entry per channel, axis 1 of the input), got shape ", vector->sizes());
}

void check_batch_norm_args(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                           const at::Tensor& running_var, const char* op) {
  check_batched_features(input, 1, 4, op, "input");
  check_channel_vector(input, weight, op, "weight");
  check_channel_vector(input, running_var, op, "running_var");
}

// The factor of each row block [N, C_ch, *spatial]: weight / sqrt(running_var + eps), shaped to
// broadcast over the spatial dims.
at::Tensor channel_scale(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                         const at::Tensor& running_var, double eps) {
  std::vector<int64_t> shape(input.dim() - 1, 1);
  shape[0] = input.size(1);
  return batch_norm_scale(weight, running_var, eps).view(shape);
}

at::Tensor scale_rows(const std::optional<at::Tensor>& rows, const at::Tensor& input, const at::Tensor& scale) {
  return map_rows_shared(rows, input.size(0), input.sizes().slice(1), input.options(),
                         [&](const at::Tensor& features) { return features * scale; });
}

}  // namespace

at::Tensor batch_norm_scale(const std::optional<at::Tensor>& weight, const at::Tensor& running_var, double eps) {
  const at::Tensor scale = at::rsqrt(running_var + eps);
  return weight.has_value() ? scale * *weight : scale;
}

std::tuple<at::Tensor, at::Tensor> batch_norm_jac_forward(const at::Tensor& input,
                                                          const std::optional<at::Tensor>& jac,
                                                          const std::optional<at::Tensor>& weight,
                                                          const std::optional<at::Tensor>& bias,
                                                          const at::Tensor& running_mean,
                                                          const at::Tensor& running_var, double eps) {
  const char* op = "jacext::batch_norm_jac_forward";
  check_batch_norm_args(input, weight, running_var, op);
  check_channel_vector(input, bias, op, "bias");
  check_channel_vector(input, running_mean, op, "running_mean");
  const std::optional<at::Tensor> tangents = tangents_nd_from_jac(jac, input, op);
  at::Tensor output = at::batch_norm(input, weight, bias, running_mean, running_var, /*training=*/false,
                                     /*momentum=*/0.0, eps, /*cudnn_enabled=*/true)
                          .contiguous();
  const at::Tensor tangents_out = scale_rows(tangents, input, channel_scale(input, weight, running_var, eps));
  return {output, tangents_out.movedim(1, -1)};
}

at::Tensor batch_norm_jac_reverse(const at::Tensor& input, const std::optional<at::Tensor>& cotangent,
                                  const std::optional<at::Tensor>& weight, const at::Tensor& running_var,
                                  double eps) {
  const char* op = "jacext::batch_norm_jac_reverse";
  check_batch_norm_args(input, weight, running_var, op);
  const std::optional<at::Tensor> cotangents =
      cotangents_nd_from_arg(cotangent, input.size(0), input.sizes().slice(1), input, op);
  return scale_rows(cotangents, input, channel_scale(input, weight, running_var, eps));
}

}  // namespace jacext
