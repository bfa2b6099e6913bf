// CPU kernel of the softmax-family row updates (rule_math.h): one reduction and one write per row.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "../jacext/jacobian_block.h"
#include "parallel.h"

namespace jacext::cpu {

void softmax_rows_kernel(at::Tensor& out, const at::Tensor& values, const at::Tensor& probabilities,
                         SoftmaxVariant variant) {
  const int64_t rows = out.size(1), features = out.size(2);
  const int64_t values_batch_stride = values.dim() == 3 ? rows * features : 0;
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "jacext_softmax_rows_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto* dst_base = out.data_ptr<scalar_t>();
    const auto* values_base = values.const_data_ptr<scalar_t>();
    const auto* s_base = probabilities.const_data_ptr<scalar_t>();
    at::parallel_for(0, out.size(0) * rows, row_grain(features), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / rows, r = row % rows;
        const scalar_t* src = values_base + b * values_batch_stride + r * features;
        const scalar_t* s = s_base + b * features;
        scalar_t* dst = dst_base + row * features;
        acc_t reduced = 0;  // <row, s> for the softmax and log-softmax forward rules, sum(row) for the reverse
        if (variant == SoftmaxVariant::LogSoftmaxReverse) {
          for (int64_t h = 0; h < features; ++h) reduced += src[h];
          for (int64_t h = 0; h < features; ++h)
            dst[h] = log_softmax_reverse_entry(src[h], s[h], static_cast<scalar_t>(reduced));
          continue;
        }
        for (int64_t h = 0; h < features; ++h) reduced += static_cast<acc_t>(src[h]) * s[h];
        if (variant == SoftmaxVariant::Softmax) {
          for (int64_t h = 0; h < features; ++h) dst[h] = softmax_row_entry(src[h], s[h], static_cast<scalar_t>(reduced));
        } else {
          for (int64_t h = 0; h < features; ++h) dst[h] = log_softmax_forward_entry(src[h], static_cast<scalar_t>(reduced));
        }
      }
    });
  });
}

}  // namespace jacext::cpu
