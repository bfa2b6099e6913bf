// Running blocks of the ops on N-d per-sample features (conv, pooling, batch norm).
//
// A block is R rows over the per-sample features, a contiguous [B, R, *features]: in forward mode the
// rows are the model's input dims (the op returns the movedim(1, -1) view, [B, *features, D]), in
// reverse mode the model's output dims. A layer that is linear and the same for every sample acts on
// a block as on a batch of B * R inputs, and on the identity once, batch-shared.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/FunctionRef.h>

#include <optional>
#include <vector>

namespace jacext {

// A layer map on a batch of per-sample features: [N, *features] -> [N, *out_features].
using FeatureMap = c10::function_ref<at::Tensor(const at::Tensor&)>;

// eye(R) shaped [R, *features] with R = prod(features): the identity block of one sample.
at::Tensor identity_rows(at::IntArrayRef features, const at::TensorOptions& options);

// A fresh contiguous [batch, *shared.shape] with `shared` for every sample.
at::Tensor broadcast_over_batch(const at::Tensor& shared, int64_t batch);

// Applies a linear, sample-independent layer map to every row of `rows` ([B, R, *features], contiguous;
// nullopt for the identity). The identity goes through the map once, on identity_rows(features), and
// is then copied to every sample. Returns a fresh contiguous [B, R, *out_features].
at::Tensor map_rows_shared(const std::optional<at::Tensor>& rows, int64_t batch, at::IntArrayRef features,
                           const at::TensorOptions& options, FeatureMap map);

}  // namespace jacext
