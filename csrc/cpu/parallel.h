// Shared iteration over the rows of a Jacobian block for the CPU kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

// With ATen's OpenMP backend, at::parallel_for (inline) is parallel only in code compiled with OpenMP;
// without it every kernel here would silently run on one thread.
#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#error "jacobian_ext's CPU kernels must be compiled with -fopenmp (torch uses the OpenMP backend)"
#endif

namespace jacext::cpu {

// Elements a thread should own before a parallel region pays for its start-up (~a few microseconds).
constexpr int64_t kParallelGrainElements = 32768;

// Calls row_fn(source_row, sample_row, out_row) for every row of out [B, R, H], in parallel over rows:
// source_row is that row of `values` ([R, H] shared by every sample, read with batch stride 0, or
// [B, R, H]) and sample_row the sample's row of `per_sample` [B, H]. All tensors are contiguous.
template <typename scalar_t, typename RowFn>
void for_each_block_row(at::Tensor& out, const at::Tensor& values, const at::Tensor& per_sample, const RowFn& row_fn) {
  const int64_t rows = out.size(1), features = out.size(2);
  const int64_t values_batch_stride = values.dim() == 3 ? rows * features : 0;
  auto* out_base = out.data_ptr<scalar_t>();
  const auto* values_base = values.const_data_ptr<scalar_t>();
  const auto* sample_base = per_sample.const_data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, kParallelGrainElements / std::max<int64_t>(1, features));
  at::parallel_for(0, out.size(0) * rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / rows, r = row % rows;
      row_fn(values_base + b * values_batch_stride + r * features, sample_base + b * features,
             out_base + row * features);
    }
  });
}

}  // namespace jacext::cpu
