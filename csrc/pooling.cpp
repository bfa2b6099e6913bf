// 2-d pooling over the last two feature dims of [B, *planes, H, W] (planes: channels, or none).
//
// Max pooling picks one input per output, chosen per sample: its Jacobian is a selection by the argmax
// indices of at::max_pool2d_with_indices (the indices torch autograd uses, so ties resolve the same
// way). Forward mode gathers the tangents at those positions, reverse mode scatter-adds the cotangents
// into them. Average pooling (fixed or adaptive) is linear and the same for every sample: tangents are
// pooled like inputs, cotangents go through the pooling's input gradient.
#include "jacext/checks.h"
#include "jacext/nd_rows.h"
#include "jacext/ops.h"

namespace jacext {
namespace {

void check_pool_input(const at::Tensor& input, const char* op) { check_batched_features(input, 2, 3, op, "input"); }

void check_pair(at::IntArrayRef values, const char* name, const char* op) {
  TORCH_CHECK_VALUE(values.size() == 2, op, ": ", name, " must have 2 entries (height, width), got ", values);
}

// Shapes are spelt out in full (no -1): they must hold for empty batches too.
int64_t plane_count(at::IntArrayRef feature_shape) {
  return c10::multiply_integers(feature_shape.begin(), feature_shape.end() - 2);
}

// [N, *planes, H, W] as [N, P, H, W] and back with the pooled spatial size.
at::Tensor as_planes(const at::Tensor& features) {
  return features.reshape(
      {features.size(0), plane_count(features.sizes().slice(1)), features.size(-2), features.size(-1)});
}

// The feature shape [*planes, H, W] with the spatial size replaced.
std::vector<int64_t> with_spatial(at::IntArrayRef feature_shape, int64_t height, int64_t width) {
  std::vector<int64_t> shape(feature_shape.begin(), feature_shape.end() - 2);
  shape.push_back(height);
  shape.push_back(width);
  return shape;
}

at::Tensor from_planes(const at::Tensor& planes, at::IntArrayRef feature_shape) {
  std::vector<int64_t> shape{planes.size(0)};
  const std::vector<int64_t> features = with_spatial(feature_shape, planes.size(2), planes.size(3));
  shape.insert(shape.end(), features.begin(), features.end());
  return planes.reshape(shape);
}

// The `self` argument of the pooling backward functions, which read only its shape (and layout): an
// uninitialised [N, P, H, W] for cotangent planes [N, P, Ho, Wo] of an input [B, *planes, H, W].
at::Tensor shape_carrier(const at::Tensor& cotangent_planes, const at::Tensor& input) {
  return at::empty({cotangent_planes.size(0), cotangent_planes.size(1), input.size(-2), input.size(-1)},
                   cotangent_planes.options().memory_format(cotangent_planes.suggest_memory_format()));
}

// Cotangent planes [N, P, Ho, Wo] in the layout the average poolings' input gradients run fastest in. On the
// CPU their contiguous kernels loop over the N * P planes one by one, which on the small maps of a cotangent
// block (B * C rows of a CNN's late features) costs several times the channels-last kernels, which run over
// the planes as vectors, conversions included; a few planes (an image's channels) keep their layout.
constexpr int64_t kChannelsLastMinimumPlanes = 8;

at::Tensor backward_layout(const at::Tensor& cotangent_planes) {
  if (!cotangent_planes.device().is_cpu() || cotangent_planes.size(1) < kChannelsLastMinimumPlanes) {
    return cotangent_planes;
  }
  return cotangent_planes.contiguous(at::MemoryFormat::ChannelsLast);
}

// ---- max pooling ----

struct MaxPoolGeometry {
  at::IntArrayRef kernel_size, stride, padding, dilation;
  bool ceil_mode;
};

void check_max_pool_args(const at::Tensor& input, const MaxPoolGeometry& pool, const char* op) {
  check_pool_input(input, op);
  check_pair(pool.kernel_size, "kernel_size", op);
  check_pair(pool.stride, "stride", op);
  check_pair(pool.padding, "padding", op);
  check_pair(pool.dilation, "dilation", op);
}

struct MaxPoolSelection {
  at::Tensor output;  // [B, *planes, Ho, Wo], contiguous
  at::Tensor flat_indices;  // [B, P * Ho * Wo]: the chosen input of each output, flat in [P * H * W]
  at::Tensor plane_indices;  // [B, P, Ho * Wo]: the chosen input of each output, flat in its [H * W] plane
};

// From the pooled planes [N, P, Ho, Wo] and indices of at::max_pool2d_with_indices (pooled: undefined where
// only the indices are wanted).
MaxPoolSelection selection_from_indices(const at::Tensor& input, const at::Tensor& pooled, const at::Tensor& indices) {
  const int64_t batch = indices.size(0), planes = indices.size(1);
  const int64_t plane_outputs = indices.size(2) * indices.size(3);
  const int64_t plane_size = input.size(-2) * input.size(-1);
  at::Tensor plane_indices = indices.contiguous().view({batch, planes, plane_outputs});
  at::Tensor plane_offsets = at::arange(planes, plane_indices.options()).mul_(plane_size).view({1, planes, 1});
  at::Tensor flat_indices = (plane_indices + plane_offsets).view({batch, planes * plane_outputs});
  const at::Tensor output = pooled.defined() ? from_planes(pooled, input.sizes().slice(1)).contiguous() : at::Tensor();
  return {output, flat_indices, plane_indices};
}

MaxPoolSelection select_max(const at::Tensor& input, const MaxPoolGeometry& pool) {
  auto [pooled, indices] = at::max_pool2d_with_indices(as_planes(input), pool.kernel_size, pool.stride,
                                                       pool.padding, pool.dilation, pool.ceil_mode);
  return selection_from_indices(input, pooled, indices);
}

// The reverse rule given the selection, for an output of per-sample shape output_features.
at::Tensor max_pool_reverse(const at::Tensor& input, const MaxPoolSelection& selection,
                            at::IntArrayRef output_features, const std::optional<at::Tensor>& cotangent,
                            const char* op) {
  const int64_t batch = input.size(0);
  const std::optional<at::Tensor> cotangents = cotangents_nd_from_arg(cotangent, batch, output_features, input, op);
  const int64_t rows = cotangents.has_value() ? cotangents->size(1) : selection.flat_indices.size(1);
  std::vector<int64_t> result_shape{batch, rows};
  result_shape.insert(result_shape.end(), input.sizes().begin() + 1, input.sizes().end());
  if (!cotangents.has_value()) {
    // Row c (an output) is the unit vector of its argmax: one 1 per row of a zero [B, outputs, D].
    return at::zeros({batch, rows, c10::multiply_integers(input.sizes().slice(1))}, input.options())
        .scatter_(2, selection.flat_indices.unsqueeze(2), 1.0)
        .view(result_shape);
  }
  // Overlapping windows may pick one input for several outputs: their rows add up, as in autograd.
  const auto& plane_indices = selection.plane_indices;
  const int64_t planes = plane_indices.size(1), plane_outputs = plane_indices.size(2);
  const at::Tensor index = plane_indices.unsqueeze(1).expand({batch, rows, planes, plane_outputs});
  return at::zeros({batch, rows, planes, input.size(-2) * input.size(-1)}, input.options())
      .scatter_add_(3, index, cotangents->view({batch, rows, planes, plane_outputs}))
      .view(result_shape);
}

// ---- average pooling ----

struct AvgPoolGeometry {
  at::IntArrayRef kernel_size, stride, padding;
  bool ceil_mode, count_include_pad;
  std::optional<int64_t> divisor_override;
};

void check_avg_pool_args(const at::Tensor& input, const AvgPoolGeometry& pool, const char* op) {
  check_pool_input(input, op);
  check_pair(pool.kernel_size, "kernel_size", op);
  check_pair(pool.stride, "stride", op);
  check_pair(pool.padding, "padding", op);
  TORCH_CHECK_VALUE(!pool.divisor_override.has_value() || *pool.divisor_override != 0, op,
                    ": divisor_override must be non-zero");
}

at::Tensor avg_pool(const at::Tensor& features, const AvgPoolGeometry& pool) {
  const at::Tensor pooled = at::avg_pool2d(as_planes(features), pool.kernel_size, pool.stride, pool.padding,
                                           pool.ceil_mode, pool.count_include_pad, pool.divisor_override);
  return from_planes(pooled, features.sizes().slice(1));
}

void check_adaptive_args(const at::Tensor& input, at::IntArrayRef output_size, const char* op) {
  check_pool_input(input, op);
  check_pair(output_size, "output_size", op);
  TORCH_CHECK_VALUE(output_size[0] >= 1 && output_size[1] >= 1, op, ": output_size entries must be positive, got ",
                    output_size);
}

at::Tensor adaptive_avg_pool(const at::Tensor& features, at::IntArrayRef output_size) {
  return from_planes(at::adaptive_avg_pool2d(as_planes(features), output_size), features.sizes().slice(1));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> max_pool2d_jac_forward(const at::Tensor& input,
                                                          const std::optional<at::Tensor>& jac,
                                                          at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                                          at::IntArrayRef padding, at::IntArrayRef dilation,
                                                          bool ceil_mode) {
  const char* op = "jacext::max_pool2d_jac_forward";
  const MaxPoolGeometry pool{kernel_size, stride, padding, dilation, ceil_mode};
  check_max_pool_args(input, pool, op);
  const std::optional<at::Tensor> tangents = tangents_nd_from_jac(jac, input, op);
  const MaxPoolSelection selection = select_max(input, pool);
  const int64_t batch = input.size(0);
  const int64_t dims = tangents.has_value() ? tangents->size(1) : c10::multiply_integers(input.sizes().slice(1));
  std::vector<int64_t> result_shape{batch, dims};
  result_shape.insert(result_shape.end(), selection.output.sizes().begin() + 1, selection.output.sizes().end());
  at::Tensor tangents_out;
  if (!tangents.has_value()) {
    // Output column o is the unit vector of its argmax: one 1 per column of a zero [B, D, outputs].
    tangents_out = at::zeros({batch, dims, selection.flat_indices.size(1)}, input.options())
                       .scatter_(1, selection.flat_indices.unsqueeze(1), 1.0)
                       .view(result_shape);
  } else {
    const auto& plane_indices = selection.plane_indices;
    const at::Tensor planes =
        tangents->view({batch, dims, plane_indices.size(1), input.size(-2) * input.size(-1)});
    const at::Tensor index =
        plane_indices.unsqueeze(1).expand({batch, dims, plane_indices.size(1), plane_indices.size(2)});
    tangents_out = at::gather(planes, 3, index).view(result_shape);
  }
  return {selection.output, tangents_out.movedim(1, -1)};
}

at::Tensor max_pool2d_jac_reverse(const at::Tensor& input, const std::optional<at::Tensor>& cotangent,
                                  at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                  at::IntArrayRef dilation, bool ceil_mode) {
  const char* op = "jacext::max_pool2d_jac_reverse";
  const MaxPoolGeometry pool{kernel_size, stride, padding, dilation, ceil_mode};
  check_max_pool_args(input, pool, op);
  const MaxPoolSelection selection = select_max(input, pool);
  return max_pool_reverse(input, selection, selection.output.sizes().slice(1), cotangent, op);
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_with_argmax(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                          at::IntArrayRef stride, at::IntArrayRef padding,
                                                          at::IntArrayRef dilation, bool ceil_mode) {
  const MaxPoolGeometry pool{kernel_size, stride, padding, dilation, ceil_mode};
  check_max_pool_args(input, pool, "jacext::max_pool2d_jac_reverse");
  auto [pooled, indices] = at::max_pool2d_with_indices(as_planes(input), pool.kernel_size, pool.stride, pool.padding,
                                                       pool.dilation, pool.ceil_mode);
  return {from_planes(pooled, input.sizes().slice(1)), indices};
}

at::Tensor max_pool2d_jac_reverse_from_argmax(const at::Tensor& input, const at::Tensor& argmax,
                                              const std::optional<at::Tensor>& cotangent) {
  const std::vector<int64_t> output_features = with_spatial(input.sizes().slice(1), argmax.size(2), argmax.size(3));
  return max_pool_reverse(input, selection_from_indices(input, at::Tensor(), argmax), output_features, cotangent,
                          "jacext::max_pool2d_jac_reverse");
}

std::tuple<at::Tensor, at::Tensor> avg_pool2d_jac_forward(const at::Tensor& input,
                                                          const std::optional<at::Tensor>& jac,
                                                          at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                                          at::IntArrayRef padding, bool ceil_mode,
                                                          bool count_include_pad,
                                                          std::optional<int64_t> divisor_override) {
  const char* op = "jacext::avg_pool2d_jac_forward";
  const AvgPoolGeometry pool{kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override};
  check_avg_pool_args(input, pool, op);
  const std::optional<at::Tensor> tangents = tangents_nd_from_jac(jac, input, op);
  at::Tensor output = avg_pool(input, pool).contiguous();
  const at::Tensor tangents_out = map_rows_shared(tangents, input.size(0), input.sizes().slice(1), input.options(),
                                                  [&](const at::Tensor& rows) { return avg_pool(rows, pool); });
  return {output, tangents_out.movedim(1, -1)};
}

at::Tensor avg_pool2d_jac_reverse(const at::Tensor& input, const std::optional<at::Tensor>& cotangent,
                                  at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                  bool ceil_mode, bool count_include_pad, std::optional<int64_t> divisor_override) {
  const char* op = "jacext::avg_pool2d_jac_reverse";
  const AvgPoolGeometry pool{kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override};
  check_avg_pool_args(input, pool, op);
  // The pooled shape, from ATen's own rule (and checks) on an empty batch.
  const std::vector<int64_t> out_features = avg_pool(input.narrow(0, 0, 0), pool).sizes().slice(1).vec();
  const std::optional<at::Tensor> cotangents =
      cotangents_nd_from_arg(cotangent, input.size(0), out_features, input, op);
  return map_rows_shared(cotangents, input.size(0), out_features, input.options(), [&](const at::Tensor& rows) {
    const at::Tensor planes = backward_layout(as_planes(rows));
    const at::Tensor grad =
        at::avg_pool2d_backward(planes, shape_carrier(planes, input), pool.kernel_size, pool.stride, pool.padding,
                                pool.ceil_mode, pool.count_include_pad, pool.divisor_override);
    return from_planes(grad, input.sizes().slice(1));
  });
}

std::tuple<at::Tensor, at::Tensor> adaptive_avg_pool2d_jac_forward(const at::Tensor& input,
                                                                   const std::optional<at::Tensor>& jac,
                                                                   at::IntArrayRef output_size) {
  const char* op = "jacext::adaptive_avg_pool2d_jac_forward";
  check_adaptive_args(input, output_size, op);
  const std::optional<at::Tensor> tangents = tangents_nd_from_jac(jac, input, op);
  at::Tensor output = adaptive_avg_pool(input, output_size).contiguous();
  const at::Tensor tangents_out =
      map_rows_shared(tangents, input.size(0), input.sizes().slice(1), input.options(),
                      [&](const at::Tensor& rows) { return adaptive_avg_pool(rows, output_size); });
  return {output, tangents_out.movedim(1, -1)};
}

at::Tensor adaptive_avg_pool2d_jac_reverse(const at::Tensor& input, const std::optional<at::Tensor>& cotangent,
                                           at::IntArrayRef output_size) {
  const char* op = "jacext::adaptive_avg_pool2d_jac_reverse";
  check_adaptive_args(input, output_size, op);
  const std::vector<int64_t> out_features = with_spatial(input.sizes().slice(1), output_size[0], output_size[1]);
  const std::optional<at::Tensor> cotangents =
      cotangents_nd_from_arg(cotangent, input.size(0), out_features, input, op);
  const bool global = output_size[0] == 1 && output_size[1] == 1;
  return map_rows_shared(cotangents, input.size(0), out_features, input.options(), [&](const at::Tensor& rows) {
    const at::Tensor planes = as_planes(rows);
    if (global) {
      // Every input position gets its plane's cotangent over the positions' count: one broadcast write, where
      // ATen's backward kernel runs 10-40x slower on some strides of the [N, P, 1, 1] cotangent's unit axes.
      const int64_t height = input.size(-2), width = input.size(-1);
      const at::Tensor spread = (planes / static_cast<double>(height * width)).expand({-1, -1, height, width});
      return from_planes(spread.contiguous(), input.sizes().slice(1));
    }
    const at::Tensor laid_out = backward_layout(planes);
    return from_planes(at::_adaptive_avg_pool2d_backward(laid_out, shape_carrier(laid_out, input)),
                       input.sizes().slice(1));
  });
}

}  // namespace jacext
