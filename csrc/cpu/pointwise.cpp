// CPU kernels of the element-wise activation rule: value + derivative in one pass, then the fused
// column scaling out[b, r, h] = values[b | shared, r, h] * factor[b, h].
#include <ATen/Dispatch.h>

#include "../jacext/jacobian_block.h"
#include "parallel.h"

namespace jacext::cpu {
namespace {

// The activation is a template argument so that the switch in rule_math.h folds away and the loop
// vectorises.
template <Activation kActivation, typename scalar_t>
void activation_loop(scalar_t* output, scalar_t* derivative, const scalar_t* input, int64_t count) {
  at::parallel_for(0, count, kParallelGrainElements, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t y = activation_value(kActivation, input[i]);
      output[i] = y;
      derivative[i] = activation_derivative(kActivation, input[i], y);
    }
  });
}

}  // namespace

void activation_kernel(at::Tensor& output, at::Tensor& derivative, const at::Tensor& input, Activation activation) {
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "jacext_activation_cpu", [&] {
    auto* out = output.data_ptr<scalar_t>();
    auto* deriv = derivative.data_ptr<scalar_t>();
    const auto* in = input.const_data_ptr<scalar_t>();
    const int64_t count = input.numel();
    switch (activation) {
      case Activation::ReLU:
        activation_loop<Activation::ReLU>(out, deriv, in, count);
        break;
      case Activation::Tanh:
        activation_loop<Activation::Tanh>(out, deriv, in, count);
        break;
      case Activation::Sigmoid:
        activation_loop<Activation::Sigmoid>(out, deriv, in, count);
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
