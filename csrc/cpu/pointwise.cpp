// CPU kernels of the element-wise activation rule: value and derivative (one pass for ReLU), then the fused
// column scaling out[b, r, h] = values[b | shared, r, h] * factor[b, h].
#include <ATen/Dispatch.h>

#include "../jacext/jacobian_block.h"
#include "parallel.h"

namespace jacext::cpu {
namespace {

// The activation is a template argument so that the switch in rule_math.h folds away and the loop
// vectorises. With kValueGiven the output already holds activation(input) and only the derivative
// is written.
template <Activation kActivation, bool kValueGiven, typename scalar_t>
void activation_loop(scalar_t* output, scalar_t* derivative, const scalar_t* input, int64_t count) {
  at::parallel_for(0, count, kParallelGrainElements, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t y = kValueGiven ? output[i] : activation_value(kActivation, input[i]);
      if constexpr (!kValueGiven) output[i] = y;
      derivative[i] = activation_derivative(kActivation, input[i], y);
    }
  });
}

}  // namespace

void activation_kernel(at::Tensor& output, at::Tensor& derivative, const at::Tensor& input, Activation activation) {
  // tanh and sigmoid values come from ATen's vectorised (SLEEF) kernels: libm's scalar tanh/exp made
  // the value pass, not the Jacobian, the cost of a tanh network (pinn case: 6.2 ms, 37x its floor).
  if (activation == Activation::Tanh) at::tanh_out(output, input);
  if (activation == Activation::Sigmoid) at::sigmoid_out(output, input);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "jacext_activation_cpu", [&] {
    auto* out = output.data_ptr<scalar_t>();
    auto* deriv = derivative.data_ptr<scalar_t>();
    const auto* in = input.const_data_ptr<scalar_t>();
    const int64_t count = input.numel();
    switch (activation) {
      case Activation::ReLU:
        activation_loop<Activation::ReLU, false>(out, deriv, in, count);
        break;
      case Activation::Tanh:
        activation_loop<Activation::Tanh, true>(out, deriv, in, count);
        break;
      case Activation::Sigmoid:
        activation_loop<Activation::Sigmoid, true>(out, deriv, in, count);
        break;
    }
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
