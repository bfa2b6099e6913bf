// One pass per row of N features, in place of the device-generic rule's chain of element-wise ATen ops:
// each of those is its own pass over the block and its own parallel region, and on a busy machine every
// region waits for its slowest thread.
#include "layer_norm.h"

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>

#include "isa.h"
#include "parallel.h"

namespace jacext::cpu {
namespace {

// One row of N: o = rstd (u - mean(u) - xhat mean(xhat u)), xhat = (x - mu) rstd, with u = w g when
// weight_first, else g and the result times w. The sums in acc_t, vectorised: each lane sums its share of the
// row and the lanes add up at the end, an order a scalar loop would not take, in the same precision. o may be g.
template <typename scalar_t, typename acc_t>
JACEXT_ISA_CLONES void project_row(scalar_t* o, const scalar_t* g, const scalar_t* x, const scalar_t* w,
                                   bool weight_first, acc_t mu, acc_t rs, int64_t n) {
  const bool scale_first = weight_first && w != nullptr, scale_after = !weight_first && w != nullptr;
  acc_t sum = 0, dot = 0;
#pragma omp simd reduction(+ : sum, dot)
  for (int64_t k = 0; k < n; ++k) {
    const acc_t u = scale_first ? acc_t(g[k]) * acc_t(w[k]) : acc_t(g[k]);
    sum += u;
    dot += u * ((acc_t(x[k]) - mu) * rs);
  }
  const acc_t row_mean = sum / acc_t(n), normalized_mean = dot / acc_t(n);
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    const acc_t u = scale_first ? acc_t(g[k]) * acc_t(w[k]) : acc_t(g[k]);
    const acc_t v = (u - row_mean - (acc_t(x[k]) - mu) * rs * normalized_mean) * rs;
    o[k] = static_cast<scalar_t>(scale_after ? v * acc_t(w[k]) : v);
  }
}

}  // namespace

void layer_norm_rows_kernel(at::Tensor& out, const at::Tensor& rows, const at::Tensor& input, const at::Tensor& mean,
                            const at::Tensor& rstd, const std::optional<at::Tensor>& weight, bool weight_first) {
  const int64_t count = rows.size(1), groups = rows.size(2), n = rows.size(3);
  const int64_t total = rows.size(0) * count * groups;
  const int64_t grain = std::max<int64_t>(1, kParallelGrainElements / std::max<int64_t>(1, n));
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "jacext::layer_norm_rows_kernel", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
    const scalar_t* rows_base = rows.const_data_ptr<scalar_t>();
    const scalar_t* input_base = input.const_data_ptr<scalar_t>();
    const scalar_t* mean_base = mean.const_data_ptr<scalar_t>();
    const scalar_t* rstd_base = rstd.const_data_ptr<scalar_t>();
    const scalar_t* w = weight.has_value() ? weight->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out_base = out.data_ptr<scalar_t>();
    at::parallel_for(0, total, grain, [=](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t group = (row / (count * groups)) * groups + row % groups;  // b * M + m
        project_row<scalar_t, acc_t>(out_base + row * n, rows_base + row * n, input_base + group * n, w, weight_first,
                                     acc_t(mean_base[group]), acc_t(rstd_base[group]), n);
      }
    });
  });
}

}  // namespace jacext::cpu
