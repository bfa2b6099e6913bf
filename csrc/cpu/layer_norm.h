// CPU kernel of the layer-norm rule on explicit rows (csrc/layer_norm.cpp has the math).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace jacext::cpu {

// out [B, R, M, N] = rstd (u - mean(u) - xhat mean(xhat u)) per row of N, xhat = (input - mean) rstd, with
// u = w * rows when weight_first (reverse: the weight scales the cotangent first), else the result times w
// (forward). rows [B, R, M, N], input [B, M, N], mean and rstd [B, M], weight [N]: contiguous, one dtype
// (float or double). out may be rows itself.
void layer_norm_rows_kernel(at::Tensor& out, const at::Tensor& rows, const at::Tensor& input, const at::Tensor& mean,
                            const at::Tensor& rstd, const std::optional<at::Tensor>& weight, bool weight_first);

}  // namespace jacext::cpu
