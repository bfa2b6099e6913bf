// One pass per row of N features, in place of the device-generic rule's chain of element-wise ATen ops:
// each of those is its own pass over the block and its own parallel region, and on a busy machine every
// region waits for its slowest thread.
#include "layer_norm.h"

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>

#include "parallel.h"

namespace jacext::cpu {

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
        const scalar_t* x = input_base + group * n;
        const scalar_t* g = rows_base + row * n;
        scalar_t* o = out_base + row * n;
        const acc_t mu = mean_base[group], rs = rstd_base[group];
        acc_t sum = 0, dot = 0;
        for (int64_t k = 0; k < n; ++k) {
          const acc_t u = (weight_first && w != nullptr) ? acc_t(g[k]) * acc_t(w[k]) : acc_t(g[k]);
          sum += u;
          dot += u * ((acc_t(x[k]) - mu) * rs);
        }
        const acc_t row_mean = sum / acc_t(n), normalized_mean = dot / acc_t(n);
        for (int64_t k = 0; k < n; ++k) {
          const acc_t u = (weight_first && w != nullptr) ? acc_t(g[k]) * acc_t(w[k]) : acc_t(g[k]);
          acc_t v = (u - row_mean - (acc_t(x[k]) - mu) * rs * normalized_mean) * rs;
          if (!weight_first && w != nullptr) v *= acc_t(w[k]);
          o[k] = static_cast<scalar_t>(v);
        }
      }
    });
  });
}

}  // namespace jacext::cpu
