// Element-wise activations (the forms of activation_from_name: ReLU, Tanh, Sigmoid, GELU, SiLU, LeakyReLU,
// ELU, Softplus, Hardtanh/ReLU6): the Jacobian is diag(f'(z)) per sample, so each rule scales the block's
// feature columns by f'(z[b]) in one fused pass; no diagonal matrix is formed.
#include "jacext/checks.h"
#include "jacext/ops.h"

namespace jacext {

std::tuple<at::Tensor, at::Tensor> activation_with_derivative(const at::Tensor& input, const Activation& activation) {
  at::Tensor contiguous_input = input.contiguous();
  at::Tensor output = at::empty_like(contiguous_input);
  at::Tensor derivative = at::empty_like(contiguous_input);
  JACEXT_RUN_KERNEL(input, activation_kernel, output, derivative, contiguous_input, activation);
  return {output, derivative};
}

JacobianBlock scale_features(const JacobianBlock& block, const at::Tensor& factor) {
  const int64_t batch = factor.size(0), features = factor.size(1);
  at::Tensor values = block.explicit_values(features, factor.options());
  const int64_t rows = values.size(-2);
  at::Tensor out = at::empty({batch, rows, features}, factor.options());
  JACEXT_RUN_KERNEL(factor, scale_features_kernel, out, values, factor.contiguous());
  return JacobianBlock::per_sample(out);
}

JacobianBlock scale_by_activation_derivative(const JacobianBlock& block, const at::Tensor& input,
                                             const Activation& activation) {
  // The CUDA kernels take the derivative's round trip through memory (two launches); the CPU kernel
  // fuses it into the scaling pass.
  if (input.is_cuda()) return scale_features(block, std::get<1>(activation_with_derivative(input, activation)));
  const int64_t batch = input.size(0), features = input.size(1);
  at::Tensor values = block.explicit_values(features, input.options());
  at::Tensor out = at::empty({batch, values.size(-2), features}, input.options());
  cpu::scale_by_activation_derivative_kernel(out, values, input.contiguous(), activation);
  return JacobianBlock::per_sample(out);
}

std::tuple<at::Tensor, at::Tensor> pointwise_jac_forward(const at::Tensor& input, const std::optional<at::Tensor>& jac,
                                                         std::string_view activation) {
  const char* op = "jacext::pointwise_jac_forward";
  check_feature_matrix(input, op, "input");
  const Activation parsed = activation_from_name(activation, op, "activation");
  const JacobianBlock tangents = tangents_from_jac(jac, input, op);
  auto [output, derivative] = activation_with_derivative(input, parsed);
  const JacobianBlock result = scale_features(tangents, derivative);
  return {output, result.values.transpose(1, 2)};
}

at::Tensor pointwise_jac_reverse(const at::Tensor& input, const std::optional<at::Tensor>& cotangent,
                                 std::string_view activation) {
  const char* op = "jacext::pointwise_jac_reverse";
  check_feature_matrix(input, op, "input");
  const Activation parsed = activation_from_name(activation, op, "activation");
  const JacobianBlock cotangents = cotangents_from_arg(cotangent, input.size(0), input.size(1), input, op);
  return scale_by_activation_derivative(cotangents, input, parsed).values;
}

}  // namespace jacext
