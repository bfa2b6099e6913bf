// Scalar arithmetic of the Jacobian rules, shared by the CPU and CUDA kernels.
//
// Every function here is __host__ __device__ so the CPU build (and therefore the CPU tests) exercises
// exactly the arithmetic the GPU kernels run.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define JACEXT_HOST_DEVICE __host__ __device__
#define JACEXT_ALWAYS_INLINE __forceinline__
#else
#define JACEXT_HOST_DEVICE
#define JACEXT_ALWAYS_INLINE inline __attribute__((always_inline))
#endif

namespace jacext {

// Element-wise activations with a native rule, one per row of activations.def. The integer values are
// part of no ABI: the schema passes activations as strings (parser: activation_from_name in jacobian_block.h).
enum class ActivationKind : int8_t {
#define JACEXT_ACTIVATION(kind, ...) kind,
#define JACEXT_ACTIVATION_ALIAS(...)
#include "activations.def"
#undef JACEXT_ACTIVATION
#undef JACEXT_ACTIVATION_ALIAS
};

// An activation with its scalar parameters, parsed once per operator call:
//   LeakyReLU: first = negative_slope;  Elu: first = alpha;
//   Softplus: first = beta, second = threshold;  Hardtanh: first = min_val, second = max_val.
// Parameters are kept in double and rounded to the computation type T where used, as torch's kernels
// round their Scalar arguments, so float32 results match torch's bit for bit where the formula does.
struct Activation {
  ActivationKind kind = ActivationKind::ReLU;
  double first = 0.0;
  double second = 0.0;
};

// Constants of torch's GELU kernels: 1/sqrt(2), 1/sqrt(2 pi), sqrt(2/pi) and the tanh form's cubic term.
constexpr double kGeluSqrtHalf = 0.70710678118654752440;
constexpr double kGeluInvSqrtTwoPi = 0.39894228040143267794;
constexpr double kGeluSqrtTwoOverPi = 0.79788456080286535588;
constexpr double kGeluCubicCoefficient = 0.044715;
// torch's hardsigmoid_backward kernels (CPU and CUDA) multiply by the float literal 1.0f / 6.0f, also in
// float64: this keeps our derivative equal to autograd's bit for bit.
constexpr double kHardsigmoidSlope = 1.0f / 6.0f;

template <typename T>
JACEXT_HOST_DEVICE inline T stable_sigmoid(T z) {
  return T(1) / (T(1) + exp(-z));
}

// min(max(z + 3, 0), 6) as torch's hardswish and hardsigmoid kernels compute it (NaN stays NaN).
template <typename T>
JACEXT_HOST_DEVICE inline T relu6_of_shifted(T z) {
  const T shifted = z + T(3);
  return shifted < T(0) ? T(0) : (shifted > T(6) ? T(6) : shifted);
}

// activation(z). The CPU kernels take the values of the non-ReLU activations from ATen (vectorised and
// equal to torch's by construction); the CUDA kernel evaluates them here, with the formulas of torch's
// CUDA kernels, in at::opmath_type.
// Always inlined, here and in activation_derivative: the kernels call them with a compile-time kind, and
// only an inlined switch folds away and lets the element loop vectorise (GCC had kept
// activation_derivative out of line, one call per element).
template <typename T>
JACEXT_HOST_DEVICE JACEXT_ALWAYS_INLINE T activation_value(const Activation& activation, T z) {
  switch (activation.kind) {
    case ActivationKind::ReLU:
      return z <= T(0) ? T(0) : z;  // NaN stays NaN, as in torch.relu
    case ActivationKind::Tanh:
      return tanh(z);
    case ActivationKind::Sigmoid:
      return stable_sigmoid(z);
    case ActivationKind::Gelu:
      return z * T(0.5) * (T(1) + erf(z * T(kGeluSqrtHalf)));
    case ActivationKind::GeluTanh:
      return T(0.5) * z * (T(1) + tanh(T(kGeluSqrtTwoOverPi) * (z + T(kGeluCubicCoefficient) * z * z * z)));
    case ActivationKind::Silu:
      return z * stable_sigmoid(z);
    case ActivationKind::LeakyReLU:
      return z > T(0) ? z : z * T(activation.first);
    case ActivationKind::Elu:
      return z > T(0) ? z : T(activation.first) * expm1(z);
    case ActivationKind::Softplus: {
      const T scaled = z * T(activation.first);
      return scaled > T(activation.second) ? z : log1p(exp(scaled)) / T(activation.first);
    }
    case ActivationKind::Hardtanh:
      return z < T(activation.first) ? T(activation.first) : (z > T(activation.second) ? T(activation.second) : z);
    case ActivationKind::Hardswish:
      return z * relu6_of_shifted(z) / T(6);
    case ActivationKind::Hardsigmoid:
      return relu6_of_shifted(z) / T(6);
  }
  return z;
}

// d activation(z) / dz, given the input z and the already computed output y = activation(z), so that
// tanh and sigmoid reuse y instead of evaluating the transcendental function twice.
// At the kinks the value is torch autograd's (its backward kernels' comparisons, copied exactly):
//   ReLU'(0) = 0 and ReLU'(NaN) = 1 (threshold_backward: z <= 0 ? 0 : 1),  LeakyReLU'(0) = negative_slope (z > 0),
//   ELU'(0) = alpha (elu_backward: z <= 0 takes alpha * exp(z)),
//   Hardtanh' = 0 at min_val and max_val (hardtanh_backward: z <= min || z >= max), so ReLU6'(0) = ReLU6'(6) = 0,
//   Softplus' = 1 only where z * beta > threshold, the forward's switch,
//   Hardswish'(-3) = 0 and Hardswish'(3) = 1.5 (hardswish_backward: z < -3 ? 0 : z <= 3 ? z / 3 + 0.5 : 1),
//   Hardsigmoid' = 0 at -3 and 3 (hardsigmoid_backward: -3 < z < 3).
// Softplus' below the switch is sigmoid(beta z), torch's exp(beta z) / (exp(beta z) + 1) in a form that
// does not overflow to inf / inf for a large threshold.
template <typename T>
JACEXT_HOST_DEVICE JACEXT_ALWAYS_INLINE T activation_derivative(const Activation& activation, T z, T y) {
  switch (activation.kind) {
    case ActivationKind::ReLU:
      return z <= T(0) ? T(0) : T(1);
    case ActivationKind::Tanh:
      return T(1) - y * y;
    case ActivationKind::Sigmoid:
      return y * (T(1) - y);
    case ActivationKind::Gelu: {
      const T cdf = T(0.5) * (T(1) + erf(z * T(kGeluSqrtHalf)));
      const T pdf = T(kGeluInvSqrtTwoPi) * exp(T(-0.5) * z * z);
      return cdf + z * pdf;
    }
    case ActivationKind::GeluTanh: {
      const T z_squared = z * z;
      const T tanh_inner = tanh(T(kGeluSqrtTwoOverPi) * (z + T(kGeluCubicCoefficient) * z_squared * z));
      const T inner_derivative = T(kGeluSqrtTwoOverPi) * (T(1) + T(3 * kGeluCubicCoefficient) * z_squared);
      return T(0.5) * (T(1) + tanh_inner) + T(0.5) * z * (T(1) - tanh_inner * tanh_inner) * inner_derivative;
    }
    case ActivationKind::Silu: {
      const T s = stable_sigmoid(z);
      return s * (T(1) + z * (T(1) - s));
    }
    case ActivationKind::LeakyReLU:
      return z > T(0) ? T(1) : T(activation.first);
    case ActivationKind::Elu:
      return z <= T(0) ? T(activation.first) * exp(z) : T(1);
    case ActivationKind::Softplus: {
      const T scaled = z * T(activation.first);
      return scaled > T(activation.second) ? T(1) : stable_sigmoid(scaled);
    }
    case ActivationKind::Hardtanh:
      return (z <= T(activation.first) || z >= T(activation.second)) ? T(0) : T(1);
    case ActivationKind::Hardswish:
      return z < T(-3) ? T(0) : (z <= T(3) ? z / T(3) + T(0.5) : T(1));
    case ActivationKind::Hardsigmoid:
      return (z > T(-3) && z < T(3)) ? T(kHardsigmoidSlope) : T(0);
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
