#include "jacext/nd_rows.h"

namespace jacext {

at::Tensor identity_rows(at::IntArrayRef features, const at::TensorOptions& options) {
  const int64_t rows = c10::multiply_integers(features);
  std::vector<int64_t> shape{rows};
  shape.insert(shape.end(), features.begin(), features.end());
  return at::eye(rows, options).view(shape);
}

at::Tensor broadcast_over_batch(const at::Tensor& shared, int64_t batch) {
  std::vector<int64_t> shape{batch};
  shape.insert(shape.end(), shared.sizes().begin(), shared.sizes().end());
  return shared.unsqueeze(0).expand(shape).contiguous();
}

at::Tensor map_rows_shared(const std::optional<at::Tensor>& rows, int64_t batch, at::IntArrayRef features,
                           const at::TensorOptions& options, FeatureMap map) {
  if (!rows.has_value()) return broadcast_over_batch(map(identity_rows(features, options)).contiguous(), batch);
  const int64_t row_count = rows->size(1);
  const at::Tensor mapped = map(rows->flatten(0, 1)).contiguous();
  std::vector<int64_t> shape{batch, row_count};
  shape.insert(shape.end(), mapped.sizes().begin() + 1, mapped.sizes().end());
  return mapped.view(shape);
}

}  // namespace jacext
