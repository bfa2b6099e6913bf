// CPU kernel of the masked Linear rule (jacobian_block.h): out[b] = values[b] diag(factor[b]) matrix,
// skipping the matrix rows of units whose factor is zero. Parallel over samples; the AVX2 + FMA copy
// of the micro-kernel when the CPU has both, else the same code with the baseline ISA's vectors.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "../jacext/jacobian_block.h"
#include "masked_linear_kernel.h"
#include "parallel.h"

namespace jacext::cpu {
namespace {

bool cpu_has_avx2_fma() {
#ifdef JACEXT_MASKED_ROWS_AVX2
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

template <typename scalar_t>
void run_samples(const MaskedRowsProblem<scalar_t>& problem, int64_t begin, int64_t end) {
#ifdef JACEXT_MASKED_ROWS_AVX2
  if (cpu_has_avx2_fma()) return masked_rows_matmul_avx2(problem, begin, end);
#endif
  masked_rows_matmul(problem, begin, end);
}

template <typename scalar_t>
void dense_rows_matmul_dispatch(const DenseRowsProblem<scalar_t>& problem) {
#ifdef JACEXT_MASKED_ROWS_AVX2
  if (cpu_has_avx2_fma()) return dense_rows_matmul_avx2(problem);
#endif
  dense_rows_matmul(problem);
}

}  // namespace

void run_dense_rows_matmul(const DenseRowsProblem<float>& problem) { dense_rows_matmul_dispatch(problem); }
void run_dense_rows_matmul(const DenseRowsProblem<double>& problem) { dense_rows_matmul_dispatch(problem); }

void masked_linear_kernel(at::Tensor& out, const at::Tensor& values, const at::Tensor& factor,
                          const at::Tensor& matrix) {
  const int64_t batch = out.size(0), rows = out.size(1), columns = out.size(2), features = matrix.size(0);
  // A sample costs about rows * columns multiply-add chains; give each thread enough of them.
  const int64_t grain = std::max<int64_t>(1, kParallelGrainElements / std::max<int64_t>(1, rows * columns));
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "jacext_masked_linear_cpu", [&] {
    // One copy of the weight per call (H * K elements, against B * R * active * K multiply-adds).
    const int64_t panel_width = kPanelWidth<scalar_t>, panel_count = columns / panel_width;
    const at::Tensor panels = matrix.narrow(1, 0, panel_count * panel_width)
                                  .view({features, panel_count, panel_width})
                                  .permute({1, 0, 2})
                                  .contiguous();
    const MaskedRowsProblem<scalar_t> problem{values.const_data_ptr<scalar_t>(),
                                              values.dim() == 3 ? rows * features : 0,
                                              factor.const_data_ptr<scalar_t>(),
                                              matrix.const_data_ptr<scalar_t>(),
                                              panels.const_data_ptr<scalar_t>(),
                                              out.data_ptr<scalar_t>(),
                                              rows,
                                              features,
                                              columns};
    at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) { run_samples(problem, begin, end); });
  });
}

}  // namespace jacext::cpu
