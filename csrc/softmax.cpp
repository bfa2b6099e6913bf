// Softmax and LogSoftmax over the feature dimension. Each rule is a row update using the probabilities
// s (rule_math.h): O(R * H) per sample, never the [H, H] softmax Jacobian.
#include "jacext/checks.h"
#include "jacext/ops.h"

namespace jacext {

JacobianBlock softmax_rows(const JacobianBlock& block, const at::Tensor& probabilities, SoftmaxVariant variant) {
  const int64_t batch = probabilities.size(0), features = probabilities.size(1);
  at::Tensor values = block.explicit_values(features, probabilities.options());
  at::Tensor out = at::empty({batch, values.size(-2), features}, probabilities.options());
  JACEXT_RUN_KERNEL(probabilities, softmax_rows_kernel, out, values, probabilities.contiguous(), variant);
  return JacobianBlock::per_sample(out);
}

std::tuple<at::Tensor, at::Tensor> softmax_jac_forward(const at::Tensor& input, const std::optional<at::Tensor>& jac) {
  const char* op = "jacext::softmax_jac_forward";
  check_feature_matrix(input, op, "input");
  const JacobianBlock tangents = tangents_from_jac(jac, input, op);
  at::Tensor probabilities = at::softmax(input, 1);
  return {probabilities, softmax_rows(tangents, probabilities, SoftmaxVariant::Softmax).values.transpose(1, 2)};
}

at::Tensor softmax_jac_reverse(const at::Tensor& output, const std::optional<at::Tensor>& cotangent) {
  const char* op = "jacext::softmax_jac_reverse";
  check_feature_matrix(output, op, "output");
  const JacobianBlock cotangents = cotangents_from_arg(cotangent, output.size(0), output.size(1), output, op);
  return softmax_rows(cotangents, output, SoftmaxVariant::Softmax).values;
}

std::tuple<at::Tensor, at::Tensor> log_softmax_jac_forward(const at::Tensor& input,
                                                           const std::optional<at::Tensor>& jac) {
  const char* op = "jacext::log_softmax_jac_forward";
  check_feature_matrix(input, op, "input");
  const JacobianBlock tangents = tangents_from_jac(jac, input, op);
  at::Tensor output = at::log_softmax(input, 1);
  return {output, softmax_rows(tangents, output.exp(), SoftmaxVariant::LogSoftmaxForward).values.transpose(1, 2)};
}

at::Tensor log_softmax_jac_reverse(const at::Tensor& output, const std::optional<at::Tensor>& cotangent) {
  const char* op = "jacext::log_softmax_jac_reverse";
  check_feature_matrix(output, op, "output");
  const JacobianBlock cotangents = cotangents_from_arg(cotangent, output.size(0), output.size(1), output, op);
  return softmax_rows(cotangents, output.exp(), SoftmaxVariant::LogSoftmaxReverse).values;
}

}  // namespace jacext
