// CUDA kernels of the element-wise activation rule: value + derivative in one pass (the values with the
// formulas of torch's CUDA kernels, equal to them within rounding), then the fused
// column scaling out[b, r, h] = values[b | shared, r, h] * factor[b, h]. Arithmetic from rule_math.h,
// in at::opmath_type (float for half and bfloat16), rounded once on the store.
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>

#include "../jacext/jacobian_block.h"
#include "launch.cuh"

namespace jacext::cuda {
namespace {

// The kind is a template argument so that the switch in rule_math.h folds away.
template <ActivationKind kKind, typename scalar_t>
__global__ void activation_cuda_kernel(scalar_t* __restrict__ output, scalar_t* __restrict__ derivative,
                                       const scalar_t* __restrict__ input, int64_t count, Activation parameters) {
  using opmath_t = at::opmath_type<scalar_t>;
  const Activation activation{kKind, parameters.first, parameters.second};
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < count; i += stride) {
    const opmath_t z = input[i];
    const opmath_t y = activation_value(activation, z);
    output[i] = static_cast<scalar_t>(y);
    derivative[i] = static_cast<scalar_t>(activation_derivative(activation, z, y));
  }
}

template <ActivationKind kKind, typename scalar_t>
void launch_activation(at::Tensor& output, at::Tensor& derivative, const at::Tensor& input,
                       const Activation& activation) {
  const int64_t count = input.numel();
  activation_cuda_kernel<kKind, scalar_t><<<grid_size(count), kThreadsPerBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
      output.data_ptr<scalar_t>(), derivative.data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(), count,
      activation);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// index_t: 32-bit when the flat index fits, because the two divisions per element that locate the
// sample and the feature cost several times more in 64-bit integer arithmetic.
template <typename scalar_t, typename index_t>
__global__ void scale_features_cuda_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ values,
                                           const scalar_t* __restrict__ factor, index_t count,
                                           index_t sample_size, index_t features, index_t values_sample_stride) {
  using opmath_t = at::opmath_type<scalar_t>;
  // The grid is at most one wave of blocks, so these products fit in 32 bits.
  const index_t stride = static_cast<index_t>(gridDim.x * blockDim.x);
  for (index_t i = static_cast<index_t>(blockIdx.x * blockDim.x + threadIdx.x); i < count; i += stride) {
    const index_t b = i / sample_size, h = i % features;
    const index_t within_sample = i - b * sample_size;
    out[i] = static_cast<scalar_t>(static_cast<opmath_t>(values[b * values_sample_stride + within_sample]) *
                                   static_cast<opmath_t>(factor[b * features + h]));
  }
}

template <typename scalar_t, typename index_t>
void launch_scale_features(at::Tensor& out, const at::Tensor& values, const at::Tensor& factor, unsigned int grid) {
  const int64_t features = out.size(2);
  scale_features_cuda_kernel<scalar_t, index_t><<<grid, kThreadsPerBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
      out.data_ptr<scalar_t>(), values.const_data_ptr<scalar_t>(), factor.const_data_ptr<scalar_t>(),
      static_cast<index_t>(out.numel()), static_cast<index_t>(out.size(1) * features),
      static_cast<index_t>(features), static_cast<index_t>(sample_stride_of(values)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void activation_kernel(at::Tensor& output, at::Tensor& derivative, const at::Tensor& input,
                       const Activation& activation) {
  if (input.numel() == 0) return;
  const c10::cuda::CUDAGuard device_guard(input.device());
  JACEXT_DISPATCH_CUDA_FLOATING_TYPES(input.scalar_type(), "jacext_activation_cuda", [&] {
    visit_activation_kind(activation.kind, [&](auto kind) {
      launch_activation<decltype(kind)::value, scalar_t>(output, derivative, input, activation);
    });
  });
}

void scale_features_kernel(at::Tensor& out, const at::Tensor& values, const at::Tensor& factor) {
  const int64_t count = out.numel();
  if (count == 0) return;
  const c10::cuda::CUDAGuard device_guard(out.device());
  const unsigned int grid = grid_size(count);
  // The last grid-stride step may pass `count` by up to one grid's worth of threads before it stops.
  const bool index_fits_32_bit = count + int64_t{grid} * kThreadsPerBlock <= std::numeric_limits<int32_t>::max();
  JACEXT_DISPATCH_CUDA_FLOATING_TYPES(out.scalar_type(), "jacext_scale_features_cuda", [&] {
    if (index_fits_32_bit) {
      launch_scale_features<scalar_t, int32_t>(out, values, factor, grid);
    } else {
      launch_scale_features<scalar_t, int64_t>(out, values, factor, grid);
    }
  });
}

}  // namespace jacext::cuda
