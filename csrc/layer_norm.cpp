// Layer norm over the trailing N = prod(normalized_shape) features of an input [B, *feat], one group of N
// per sample and leading feature position (a ViT's [B, T, E] with normalized_shape [E] has T groups).
// With xhat = (x - mean) * rstd, a group's Jacobian is
//   J = diag(w) rstd P,   P = I - 1 1^T / N - xhat xhat^T / N   (symmetric),
// applied without forming it, to every row of the running block:
//   forward (tangent column t):  t' = w rstd (t - mean(t) - xhat mean(xhat t))
//   reverse (cotangent row g):   g' = rstd (u - mean(u) - xhat mean(xhat u)),  u = w g
// Layouts follow the N-d convention: jac [B, *feat, D] (None: identity), cotangent [B, C, *feat]
// (None: identity); the block runs as [B, R, M, N] with M groups per sample. ATen ops, device-generic; on
// the CPU the update of explicit rows is one pass per row (cpu/layer_norm.cpp).
#include "cpu/layer_norm.h"
#include "jacext/checks.h"
#include "jacext/ops.h"

#include <vector>

namespace jacext {
namespace {

struct LayerNormGroups {
  int64_t batch = 0;
  int64_t groups = 0;      // M: leading feature positions per sample
  int64_t group_size = 0;  // N = prod(normalized_shape)
  std::vector<int64_t> features;  // the per-sample shape *feat
};

LayerNormGroups check_layer_norm_args(const at::Tensor& input, at::IntArrayRef normalized_shape,
                                      const std::optional<at::Tensor>& weight, const char* op) {
  check_floating_tensor(input, op, "input");
  const int64_t normalized_dims = static_cast<int64_t>(normalized_shape.size());
  TORCH_CHECK_VALUE(normalized_dims >= 1, op, ": normalized_shape must name at least one dimension");
  TORCH_CHECK_VALUE(input.dim() > normalized_dims && input.sizes().slice(input.dim() - normalized_dims) == normalized_shape,
                    op, ": input must be [batch, *features] with features ending in normalized_shape ", normalized_shape,
                    ", got shape ", input.sizes());
  if (weight.has_value()) {
    check_same_dtype_device(input, *weight, op, "weight");
    TORCH_CHECK_VALUE(weight->sizes() == normalized_shape, op, ": weight must have shape normalized_shape ",
                      normalized_shape, ", got ", weight->sizes());
  }
  LayerNormGroups groups;
  groups.batch = input.size(0);
  groups.group_size = c10::multiply_integers(normalized_shape);
  groups.groups = c10::multiply_integers(input.sizes().slice(1, input.dim() - 1 - normalized_dims));
  groups.features.assign(input.sizes().begin() + 1, input.sizes().end());
  return groups;
}

// xhat [B, 1, M, N] and rstd [B, 1, M, 1] in the input's dtype, from the statistics at::layer_norm uses.
std::pair<at::Tensor, at::Tensor> normalized_and_rstd(const at::Tensor& input, const at::Tensor& mean,
                                                      const at::Tensor& rstd, const LayerNormGroups& g) {
  const auto dtype = input.scalar_type();  // CUDA keeps the statistics of half inputs in float
  const at::Tensor group_rstd = rstd.to(dtype).reshape({g.batch, 1, g.groups, 1});
  const at::Tensor group_mean = mean.to(dtype).reshape({g.batch, 1, g.groups, 1});
  const at::Tensor x = input.reshape({g.batch, 1, g.groups, g.group_size});
  return {(x - group_mean) * group_rstd, group_rstd};
}

// rstd (v - mean(v) - xhat mean(xhat v)) over the group axis of rows [B, R, M, N]: rstd P applied per row.
at::Tensor project_rows(const at::Tensor& rows, const at::Tensor& normalized, const at::Tensor& rstd) {
  const at::Tensor row_mean = rows.mean(-1, /*keepdim=*/true);
  const at::Tensor normalized_mean = (rows * normalized).mean(-1, /*keepdim=*/true);
  return (rows - row_mean - normalized * normalized_mean) * rstd;
}

// The rule on explicit rows [B, R, M, N] (tangent columns or cotangent rows), the weight scaling each row first
// (reverse) or the result (forward): one CPU pass per row for float and double, the ATen ops above elsewhere.
// With `overwrite`, the CPU pass writes its result over the rows (contiguous, the caller's own).
at::Tensor project_block_rows(const at::Tensor& rows, const at::Tensor& input, const at::Tensor& mean,
                              const at::Tensor& rstd, const std::optional<at::Tensor>& weight, bool weight_first,
                              const LayerNormGroups& g, bool overwrite = false) {
  const auto dtype = input.scalar_type();
  if (input.is_cpu() && (dtype == at::kFloat || dtype == at::kDouble)) {
    const at::Tensor contiguous_rows = rows.contiguous();
    at::Tensor out = overwrite && contiguous_rows.is_same(rows) ? rows : at::empty_like(contiguous_rows);
    const std::optional<at::Tensor> contiguous_weight =
        weight.has_value() ? std::optional<at::Tensor>(weight->contiguous()) : std::nullopt;
    cpu::layer_norm_rows_kernel(out, contiguous_rows, input.contiguous(), mean.to(dtype).contiguous(),
                                rstd.to(dtype).contiguous(), contiguous_weight, weight_first);
    return out;
  }
  const auto [normalized, group_rstd] = normalized_and_rstd(input, mean, rstd, g);
  const bool scale_rows = weight.has_value() && weight_first, scale_result = weight.has_value() && !weight_first;
  const at::Tensor result =
      project_rows(scale_rows ? rows * weight->reshape({g.group_size}) : rows, normalized, group_rstd);
  return scale_result ? result * weight->reshape({g.group_size}) : result;
}

// The rule applied to the identity seed: J itself as rows [B, F, M, N], F = M N. J is block-diagonal over
// the M groups, so only the diagonal [N, N] blocks rstd P are computed and placed into zeros (about 4x
// faster than the general update on F unit rows for ViT tokens [8, 17, 64] in float32, which lost to
// torch.func in reverse mode). The weight scales
// the output feature: the block's last axis in forward mode (rows are input features), its row axis in
// reverse mode (rows are output features).
at::Tensor identity_jacobian_rows(const at::Tensor& normalized, const at::Tensor& rstd,
                                  const std::optional<at::Tensor>& weight, bool weight_on_rows,
                                  const LayerNormGroups& g) {
  const int64_t n = g.group_size;
  const at::Tensor xhat = normalized.squeeze(1);  // [B, M, N]
  at::Tensor blocks = at::eye(n, xhat.options()) - 1.0 / static_cast<double>(n) -
                      xhat.unsqueeze(-1) * xhat.unsqueeze(-2) / static_cast<double>(n);  // P, [B, M, N, N]
  blocks = blocks * rstd.squeeze(1).unsqueeze(-1);
  if (weight.has_value()) blocks = blocks * (weight_on_rows ? weight->reshape({n, 1}) : weight->reshape({n}));
  at::Tensor jacobian = at::zeros({g.batch, g.groups, n, g.groups, n}, xhat.options());
  // diagonal over the two group axes: [B, N (row), N (column), M]
  jacobian.diagonal(0, 1, 3).copy_(blocks.permute({0, 2, 3, 1}));
  return jacobian.view({g.batch, g.groups * n, g.groups, n});
}

// Fresh contiguous [B, R, *feat] from rows [B, R, M, N].
at::Tensor rows_to_block(const at::Tensor& rows, const LayerNormGroups& g) {
  std::vector<int64_t> shape{g.batch, rows.size(1)};
  shape.insert(shape.end(), g.features.begin(), g.features.end());
  return rows.contiguous().view(shape);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> layer_norm_jac_forward(const at::Tensor& input, const std::optional<at::Tensor>& jac,
                                                          at::IntArrayRef normalized_shape,
                                                          const std::optional<at::Tensor>& weight,
                                                          const std::optional<at::Tensor>& bias, double eps) {
  const char* op = "jacext::layer_norm_jac_forward";
  const LayerNormGroups g = check_layer_norm_args(input, normalized_shape, weight, op);
  if (bias.has_value()) {
    check_same_dtype_device(input, *bias, op, "bias");
    TORCH_CHECK_VALUE(bias->sizes() == normalized_shape, op, ": bias must have shape normalized_shape ", normalized_shape,
                      ", got ", bias->sizes());
  }
  if (jac.has_value()) {
    check_same_dtype_device(input, *jac, op, "jac");
    TORCH_CHECK_VALUE(jac->dim() == input.dim() + 1 && jac->sizes().slice(0, input.dim()) == input.sizes(), op,
                      ": jac of shape ", jac->sizes(), " must be the input's shape ", input.sizes(),
                      " followed by D tangent columns");
  }

  auto [output, mean, rstd] = at::native_layer_norm(input, normalized_shape, weight, bias, eps);
  at::Tensor result;  // [B, D, M, N]
  if (jac.has_value()) {
    const at::Tensor tangents =
        jac->movedim(-1, 1).contiguous().view({g.batch, jac->size(-1), g.groups, g.group_size});
    result = project_block_rows(tangents, input, mean, rstd, weight, /*weight_first=*/false, g);
  } else {
    const auto [normalized, group_rstd] = normalized_and_rstd(input, mean, rstd, g);
    result = identity_jacobian_rows(normalized, group_rstd, weight, /*weight_on_rows=*/false, g);
  }
  return {output.contiguous(), rows_to_block(result, g).movedim(1, -1)};
}

at::Tensor layer_norm_jac_reverse(const at::Tensor& input, const std::optional<at::Tensor>& cotangent,
                                  at::IntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
                                  double eps) {
  return layer_norm_rows_reverse(input, cotangent, normalized_shape, weight, eps, /*overwrite=*/false);
}

at::Tensor layer_norm_rows_reverse(const at::Tensor& input, const std::optional<at::Tensor>& cotangent,
                                   at::IntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
                                   double eps, bool overwrite) {
  const char* op = "jacext::layer_norm_jac_reverse";
  const LayerNormGroups g = check_layer_norm_args(input, normalized_shape, weight, op);
  if (cotangent.has_value()) {
    check_same_dtype_device(input, *cotangent, op, "cotangent");
    TORCH_CHECK_VALUE(cotangent->dim() == input.dim() + 1 && cotangent->size(0) == g.batch &&
                    cotangent->sizes().slice(2) == input.sizes().slice(1),
                      op, ": cotangent of shape ", cotangent->sizes(), " must be [", g.batch,
                      ", C, *features] with C rows and the input's features ", input.sizes().slice(1));
  }

  // Only the statistics are needed: no weight or bias in this forward.
  const auto [_, mean, rstd] = at::native_layer_norm(input, normalized_shape, {}, {}, eps);
  if (!cotangent.has_value()) {
    const auto [normalized, group_rstd] = normalized_and_rstd(input, mean, rstd, g);
    return rows_to_block(identity_jacobian_rows(normalized, group_rstd, weight, /*weight_on_rows=*/true, g), g);
  }
  const at::Tensor rows = cotangent->reshape({g.batch, cotangent->size(1), g.groups, g.group_size});
  return rows_to_block(project_block_rows(rows, input, mean, rstd, weight, /*weight_first=*/true, g, overwrite), g);
}

}  // namespace jacext
