// Linear layer: y = x W^T + b. Its Jacobian is the shared matrix W, so both directions are one GEMM
// over all rows of all samples ([B * R, H] @ M), and an identity or shared block stays shared.
#include "jacext/checks.h"
#include "jacext/ops.h"

namespace jacext {

JacobianBlock chain_matrix(const JacobianBlock& block, const at::Tensor& matrix) {
  switch (block.kind) {
    case JacobianBlock::Kind::Identity:
      return JacobianBlock::shared(matrix);
    case JacobianBlock::Kind::Shared:
      return JacobianBlock::shared(at::mm(block.values, matrix));
    case JacobianBlock::Kind::PerSample: {
      const auto& v = block.values;
      return JacobianBlock::per_sample(
          at::mm(v.view({v.size(0) * v.size(1), v.size(2)}), matrix).view({v.size(0), v.size(1), matrix.size(1)}));
    }
  }
  TORCH_INTERNAL_ASSERT(false, "unknown JacobianBlock kind");
}

JacobianBlock chain_masked_matrix(const JacobianBlock& block, const at::Tensor& factor, const at::Tensor& matrix) {
  TORCH_INTERNAL_ASSERT(factor.device().is_cpu(), "chain_masked_matrix has only a CPU kernel");
  const int64_t batch = factor.size(0), features = factor.size(1);
  const at::Tensor values = block.explicit_values(features, factor.options());
  at::Tensor out = at::empty({batch, values.size(-2), matrix.size(1)}, factor.options());
  cpu::masked_linear_kernel(out, values, factor.contiguous(), matrix.contiguous());
  return JacobianBlock::per_sample(out);
}

void check_linear_params(const at::Tensor& input, int64_t in_features, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, const char* op) {
  check_same_dtype_device(input, weight, op, "weight");
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be [out_features, in_features], got shape ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(1) == in_features, op, ": weight of shape ", weight.sizes(), " expects ",
                    weight.size(1), " input features, got ", in_features);
  if (bias.has_value()) {
    check_same_dtype_device(input, *bias, op, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must be [", weight.size(0),
                      "], got shape ", bias->sizes());
  }
}

// A shared result goes out as a [H, D] / [C, H] tensor of its own: never a view of the weight.
static at::Tensor shared_result(const at::Tensor& values, const at::Tensor& weight) {
  return values.is_alias_of(weight) ? values.clone(at::MemoryFormat::Contiguous) : values.contiguous();
}

std::tuple<at::Tensor, at::Tensor> linear_jac_forward(const at::Tensor& input, const std::optional<at::Tensor>& jac,
                                                      const at::Tensor& weight,
                                                      const std::optional<at::Tensor>& bias) {
  const char* op = "jacext::linear_jac_forward";
  check_feature_matrix(input, op, "input");
  check_linear_params(input, input.size(1), weight, bias, op);
  const JacobianBlock tangents = tangents_from_jac(jac, input, op);
  at::Tensor output = at::linear(input, weight, bias);
  const JacobianBlock result = chain_matrix(tangents, weight.t());
  if (result.kind == JacobianBlock::Kind::Shared) {
    return {output, shared_result(result.values, weight).t()};
  }
  return {output, result.values.transpose(1, 2)};
}

at::Tensor linear_jac_reverse(const std::optional<at::Tensor>& cotangent, const at::Tensor& weight) {
  const char* op = "jacext::linear_jac_reverse";
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be [out_features, in_features], got shape ", weight.sizes());
  check_feature_matrix(weight, op, "weight");
  const JacobianBlock cotangents = cotangents_from_arg(cotangent, -1, weight.size(0), weight, op);
  const JacobianBlock result = chain_matrix(cotangents, weight);
  if (result.kind == JacobianBlock::Kind::Shared) return shared_result(result.values, weight);
  return result.values;
}

}  // namespace jacext
