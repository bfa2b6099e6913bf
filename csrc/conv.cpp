// Convolution (Conv1d/2d/3d with zero padding): y = conv(x, W) + b. Its Jacobian is the convolution
// itself, the same for every sample, so tangents go through the same convolution (without bias, the
// B * D rows as its batch) and cotangents through the transposed convolution, which is the input
// gradient of the convolution. J is never unfolded beyond the weight (see window_matrix for the one dense form).
#include "jacext/checks.h"
#include "jacext/nd_rows.h"
#include "jacext/ops.h"

#include <algorithm>

namespace jacext {
namespace {

struct ConvGeometry {
  at::IntArrayRef stride, padding, dilation;
  int64_t groups;
};

void check_conv_args(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     const ConvGeometry& conv, const char* op) {
  check_batched_features(input, 2, 4, op, "input");
  check_same_dtype_device(input, weight, op, "weight");
  const int64_t spatial_dims = input.dim() - 2;
  TORCH_CHECK_VALUE(weight.dim() == input.dim(), op, ": weight must be [out_channels, in_channels / groups, *kernel] with ",
                    spatial_dims, " kernel dims for an input of shape ", input.sizes(), ", got shape ", weight.sizes());
  TORCH_CHECK_VALUE(conv.groups >= 1 && weight.size(0) % conv.groups == 0 && input.size(1) == weight.size(1) * conv.groups,
                    op, ": weight of shape ", weight.sizes(), " with groups = ", conv.groups, " does not fit an input with ",
                    input.size(1), " channels");
  for (const auto& [name, values] : {std::pair{"stride", conv.stride}, std::pair{"padding", conv.padding},
                                     std::pair{"dilation", conv.dilation}}) {
    TORCH_CHECK_VALUE(static_cast<int64_t>(values.size()) == spatial_dims, op, ": ", name, " must have ", spatial_dims,
                      " entries (one per spatial dim), got ", values);
  }
  if (bias.has_value()) {
    check_same_dtype_device(input, *bias, op, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must be [", weight.size(0),
                      "], got shape ", bias->sizes());
  }
}

// Whether the weight has `spatial_dims` kernel axes and stride, padding and dilation one entry per axis: the
// shortcuts below index them axis by axis. Where they do not (the graph executor's conv_value comes without
// check_conv_args), the shortcuts step aside and ATen's convolution reports the mismatch.
bool geometry_fits(const at::Tensor& weight, const ConvGeometry& conv, int64_t spatial_dims) {
  const auto fits = [&](at::IntArrayRef values) { return static_cast<int64_t>(values.size()) == spatial_dims; };
  return spatial_dims >= 1 && weight.dim() == spatial_dims + 2 && fits(conv.stride) && fits(conv.padding) &&
         fits(conv.dilation);
}

// One input and one output channel per group.
bool is_depthwise(const at::Tensor& weight, const ConvGeometry& conv) {
  return weight.size(1) == 1 && conv.groups == weight.size(0);
}

// A convolution whose kernel window covers its whole input (one output position, stride irrelevant,
// no dilation or groups: the last stages of a CNN on small images) is a Linear map with the kernel taps
// that land on the input. As a matrix product it skips the padded taps an im2col convolution multiplies
// by zero (8 of 9 for a 3x3 kernel on 1x1 features). Where the kernel is the input's size (no padding) the
// matrix is the weight itself, [out_channels, in_channels * *in_spatial]; else the taps that land, as
// [out_channels, *in_spatial * in_channels], channels last: that copy of the strided taps is fast where
// [.., in_channels, *in_spatial] is not.
struct WindowMatrix {
  at::Tensor matrix;
  bool channels_last;
};

std::optional<WindowMatrix> window_matrix(const at::Tensor& weight, at::IntArrayRef in_spatial,
                                          const ConvGeometry& conv) {
  if (conv.groups != 1 || !geometry_fits(weight, conv, static_cast<int64_t>(in_spatial.size()))) {
    return std::nullopt;
  }
  at::Tensor taps = weight;
  bool whole = true;
  for (size_t i = 0; i < in_spatial.size(); ++i) {
    const int64_t kernel = weight.size(i + 2);
    if (conv.dilation[i] != 1 || conv.padding[i] < 0 || in_spatial[i] + 2 * conv.padding[i] < kernel ||
        conv.padding[i] + in_spatial[i] > kernel ||
        in_spatial[i] + 2 * conv.padding[i] - kernel >= conv.stride[i]) {
      return std::nullopt;
    }
    taps = taps.narrow(i + 2, conv.padding[i], in_spatial[i]);
    whole = whole && kernel == in_spatial[i];
  }
  if (whole) return WindowMatrix{weight.flatten(1), false};
  return WindowMatrix{taps.movedim(1, -1).contiguous().flatten(1), true};
}

// A kernel and the padding it runs with.
struct KernelWithPadding {
  at::Tensor weight;
  std::vector<int64_t> padding;
};

// The taps of a depthwise kernel that touch the input. With stride 1 and no dilation along an axis, a kernel
// wider than the input and its padding reads only padding with its first and last n = K - H - padding taps at
// every output position (a 7 x 7 kernel on a 2 x 2 map, padding 3: the outer two rings). Cutting them off, with
// n less padding, keeps every output, and oneDNN's depthwise kernels, which take a slow path for kernels wider
// than the padded map needs, run at their usual rate. Depthwise only (one input and one output channel per
// group): ATen runs other grouped convolutions with the cut kernel group by group. nullopt where no tap is
// unused.
std::optional<KernelWithPadding> crop_unused_taps(const at::Tensor& weight, at::IntArrayRef in_spatial,
                                                  const ConvGeometry& conv) {
  const int64_t spatial_dims = static_cast<int64_t>(in_spatial.size());
  if (!geometry_fits(weight, conv, spatial_dims) || !is_depthwise(weight, conv)) return std::nullopt;
  KernelWithPadding cropped{weight, conv.padding.vec()};
  bool any = false;
  for (int64_t i = 0; i < spatial_dims; ++i) {
    const int64_t unused = weight.size(i + 2) - in_spatial[i] - conv.padding[i];
    if (conv.stride[i] != 1 || conv.dilation[i] != 1 || unused <= 0 || 2 * unused >= weight.size(i + 2) ||
        unused > conv.padding[i]) {
      continue;
    }
    cropped.weight = cropped.weight.narrow(i + 2, unused, weight.size(i + 2) - 2 * unused);
    cropped.padding[i] -= unused;
    any = true;
  }
  if (!any) return std::nullopt;
  cropped.weight = cropped.weight.contiguous();
  return cropped;
}

// A depthwise convolution (one input channel per group, one output channel per input channel) with a 1-tap
// kernel, stride 1 and no padding scales each channel by its weight: done as that product, which oneDNN's
// depthwise kernel runs far slower. The weights as a vector [C], or nullopt.
std::optional<at::Tensor> channel_scale(const at::Tensor& weight, const ConvGeometry& conv) {
  const int64_t spatial_dims = weight.dim() - 2;
  if (!geometry_fits(weight, conv, spatial_dims) || !is_depthwise(weight, conv)) return std::nullopt;
  for (int64_t i = 0; i < spatial_dims; ++i) {
    if (weight.size(i + 2) != 1 || conv.stride[i] != 1 || conv.padding[i] != 0) return std::nullopt;
  }
  return weight.flatten();
}

// A per-channel vector [C] as a factor of [N, C, *spatial] (`dims` axes).
at::Tensor channel_factor(const at::Tensor& vector, int64_t dims) {
  std::vector<int64_t> shape(dims, 1);
  shape[1] = vector.size(0);
  return vector.view(shape);
}

at::Tensor convolve(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const ConvGeometry& conv) {
  if (const auto cropped = crop_unused_taps(weight, x.sizes().slice(2), conv)) {
    return convolve(x, cropped->weight, bias, ConvGeometry{conv.stride, cropped->padding, conv.dilation, conv.groups});
  }
  if (const auto scale = channel_scale(weight, conv); scale && x.size(1) == weight.size(0)) {
    const at::Tensor scaled = x * channel_factor(*scale, x.dim());
    return bias ? scaled + channel_factor(*bias, x.dim()) : scaled;
  }
  if (const auto window = window_matrix(weight, x.sizes().slice(2), conv)) {
    std::vector<int64_t> out_shape(x.dim(), 1);
    out_shape[0] = x.size(0);
    out_shape[1] = weight.size(0);
    const at::Tensor rows = window->channels_last ? x.movedim(1, -1).flatten(1) : x.flatten(1);
    return at::linear(rows, window->matrix, bias).view(out_shape);
  }
  const std::vector<int64_t> no_output_padding(conv.stride.size(), 0);
  return at::convolution(x, weight, bias, conv.stride, conv.padding, conv.dilation, /*transposed=*/false,
                         no_output_padding, conv.groups);
}

// The per-sample output shape [out_channels, *out_spatial] of the convolution of `input`.
std::vector<int64_t> conv_output_features(const at::Tensor& input, const at::Tensor& weight,
                                          const ConvGeometry& conv, const char* op) {
  std::vector<int64_t> shape{weight.size(0)};
  for (size_t i = 0; i < conv.stride.size(); ++i) {
    const int64_t extent = conv.dilation[i] * (weight.size(i + 2) - 1) + 1;
    const int64_t padded = input.size(i + 2) + 2 * conv.padding[i];
    TORCH_CHECK_VALUE(conv.stride[i] >= 1 && conv.dilation[i] >= 1 && conv.padding[i] >= 0 && padded >= extent, op,
                      ": the (dilated) kernel of extent ", extent, " does not fit the padded input size ", padded,
                      " in spatial dim ", i, " (stride ", conv.stride, ", padding ", conv.padding, ", dilation ",
                      conv.dilation, ")");
    shape.push_back((padded - extent) / conv.stride[i] + 1);
  }
  return shape;
}

// The transposed convolution of a 2-d convolution with few input channels (an RGB or grey stem), on the
// CPU, as one matrix product into the taps' columns and their scatter-add (col2im): oneDNN's transposed
// convolution leaves most of its vector lanes idle when it writes so few channels. With stride 1 that
// only shows on larger maps (on an 8 x 8 map both forms take the same time), hence the minimum number of
// input positions there. The rows go in chunks, so that the columns (in_channels * taps times the
// output positions per row) stay a few MiB.
constexpr int64_t kFewChannels = 4;
constexpr int64_t kUnstridedMinimumPositions = 16 * 16;
constexpr int64_t kColumnChunkElements = int64_t{1} << 20;

std::optional<at::Tensor> transpose_by_columns(const at::Tensor& g, const at::Tensor& weight,
                                               at::IntArrayRef in_spatial, const ConvGeometry& conv) {
  const bool strided = std::any_of(conv.stride.begin(), conv.stride.end(), [](int64_t step) { return step > 1; });
  if (!g.device().is_cpu() || in_spatial.size() != 2 || conv.groups != 1 || weight.size(1) > kFewChannels ||
      g.size(0) == 0 || (!strided && in_spatial[0] * in_spatial[1] < kUnstridedMinimumPositions)) {
    return std::nullopt;
  }
  const int64_t rows = g.size(0), out_channels = weight.size(0), positions = g.size(2) * g.size(3);
  const at::Tensor taps_by_channel = weight.flatten(1).t();  // [in_channels * kh * kw, out_channels]
  const at::Tensor flat = g.reshape({rows, out_channels, positions});
  at::Tensor result = at::empty({rows, weight.size(1), in_spatial[0], in_spatial[1]}, g.options());
  const int64_t chunk = std::max<int64_t>(1, kColumnChunkElements / (taps_by_channel.size(0) * positions));
  for (int64_t start = 0; start < rows; start += chunk) {
    const int64_t count = std::min(chunk, rows - start);
    const at::Tensor columns = at::matmul(taps_by_channel, flat.narrow(0, start, count));
    at::Tensor out = result.narrow(0, start, count);
    at::col2im_out(out, columns, in_spatial, weight.sizes().slice(2), conv.dilation, conv.padding, conv.stride);
  }
  return result;
}

// The transposed convolution of a convolution whose stride equals its kernel, without padding, dilation or
// groups (a ViT's patch embedding, ConvNeXt's stem and downsampling layers), on the CPU: each input position
// is read by at most one output position, through the same matrix W [out_channels, in_channels * taps], so
// the input cotangent is one matrix product of the cotangent rows [N * positions, out_channels] with W, each
// row's product being one patch; oneDNN's transposed convolution of these shapes runs at a fraction of the
// matrix product's rate. The patches come out channels last ([*kernel, in_channels]), and are written so
// (a channels-last view of [N, in_channels, *in_spatial]): that copy moves whole runs of channels, where one
// into [in_channels, *in_spatial] would move a kernel row at a time. Positions past the last patch get zero.
std::optional<at::Tensor> transpose_by_patches(const at::Tensor& g, const at::Tensor& weight,
                                               at::IntArrayRef in_spatial, const ConvGeometry& conv) {
  const int64_t spatial_dims = static_cast<int64_t>(in_spatial.size());
  if (!g.device().is_cpu() || conv.groups != 1 || g.dim() != spatial_dims + 2 ||
      !geometry_fits(weight, conv, spatial_dims)) {
    return std::nullopt;
  }
  bool covered = true;
  for (int64_t i = 0; i < spatial_dims; ++i) {
    if (conv.stride[i] != weight.size(i + 2) || conv.padding[i] != 0 || conv.dilation[i] != 1) return std::nullopt;
    covered = covered && g.size(i + 2) * conv.stride[i] == in_spatial[i];
  }
  if (c10::multiply_integers(weight.sizes().slice(2)) == 1) return std::nullopt;  // 1 x 1: a plain product
  const int64_t rows = g.size(0), out_channels = weight.size(0), in_channels = weight.size(1);
  const at::Tensor patches =
      at::mm(g.movedim(1, -1).reshape({-1, out_channels}), weight.movedim(1, -1).reshape({out_channels, -1}));
  // patches as [N, *out_spatial, *kernel, in_channels]; the cotangent, channels last, as [N, o_1, k_1, o_2, k_2,
  // ..., in_channels] over its positions up to the last patch.
  std::vector<int64_t> patch_shape{rows}, in_shape{rows}, split{rows}, order{0};
  patch_shape.insert(patch_shape.end(), g.sizes().begin() + 2, g.sizes().end());
  patch_shape.insert(patch_shape.end(), weight.sizes().begin() + 2, weight.sizes().end());
  patch_shape.push_back(in_channels);
  in_shape.insert(in_shape.end(), in_spatial.begin(), in_spatial.end());
  in_shape.push_back(in_channels);
  at::Tensor result = covered ? at::empty(in_shape, g.options()) : at::zeros(in_shape, g.options());
  at::Tensor reached = result;
  for (int64_t i = 0; i < spatial_dims; ++i) {
    reached = reached.narrow(i + 1, 0, g.size(i + 2) * conv.stride[i]);
    split.push_back(g.size(i + 2));
    split.push_back(conv.stride[i]);
    order.push_back(1 + i);
    order.push_back(1 + spatial_dims + i);
  }
  split.push_back(in_channels);
  order.push_back(1 + 2 * spatial_dims);
  reached.view(split).copy_(patches.view(patch_shape).permute(order));
  return result.movedim(-1, 1);
}

// A stride-1 depthwise convolution (one input and one output channel per group) has for its transpose the
// convolution with the spatially flipped kernel and padding dilation * (kernel - 1) - padding: on the CPU and
// channels-last cotangents (ConvNeXt's, from its permuted layer norms) oneDNN runs that forward depthwise kernel
// several times faster than its transposed one, and leaves them channels last; on others the two are about
// even. nullopt for other devices, geometries or layouts, or a padding wider than the dilated kernel.
std::optional<KernelWithPadding> flipped_depthwise(const at::Tensor& g, const at::Tensor& weight,
                                                   const ConvGeometry& conv) {
  const int64_t spatial_dims = weight.dim() - 2;
  if (!g.device().is_cpu() || g.dim() != 4 || g.suggest_memory_format() != at::MemoryFormat::ChannelsLast ||
      !geometry_fits(weight, conv, spatial_dims) || !is_depthwise(weight, conv)) {
    return std::nullopt;
  }
  std::vector<int64_t> spatial_axes, padding;
  for (int64_t i = 0; i < spatial_dims; ++i) {
    const int64_t complement = conv.dilation[i] * (weight.size(i + 2) - 1) - conv.padding[i];
    if (conv.stride[i] != 1 || complement < 0) return std::nullopt;
    spatial_axes.push_back(i + 2);
    padding.push_back(complement);
  }
  return KernelWithPadding{weight.flip(spatial_axes), padding};
}

// Cotangents [N, *out_features] -> [N, *in_features]: the transposed convolution, with the output
// padding that restores exactly the input's spatial size (the rows the strided convolution skipped).
at::Tensor transpose_convolve(const at::Tensor& g, const at::Tensor& weight, at::IntArrayRef in_spatial,
                              const ConvGeometry& conv) {
  if (const auto cropped = crop_unused_taps(weight, in_spatial, conv)) {
    return transpose_convolve(g, cropped->weight, in_spatial,
                              ConvGeometry{conv.stride, cropped->padding, conv.dilation, conv.groups});
  }
  if (const auto scale = channel_scale(weight, conv); scale && g.size(1) == weight.size(0)) {
    return g * channel_factor(*scale, g.dim());
  }
  if (const auto window = window_matrix(weight, in_spatial, conv)) {
    const at::Tensor pulled = at::mm(g.flatten(1), window->matrix);
    std::vector<int64_t> shape{g.size(0)};
    if (!window->channels_last) shape.push_back(weight.size(1));
    shape.insert(shape.end(), in_spatial.begin(), in_spatial.end());
    if (!window->channels_last) return pulled.view(shape);
    shape.push_back(weight.size(1));
    return pulled.view(shape).movedim(-1, 1);  // channels last, left so for callers that take any layout
  }
  if (auto by_patches = transpose_by_patches(g, weight, in_spatial, conv)) return *std::move(by_patches);
  if (auto by_columns = transpose_by_columns(g, weight, in_spatial, conv)) return *std::move(by_columns);
  if (auto flipped = flipped_depthwise(g, weight, conv)) {
    const std::vector<int64_t> no_output_padding(conv.stride.size(), 0);
    return at::convolution(g, flipped->weight, std::nullopt, conv.stride, flipped->padding, conv.dilation,
                           /*transposed=*/false, no_output_padding, conv.groups);
  }
  std::vector<int64_t> output_padding;
  for (size_t i = 0; i < conv.stride.size(); ++i) {
    const int64_t reached = (g.size(i + 2) - 1) * conv.stride[i] - 2 * conv.padding[i] +
                            conv.dilation[i] * (weight.size(i + 2) - 1) + 1;
    output_padding.push_back(in_spatial[i] - reached);
  }
  return at::convolution(g, weight, std::nullopt, conv.stride, conv.padding, conv.dilation, /*transposed=*/true,
                         output_padding, conv.groups);
}

}  // namespace

at::Tensor conv_value(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return convolve(input, weight, bias, ConvGeometry{stride, padding, dilation, groups});
}

std::tuple<at::Tensor, at::Tensor> conv_jac_forward(const at::Tensor& input, const std::optional<at::Tensor>& jac,
                                                    const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                                    at::IntArrayRef dilation, int64_t groups) {
  const char* op = "jacext::conv_jac_forward";
  const ConvGeometry conv{stride, padding, dilation, groups};
  check_conv_args(input, weight, bias, conv, op);
  conv_output_features(input, weight, conv, op);  // checks the geometry, naming this op
  const std::optional<at::Tensor> tangents = tangents_nd_from_jac(jac, input, op);
  at::Tensor output = convolve(input, weight, bias, conv).contiguous();
  const at::Tensor tangents_out =
      map_rows_shared(tangents, input.size(0), input.sizes().slice(1), input.options(),
                      [&](const at::Tensor& rows) { return convolve(rows, weight, std::nullopt, conv); });
  return {output, tangents_out.movedim(1, -1)};
}

at::Tensor conv_jac_reverse(const at::Tensor& input, const std::optional<at::Tensor>& cotangent,
                            const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups) {
  const char* op = "jacext::conv_jac_reverse";
  const ConvGeometry conv{stride, padding, dilation, groups};
  check_conv_args(input, weight, std::nullopt, conv, op);
  const std::vector<int64_t> out_features = conv_output_features(input, weight, conv, op);
  const std::optional<at::Tensor> cotangents =
      cotangents_nd_from_arg(cotangent, input.size(0), out_features, input, op);
  const at::IntArrayRef in_spatial = input.sizes().slice(2);
  return map_rows_shared(cotangents, input.size(0), out_features, input.options(), [&](const at::Tensor& rows) {
    return transpose_convolve(rows, weight, in_spatial, conv);
  });
}

at::Tensor conv_jac_reverse_any_layout(const at::Tensor& input, const std::optional<at::Tensor>& cotangent,
                                       const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                                       at::IntArrayRef dilation, int64_t groups) {
  if (!cotangent.has_value()) return conv_jac_reverse(input, cotangent, weight, stride, padding, dilation, groups);
  const char* op = "jacext::conv_jac_reverse";
  const ConvGeometry conv{stride, padding, dilation, groups};
  check_conv_args(input, weight, std::nullopt, conv, op);
  check_cotangent_nd(*cotangent, input.size(0), conv_output_features(input, weight, conv, op), input, op);
  // Channels-last rows stay so, in and out; any other layout (a slice of a concatenation's block) goes in and
  // comes out contiguous, as through conv_jac_reverse, which the rules after it are measured on.
  at::Tensor rows = cotangent->flatten(0, 1);
  const bool channels_last = rows.dim() == 4 && rows.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                             !rows.is_contiguous();
  if (!channels_last) rows = rows.contiguous();
  const at::Tensor pulled = transpose_convolve(rows, weight, input.sizes().slice(2), conv);
  return (channels_last ? pulled : pulled.contiguous()).unflatten(0, {input.size(0), cotangent->size(1)});
}

}  // namespace jacext
