// Launch plumbing shared by the CUDA kernels: the dtypes they are built for, grid sizing, and the
// layout of a block's explicit values.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdint>

namespace jacext::cuda {

// float and double like the CPU kernels, plus half and bfloat16 (accumulated in float through
// at::opmath_type); check_feature_matrix admits the reduced-precision types for CUDA tensors only.
#define JACEXT_DISPATCH_CUDA_FLOATING_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

constexpr int kThreadsPerBlock = 256;

// Blocks for `work_items` items of which one block takes `items_per_block` per pass: no more than one
// wave of resident blocks. The kernels loop grid-stride over the rest, which covers both counts beyond
// one wave (or beyond the grid's limits) and counts that are not a multiple of the block size.
inline unsigned int grid_size(int64_t work_items, int64_t items_per_block = kThreadsPerBlock) {
  const cudaDeviceProp* properties = at::cuda::getCurrentDeviceProperties();
  const int64_t resident_blocks = int64_t{properties->multiProcessorCount} *
                                  std::max(1, properties->maxThreadsPerMultiProcessor / kThreadsPerBlock);
  const int64_t needed_blocks = (work_items + items_per_block - 1) / items_per_block;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(needed_blocks, resident_blocks)));
}

// Distance between samples in a block's explicit values: [R, H] values are shared by every sample and
// read with stride 0 instead of being expanded; [B, R, H] values are per sample.
inline int64_t sample_stride_of(const at::Tensor& values) {
  return values.dim() == 3 ? values.size(1) * values.size(2) : 0;
}

}  // namespace jacext::cuda
