// CPU kernel of the softmax-family row updates (rule_math.h): one reduction and one write per row.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "../jacext/jacobian_block.h"
#include "parallel.h"

namespace jacext::cpu {

void softmax_rows_kernel(at::Tensor& out, const at::Tensor& values, const at::Tensor& probabilities,
                         SoftmaxVariant variant) {
  const int64_t features = out.size(2);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "jacext_softmax_rows_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for_each_block_row<scalar_t>(out, values, probabilities, [&](const scalar_t* src, const scalar_t* s, scalar_t* dst) {
      acc_t reduced = 0;  // <row, s> for the softmax and log-softmax forward rules, sum(row) for the reverse
      if (variant == SoftmaxVariant::LogSoftmaxReverse) {
        for (int64_t h = 0; h < features; ++h) reduced += src[h];
        for (int64_t h = 0; h < features; ++h)
          dst[h] = log_softmax_reverse_entry(src[h], s[h], static_cast<scalar_t>(reduced));
        return;
      }
      for (int64_t h = 0; h < features; ++h) reduced += static_cast<acc_t>(src[h]) * s[h];
      if (variant == SoftmaxVariant::Softmax) {
        for (int64_t h = 0; h < features; ++h) dst[h] = softmax_row_entry(src[h], s[h], static_cast<scalar_t>(reduced));
      } else {
        for (int64_t h = 0; h < features; ++h) dst[h] = log_softmax_forward_entry(src[h], static_cast<scalar_t>(reduced));
      }
    });
  });
}

}  // namespace jacext::cpu
