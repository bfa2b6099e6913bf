// The masked-rows product shared by the CPU kernel files of masked_linear (plain pointers only, so
// that the AVX2 file needs nothing from ATen but at::vec).
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

// Samples [begin, end) with AVX2 + FMA vectors; defined only where the compiler can target AVX2
// (see masked_linear_avx2.cpp), and called only where the CPU has it.
#if defined(__x86_64__) && defined(__GNUC__)
#define JACEXT_MASKED_ROWS_AVX2 1
void masked_rows_matmul_avx2(const MaskedRowsProblem<float>& problem, int64_t begin, int64_t end);
void masked_rows_matmul_avx2(const MaskedRowsProblem<double>& problem, int64_t begin, int64_t end);
#endif

}  // namespace jacext::cpu
