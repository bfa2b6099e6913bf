// CPU kernel of the softmax-family row updates (rule_math.h): one pass for the dominant class, one reduction and one
// write per row.
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
      softmax_family_row<acc_t>(variant, src, s, dst, features);
    });
  });
}

}  // namespace jacext::cpu
