// CPU kernels of the element-wise activation rule: value and derivative (one pass for ReLU; ATen's backward
// kernels for the transcendental derivatives), then the fused
// column scaling out[b, r, h] = values[b | shared, r, h] * factor[b, h].
#include <ATen/Dispatch.h>

#include "../jacext/jacobian_block.h"
#include "parallel.h"

namespace jacext::cpu {
namespace {

// The kind is a template argument so that the switch in rule_math.h folds away and the loop
// vectorises. With kValueGiven the output already holds activation(input) and only the derivative
// is written.
// Everything the loop reads is captured by value: through captured references GCC reloaded the pointers
// and the activation's kind (an int8_t, which every store may alias) after each store, so the switch
// stayed a jump per element and nothing vectorised (ReLU's reverse rule ran 20x slower than autograd's
// threshold_backward).
template <ActivationKind kKind, bool kValueGiven, typename scalar_t>
void activation_loop(scalar_t* output, scalar_t* derivative, const scalar_t* input, int64_t count,
                     const Activation& parameters) {
  const double first = parameters.first, second = parameters.second;
  at::parallel_for(0, count, kParallelGrainElements, [=](int64_t begin, int64_t end) {
    const Activation activation{kKind, first, second};
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t y = kValueGiven ? output[i] : activation_value(activation, input[i]);
      if constexpr (!kValueGiven) output[i] = y;
      derivative[i] = activation_derivative(activation, input[i], y);
    }
  });
}

// Writes activation(input) with torch's own vectorised kernel, so the values equal the module's forward
// exactly; except for ReLU, whose value the derivative loop produces in the same pass.
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
#undef JACEXT_NO_ATEN
  }
}

// Writes the derivative with autograd's own backward kernel (grad_output = 1, so grad * f' is f' exactly)
// for the activations whose derivative needs erf/exp: ATen's kernels are vectorised, the formulas of
// rule_math.h call scalar libm per element (GELU's rule took 2.0 ms where gelu_backward takes 0.2 ms,
// [4, 16384] float32, one thread). False for the others (JACEXT_NO_ATEN in activations.def), whose
// derivative the element loop computes.
bool aten_activation_derivative(at::Tensor& derivative, const at::Tensor& input, const Activation& activation) {
  const at::Tensor ones = at::scalar_tensor(1, input.options()).expand(input.sizes());
  switch (activation.kind) {
#define JACEXT_NO_ATEN return false
#define JACEXT_ACTIVATION(kind, name, parameters, first, second, grammar, aten_value, aten_derivative) \
  case ActivationKind::kind:                                                                         \
    aten_derivative;                                                                                 \
    return true;
#include "../jacext/activations.def"
#undef JACEXT_ACTIVATION
#undef JACEXT_ACTIVATION_ALIAS
#undef JACEXT_NO_ATEN
  }
  return false;
}

}  // namespace

void activation_kernel(at::Tensor& output, at::Tensor& derivative, const at::Tensor& input,
                       const Activation& activation) {
  // Values from ATen's vectorised (SLEEF) kernels: libm's scalar tanh/exp made the value pass, not the
  // Jacobian, the cost of a tanh network (pinn case: 6.2 ms, 37x its floor).
  aten_activation_value(output, input, activation);
  if (aten_activation_derivative(derivative, input, activation)) return;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "jacext_activation_cpu", [&] {
    auto* out = output.data_ptr<scalar_t>();
    auto* deriv = derivative.data_ptr<scalar_t>();
    const auto* in = input.const_data_ptr<scalar_t>();
    const int64_t count = input.numel();
    visit_activation_kind(activation.kind, [&](auto kind) {
      constexpr ActivationKind kKind = decltype(kind)::value;
      activation_loop<kKind, kKind != ActivationKind::ReLU>(out, deriv, in, count, activation);
    });
  });
}

void scale_features_kernel(at::Tensor& out, const at::Tensor& values, const at::Tensor& factor) {
  const int64_t features = out.size(2);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "jacext_scale_features_cpu", [&] {
    for_each_block_row<scalar_t>(out, values, factor, [&](const scalar_t* src, const scalar_t* f, scalar_t* dst) {
      for (int64_t h = 0; h < features; ++h) dst[h] = src[h] * f[h];
    });
  });
}

}  // namespace jacext::cpu
