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

// A convolution whose kernel window covers its whole input (one output position, stride irrelevant,
// no dilation or groups: the last stages of a CNN on small images) is a Linear map with the kernel taps
// that land on the input. As a matrix product it skips the padded taps an im2col convolution multiplies
// by zero (8 of 9 for a 3x3 kernel on 1x1 features). The matrix is [out_channels, *in_spatial *
// in_channels], channels last: that copy of the strided taps is fast where [.., in_channels, *in_spatial]
// is not.
std::optional<at::Tensor> window_matrix(const at::Tensor& weight, at::IntArrayRef in_spatial,
                                        const ConvGeometry& conv) {
  const size_t spatial_dims = in_spatial.size();
  if (conv.groups != 1 || weight.dim() != static_cast<int64_t>(spatial_dims) + 2 ||
      conv.stride.size() != spatial_dims || conv.padding.size() != spatial_dims ||
      conv.dilation.size() != spatial_dims) {
    return std::nullopt;  // not this form; a malformed geometry is left to the convolution's own checks
  }
  at::Tensor taps = weight;
  for (size_t i = 0; i < in_spatial.size(); ++i) {
    const int64_t kernel = weight.size(i + 2);
    if (conv.dilation[i] != 1 || conv.padding[i] < 0 || in_spatial[i] + 2 * conv.padding[i] < kernel ||
        conv.padding[i] + in_spatial[i] > kernel ||
        in_spatial[i] + 2 * conv.padding[i] - kernel >= conv.stride[i]) {
      return std::nullopt;
    }
    taps = taps.narrow(i + 2, conv.padding[i], in_spatial[i]);
  }
  return taps.movedim(1, -1).contiguous().flatten(1);
}

at::Tensor convolve(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const ConvGeometry& conv) {
  if (const auto matrix = window_matrix(weight, x.sizes().slice(2), conv)) {
    std::vector<int64_t> out_shape(x.dim(), 1);
    out_shape[0] = x.size(0);
    out_shape[1] = weight.size(0);
    return at::linear(x.movedim(1, -1).flatten(1), *matrix, bias).view(out_shape);
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

// Cotangents [N, *out_features] -> [N, *in_features]: the transposed convolution, with the output
// padding that restores exactly the input's spatial size (the rows the strided convolution skipped).
at::Tensor transpose_convolve(const at::Tensor& g, const at::Tensor& weight, at::IntArrayRef in_spatial,
                              const ConvGeometry& conv) {
  if (const auto matrix = window_matrix(weight, in_spatial, conv)) {
    std::vector<int64_t> channels_last_shape{g.size(0)};
    channels_last_shape.insert(channels_last_shape.end(), in_spatial.begin(), in_spatial.end());
    channels_last_shape.push_back(weight.size(1));
    return at::mm(g.flatten(1), *matrix).view(channels_last_shape).movedim(-1, 1).contiguous();
  }
  if (auto by_columns = transpose_by_columns(g, weight, in_spatial, conv)) return *std::move(by_columns);
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

}  // namespace jacext
