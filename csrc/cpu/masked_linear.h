// The register-blocked row products of the CPU kernels (masked_linear_kernel.h): the masked-rows product
// of masked_linear and the dense product of the small-chain kernel. Plain pointers only, so that the
// AVX2 file needs nothing from ATen but at::vec.
#pragma once

#include <cstdint>

namespace jacext::cpu {

// Columns of a weight panel: one 64-byte cache line.
template <typename scalar_t>
constexpr int64_t kPanelWidth = 64 / sizeof(scalar_t);

// out[b] = values[b] diag(factor[b]) matrix for every sample b, all row-major and contiguous:
// values [R, H] shared by every sample (values_batch_stride 0) or [B, R, H] (stride R * H),
// factor [B, H], matrix [H, K], out [B, R, K]; panels [K / P, H, P] (P = kPanelWidth) holds the
// matrix's first K / P * P columns panel by panel.
template <typename scalar_t>
struct MaskedRowsProblem {
  const scalar_t* values;
  int64_t values_batch_stride;
  const scalar_t* factor;
  const scalar_t* matrix;
  const scalar_t* panels;
  scalar_t* out;
  int64_t rows, features, columns;
};

// out [R, N] = a [R, K] @ matrix [K, N], all row-major and contiguous.
template <typename scalar_t>
struct DenseRowsProblem {
  const scalar_t* a;
  const scalar_t* matrix;
  scalar_t* out;
  int64_t rows, steps, columns;
};

// The dense product with the AVX2 + FMA copy when the CPU has both, else the baseline ISA's
// (masked_linear.cpp holds the choice).
void run_dense_rows_matmul(const DenseRowsProblem<float>& problem);
void run_dense_rows_matmul(const DenseRowsProblem<double>& problem);

// Samples [begin, end) with AVX2 + FMA vectors; defined only where the compiler can target AVX2
// (see masked_linear_avx2.cpp), and called only where the CPU has it.
#if defined(__x86_64__) && defined(__GNUC__)
#define JACEXT_MASKED_ROWS_AVX2 1
void masked_rows_matmul_avx2(const MaskedRowsProblem<float>& problem, int64_t begin, int64_t end);
void masked_rows_matmul_avx2(const MaskedRowsProblem<double>& problem, int64_t begin, int64_t end);
void dense_rows_matmul_avx2(const DenseRowsProblem<float>& problem);
void dense_rows_matmul_avx2(const DenseRowsProblem<double>& problem);
#endif

}  // namespace jacext::cpu
