#include "jacext/checks.h"

namespace jacext {

void check_floating_tensor(const at::Tensor& input, const char* op, const char* arg) {
  const at::ScalarType dtype = input.scalar_type();
  const bool reduced_precision = dtype == at::kHalf || dtype == at::kBFloat16;
  // The CPU kernels are built for float and double only; the CUDA kernels also take half and bfloat16.
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || (reduced_precision && input.device().is_cuda()), op,
                   ": ", arg, " must be float32 or float64", reduced_precision ? " (float16 and bfloat16 on CUDA only)" : "",
                   ", got ", dtype);
  TORCH_CHECK_VALUE(input.device().is_cpu() || input.device().is_cuda(), op, ": ", arg,
                    " must be on the CPU or a CUDA device, got ", input.device());
#ifndef JACEXT_WITH_CUDA
  TORCH_CHECK_VALUE(input.device().is_cpu(), op, ": ", arg,
                    " is on a CUDA device but jacobian_ext was built without CUDA support");
#endif
}

void check_feature_matrix(const at::Tensor& input, const char* op, const char* arg) {
  TORCH_CHECK_VALUE(input.dim() == 2, op, ": ", arg, " must be a [batch, features] matrix, got shape ", input.sizes());
  check_floating_tensor(input, op, arg);
}

void check_batched_features(const at::Tensor& input, int64_t min_feature_dims, int64_t max_feature_dims,
                            const char* op, const char* arg) {
  const int64_t feature_dims = input.dim() - 1;
  TORCH_CHECK_VALUE(feature_dims >= min_feature_dims && feature_dims <= max_feature_dims, op, ": ", arg,
                    " must be [batch, *features] with ", min_feature_dims, " to ", max_feature_dims,
                    " feature dims, got shape ", input.sizes());
  check_floating_tensor(input, op, arg);
}

void check_same_dtype_device(const at::Tensor& input, const at::Tensor& other, const char* op, const char* arg) {
  TORCH_CHECK_TYPE(other.scalar_type() == input.scalar_type(), op, ": ", arg, " has dtype ", other.scalar_type(),
                   " but the input has dtype ", input.scalar_type());
  TORCH_CHECK_VALUE(other.device() == input.device(), op, ": ", arg, " is on ", other.device(),
                    " but the input is on ", input.device());
}

JacobianBlock tangents_from_jac(const std::optional<at::Tensor>& jac, const at::Tensor& input, const char* op) {
  if (!jac.has_value()) return JacobianBlock::identity();
  const at::Tensor& j = *jac;
  check_same_dtype_device(input, j, op, "jac");
  const int64_t features = input.size(1);
  if (j.dim() == 2) {
    TORCH_CHECK_VALUE(j.size(0) == features, op, ": jac of shape ", j.sizes(), " must be [", features,
                      ", D] to match the input's ", features, " features");
    return JacobianBlock::shared(j.t().contiguous());
  }
  TORCH_CHECK_VALUE(j.dim() == 3 && j.size(0) == input.size(0) && j.size(1) == features, op, ": jac of shape ",
                    j.sizes(), " must be [", input.size(0), ", ", features, ", D] (or [", features,
                    ", D] when shared by every sample)");
  return JacobianBlock::per_sample(j.transpose(1, 2).contiguous());
}

JacobianBlock cotangents_from_arg(const std::optional<at::Tensor>& cotangent, int64_t batch, int64_t features,
                                  const at::Tensor& like, const char* op) {
  if (!cotangent.has_value()) return JacobianBlock::identity();
  const at::Tensor& g = *cotangent;
  check_same_dtype_device(like, g, op, "cotangent");
  if (g.dim() == 2) {
    TORCH_CHECK_VALUE(g.size(1) == features, op, ": cotangent of shape ", g.sizes(), " must be [C, ", features, "]");
    return JacobianBlock::shared(g.contiguous());
  }
  TORCH_CHECK_VALUE(g.dim() == 3 && (batch < 0 || g.size(0) == batch) && g.size(2) == features, op,
                    ": cotangent of shape ", g.sizes(), " must be [", batch, ", C, ", features, "] (or [C, ", features,
                    "] when shared by every sample)");
  return JacobianBlock::per_sample(g.contiguous());
}

at::Tensor tangents_to_jac(const JacobianBlock& block, int64_t batch, int64_t features,
                           const at::TensorOptions& options) {
  return block.dense(batch, features, options).transpose(1, 2);
}

std::optional<at::Tensor> tangents_nd_from_jac(const std::optional<at::Tensor>& jac, const at::Tensor& input,
                                              const char* op) {
  if (!jac.has_value()) return std::nullopt;
  const at::Tensor& j = *jac;
  check_same_dtype_device(input, j, op, "jac");
  TORCH_CHECK_VALUE(j.dim() == input.dim() + 1 && j.sizes().slice(0, input.dim()) == input.sizes(), op, ": jac of shape ",
                    j.sizes(), " must be [batch, *features, D] to match the input of shape [batch, *features] = ",
                    input.sizes());
  return j.movedim(-1, 1).contiguous();
}

void check_cotangent_nd(const at::Tensor& g, int64_t batch, at::IntArrayRef out_features, const at::Tensor& like,
                        const char* op) {
  check_same_dtype_device(like, g, op, "cotangent");
  const int64_t out_dims = static_cast<int64_t>(out_features.size());
  TORCH_CHECK_VALUE(g.dim() == out_dims + 2 && g.size(0) == batch && g.sizes().slice(2) == out_features, op,
                    ": cotangent of shape ", g.sizes(), " must be [batch, C, *out_features] with batch = ", batch,
                    " and out_features = ", out_features, " (the layer's output shape per sample)");
}

std::optional<at::Tensor> cotangents_nd_from_arg(const std::optional<at::Tensor>& cotangent, int64_t batch,
                                                 at::IntArrayRef out_features, const at::Tensor& like,
                                                 const char* op) {
  if (!cotangent.has_value()) return std::nullopt;
  check_cotangent_nd(*cotangent, batch, out_features, like, op);
  return cotangent->contiguous();
}

}  // namespace jacext
