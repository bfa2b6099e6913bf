// CPU kernels of the element-wise activation rule: value and derivative (one pass for ReLU and tanh; ATen's
// backward kernels for the transcendental derivatives), the column scaling
// out[b, r, h] = values[b | shared, r, h] * factor[b, h], and the reverse rule's fused form of both.
#include <ATen/Dispatch.h>

#include <string_view>

#include "../jacext/jacobian_block.h"
#include "activation_loop.h"
#include "parallel.h"

namespace jacext::cpu {
namespace {

// Which of the kind's value and derivative its row in activations.def computes with torch's own kernels
// (the aten_value and aten_derivative arguments, unexpanded, are not the token JACEXT_NO_ATEN).
struct AtenKernels {
  bool value, derivative;
};

constexpr AtenKernels aten_kernels(ActivationKind kind) {
  switch (kind) {
#define JACEXT_ACTIVATION(kind, name, parameters, first, second, grammar, aten_value, aten_derivative) \
  case ActivationKind::kind:                                                                         \
    return {std::string_view(#aten_value) != "JACEXT_NO_ATEN", std::string_view(#aten_derivative) != "JACEXT_NO_ATEN"};
#define JACEXT_ACTIVATION_ALIAS(...)
#include "../jacext/activations.def"
#undef JACEXT_ACTIVATION
#undef JACEXT_ACTIVATION_ALIAS
  }
  return {false, false};
}

constexpr bool has_aten_value(ActivationKind kind) { return aten_kernels(kind).value; }
constexpr bool has_aten_derivative(ActivationKind kind) { return aten_kernels(kind).derivative; }

// Features per tile of the fused reverse kernel: the tile's derivative, computed once per sample and
// feature, stays in L1 while every row of the block is scaled by it.
constexpr int64_t kFeatureTile = 1024;

// Rows per sample up to which the reverse rule takes that one pass (scale_by_derivative_loop), measured
// against the derivative-then-scaling pair at [4, R, 16384]: a kind whose derivative reads the value
// (tanh, sigmoid) pays for the value tensor in either form and loses the one pass's advantage sooner.
constexpr int64_t one_pass_max_rows(ActivationKind kind) { return derivative_uses_value(kind) ? 4 : 16; }

// dst[h] = src[h] * factor[h] for h < count. A multiply, not a select, for ReLU's 0/1 factor too: a
// non-finite entry times 0 stays NaN, as in the chain's other products. A plain loop that the compiler
// vectorises for the build's ISA (restrict: no aliasing checks); at::vec's baseline-ISA Vectorized,
// array-backed, ran slower.
template <typename scalar_t>
inline void multiply_row(scalar_t* __restrict__ dst, const scalar_t* __restrict__ src,
                         const scalar_t* __restrict__ factor, int64_t count) {
#pragma omp simd
  for (int64_t h = 0; h < count; ++h) dst[h] = src[h] * factor[h];
}

// output = activation(input) (unless kValueGiven: torch's kernel wrote it) and derivative = activation'(input).
template <ActivationKind kKind, bool kValueGiven, typename scalar_t>
void activation_loop(scalar_t* output, scalar_t* derivative, const scalar_t* input, int64_t count,
                     const Activation& activation) {
  constexpr ValueSource source = kValueGiven ? ValueSource::Read : ValueSource::Write;
  at::parallel_for(0, count, kParallelGrainElements, [=](int64_t begin, int64_t end) {
    activation_range<kKind, source>(input + begin, output + begin, output + begin, derivative + begin, end - begin,
                                    activation);
  });
}

// out [B, R, H] = values ([R, H] or [B, R, H]) * activation'(input [B, H]), in one pass over the block:
// per sample and tile of features, the derivative from rule_math.h into a buffer, then every row times
// it. `value` holds activation(input) where the derivative reads it and torch's kernel computes it
// (derivative_uses_value and has_aten_value), else null; a value the loop computes goes to a tile buffer.
template <ActivationKind kKind, typename scalar_t>
void scale_by_derivative_loop(at::Tensor& out, const at::Tensor& values, const scalar_t* input, const scalar_t* value,
                              const Activation& activation) {
  constexpr ValueSource source = !derivative_uses_value(kKind) ? ValueSource::Skip
                                 : has_aten_value(kKind)       ? ValueSource::Read
                                                               : ValueSource::Write;
  const int64_t batch = out.size(0), rows = out.size(1), features = out.size(2);
  const int64_t tiles = (features + kFeatureTile - 1) / kFeatureTile;
  const int64_t values_batch_stride = values.dim() == 3 ? rows * features : 0;
  scalar_t* out_base = out.data_ptr<scalar_t>();
  const scalar_t* values_base = values.const_data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, kParallelGrainElements / std::max<int64_t>(1, rows * kFeatureTile));
  at::parallel_for(0, batch * tiles, grain, [=](int64_t begin, int64_t end) {
    scalar_t derivative[kFeatureTile], computed_value[kFeatureTile];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / tiles, h0 = (item % tiles) * kFeatureTile;
      const int64_t count = std::min(kFeatureTile, features - h0);
      const scalar_t* given_value = value != nullptr ? value + b * features + h0 : nullptr;
      activation_range<kKind, source>(input + b * features + h0, given_value, computed_value, derivative, count,
                                      activation);
      for (int64_t r = 0; r < rows; ++r) {
        multiply_row(out_base + (b * rows + r) * features + h0, values_base + b * values_batch_stride + r * features + h0,
                     derivative, count);
      }
    }
  });
}

// Writes activation(input) with torch's own vectorised kernel, so the values equal the module's forward
// exactly; nothing for the kinds without one (has_aten_value), whose value the derivative loop produces in
// the same pass.
void aten_activation_value(at::Tensor& output, const at::Tensor& input, const Activation& activation) {
  switch (activation.kind) {
#define JACEXT_NO_ATEN
#define JACEXT_ACTIVATION(kind, name, parameters, first, second, grammar, aten_value, aten_derivative) \
  case ActivationKind::kind:                                                                         \
    aten_value;                                                                                      \
    break;
#define JACEXT_ACTIVATION_ALIAS(...)
#include "../jacext/activations.def"
#undef JACEXT_ACTIVATION
#undef JACEXT_ACTIVATION_ALIAS
#undef JACEXT_NO_ATEN
  }
}

// Writes grad * derivative into `derivative` with autograd's own backward kernel, for the activations whose
// derivative needs erf/exp (has_aten_derivative): ATen's kernels are vectorised, the formulas of
// rule_math.h call scalar libm per element (GELU's rule was 5x slower through them).
void aten_activation_backward(at::Tensor& derivative, const at::Tensor& grad, const at::Tensor& input,
                              const Activation& activation) {
  switch (activation.kind) {
#define JACEXT_NO_ATEN TORCH_INTERNAL_ASSERT(false, "no ATen backward kernel for this activation")
#define JACEXT_ACTIVATION(kind, name, parameters, first, second, grammar, aten_value, aten_derivative) \
  case ActivationKind::kind:                                                                         \
    aten_derivative;                                                                                 \
    break;
#define JACEXT_ACTIVATION_ALIAS(...)
#include "../jacext/activations.def"
#undef JACEXT_ACTIVATION
#undef JACEXT_ACTIVATION_ALIAS
#undef JACEXT_NO_ATEN
  }
}

at::Tensor ones_like_input(const at::Tensor& input) {
  return at::scalar_tensor(1, input.options()).expand(input.sizes());
}

}  // namespace

void activation_kernel(at::Tensor& output, at::Tensor& derivative, const at::Tensor& input,
                       const Activation& activation) {
  // Values from ATen's vectorised kernels where the loop's formula would call scalar libm (exp, erf):
  // that made the value pass, not the Jacobian, the cost of such a network.
  aten_activation_value(output, input, activation);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "jacext_activation_cpu", [&] {
    auto* out = output.data_ptr<scalar_t>();
    auto* deriv = derivative.data_ptr<scalar_t>();
    const auto* in = input.const_data_ptr<scalar_t>();
    const int64_t count = input.numel();
    visit_activation_kind(activation.kind, [&](auto kind) {
      constexpr ActivationKind kKind = decltype(kind)::value;
      if constexpr (has_aten_derivative(kKind)) {
        aten_activation_backward(derivative, ones_like_input(input), input, activation);
      } else {
        activation_loop<kKind, has_aten_value(kKind)>(out, deriv, in, count, activation);
      }
    });
  });
}

void scale_features_kernel(at::Tensor& out, const at::Tensor& values, const at::Tensor& factor) {
  const int64_t features = out.size(2);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "jacext_scale_features_cpu", [&] {
    for_each_block_row<scalar_t>(out, values, factor, [&](const scalar_t* src, const scalar_t* f, scalar_t* dst) {
      multiply_row(dst, src, f, features);
    });
  });
}

void scale_by_activation_derivative_kernel(at::Tensor& out, const at::Tensor& values, const at::Tensor& input,
                                           const Activation& activation) {
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "jacext_scale_by_activation_derivative_cpu", [&] {
    visit_activation_kind(activation.kind, [&](auto kind) {
      constexpr ActivationKind kKind = decltype(kind)::value;
      if constexpr (has_aten_derivative(kKind)) {
        // One row per sample: the row is autograd's grad, and its backward kernel is the whole rule.
        if (out.size(1) == 1 && values.dim() == 3) {
          at::Tensor out_rows = out.view({out.size(0), out.size(2)});
          aten_activation_backward(out_rows, values.view({values.size(0), values.size(2)}), input, activation);
          return;
        }
        at::Tensor derivative = at::empty_like(input);
        aten_activation_backward(derivative, ones_like_input(input), input, activation);
        scale_features_kernel(out, values, derivative);
      } else if (out.size(1) > one_pass_max_rows(kKind)) {
        // Wider blocks: the derivative [B, H] first, then the row-by-row scaling, which streams each row
        // whole where the one pass interleaves pieces of every row.
        at::Tensor value = at::empty_like(input), derivative = at::empty_like(input);
        activation_kernel(value, derivative, input, activation);
        scale_features_kernel(out, values, derivative);
      } else if constexpr (derivative_uses_value(kKind) && has_aten_value(kKind)) {
        at::Tensor value = at::empty_like(input);
        aten_activation_value(value, input, activation);
        scale_by_derivative_loop<kKind>(out, values, input.const_data_ptr<scalar_t>(), value.const_data_ptr<scalar_t>(),
                                        activation);
      } else {
        scale_by_derivative_loop<kKind>(out, values, input.const_data_ptr<scalar_t>(),
                                        static_cast<const scalar_t*>(nullptr), activation);
      }
    });
  });
}

}  // namespace jacext::cpu
