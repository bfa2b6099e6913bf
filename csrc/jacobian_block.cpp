#include "jacext/jacobian_block.h"

namespace jacext {

at::Tensor JacobianBlock::explicit_values(int64_t features, const at::TensorOptions& options) const {
  if (kind == Kind::Identity) return at::eye(features, options);
  return values.contiguous();
}

at::Tensor JacobianBlock::dense(int64_t batch, int64_t features, const at::TensorOptions& options) const {
  switch (kind) {
    case Kind::Identity:
      return at::eye(features, options).expand({batch, features, features}).clone(at::MemoryFormat::Contiguous);
    case Kind::Shared:
      // clone, not contiguous(): for batch 1 the expanded view is already contiguous and would alias
      // the shared values (possibly a weight).
      return values.expand({batch, values.size(0), values.size(1)}).clone(at::MemoryFormat::Contiguous);
    case Kind::PerSample:
      return values;
  }
  TORCH_INTERNAL_ASSERT(false, "unknown JacobianBlock kind");
}

Activation activation_from_name(const std::string& name) {
  if (name == "relu") return Activation::ReLU;
  if (name == "tanh") return Activation::Tanh;
  if (name == "sigmoid") return Activation::Sigmoid;
  TORCH_CHECK(false, "unknown activation '", name, "'; expected one of relu, tanh, sigmoid");
}

}  // namespace jacext
