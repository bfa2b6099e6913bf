// Validation at the operator boundary, so that rules and kernels can assume clean inputs.
// Every failure names the argument and what was expected.
#pragma once

#include <ATen/ATen.h>
#include <optional>

#include "jacobian_block.h"

namespace jacext {

// float32/float64 on CPU, or in a CUDA build on CUDA, where float16 and bfloat16 are accepted as well.
void check_floating_tensor(const at::Tensor& input, const char* op, const char* arg);

// A [B, H] feature matrix of float32/float64 on CPU, or in a CUDA build on CUDA, where float16 and
// bfloat16 are accepted as well.
void check_feature_matrix(const at::Tensor& input, const char* op, const char* arg);

// `other` shares dtype and device with `input`.
void check_same_dtype_device(const at::Tensor& input, const at::Tensor& other, const char* op, const char* arg);

// Forward-mode Jacobian argument in its external layout: None (identity, the layer input is the
// model input), [H, D] (the same for every sample) or [B, H, D]. Returned with the feature axis last.
JacobianBlock tangents_from_jac(const std::optional<at::Tensor>& jac, const at::Tensor& input, const char* op);

// Reverse-mode cotangent argument: None (identity, the layer output is the model output),
// [C, H] (the same for every sample) or [B, C, H], with H == `features`.
JacobianBlock cotangents_from_arg(const std::optional<at::Tensor>& cotangent, int64_t batch, int64_t features,
                                  const at::Tensor& like, const char* op);

// External forward-mode layout [.., H, D] of a block stored as [.., D, H]; a view of fresh memory.
at::Tensor tangents_to_jac(const JacobianBlock& block, int64_t batch, int64_t features,
                           const at::TensorOptions& options);

// ---- Ops on N-d per-sample features (conv, pooling, normalisation; block layout in nd_rows.h) ----

// [B, *features] with min_feature_dims..max_feature_dims feature dims, dtype and device as above.
void check_batched_features(const at::Tensor& input, int64_t min_feature_dims, int64_t max_feature_dims,
                            const char* op, const char* arg);

// Forward-mode `jac`: None (identity, the layer input is the model input) or [B, *features, D] matching
// `input` [B, *features]. Returns the contiguous tangents [B, D, *features] (free when jac is the
// movedim(1, -1) view of such storage, as the walker passes it), or nullopt for the identity.
std::optional<at::Tensor> tangents_nd_from_jac(const std::optional<at::Tensor>& jac, const at::Tensor& input,
                                              const char* op);

// Checks a reverse-mode cotangent block [batch, C, *out_features] (any layout) against `like` and the shape.
void check_cotangent_nd(const at::Tensor& cotangent, int64_t batch, at::IntArrayRef out_features,
                        const at::Tensor& like, const char* op);

// Reverse-mode `cotangent`: None (identity, the layer output is the model output) or
// [batch, C, *out_features]. Returns it contiguous, or nullopt for the identity.
std::optional<at::Tensor> cotangents_nd_from_arg(const std::optional<at::Tensor>& cotangent, int64_t batch,
                                                 at::IntArrayRef out_features, const at::Tensor& like,
                                                 const char* op);

}  // namespace jacext
