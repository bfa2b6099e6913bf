// CUDA kernel of the softmax-family row updates (rule_math.h): per row the dominant class, one reduction
// and one write.
// One warp per row: the rows are as wide as a softmax layer (usually a classifier head of 10 to a few
// hundred features), too short to keep a whole block busy, and a warp reduces without shared memory.
// No [H, H] matrix is formed.
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>

#include "../jacext/jacobian_block.h"
#include "launch.cuh"

namespace jacext::cuda {
namespace {

constexpr int kRowsPerBlock = kThreadsPerBlock / C10_WARP_SIZE;

// Butterfly sum: every lane ends with the total of the warp.
template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t value) {
  for (int offset = C10_WARP_SIZE / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}

// The row's dominant class m (rule_math.h's dominant_class: the first of the largest, -1 unless it holds
// more than half the probability), on every lane.
template <typename scalar_t>
__device__ __forceinline__ int64_t warp_dominant_class(const scalar_t* s, int64_t features, int lane) {
  int64_t best = lane < features ? lane : 0;
  for (int64_t h = lane + C10_WARP_SIZE; h < features; h += C10_WARP_SIZE) {
    if (s[h] > s[best]) best = h;
  }
  for (int offset = C10_WARP_SIZE / 2; offset > 0; offset /= 2) {
    const int64_t other = __shfl_xor_sync(0xffffffffu, best, offset);
    if (s[other] > s[best] || (s[other] == s[best] && other < best)) best = other;
  }
  return s[best] > scalar_t(0.5) ? best : -1;
}

template <SoftmaxVariant kVariant, typename scalar_t>
__global__ void softmax_rows_cuda_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ values,
                                         const scalar_t* __restrict__ probabilities, int64_t row_count,
                                         int64_t rows_per_sample, int64_t features, int64_t values_sample_stride) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % C10_WARP_SIZE;
  const int64_t row_stride = int64_t{gridDim.x} * kRowsPerBlock;
  // `row` is the same for every lane of a warp, so the whole warp takes part in each shuffle.
  for (int64_t row = int64_t{blockIdx.x} * kRowsPerBlock + threadIdx.x / C10_WARP_SIZE; row < row_count;
       row += row_stride) {
    const int64_t b = row / rows_per_sample, r = row - b * rows_per_sample;
    const scalar_t* src = values + b * values_sample_stride + r * features;
    const scalar_t* s = probabilities + b * features;
    scalar_t* dst = out + row * features;
    const int64_t m = warp_dominant_class(s, features, lane);
    const acc_t r_m = m >= 0 ? static_cast<acc_t>(src[m]) : acc_t(0);
    SoftmaxRowSums<acc_t> sums;
    for (int64_t j = lane; j < features; j += C10_WARP_SIZE) {
      if (j != m) add_other_class(sums, kVariant, static_cast<acc_t>(src[j]), r_m, static_cast<acc_t>(s[j]));
    }
    sums.shift = warp_sum(sums.shift);
    sums.others = warp_sum(sums.others);
    sums.tail_mass = warp_sum(sums.tail_mass);
    for (int64_t h = lane; h < features; h += C10_WARP_SIZE) {
      dst[h] = static_cast<scalar_t>(
          softmax_family_entry(kVariant, static_cast<acc_t>(src[h]), static_cast<acc_t>(s[h]), h == m, r_m, sums));
    }
  }
}

template <SoftmaxVariant kVariant, typename scalar_t>
void launch_softmax_rows(at::Tensor& out, const at::Tensor& values, const at::Tensor& probabilities) {
  const int64_t rows_per_sample = out.size(1), row_count = out.size(0) * rows_per_sample;
  softmax_rows_cuda_kernel<kVariant, scalar_t>
      <<<grid_size(row_count, kRowsPerBlock), kThreadsPerBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
          out.data_ptr<scalar_t>(), values.const_data_ptr<scalar_t>(), probabilities.const_data_ptr<scalar_t>(),
          row_count, rows_per_sample, out.size(2), sample_stride_of(values));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void softmax_rows_kernel(at::Tensor& out, const at::Tensor& values, const at::Tensor& probabilities,
                         SoftmaxVariant variant) {
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard device_guard(out.device());
  JACEXT_DISPATCH_CUDA_FLOATING_TYPES(out.scalar_type(), "jacext_softmax_rows_cuda", [&] {
    switch (variant) {
      case SoftmaxVariant::Softmax:
        launch_softmax_rows<SoftmaxVariant::Softmax, scalar_t>(out, values, probabilities);
        break;
      case SoftmaxVariant::LogSoftmaxForward:
        launch_softmax_rows<SoftmaxVariant::LogSoftmaxForward, scalar_t>(out, values, probabilities);
        break;
      case SoftmaxVariant::LogSoftmaxReverse:
        launch_softmax_rows<SoftmaxVariant::LogSoftmaxReverse, scalar_t>(out, values, probabilities);
        break;
    }
  });
}

}  // namespace jacext::cuda
