// The register-blocked row products of the CPU kernels (masked_linear_kernel.h): the masked-rows product
// of masked_linear and the dense product of the small-chain kernel. Plain pointers only, so that the
// per-ISA copies need nothing from ATen but at::vec.
#pragma once

#include <cstdint>

namespace jacext::cpu {

// out[b] = values[b] diag(factor[b]) matrix for every sample b, all row-major and contiguous:
// values [R, H] shared by every sample (values_batch_stride 0) or [B, R, H] (stride R * H),
// factor [B, H], matrix [H, K], out [B, R, K]; panels [K / P, H, P] holds the matrix's first K / P * P
// columns panel by panel, P being the chosen kernels' panel_width.
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

// The instruction sets the row products are compiled for, in increasing order. The build's baseline
// ISA always; AVX2 + FMA and AVX-512 (F, BW, VL, DQ) where the compiler can target them on x86-64
// (masked_linear_avx2.cpp, masked_linear_avx512.cpp), picked at run time from what the CPU has.
enum class RowProductIsa { Baseline, Avx2, Avx512 };

// One instruction set's copy of the kernels. The masked product runs samples [begin, end).
template <typename scalar_t>
struct RowProductKernels {
  int64_t panel_width;     // columns of a weight panel: two of this ISA's vectors
  int64_t max_block_rows;  // rows of its largest register block
  void (*masked)(const MaskedRowsProblem<scalar_t>& problem, int64_t begin, int64_t end);
  void (*dense)(const DenseRowsProblem<scalar_t>& problem);
};

// Each copy's kernels, one specialisation per instruction set in the file compiled for it.
template <RowProductIsa isa, typename scalar_t>
RowProductKernels<scalar_t> row_product_kernels_for();

#if defined(__x86_64__) && defined(__GNUC__)
#define JACEXT_ROW_PRODUCT_ISA_COPIES 1
#endif

// The copy for a product of `rows` rows (R of MaskedRowsProblem and DenseRowsProblem): the best instruction
// set this CPU has, capped by the environment variable JACEXT_ROW_PRODUCT_ISA (baseline, avx2 or avx512;
// read once per process, so that tests and benchmarks can run each copy on one machine). AVX-512's copy
// takes at most one of its register blocks of rows, where it loads each weight row once instead of the
// twice of AVX2's 6-row blocks; with more rows both copies run several blocks, and AVX-512's measured a
// few percent slower (python -m bench.masked_linear --branches masked-avx2,masked-avx512 on cifar and
// bottleneck, 100 and 512 rows), so AVX2's runs them. masked_linear.cpp holds the choice.
template <typename scalar_t>
const RowProductKernels<scalar_t>& row_product_kernels(int64_t rows);

// Nonzero entries of data[0, n): the active units of a ReLU mask, counted in one branch-free pass.
template <typename scalar_t>
int64_t count_nonzero(const scalar_t* data, int64_t n);

inline void run_dense_rows_matmul(const DenseRowsProblem<float>& problem) {
  row_product_kernels<float>(problem.rows).dense(problem);
}
inline void run_dense_rows_matmul(const DenseRowsProblem<double>& problem) {
  row_product_kernels<double>(problem.rows).dense(problem);
}

}  // namespace jacext::cpu
