// The running Jacobian block that every rule consumes and produces, and the rules' declarations.
//
// Both accumulation directions keep the layer's feature axis last, so every rule works on rows:
//   forward mode: tangents   T[b, d, h] = d z_h / d x_d      (rows are the model's input dims D)
//   reverse mode: cotangents G[b, c, h] = d y_c / d z_h      (rows are the model's output dims C)
// A linear layer is then "rows @ M" and every element-wise or softmax rule is a row update.
#pragma once

#include <ATen/ATen.h>

#include <string_view>
#include <type_traits>
#include <vector>

#include "rule_math.h"

namespace jacext {

// Lazy seeds: the identity and batch-shared blocks are never expanded to B copies. The first Linear
// of a forward sweep (or the last of a reverse sweep) turns the identity into the shared weight matrix;
// only a per-sample factor (activation mask, softmax) makes the block per-sample.
struct JacobianBlock {
  enum class Kind { Identity, Shared, PerSample };

  Kind kind = Kind::Identity;
  at::Tensor values;  // Identity: undefined; Shared: [R, H]; PerSample: [B, R, H]

  static JacobianBlock identity() { return {Kind::Identity, at::Tensor()}; }
  static JacobianBlock shared(at::Tensor values) { return {Kind::Shared, std::move(values)}; }
  static JacobianBlock per_sample(at::Tensor values) { return {Kind::PerSample, std::move(values)}; }

  // Values as an explicit contiguous [R, H] (shared) or [B, R, H] (per-sample) tensor; the identity
  // becomes a single shared eye(features), still not one copy per sample.
  at::Tensor explicit_values(int64_t features, const at::TensorOptions& options) const;
  // The dense [B, R, H] tensor, always freshly allocated or produced by a kernel (never a view of a
  // weight), so it can be returned from an operator.
  at::Tensor dense(int64_t batch, int64_t features, const at::TensorOptions& options) const;
};


// Parses an activation string of the operators' schemas:
//   relu | tanh | sigmoid | gelu | gelu_tanh | silu | relu6
//   | leaky_relu[:negative_slope] | elu[:alpha] | softplus[:beta[:threshold]] | hardtanh[:min_val[:max_val]]
// Parameters are decimal numbers as C's strtod reads them (Python's repr(float) round-trips exactly);
// omitted trailing ones take torch's defaults (0.01; 1.0; 1.0, 20.0; -1.0, 1.0). "gelu" is
// approximate='none', "gelu_tanh" approximate='tanh', "relu6" is hardtanh:0:6. A bad string throws an
// error naming `op` and `arg` and listing the accepted forms.
Activation activation_from_name(std::string_view name, const char* op, const char* arg);

// Calls fn(std::integral_constant<ActivationKind, kind>{}), so that a kernel instantiates one loop per
// kind and the switches of rule_math.h fold away in each.
template <typename Fn>
decltype(auto) visit_activation_kind(ActivationKind kind, const Fn& fn) {
  using K = ActivationKind;
  switch (kind) {
#define JACEXT_ACTIVATION(kind_name, ...) \
  case K::kind_name:                      \
    return fn(std::integral_constant<K, K::kind_name>{});
#define JACEXT_ACTIVATION_ALIAS(...)
#include "activations.def"
#undef JACEXT_ACTIVATION
#undef JACEXT_ACTIVATION_ALIAS
  }
  TORCH_INTERNAL_ASSERT(false, "unknown ActivationKind");
}

// ---- Rules (device-generic; element-wise work goes to the backend kernels below) ----

// rows @ matrix: the linear rule in both directions (forward: matrix = W^T, reverse: matrix = W).
JacobianBlock chain_matrix(const JacobianBlock& block, const at::Tensor& matrix);
// rows @ diag(factor[b]) @ matrix per sample, reading only the rows of `matrix` [H, K] whose factor
// entry is nonzero (a ReLU mask's active units). CPU tensors only: the caller (the reverse walker)
// decides when skipping beats the dense chain; CUDA stays on dense GEMMs.
JacobianBlock chain_masked_matrix(const JacobianBlock& block, const at::Tensor& factor, const at::Tensor& matrix);
// (output, derivative) of an activation, both [B, H].
std::tuple<at::Tensor, at::Tensor> activation_with_derivative(const at::Tensor& input, const Activation& activation);
// out[b, r, h] = block[b, r, h] * factor[b, h].
JacobianBlock scale_features(const JacobianBlock& block, const at::Tensor& factor);
// out[b, r, h] = block[b, r, h] * activation'(input[b, h]): the reverse rule when no forward pass has kept
// the derivative.
JacobianBlock scale_by_activation_derivative(const JacobianBlock& block, const at::Tensor& input,
                                             const Activation& activation);
// Row update of softmax / log-softmax given the probabilities s [B, H].
JacobianBlock softmax_rows(const JacobianBlock& block, const at::Tensor& probabilities, SoftmaxVariant variant);

// ---- Backend kernels: write `out` [B, R, H] from explicit block values ([R, H] or [B, R, H]) ----
namespace cpu {
void activation_kernel(at::Tensor& output, at::Tensor& derivative, const at::Tensor& input,
                       const Activation& activation);
void scale_features_kernel(at::Tensor& out, const at::Tensor& values, const at::Tensor& factor);
// out [B, R, H] = values ([R, H] or [B, R, H]) * activation'(input [B, H]), the derivative never stored whole.
void scale_by_activation_derivative_kernel(at::Tensor& out, const at::Tensor& values, const at::Tensor& input,
                                           const Activation& activation);
void softmax_rows_kernel(at::Tensor& out, const at::Tensor& values, const at::Tensor& probabilities,
                         SoftmaxVariant variant);
// out [B, R, K] = values ([R, H] or [B, R, H]) diag(factor [B, H]) matrix [H, K], all contiguous.
void masked_linear_kernel(at::Tensor& out, const at::Tensor& values, const at::Tensor& factor,
                          const at::Tensor& matrix);
}  // namespace cpu

#ifdef JACEXT_WITH_CUDA
namespace cuda {
void activation_kernel(at::Tensor& output, at::Tensor& derivative, const at::Tensor& input,
                       const Activation& activation);
void scale_features_kernel(at::Tensor& out, const at::Tensor& values, const at::Tensor& factor);
void softmax_rows_kernel(at::Tensor& out, const at::Tensor& values, const at::Tensor& probabilities,
                         SoftmaxVariant variant);
}  // namespace cuda
#endif

// Runs a backend kernel on the device of `tensor`. The checks at the operator boundary have already
// rejected CUDA tensors in a build without CUDA.
#ifdef JACEXT_WITH_CUDA
#define JACEXT_RUN_KERNEL(tensor, kernel, ...) \
  ((tensor).is_cuda() ? ::jacext::cuda::kernel(__VA_ARGS__) : ::jacext::cpu::kernel(__VA_ARGS__))
#else
#define JACEXT_RUN_KERNEL(tensor, kernel, ...) ::jacext::cpu::kernel(__VA_ARGS__)
#endif

}  // namespace jacext
