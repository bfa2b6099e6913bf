// Scalar arithmetic of the Jacobian rules, shared by the CPU and CUDA kernels.
//
// Every function here is __host__ __device__ so the CPU build (and therefore the CPU tests) exercises
// exactly the arithmetic the GPU kernels run.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "tanh_math.h"

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

// activation(z). The CPU kernels take the values of most activations from ATen (vectorised and equal to
// torch's by construction; activations.def says which); the CUDA kernel evaluates them here, with the
// formulas of torch's CUDA kernels, in at::opmath_type. Tanh on the CPU is tanh_math.h's, which vectorises.
// Always inlined, here and in activation_derivative: the kernels call them with a compile-time kind, and
// only an inlined switch folds away and lets the element loop vectorise (GCC had kept
// activation_derivative out of line, one call per element). For the same reason the derivatives evaluate
// their operands before choosing (no conversion inside a branch, no short-circuit ||): GCC
// if-converts only such selects, and a branch per element mispredicts on random signs.
template <typename T>
JACEXT_HOST_DEVICE JACEXT_ALWAYS_INLINE T activation_value(const Activation& activation, T z) {
  switch (activation.kind) {
    case ActivationKind::ReLU:
      return z <= T(0) ? T(0) : z;  // NaN stays NaN, as in torch.relu
    case ActivationKind::Tanh:
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
      return tanh(z);
#else
      if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) return tanh_via_expm1(z);
      else return tanh(z);
#endif
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
    case ActivationKind::Mish:
      return z * tanh(log1p(exp(z)));
  }
  return z;
}

// Whether activation_derivative below reads y; where it does not, a kernel that needs only the derivative
// skips computing the value.
JACEXT_HOST_DEVICE constexpr bool derivative_uses_value(ActivationKind kind) {
  return kind == ActivationKind::Tanh || kind == ActivationKind::Sigmoid;
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
    case ActivationKind::LeakyReLU: {
      const T negative_slope = T(activation.first);
      return z > T(0) ? T(1) : negative_slope;
    }
    case ActivationKind::Elu:
      return z <= T(0) ? T(activation.first) * exp(z) : T(1);
    case ActivationKind::Softplus: {
      const T scaled = z * T(activation.first);
      return scaled > T(activation.second) ? T(1) : stable_sigmoid(scaled);
    }
    case ActivationKind::Hardtanh: {
      const T min_val = T(activation.first), max_val = T(activation.second);
      return ((z <= min_val) | (z >= max_val)) ? T(0) : T(1);
    }
    case ActivationKind::Hardswish:
      return z < T(-3) ? T(0) : (z <= T(3) ? z / T(3) + T(0.5) : T(1));
    case ActivationKind::Hardsigmoid:
      return (z > T(-3) && z < T(3)) ? T(kHardsigmoidSlope) : T(0);
    case ActivationKind::Mish: {  // torch's mish_backward: tanh(softplus(z)) + z sigmoid(z) (1 - tanh^2)
      const T tanh_softplus = tanh(log1p(exp(z)));
      return tanh_softplus + z * stable_sigmoid(z) * (T(1) - tanh_softplus * tanh_softplus);
    }
  }
  return T(0);
}

// Which row update a softmax-family rule applies.
enum class SoftmaxVariant : int8_t { Softmax, LogSoftmaxForward, LogSoftmaxReverse };

// The softmax-family row updates, with s the probabilities of one sample. The softmax Jacobian
// diag(s) - s s^T is symmetric, so pushing a tangent row forward and pulling a cotangent row back are
// the same update; log-softmax's Jacobian I - 1 s^T (d y_i / d z_j = delta_ij - s_j) is not:
//   softmax (either direction):   out_h = s_h (r_h - <r, s>)
//   log-softmax forward:          out_h = t_h - <t, s>
//   log-softmax reverse:          out_h = g_h - s_h sum(g)
// Written so, they cancel catastrophically when one class m holds nearly all the probability: <r, s>
// is then r_m up to the tail mass sigma = 1 - s_m, and what is left is sigma-sized, below the rounding
// of r_m once sigma < u. So where s_m > 1/2 the updates are taken through the other classes, whose
// probabilities are accurate however small (the sums run over j != m; sigma = sum s_j, never 1 - s_m):
//   r_h - <r, s> = (r_h - r_m) + shift,   shift = sum s_j (r_m - r_j)
//   g_m - s_m sum(g) = g_m sigma - s_m sum g_j,   and for h != m  g_h - s_h (g_m + sum g_j)
// Below 1/2 that form would cancel instead (-1 + sigma for a tangent e_m), and the direct one is exact to
// a few roundoffs; it is the same code with no dominant class: r_m = 0 and the sums over every j.
// No [H, H] matrix is ever formed.

// m: the index of the largest probability (the first of equals) when it exceeds 1/2, else -1 (none).
template <typename T>
JACEXT_HOST_DEVICE inline int64_t dominant_class(const T* s, int64_t features) {
  int64_t m = 0;
  for (int64_t h = 1; h < features; ++h) {
    if (s[h] > s[m]) m = h;
  }
  return s[m] > T(0.5) ? m : -1;
}

// What a row reduces to, over the classes other than m (every class when there is no m): shift (softmax,
// log-softmax forward), or the other entries' sum and the tail mass sigma (log-softmax reverse).
template <typename Acc>
struct SoftmaxRowSums {
  Acc shift = 0, others = 0, tail_mass = 0;
};

// Adds class j (j != m) to the sums, from the row's entries r_j and r_m.
template <typename Acc>
JACEXT_HOST_DEVICE inline void add_other_class(SoftmaxRowSums<Acc>& sums, SoftmaxVariant variant, Acc r_j, Acc r_m,
                                               Acc s_j) {
  if (variant == SoftmaxVariant::LogSoftmaxReverse) {
    sums.others += r_j;
    sums.tail_mass += s_j;
  } else {
    sums.shift += s_j * (r_m - r_j);
  }
}

// The updated entry h of a row from its entry r_h, the dominant entry r_m and the row's sums.
template <typename Acc>
JACEXT_HOST_DEVICE inline Acc softmax_family_entry(SoftmaxVariant variant, Acc r_h, Acc s_h, bool dominant, Acc r_m,
                                                   const SoftmaxRowSums<Acc>& sums) {
  switch (variant) {
    case SoftmaxVariant::Softmax:
      return s_h * ((r_h - r_m) + sums.shift);
    case SoftmaxVariant::LogSoftmaxForward:
      return (r_h - r_m) + sums.shift;
    case SoftmaxVariant::LogSoftmaxReverse:
      return dominant ? r_m * sums.tail_mass - s_h * sums.others : r_h - s_h * (r_m + sums.others);
  }
  return Acc(0);
}

// One row in place or into `out` (out may be `row`), sequentially: the CPU kernels' form.
template <typename Acc, typename T>
JACEXT_HOST_DEVICE inline void softmax_family_row(SoftmaxVariant variant, const T* row, const T* s, T* out,
                                                  int64_t features) {
  if (features == 0) return;
  const int64_t m = dominant_class(s, features);
  const Acc r_m = m >= 0 ? static_cast<Acc>(row[m]) : Acc(0);
  SoftmaxRowSums<Acc> sums;
  for (int64_t j = 0; j < features; ++j) {
    if (j != m) add_other_class(sums, variant, static_cast<Acc>(row[j]), r_m, static_cast<Acc>(s[j]));
  }
  for (int64_t h = 0; h < features; ++h) {
    out[h] = static_cast<T>(
        softmax_family_entry(variant, static_cast<Acc>(row[h]), static_cast<Acc>(s[h]), h == m, r_m, sums));
  }
}

}  // namespace jacext
