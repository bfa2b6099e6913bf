// CPU kernels of the element-wise activation rule: value and derivative (one pass for ReLU), then the fused
// column scaling out[b, r, h] = values[b | shared, r, h] * factor[b, h].
#include <ATen/Dispatch.h>

#include "../jacext/jacobian_block.h"
#include "parallel.h"

namespace jacext::cpu {
namespace {

// The kind is a template argument so that the switch in rule_math.h folds away and the loop
// vectorises. With kValueGiven the output already holds activation(input) and only the derivative
// is written.
template <ActivationKind kKind, bool kValueGiven, typename scalar_t>
void activation_loop(scalar_t* output, scalar_t* derivative, const scalar_t* input, int64_t count,
                     const Activation& parameters) {
  const Activation activation{kKind, parameters.first, parameters.second};
  at::parallel_for(0, count, kParallelGrainElements, [&](int64_t begin, int64_t end) {
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
    case ActivationKind::ReLU:
      break;
    case ActivationKind::Tanh:
      at::tanh_out(output, input);
      break;
    case ActivationKind::Sigmoid:
      at::sigmoid_out(output, input);
      break;
    case ActivationKind::Gelu:
      at::gelu_out(output, input, "none");
      break;
    case ActivationKind::GeluTanh:
      at::gelu_out(output, input, "tanh");
      break;
    case ActivationKind::Silu:
      at::silu_out(output, input);
      break;
    case ActivationKind::LeakyReLU:
      at::leaky_relu_out(output, input, activation.first);
      break;
    case ActivationKind::Elu:
      at::elu_out(output, input, activation.first);
      break;
    case ActivationKind::Softplus:
      at::softplus_out(output, input, activation.first, activation.second);
      break;
    case ActivationKind::Hardtanh:
      at::hardtanh_out(output, input, activation.first, activation.second);
      break;
  }
}

}  // namespace

void activation_kernel(at::Tensor& output, at::Tensor& derivative, const at::Tensor& input,
                       const Activation& activation) {
  // Values from ATen's vectorised (SLEEF) kernels: libm's scalar tanh/exp made the value pass, not the
  // Jacobian, the cost of a tanh network (pinn case: 6.2 ms, 37x its floor).
  aten_activation_value(output, input, activation);
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
