// Scalar arithmetic of the Jacobian rules, shared by the CPU and CUDA kernels.
//
// Every function here is __host__ __device__ so the CPU build (and therefore the CPU tests) exercises
// exactly the arithmetic the GPU kernels run.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define JACEXT_HOST_DEVICE __host__ __device__
#else
#define JACEXT_HOST_DEVICE
#endif

namespace jacext {

// Element-wise activations with a native rule. The integer values are part of no ABI: the schema
// passes activations by name (see activation_from_name in jacobian_block.h).
enum class Activation : int8_t { ReLU, Tanh, Sigmoid };

template <typename T>
JACEXT_HOST_DEVICE inline T activation_value(Activation activation, T z) {
  switch (activation) {
    case Activation::ReLU:
      return z <= T(0) ? T(0) : z;  // NaN stays NaN, as in torch.relu
    case Activation::Tanh:
      return tanh(z);
    case Activation::Sigmoid:
      return T(1) / (T(1) + exp(-z));
  }
  return z;
}

// d activation(z) / dz, given the input z and the already computed output y = activation(z), so that
// tanh and sigmoid reuse y instead of evaluating the transcendental function twice.
// ReLU' follows torch's autograd (threshold_backward: z <= 0 ? 0 : 1): 0 at z = 0, and 1 at NaN, so a
// NaN input gives the same Jacobian as the reference.
template <typename T>
JACEXT_HOST_DEVICE inline T activation_derivative(Activation activation, T z, T y) {
  switch (activation) {
    case Activation::ReLU:
      return z <= T(0) ? T(0) : T(1);
    case Activation::Tanh:
      return T(1) - y * y;
    case Activation::Sigmoid:
      return y * (T(1) - y);
  }
  return T(0);
}

// The row update of both softmax rules. The softmax Jacobian diag(s) - s s^T is symmetric, so pushing
// a tangent row forward and pulling a cotangent row back are the same operation:
//   out = s * (row - <row, s>)
// `row_dot_s` is <row, s>, computed once per row by the caller. No [H, H] matrix is ever formed.
template <typename T>
JACEXT_HOST_DEVICE inline T softmax_row_entry(T row_entry, T s_entry, T row_dot_s) {
  return s_entry * (row_entry - row_dot_s);
}

// Log-softmax has the non-symmetric Jacobian I - 1 s^T (d y_i / d z_j = delta_ij - s_j), so its two
// directions differ:
//   forward (tangent row t over the input features):   out_i = t_i - <t, s>
//   reverse (cotangent row g over the output features): out_j = g_j - s_j * sum(g)
template <typename T>
JACEXT_HOST_DEVICE inline T log_softmax_forward_entry(T tangent_entry, T tangent_dot_s) {
  return tangent_entry - tangent_dot_s;
}

template <typename T>
JACEXT_HOST_DEVICE inline T log_softmax_reverse_entry(T cotangent_entry, T s_entry, T cotangent_sum) {
  return cotangent_entry - s_entry * cotangent_sum;
}

}  // namespace jacext
