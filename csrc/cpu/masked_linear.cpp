// CPU kernel of the masked Linear rule (jacobian_block.h): out[b] = values[b] diag(factor[b]) matrix,
// skipping the matrix rows of units whose factor is zero. Parallel over samples. Also the run-time choice
// among the row products' copies (masked_linear.h): the baseline ISA's, compiled here, AVX2's and AVX-512's.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "../jacext/jacobian_block.h"
#include "masked_linear_kernel.h"
#include "parallel.h"

namespace jacext::cpu {
namespace {

RowProductIsa best_isa_of_this_cpu() {
#ifdef JACEXT_ROW_PRODUCT_ISA_COPIES
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return RowProductIsa::Avx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return RowProductIsa::Avx2;
#endif
  return RowProductIsa::Baseline;
}

// The CPU's best, or JACEXT_ROW_PRODUCT_ISA's choice when it names one the CPU has.
RowProductIsa chosen_isa() {
  static const RowProductIsa isa = [] {
    const RowProductIsa best = best_isa_of_this_cpu();
    const char* text = std::getenv("JACEXT_ROW_PRODUCT_ISA");
    if (text == nullptr || *text == '\0') return best;
    RowProductIsa requested;
    if (std::strcmp(text, "baseline") == 0) {
      requested = RowProductIsa::Baseline;
    } else if (std::strcmp(text, "avx2") == 0) {
      requested = RowProductIsa::Avx2;
    } else if (std::strcmp(text, "avx512") == 0) {
      requested = RowProductIsa::Avx512;
    } else {
      TORCH_CHECK_VALUE(false, "JACEXT_ROW_PRODUCT_ISA must be baseline, avx2 or avx512, got '", text, "'");
    }
    TORCH_CHECK_VALUE(requested <= best, "JACEXT_ROW_PRODUCT_ISA=", text,
                      ": this CPU (or this build) has no such copy of the row-product kernels");
    return requested;
  }();
  return isa;
}

template <typename scalar_t>
RowProductKernels<scalar_t> kernels_for(RowProductIsa isa) {
#ifdef JACEXT_ROW_PRODUCT_ISA_COPIES
  if (isa == RowProductIsa::Avx512) return row_product_kernels_for<RowProductIsa::Avx512, scalar_t>();
  if (isa == RowProductIsa::Avx2) return row_product_kernels_for<RowProductIsa::Avx2, scalar_t>();
#endif
  return this_copy_kernels<scalar_t>();  // this file's copy: the build's baseline ISA
}

}  // namespace

template <typename scalar_t>
const RowProductKernels<scalar_t>& row_product_kernels(int64_t rows) {
  static const RowProductKernels<scalar_t> chosen = kernels_for<scalar_t>(chosen_isa());
  static const RowProductKernels<scalar_t> many_rows =
      kernels_for<scalar_t>(std::min(chosen_isa(), RowProductIsa::Avx2));
  return rows <= chosen.max_block_rows ? chosen : many_rows;
}
template const RowProductKernels<float>& row_product_kernels<float>(int64_t rows);
template const RowProductKernels<double>& row_product_kernels<double>(int64_t rows);

template <typename scalar_t>
int64_t count_nonzero(const scalar_t* data, int64_t n) {
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += data[i] != scalar_t(0);
  return count;
}
template int64_t count_nonzero<float>(const float* data, int64_t n);
template int64_t count_nonzero<double>(const double* data, int64_t n);

void masked_linear_kernel(at::Tensor& out, const at::Tensor& values, const at::Tensor& factor,
                          const at::Tensor& matrix) {
  const int64_t batch = out.size(0), rows = out.size(1), columns = out.size(2), features = matrix.size(0);
  // A sample costs about rows * columns multiply-add chains; give each thread enough of them.
  const int64_t grain = std::max<int64_t>(1, kParallelGrainElements / std::max<int64_t>(1, rows * columns));
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "jacext_masked_linear_cpu", [&] {
    const RowProductKernels<scalar_t>& kernels = row_product_kernels<scalar_t>(rows);
    // One copy of the weight per call (H * K elements, against B * R * active * K multiply-adds).
    const int64_t panel_width = kernels.panel_width, panel_count = columns / panel_width;
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
    at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) { kernels.masked(problem, begin, end); });
  });
}

}  // namespace jacext::cpu
