// The rules of the graph kinds (grammar in graph.cpp): one table entry per kind, holding its attributes'
// decoder, its value, its forward rule and its reverse rule. Layer kinds call the per-layer operators;
// index maps and combinations of values (reshape ... scale) are written here in ATen.
//
// Blocks keep the per-sample shape intact with the rows second: tangents T[b, d, *shape], cotangents
// G[b, c, *shape]; std::nullopt is the lazy identity, which the index maps that need rows materialise.
#include "jacext/checks.h"
#include "jacext/graph_program.h"
#include "jacext/jacobian_block.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <limits>
#include <numeric>

namespace jacext::graph {

std::vector<int64_t> per_sample_shape(const at::Tensor& value) { return value.sizes().slice(1).vec(); }

std::vector<int64_t> with_leading(std::initializer_list<int64_t> leading, at::IntArrayRef shape) {
  std::vector<int64_t> sizes(leading);
  sizes.insert(sizes.end(), shape.begin(), shape.end());
  return sizes;
}

bool writable(const at::Tensor& block) {
  return block.defined() && block.use_count() == 1 && block.storage().use_count() == 1 &&
         block.is_non_overlapping_and_dense();
}

at::Tensor explicit_block(const std::optional<at::Tensor>& block, const at::Tensor& value) {
  if (block) return *block;
  // eye(R) as [B, R, *shape]: one copy, expanded over the batch.
  const std::vector<int64_t> shape = per_sample_shape(value);
  const int64_t rows = c10::multiply_integers(shape);
  return at::eye(rows, value.options())
      .view(with_leading({1, rows}, shape))
      .expand(with_leading({value.size(0), rows}, shape));
}

namespace {

using Forward = std::pair<at::Tensor, std::optional<at::Tensor>>;

// A forward rule from the value and a tangent rule (index maps, the last-axis Linear): its value, then its tangent from the value.
template <typename Tangent>
std::function<Forward(const Node&, const Values&, const Blocks&)> value_then_tangent(Tangent tangent) {
  return [tangent](const Node& node, const Values& in, const Blocks& tangents) {
    at::Tensor value = node.rule->value(node, in);
    std::optional<at::Tensor> result = tangent(node, in, tangents, value);
    return Forward{std::move(value), std::move(result)};
  };
}

// ---- layer kinds: the per-layer operators take forward tangents rows last, [B, *in, D] ----

// A forward rule from a per-layer operator, which takes and returns tangents rows last ([B, *in, D]) while the
// graph carries them rows second ([B, D, *in]).
template <typename RowsLastOperator>
std::function<Forward(const Node&, const Values&, const Blocks&)> rows_last_forward(RowsLastOperator op) {
  return [op](const Node& node, const Values& in, const Blocks& tangents) {
    const std::optional<at::Tensor> rows_last =
        tangents[0] ? std::optional<at::Tensor>(tangents[0]->movedim(1, -1)) : std::nullopt;
    auto [value, tangent] = op(node, in[0], rows_last);
    return Forward{std::move(value), tangent.movedim(-1, 1)};
  };
}

// The optional weight and bias of batch_norm and layer_norm, in params order, and the index of the rest.
struct Affine {
  std::optional<at::Tensor> weight, bias;
  size_t next = 0;
};

Affine affine(const Node& node) {
  Affine result;
  if (node.attributes.weight) result.weight = node.params[result.next++];
  if (node.attributes.bias) result.bias = node.params[result.next++];
  return result;
}

std::optional<at::Tensor> conv_bias(const Node& node) {
  return node.attributes.bias ? std::optional<at::Tensor>(node.params[1]) : std::nullopt;
}

GraphKind conv_kind() {
  GraphKind kind;
  kind.attribute_names = {"stride", "padding", "dilation", "groups", "bias"};
  kind.decode = [](const AttributeText& text, Node& node) -> size_t {
    Attributes& a = node.attributes;
    a.stride = text.ints("stride");
    a.padding = text.ints("padding");
    a.dilation = text.ints("dilation");
    a.groups = text.integer("groups");
    a.bias = text.flag("bias");
    return 1 + a.bias;
  };
  kind.value = [](const Node& node, const Values& in) {
    const Attributes& a = node.attributes;
    check_same_dtype_device(in[0], node.params[0], kOp, "params (conv weight)");
    return conv_value(in[0], node.params[0], conv_bias(node), a.stride, a.padding, a.dilation, a.groups);
  };
  kind.forward = rows_last_forward([](const Node& node, const at::Tensor& x, const std::optional<at::Tensor>& t) {
    const Attributes& a = node.attributes;
    return conv_jac_forward(x, t, node.params[0], conv_bias(node), a.stride, a.padding, a.dilation, a.groups);
  });
  kind.reverse = [](const Node& node, const Values& in, const at::Tensor&, const std::optional<at::Tensor>& g) {
    const Attributes& a = node.attributes;
    return Blocks{conv_jac_reverse_any_layout(in[0], g, node.params[0], a.stride, a.padding, a.dilation, a.groups)};
  };
  return kind;
}

GraphKind batch_norm_kind() {
  GraphKind kind;
  kind.attribute_names = {"eps", "weight", "bias"};
  kind.decode = [](const AttributeText& text, Node& node) -> size_t {
    Attributes& a = node.attributes;
    a.eps = text.number("eps");
    a.weight = text.flag("weight");
    a.bias = text.flag("bias");
    return 2 + a.weight + a.bias;  // and the running mean and variance
  };
  kind.value = [](const Node& node, const Values& in) {
    const Affine a = affine(node);
    return at::batch_norm(in[0], a.weight, a.bias, node.params[a.next], node.params[a.next + 1], false, 0.0,
                          node.attributes.eps, true);
  };
  kind.forward = rows_last_forward([](const Node& node, const at::Tensor& x, const std::optional<at::Tensor>& t) {
    const Affine a = affine(node);
    return batch_norm_jac_forward(x, t, a.weight, a.bias, node.params[a.next], node.params[a.next + 1],
                                  node.attributes.eps);
  });
  kind.reverse = [](const Node& node, const Values& in, const at::Tensor&, const std::optional<at::Tensor>& g) {
    const Affine a = affine(node);
    return Blocks{batch_norm_jac_reverse(in[0], g, a.weight, node.params[a.next + 1], node.attributes.eps)};
  };
  return kind;
}

GraphKind layer_norm_kind() {
  GraphKind kind;
  kind.attribute_names = {"shape", "eps", "weight", "bias"};
  kind.decode = [](const AttributeText& text, Node& node) -> size_t {
    Attributes& a = node.attributes;
    a.shape = text.ints("shape");
    a.eps = text.number("eps");
    a.weight = text.flag("weight");
    a.bias = text.flag("bias");
    return a.weight + a.bias;
  };
  kind.value = [](const Node& node, const Values& in) {
    const Affine a = affine(node);
    return at::layer_norm(in[0], node.attributes.shape, a.weight, a.bias, node.attributes.eps);
  };
  kind.forward = rows_last_forward([](const Node& node, const at::Tensor& x, const std::optional<at::Tensor>& t) {
    const Affine a = affine(node);
    return layer_norm_jac_forward(x, t, node.attributes.shape, a.weight, a.bias, node.attributes.eps);
  });
  kind.reverse = [](const Node& node, const Values& in, const at::Tensor&, std::optional<at::Tensor> g) {
    const Affine a = affine(node);
    const bool overwrite = g && writable(*g);
    return Blocks{layer_norm_rows_reverse(in[0], g, node.attributes.shape, a.weight, node.attributes.eps,
                                          overwrite)};
  };
  return kind;
}

// nn.RMSNorm / F.rms_norm over the trailing axes `shape`: y = w x r with r = (mean x^2 + eps)^(-1/2) per
// group. Its Jacobian diag(w) (r I - r^3 x x^T / N) is applied to the rows of a block without forming it: the
// matrix in brackets is symmetric, so the forward rule scales by w after it and the reverse rule before it.
// ATen ops on the blocks, device-generic (at::rms_norm exists from torch 2.4, as nn.RMSNorm does).
#if __has_include(<ATen/ops/rms_norm.h>)
// The normalised axes counted from the end, after checking that `shape` ends x's per-sample shape and that the
// weight has that shape.
std::vector<int64_t> rms_norm_axes(const Node& node, const at::Tensor& x) {
  const at::IntArrayRef shape = node.attributes.shape;
  const int64_t count = static_cast<int64_t>(shape.size());
  TORCH_CHECK_VALUE(count >= 1 && x.dim() - 1 >= count && x.sizes().slice(x.dim() - count) == shape, kOp, ": ",
                    where(node), " needs a per-sample shape ending in shape=", shape, ", got ", x.sizes().slice(1));
  if (node.attributes.weight) {
    check_same_dtype_device(x, node.params[0], kOp, "params (rms_norm weight)");
    TORCH_CHECK_VALUE(node.params[0].sizes() == shape, kOp, ": ", where(node), " needs a weight of shape ", shape,
                      ", got ", node.params[0].sizes());
  }
  std::vector<int64_t> axes;
  for (int64_t axis = -count; axis < 0; ++axis) axes.push_back(axis);
  return axes;
}

std::optional<double> rms_norm_eps(const Node& node) {
  return node.attributes.dtype_eps ? std::nullopt : std::optional<double>(node.attributes.eps);
}

// r b - r^3 x mean(x b) over the normalised axes, for the rows b [B, R, *shape] of a block.
at::Tensor rms_norm_project(const Node& node, const at::Tensor& x, const at::Tensor& rows) {
  const std::vector<int64_t> axes = rms_norm_axes(node, x);
  // at::rms_norm's default: the epsilon of the input's accumulation type (float for float and narrower).
  const double dtype_eps = x.scalar_type() == at::kDouble ? std::numeric_limits<double>::epsilon()
                                                           : std::numeric_limits<float>::epsilon();
  const double eps = rms_norm_eps(node).value_or(dtype_eps);
  const at::Tensor xs = x.unsqueeze(1);
  const at::Tensor r = (xs.pow(2).mean(axes, /*keepdim=*/true) + eps).rsqrt();
  return r * rows - r.pow(3) * xs * (xs * rows).mean(axes, /*keepdim=*/true);
}

GraphKind rms_norm_kind() {
  GraphKind kind;
  kind.attribute_names = {"shape", "eps", "weight"};
  kind.decode = [](const AttributeText& text, Node& node) -> size_t {
    Attributes& a = node.attributes;
    a.shape = text.ints("shape");
    a.dtype_eps = !text.has("eps");
    if (!a.dtype_eps) a.eps = text.number("eps");
    a.weight = text.flag("weight");
    return a.weight;
  };
  kind.value = [](const Node& node, const Values& in) {
    rms_norm_axes(node, in[0]);
    return at::rms_norm(in[0], node.attributes.shape, affine(node).weight, rms_norm_eps(node));
  };
  kind.forward = value_then_tangent(
      [](const Node& node, const Values& in, const Blocks& tangents, const at::Tensor&) -> std::optional<at::Tensor> {
        const at::Tensor projected = rms_norm_project(node, in[0], explicit_block(tangents[0], in[0]));
        return node.attributes.weight ? projected * node.params[0] : projected;
      });
  kind.reverse = [](const Node& node, const Values& in, const at::Tensor& value, const std::optional<at::Tensor>& g) {
    const at::Tensor block = explicit_block(g, value);
    return Blocks{rms_norm_project(node, in[0], node.attributes.weight ? block * node.params[0] : block)};
  };
  return kind;
}
#endif

GraphKind max_pool2d_kind() {
  GraphKind kind;
  kind.attribute_names = {"kernel", "stride", "padding", "dilation", "ceil"};
  kind.decode = [](const AttributeText& text, Node& node) -> size_t {
    Attributes& a = node.attributes;
    a.kernel = text.ints("kernel");
    a.stride = text.ints("stride");
    a.padding = text.ints("padding");
    a.dilation = text.ints("dilation");
    a.ceil = text.flag("ceil");
    return 0;
  };
  kind.value = [](const Node& node, const Values& in) {
    const Attributes& a = node.attributes;
    return at::max_pool2d(in[0], a.kernel, a.stride, a.padding, a.dilation, a.ceil);
  };
  kind.forward = rows_last_forward([](const Node& node, const at::Tensor& x, const std::optional<at::Tensor>& t) {
    const Attributes& a = node.attributes;
    return max_pool2d_jac_forward(x, t, a.kernel, a.stride, a.padding, a.dilation, a.ceil);
  });
  kind.reverse = [](const Node& node, const Values& in, const at::Tensor&, const std::optional<at::Tensor>& g) {
    const Attributes& a = node.attributes;
    return Blocks{max_pool2d_jac_reverse(in[0], g, a.kernel, a.stride, a.padding, a.dilation, a.ceil)};
  };
  kind.value_saving = [](const Node& node, const Values& in) {
    const Attributes& a = node.attributes;
    auto [value, argmax] = max_pool2d_with_argmax(in[0], a.kernel, a.stride, a.padding, a.dilation, a.ceil);
    return std::pair<at::Tensor, at::Tensor>{value, argmax};
  };
  kind.reverse_saved = [](const Node&, const Values& in, const at::Tensor& argmax, const std::optional<at::Tensor>& g) {
    return Blocks{max_pool2d_jac_reverse_from_argmax(in[0], argmax, g)};
  };
  return kind;
}

GraphKind avg_pool2d_kind() {
  GraphKind kind;
  kind.attribute_names = {"kernel", "stride", "padding", "ceil", "count_include_pad", "divisor"};
  kind.decode = [](const AttributeText& text, Node& node) -> size_t {
    Attributes& a = node.attributes;
    a.kernel = text.ints("kernel");
    a.stride = text.ints("stride");
    a.padding = text.ints("padding");
    a.ceil = text.flag("ceil");
    a.count_include_pad = text.flag("count_include_pad");
    a.divisor = text.optional_integer("divisor");
    return 0;
  };
  kind.value = [](const Node& node, const Values& in) {
    const Attributes& a = node.attributes;
    return at::avg_pool2d(in[0], a.kernel, a.stride, a.padding, a.ceil, a.count_include_pad, a.divisor);
  };
  kind.forward = rows_last_forward([](const Node& node, const at::Tensor& x, const std::optional<at::Tensor>& t) {
    const Attributes& a = node.attributes;
    return avg_pool2d_jac_forward(x, t, a.kernel, a.stride, a.padding, a.ceil, a.count_include_pad, a.divisor);
  });
  kind.reverse = [](const Node& node, const Values& in, const at::Tensor&, const std::optional<at::Tensor>& g) {
    const Attributes& a = node.attributes;
    return Blocks{
        avg_pool2d_jac_reverse(in[0], g, a.kernel, a.stride, a.padding, a.ceil, a.count_include_pad, a.divisor)};
  };
  return kind;
}

GraphKind adaptive_avg_pool2d_kind() {
  GraphKind kind;
  kind.attribute_names = {"size"};
  kind.decode = [](const AttributeText& text, Node& node) -> size_t {
    node.attributes.size = text.ints("size");
    return 0;
  };
  kind.value = [](const Node& node, const Values& in) { return at::adaptive_avg_pool2d(in[0], node.attributes.size); };
  kind.forward = rows_last_forward([](const Node& node, const at::Tensor& x, const std::optional<at::Tensor>& t) {
    return adaptive_avg_pool2d_jac_forward(x, t, node.attributes.size);
  });
  kind.reverse = [](const Node& node, const Values& in, const at::Tensor&, const std::optional<at::Tensor>& g) {
    return Blocks{adaptive_avg_pool2d_jac_reverse(in[0], g, node.attributes.size)};
  };
  return kind;
}

// nn.Linear over the last axis of an N-d per-sample input (tokens): the blocks' last axis times W^T
// (forward) or W (reverse), one GEMM over every row of every sample.
GraphKind linear_last_axis_kind() {
  GraphKind kind;
  kind.attribute_names = {"bias"};
  kind.decode = [](const AttributeText& text, Node& node) -> size_t {
    node.attributes.bias = text.flag("bias");
    return 1 + node.attributes.bias;
  };
  kind.value = [](const Node& node, const Values& in) {
    const at::Tensor& x = in[0];
    const at::Tensor& weight = node.params[0];
    check_same_dtype_device(x, weight, kOp, "params (linear_last_axis weight)");
    TORCH_CHECK_VALUE(weight.dim() == 2 && x.dim() >= 2 && x.size(-1) == weight.size(1), kOp, ": ", where(node),
                      " needs a weight [out, ", x.size(-1), "] for an input of shape ", x.sizes(), ", got ",
                      weight.sizes());
    std::optional<at::Tensor> bias;
    if (node.attributes.bias) {
      bias = node.params[1];
      check_same_dtype_device(x, *bias, kOp, "params (linear_last_axis bias)");
      TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), kOp, ": ", where(node),
                        " needs a bias [", weight.size(0), "], got ", bias->sizes());
    }
    return at::linear(x, weight, bias);
  };
  kind.forward = value_then_tangent(
      [](const Node& node, const Values& in, const Blocks& tangents, const at::Tensor&) -> std::optional<at::Tensor> {
        return at::matmul(explicit_block(tangents[0], in[0]), node.params[0].t());
      });
  kind.reverse = [](const Node& node, const Values&, const at::Tensor& value, const std::optional<at::Tensor>& g) {
    return Blocks{at::matmul(explicit_block(g, value), node.params[0])};
  };
  return kind;
}

// ---- index maps and combinations of values ----

std::vector<int64_t> shifted(const std::vector<int64_t>& axes, int64_t by) {
  std::vector<int64_t> result;
  for (int64_t axis : axes) result.push_back(axis + by);
  return result;
}

// Per-sample axes of an entry (dims=, dim=) checked against the value's per-sample rank.
std::vector<int64_t> sample_axes(const Node& node, const std::vector<int64_t>& axes, int64_t rank) {
  for (int64_t axis : axes) {
    TORCH_CHECK_VALUE(axis >= 0 && axis < rank, kOp, ": ", where(node), " names per-sample axis ", axis,
                      " but its input has ", rank, " per-sample axes");
  }
  return axes;
}

GraphKind reshape_kind() {
  GraphKind kind;
  kind.attribute_names = {"shape"};
  kind.decode = [](const AttributeText& text, Node& node) -> size_t {
    node.attributes.shape = text.ints("shape");
    return 0;
  };
  kind.value = [](const Node& node, const Values& in) {
    const at::Tensor& x = in[0];
    const std::vector<int64_t>& shape = node.attributes.shape;
    TORCH_CHECK_VALUE(c10::multiply_integers(shape) == c10::multiply_integers(x.sizes().slice(1)), kOp, ": ",
                      where(node), " cannot reshape per-sample shape ", x.sizes().slice(1), " to ", shape);
    return x.reshape(with_leading({x.size(0)}, shape));
  };
  kind.forward = value_then_tangent(
      [](const Node&, const Values& in, const Blocks& tangents, const at::Tensor& value) -> std::optional<at::Tensor> {
        if (!tangents[0]) return std::nullopt;  // a reshape of the identity is the identity of the new shape
        return tangents[0]->reshape(with_leading({in[0].size(0), tangents[0]->size(1)}, per_sample_shape(value)));
      });
  kind.reverse = [](const Node&, const Values& in, const at::Tensor&, const std::optional<at::Tensor>& g) -> Blocks {
    if (!g) return {std::nullopt};
    return {g->reshape(with_leading({in[0].size(0), g->size(1)}, per_sample_shape(in[0])))};
  };
  return kind;
}

std::vector<int64_t> permutation(const Node& node, const at::Tensor& x) {
  const std::vector<int64_t> dims = sample_axes(node, node.attributes.dims, x.dim() - 1);
  std::vector<int64_t> sorted = dims;
  std::sort(sorted.begin(), sorted.end());
  std::vector<int64_t> expected(x.dim() - 1);
  std::iota(expected.begin(), expected.end(), 0);
  TORCH_CHECK_VALUE(sorted == expected, kOp, ": ", where(node), " dims must be a permutation of the ", x.dim() - 1,
                    " per-sample axes, got ", dims);
  return dims;
}

GraphKind permute_kind() {
  GraphKind kind;
  kind.attribute_names = {"dims"};
  kind.decode = [](const AttributeText& text, Node& node) -> size_t {
    node.attributes.dims = text.ints("dims");
    return 0;
  };
  kind.value = [](const Node& node, const Values& in) {
    return in[0].permute(with_leading({0}, shifted(permutation(node, in[0]), 1)));
  };
  kind.forward = value_then_tangent(
      [](const Node& node, const Values& in, const Blocks& tangents, const at::Tensor&) -> std::optional<at::Tensor> {
        return explicit_block(tangents[0], in[0]).permute(with_leading({0, 1}, shifted(permutation(node, in[0]), 2)));
      });
  kind.reverse = [](const Node& node, const Values& in, const at::Tensor& value, const std::optional<at::Tensor>& g) {
    const std::vector<int64_t> dims = permutation(node, in[0]);
    std::vector<int64_t> inverse(dims.size() + 2);
    inverse[0] = 0;
    inverse[1] = 1;
    for (size_t i = 0; i < dims.size(); ++i) inverse[dims[i] + 2] = static_cast<int64_t>(i) + 2;
    return Blocks{explicit_block(g, value).permute(inverse)};
  };
  return kind;
}

// mean and sum over per-sample axes.
GraphKind reduction_kind(bool mean) {
  GraphKind kind;
  kind.attribute_names = {"dims", "keepdim"};
  kind.decode = [](const AttributeText& text, Node& node) -> size_t {
    node.attributes.dims = text.ints("dims");
    node.attributes.keepdim = text.flag("keepdim");
    return 0;
  };
  kind.value = [mean](const Node& node, const Values& in) {
    const std::vector<int64_t> axes = shifted(sample_axes(node, node.attributes.dims, in[0].dim() - 1), 1);
    return mean ? in[0].mean(axes, node.attributes.keepdim) : in[0].sum(axes, node.attributes.keepdim);
  };
  kind.forward = value_then_tangent([mean](const Node& node, const Values& in, const Blocks& tangents,
                                           const at::Tensor& value) -> std::optional<at::Tensor> {
    const at::Tensor t = explicit_block(tangents[0], in[0]);
    const std::vector<int64_t> axes = shifted(sample_axes(node, node.attributes.dims, in[0].dim() - 1), 2);
    const at::Tensor reduced = mean ? t.mean(axes, true) : t.sum(axes, true);
    return reduced.reshape(with_leading({in[0].size(0), t.size(1)}, per_sample_shape(value)));
  });
  kind.reverse = [mean](const Node& node, const Values& in, const at::Tensor& value,
                        const std::optional<at::Tensor>& cotangent) {
    const at::Tensor& x = in[0];
    const at::Tensor g = explicit_block(cotangent, value);
    const std::vector<int64_t> axes = sample_axes(node, node.attributes.dims, x.dim() - 1);
    std::vector<int64_t> kept{x.size(0), g.size(1)};
    int64_t count = 1;
    for (int64_t axis = 0; axis < x.dim() - 1; ++axis) {
      const bool reduced = std::find(axes.begin(), axes.end(), axis) != axes.end();
      kept.push_back(reduced ? 1 : x.size(axis + 1));
      if (reduced) count *= x.size(axis + 1);
    }
    const at::Tensor spread = g.reshape(kept).expand(with_leading({x.size(0), g.size(1)}, per_sample_shape(x)));
    return Blocks{mean ? spread / static_cast<double>(count) : spread};
  };
  return kind;
}

int64_t dim_axis(const Node& node, const at::Tensor& x) {
  return sample_axes(node, {node.attributes.dim}, x.dim() - 1)[0];
}

// constants= of the entries that mix values and tensors of params among their operands (cat, einsum): one flag
// per operand in order, 1 for the next tensor of params, 0 for the next value slot. Absent: values only. Returns
// how many tensors of params the entry takes.
size_t decode_constant_flags(const AttributeText& text, Node& node) {
  std::vector<int64_t>& flags = node.attributes.constants;
  flags = text.has("constants") ? text.ints("constants") : std::vector<int64_t>{};
  if (flags.empty()) return 0;
  const auto params = static_cast<size_t>(std::count(flags.begin(), flags.end(), 1));
  const bool binary = std::all_of(flags.begin(), flags.end(), [](int64_t flag) { return flag == 0 || flag == 1; });
  TORCH_CHECK_VALUE(binary && flags.size() - params == node.inputs.size(), kOp, ": ", where(node),
                    " needs constants= flags (0 or 1), one per operand, with a 0 for each of its ", node.inputs.size(),
                    " value slots, got ", flags);
  return params;
}

// The operands in order: the values (in) and the tensors of params, interleaved as constants= says (`what` names
// the params in errors); values only where it is absent.
Values interleaved_operands(const Node& node, const Values& in, const char* what) {
  if (node.attributes.constants.empty()) return in;
  Values operands;
  size_t value = 0, param = 0;
  for (int64_t constant : node.attributes.constants) {
    if (constant) {
      check_same_dtype_device(in[0], node.params[param], kOp, what);
      operands.push_back(node.params[param++]);
    } else {
      operands.push_back(in[value++]);
    }
  }
  return operands;
}

// The parts of a cat entry in order: its values, and where constants= flags a part 1, the next tensor of params
// [1, *part shape] expanded over the batch (a class token, constant for the derivative).
std::vector<at::Tensor> cat_parts(const Node& node, const Values& in) {
  std::vector<at::Tensor> parts = interleaved_operands(node, in, "params (cat part)");
  const std::vector<int64_t>& constants = node.attributes.constants;
  for (size_t i = 0; i < constants.size(); ++i) {
    if (!constants[i]) continue;
    const at::Tensor& part = parts[i];
    TORCH_CHECK_VALUE(part.dim() == in[0].dim() && part.size(0) == 1, kOp, ": ", where(node),
                      " needs a constant part [1, ...] of the values' rank ", in[0].dim(), ", got ", part.sizes());
    parts[i] = part.expand(with_leading({in[0].size(0)}, per_sample_shape(part)));
  }
  return parts;
}

GraphKind cat_kind() {
  GraphKind kind;
  kind.attribute_names = {"dim", "constants"};
  kind.inputs = 0;
  kind.decode = [](const AttributeText& text, Node& node) -> size_t {
    node.attributes.dim = text.integer("dim");
    return decode_constant_flags(text, node);
  };
  kind.value = [](const Node& node, const Values& in) { return at::cat(cat_parts(node, in), dim_axis(node, in[0]) + 1); };
  kind.forward = value_then_tangent(
      [](const Node& node, const Values& in, const Blocks& tangents, const at::Tensor&) -> std::optional<at::Tensor> {
        const std::vector<at::Tensor> parts = cat_parts(node, in);
        const std::vector<int64_t>& constants = node.attributes.constants;
        std::vector<at::Tensor> blocks;
        size_t next_value = 0;
        std::optional<int64_t> rows;
        for (size_t i = 0; i < parts.size(); ++i) {
          if (!constants.empty() && constants[i]) {
            blocks.emplace_back();  // zeros, once the rows are known
            continue;
          }
          blocks.push_back(explicit_block(tangents[next_value], in[next_value]));
          rows = blocks.back().size(1);
          ++next_value;
        }
        for (size_t i = 0; i < parts.size(); ++i) {
          if (!blocks[i].defined()) {
            blocks[i] = at::zeros(with_leading({parts[i].size(0), *rows}, per_sample_shape(parts[i])), parts[i].options());
          }
        }
        return at::cat(blocks, dim_axis(node, in[0]) + 2);
      });
  kind.reverse = [](const Node& node, const Values& in, const at::Tensor& value, const std::optional<at::Tensor>& g) {
    const int64_t axis = dim_axis(node, in[0]);
    const std::vector<at::Tensor> parts = cat_parts(node, in);
    const std::vector<int64_t>& constants = node.attributes.constants;
    std::vector<int64_t> sizes;
    for (const at::Tensor& part : parts) sizes.push_back(part.size(axis + 1));
    Blocks pulled;
    const std::vector<at::Tensor> pieces = explicit_block(g, value).split_with_sizes(sizes, axis + 2);
    for (size_t i = 0; i < pieces.size(); ++i) {
      if (constants.empty() || !constants[i]) pulled.emplace_back(pieces[i]);  // a constant's piece has no input
    }
    return pulled;
  };
  return kind;
}

struct Slice {
  int64_t axis, start, stop, step;
};

// A slice entry's bounds, checked against the input (Python's slice.indices has resolved them already).
Slice slice_of(const Node& node, const at::Tensor& x) {
  const Attributes& a = node.attributes;
  const Slice cut{dim_axis(node, x), a.start, a.stop, a.step};
  const int64_t size = x.size(cut.axis + 1);
  TORCH_CHECK_VALUE(cut.step >= 1 && 0 <= cut.start && cut.start <= cut.stop && cut.stop <= size, kOp, ": ",
                    where(node), " needs 0 <= start <= stop <= ", size, " and step >= 1, got start=", cut.start,
                    " stop=", cut.stop, " step=", cut.step);
  return cut;
}

// Zeros [B, R, *shape] for a value [B, *shape], the per-sample axes in the memory order of the value's (by
// decreasing stride), so that the views that made the value (qkv's permute) undo to a contiguous block. Strided
// from the start, not a permuted view of a fresh tensor: a view keeps its base alive, and so is not `writable`.
at::Tensor zeros_block_like(const at::Tensor& value, int64_t rows, const at::TensorOptions& options) {
  std::vector<int64_t> memory_order(value.dim() - 1);  // the block's per-sample axes, outermost first
  std::iota(memory_order.begin(), memory_order.end(), 2);
  std::stable_sort(memory_order.begin(), memory_order.end(),
                   [&](int64_t a, int64_t b) { return value.stride(a - 1) > value.stride(b - 1); });
  memory_order.insert(memory_order.begin(), {0, 1});
  const std::vector<int64_t> sizes = with_leading({value.size(0), rows}, per_sample_shape(value));
  std::vector<int64_t> strides(sizes.size());
  int64_t stride = 1;
  for (size_t i = memory_order.size(); i-- > 0;) {
    strides[memory_order[i]] = stride;
    stride *= std::max<int64_t>(sizes[memory_order[i]], 1);
  }
  return at::empty_strided(sizes, strides, options).zero_();
}

GraphKind slice_kind() {
  GraphKind kind;
  kind.attribute_names = {"dim", "start", "stop", "step"};
  kind.decode = [](const AttributeText& text, Node& node) -> size_t {
    Attributes& a = node.attributes;
    a.dim = text.integer("dim");
    a.start = text.integer("start");
    a.stop = text.integer("stop");
    a.step = text.integer("step");
    return 0;
  };
  kind.value = [](const Node& node, const Values& in) {
    const Slice cut = slice_of(node, in[0]);
    return in[0].slice(cut.axis + 1, cut.start, cut.stop, cut.step);
  };
  kind.forward = value_then_tangent(
      [](const Node& node, const Values& in, const Blocks& tangents, const at::Tensor&) -> std::optional<at::Tensor> {
        const Slice cut = slice_of(node, in[0]);
        return explicit_block(tangents[0], in[0]).slice(cut.axis + 2, cut.start, cut.stop, cut.step);
      });
  kind.reverse = [](const Node& node, const Values& in, const at::Tensor& value, const std::optional<at::Tensor>& g) {
    // The cotangent written into zeros of the input's block.
    const Slice cut = slice_of(node, in[0]);
    const at::Tensor block = explicit_block(g, value);
    at::Tensor pulled = zeros_block_like(in[0], block.size(1), block.options());
    pulled.slice(cut.axis + 2, cut.start, cut.stop, cut.step).copy_(block);
    return Blocks{pulled};
  };
  kind.reverse_into = [](const Node& node, const Values& in, const at::Tensor& value, const std::optional<at::Tensor>& g,
                         at::Tensor& stored) {
    const Slice cut = slice_of(node, in[0]);
    stored.slice(cut.axis + 2, cut.start, cut.stop, cut.step).add_(explicit_block(g, value));
  };
  return kind;
}

// ---- roll, flip, constant padding, normalize and einsum (torchvision's Swin and MaxVit) ----

// torch.roll (shifts=) and torch.flip (no shifts) over per-sample axes: the same permutation of positions on
// the block's axes; reverse rolls back by the opposite shifts (a flip is its own inverse).
GraphKind shift_kind(bool roll) {
  GraphKind kind;
  kind.attribute_names = roll ? std::set<std::string>{"shifts", "dims"} : std::set<std::string>{"dims"};
  kind.decode = [roll](const AttributeText& text, Node& node) -> size_t {
    Attributes& a = node.attributes;
    a.dims = text.ints("dims");
    if (roll) {
      a.shifts = text.ints("shifts");
      TORCH_CHECK_VALUE(a.shifts.size() == a.dims.size() && !a.dims.empty(), kOp, ": ", where(node),
                        " needs one shift per axis and at least one axis, got shifts=", a.shifts, " dims=", a.dims);
    }
    return 0;
  };
  // The input (or a block of it, whose per-sample axes start at `first`) rolled or flipped; `sign` -1 rolls back.
  const auto moved = [roll](const Node& node, const at::Tensor& x, const at::Tensor& t, int64_t first, int64_t sign) {
    const std::vector<int64_t> axes = shifted(sample_axes(node, node.attributes.dims, x.dim() - 1), first);
    if (!roll) return t.flip(axes);
    std::vector<int64_t> shifts = node.attributes.shifts;
    for (int64_t& shift : shifts) shift *= sign;
    return t.roll(shifts, axes);
  };
  kind.value = [moved](const Node& node, const Values& in) { return moved(node, in[0], in[0], 1, 1); };
  kind.forward = value_then_tangent([moved](const Node& node, const Values& in, const Blocks& tangents,
                                            const at::Tensor&) -> std::optional<at::Tensor> {
    return moved(node, in[0], explicit_block(tangents[0], in[0]), 2, 1);
  });
  kind.reverse = [moved](const Node& node, const Values& in, const at::Tensor& value,
                         const std::optional<at::Tensor>& g) {
    return Blocks{moved(node, in[0], explicit_block(g, value), 2, -1)};
  };
  return kind;
}

// F.pad(x, pad, "constant", value): pad= in F.pad's order (last axis first, before and after), negative amounts
// crop. The padding is a constant, so the block is padded with zeros; reverse pads by the opposite amounts,
// which crops the padding off and puts zeros back where the forward cropped.
std::vector<int64_t> pad_amounts(const Node& node, const at::Tensor& x, int64_t sign) {
  const std::vector<int64_t>& pad = node.attributes.pad;
  TORCH_CHECK_VALUE(pad.size() % 2 == 0 && static_cast<int64_t>(pad.size() / 2) <= x.dim() - 1, kOp, ": ",
                    where(node), " needs pairs of amounts for at most the ", x.dim() - 1,
                    " per-sample axes, got pad=", pad);
  std::vector<int64_t> amounts;
  for (int64_t amount : pad) amounts.push_back(sign * amount);
  return amounts;
}

GraphKind pad_kind() {
  GraphKind kind;
  kind.attribute_names = {"pad", "value"};
  kind.decode = [](const AttributeText& text, Node& node) -> size_t {
    node.attributes.pad = text.ints("pad");
    node.attributes.pad_value = text.number("value");
    return 0;
  };
  kind.value = [](const Node& node, const Values& in) {
    return at::constant_pad_nd(in[0], pad_amounts(node, in[0], 1), node.attributes.pad_value);
  };
  kind.forward = value_then_tangent(
      [](const Node& node, const Values& in, const Blocks& tangents, const at::Tensor&) -> std::optional<at::Tensor> {
        return at::constant_pad_nd(explicit_block(tangents[0], in[0]), pad_amounts(node, in[0], 1), 0);
      });
  kind.reverse = [](const Node& node, const Values& in, const at::Tensor& value, const std::optional<at::Tensor>& g) {
    return Blocks{at::constant_pad_nd(explicit_block(g, value), pad_amounts(node, in[0], -1), 0)};
  };
  return kind;
}

// F.normalize(x, p=2, dim, eps): y = x / max(|x|, eps) along one per-sample axis. Its Jacobian
// (I - s y y^T) / max(|x|, eps), s = [|x| >= eps] (below eps the clamp passes no derivative of the norm), is
// symmetric: one map pushes tangents forward and pulls cotangents back.
at::Tensor normalize_map(const Node& node, const at::Tensor& x, const at::Tensor& block) {
  const int64_t axis = dim_axis(node, x) + 1;
  const at::Tensor norm = at::linalg_vector_norm(x, 2, {axis}, /*keepdim=*/true);
  const at::Tensor denominator = norm.clamp_min(node.attributes.eps);
  const at::Tensor y = (x / denominator).unsqueeze(1);
  const at::Tensor along = (y * block).sum({axis + 1}, /*keepdim=*/true) * norm.ge(node.attributes.eps).unsqueeze(1);
  return (block - y * along) / denominator.unsqueeze(1);
}

GraphKind normalize_kind() {
  GraphKind kind;
  kind.attribute_names = {"dim", "eps"};
  kind.decode = [](const AttributeText& text, Node& node) -> size_t {
    node.attributes.dim = text.integer("dim");
    node.attributes.eps = text.number("eps");
    return 0;
  };
  kind.value = [](const Node& node, const Values& in) {
    const at::Tensor& x = in[0];
    return x / at::linalg_vector_norm(x, 2, {dim_axis(node, x) + 1}, true).clamp_min(node.attributes.eps);
  };
  kind.forward = value_then_tangent(
      [](const Node& node, const Values& in, const Blocks& tangents, const at::Tensor&) -> std::optional<at::Tensor> {
        return normalize_map(node, in[0], explicit_block(tangents[0], in[0]));
      });
  kind.reverse = [](const Node& node, const Values& in, const at::Tensor& value, const std::optional<at::Tensor>& g) {
    return Blocks{normalize_map(node, in[0], explicit_block(g, value))};
  };
  return kind;
}

// torch.einsum with an explicit equation of letters alone (no '...': program.py spells it out), operands in the
// equation's order, each a value (the next slot of in=) or a tensor of params (constants=1 at its position).
// Values are batch-first, so each value's letters and the output's start with one batch letter. einsum is
// linear in each operand: the tangent is one einsum per value with its tangent block in its place, and a
// value's cotangent is the einsum of the output's cotangent block with the other operands, the blocks' rows
// on a letter the equation does not use.
struct Einsum {
  std::vector<std::string> specs;  // per operand
  std::string output;
  char rows = 0;
};

Einsum einsum_of(const Node& node) {
  const std::string& equation = node.attributes.equation;
  Einsum e;
  const size_t arrow = equation.find("->");
  TORCH_CHECK_VALUE(arrow != std::string::npos, kOp, ": ", where(node), " needs an explicit output (->), got '",
                    equation, "'");
  e.output = equation.substr(arrow + 2);
  size_t start = 0;
  const std::string left = equation.substr(0, arrow);
  while (true) {
    const size_t comma = std::min(left.find(',', start), left.size());
    e.specs.push_back(left.substr(start, comma - start));
    if (comma == left.size()) break;
    start = comma + 1;
  }
  const std::vector<int64_t>& constants = node.attributes.constants;
  TORCH_CHECK_VALUE(e.specs.size() == constants.size(), kOp, ": ", where(node), " has ", e.specs.size(),
                    " operands in its equation but constants= names ", constants.size());
  std::string used;
  for (const std::string& spec : e.specs) used += spec;
  for (const std::string& spec : {used, e.output}) {
    for (char letter : spec) {
      TORCH_CHECK_VALUE(std::isalpha(static_cast<unsigned char>(letter)), kOp, ": ", where(node),
                        " equation must be letters, commas and one ->, got '", equation, "'");
    }
  }
  for (const std::string& spec : e.specs) {
    TORCH_CHECK_VALUE(std::set<char>(spec.begin(), spec.end()).size() == spec.size(), kOp, ": ", where(node),
                      " repeats a letter within the operand '", spec, "' (a diagonal), which it does not take");
  }
  // Every value and the output on one batch letter, first: the samples stay apart.
  TORCH_CHECK_VALUE(!e.output.empty(), kOp, ": ", where(node), " needs the batch letter first in its output");
  for (size_t k = 0; k < e.specs.size(); ++k) {
    TORCH_CHECK_VALUE(constants[k] == 1 || (constants[k] == 0 && !e.specs[k].empty() && e.specs[k][0] == e.output[0]),
                      kOp, ": ", where(node), " needs each value operand to start with the output's batch letter '",
                      e.output[0], "' and constants= flags of 0 or 1, got '", equation, "' constants=", constants);
  }
  for (char letter : std::string("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")) {
    if (used.find(letter) == std::string::npos && e.output.find(letter) == std::string::npos) {
      e.rows = letter;
      break;
    }
  }
  TORCH_CHECK_VALUE(e.rows != 0, kOp, ": ", where(node), " uses every letter, leaving none for the block's rows");
  return e;
}

std::string with_rows(const std::string& spec, char rows) { return spec.substr(0, 1) + rows + spec.substr(1); }

std::string joined(const std::vector<std::string>& specs, const std::string& output) {
  std::string equation;
  for (size_t k = 0; k < specs.size(); ++k) equation += (k ? "," : "") + specs[k];
  return equation + "->" + output;
}

// The operands in the equation's order.
Values einsum_operands(const Node& node, const Values& in) {
  return interleaved_operands(node, in, "params (einsum operand)");
}

GraphKind einsum_kind() {
  GraphKind kind;
  kind.attribute_names = {"equation", "constants"};
  kind.inputs = 0;
  kind.decode = [](const AttributeText& text, Node& node) -> size_t {
    node.attributes.equation = text.word("equation");
    const size_t params = decode_constant_flags(text, node);
    einsum_of(node);  // a malformed equation (or constants= not one flag per operand) fails where the program is read
    return params;
  };
  kind.value = [](const Node& node, const Values& in) {
    return at::einsum(node.attributes.equation, einsum_operands(node, in));
  };
  kind.forward = value_then_tangent(
      [](const Node& node, const Values& in, const Blocks& tangents, const at::Tensor&) -> std::optional<at::Tensor> {
        const Einsum e = einsum_of(node);
        const Values operands = einsum_operands(node, in);
        std::optional<at::Tensor> total;
        size_t value = 0;
        for (size_t k = 0; k < operands.size(); ++k) {
          if (node.attributes.constants[k]) continue;
          std::vector<std::string> specs = e.specs;
          specs[k] = with_rows(specs[k], e.rows);
          Values terms = operands;
          terms[k] = explicit_block(tangents[value], in[value]);
          ++value;
          const at::Tensor term = at::einsum(joined(specs, with_rows(e.output, e.rows)), terms);
          total = total ? *total + term : term;
        }
        return total;
      });
  kind.reverse = [](const Node& node, const Values& in, const at::Tensor& value, const std::optional<at::Tensor>& g) {
    const Einsum e = einsum_of(node);
    const Values operands = einsum_operands(node, in);
    const at::Tensor block = explicit_block(g, value);
    Blocks pulled;
    for (size_t k = 0; k < operands.size(); ++k) {
      if (node.attributes.constants[k]) continue;
      std::vector<std::string> others{with_rows(e.output, e.rows)};
      Values terms{block};
      for (size_t j = 0; j < operands.size(); ++j) {
        if (j == k) continue;
        others.push_back(e.specs[j]);
        terms.push_back(operands[j]);
      }
      std::string reached;
      for (const std::string& spec : others) reached += spec;
      // A letter summed inside this operand alone is in no other term: the cotangent is the same all along it,
      // so the einsum leaves it out and the block is expanded along it after.
      const std::string own = with_rows(e.specs[k], e.rows);
      std::string kept;
      std::vector<int64_t> unreached;
      for (size_t axis = 0; axis < own.size(); ++axis) {
        if (reached.find(own[axis]) != std::string::npos) {
          kept += own[axis];
        } else {
          unreached.push_back(static_cast<int64_t>(axis));
        }
      }
      at::Tensor part = at::einsum(joined(others, kept), terms);
      for (int64_t axis : unreached) part = part.unsqueeze(axis);
      const at::Tensor& x = operands[k];
      const std::vector<int64_t> shape = with_leading({x.size(0), block.size(1)}, per_sample_shape(x));
      // Axes the operand broadcast (size 1 against the others) sum back; unreached ones expand.
      std::vector<int64_t> summed;
      for (size_t axis = 0; axis < shape.size(); ++axis) summed.push_back(part.size(axis) == 1 ? 1 : shape[axis]);
      pulled.emplace_back(part.sum_to_size(summed).expand(shape));
    }
    return pulled;
  };
  return kind;
}

// x.gather(dim, index) (`gather`) and x.index_select(dim, index) along a per-sample axis, the index a tensor of
// params (a buffer of the model, constant for the derivative): the same selection of the tangent block's
// positions, the index broadcast over the rows axis; reverse adds each cotangent position back where it was read
// from (scatter_add / index_add into zeros), so that a position read twice gets both and one never read gets zero.
// A gather index has x's rank and batch 1 (broadcast over the batch, a buffer the model expands) or B; an
// index_select index is a vector (or one number).
at::Tensor selection_index(const Node& node, const at::Tensor& x, bool gather) {
  const at::Tensor& index = node.params[0];
  const int64_t axis = dim_axis(node, x);
  TORCH_CHECK_VALUE(index.device() == x.device(), kOp, ": ", where(node), " needs its index on ", x.device(),
                    ", got ", index.device());
  if (!gather) {
    TORCH_CHECK_TYPE(index.scalar_type() == at::kLong || index.scalar_type() == at::kInt, kOp, ": ", where(node),
                     " needs an int64 or int32 index, got ", index.scalar_type());
    TORCH_CHECK_VALUE(index.dim() <= 1, kOp, ": ", where(node), " needs a vector index, got shape ", index.sizes());
    return index.reshape({-1});
  }
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, kOp, ": ", where(node), " needs an int64 index, got ",
                   index.scalar_type());
  TORCH_CHECK_VALUE(index.dim() == x.dim() && (index.size(0) == 1 || index.size(0) == x.size(0)), kOp, ": ",
                    where(node), " needs an index [1 or ", x.size(0), ", ...] of the input's rank ", x.dim(),
                    ", got shape ", index.sizes());
  for (int64_t d = 1; d < x.dim(); ++d) {
    TORCH_CHECK_VALUE(d == axis + 1 || index.size(d) <= x.size(d), kOp, ": ", where(node), " index of shape ",
                      index.sizes(), " is larger than the input ", x.sizes(), " along axis ", d);
  }
  return index.expand(with_leading({x.size(0)}, per_sample_shape(index)));
}

// The gather index against a block [B, R, *shape]: the rows axis inserted and broadcast.
at::Tensor block_index(const at::Tensor& index, int64_t rows) {
  return index.unsqueeze(1).expand(with_leading({index.size(0), rows}, per_sample_shape(index)));
}

GraphKind selection_kind(bool gather) {
  GraphKind kind;
  kind.attribute_names = {"dim"};
  kind.decode = [](const AttributeText& text, Node& node) -> size_t {
    node.attributes.dim = text.integer("dim");
    return 1;
  };
  kind.value = [gather](const Node& node, const Values& in) {
    const at::Tensor index = selection_index(node, in[0], gather);
    const int64_t axis = dim_axis(node, in[0]) + 1;
    return gather ? in[0].gather(axis, index) : in[0].index_select(axis, index);
  };
  kind.forward = value_then_tangent([gather](const Node& node, const Values& in, const Blocks& tangents,
                                             const at::Tensor&) -> std::optional<at::Tensor> {
    const at::Tensor index = selection_index(node, in[0], gather);
    const at::Tensor t = explicit_block(tangents[0], in[0]);
    const int64_t axis = dim_axis(node, in[0]) + 2;
    return gather ? t.gather(axis, block_index(index, t.size(1))) : t.index_select(axis, index);
  });
  kind.reverse = [gather](const Node& node, const Values& in, const at::Tensor& value,
                          const std::optional<at::Tensor>& cotangent) {
    const at::Tensor index = selection_index(node, in[0], gather);
    const at::Tensor g = explicit_block(cotangent, value);
    const int64_t axis = dim_axis(node, in[0]) + 2;
    at::Tensor pulled = at::zeros(with_leading({in[0].size(0), g.size(1)}, per_sample_shape(in[0])), g.options());
    return Blocks{gather ? pulled.scatter_add_(axis, block_index(index, g.size(1)), g)
                         : pulled.index_add_(axis, index, g)};
  };
  return kind;
}

GraphKind add_kind() {
  GraphKind kind;
  kind.attribute_names = {"coef", "offset", "offset_param"};
  kind.inputs = 0;
  kind.decode = [](const AttributeText& text, Node& node) -> size_t {
    Attributes& a = node.attributes;
    a.coef = text.numbers("coef");
    TORCH_CHECK_VALUE(a.coef.size() == node.inputs.size(), kOp, ": ", where(node), " has ", a.coef.size(),
                      " coefficients for ", node.inputs.size(), " inputs");
    a.offset = text.optional_number("offset");
    a.offset_param = text.optional_number("offset_param");
    return a.offset_param ? 1 : 0;
  };
  kind.value = [](const Node& node, const Values& in) {
    const Attributes& a = node.attributes;
    at::Tensor total;
    for (size_t i = 0; i < in.size(); ++i) {
      const at::Tensor term = a.coef[i] == 1 ? in[i] : in[i] * a.coef[i];
      total = total.defined() ? total + term : term;
    }
    if (a.offset) total = total + *a.offset;
    if (a.offset_param) {
      check_same_dtype_device(in[0], node.params[0], kOp, "params (add offset)");
      total = total + node.params[0] * *a.offset_param;
    }
    return total;
  };
  kind.forward = value_then_tangent(
      [](const Node& node, const Values& in, const Blocks& tangents, const at::Tensor&) -> std::optional<at::Tensor> {
        at::Tensor total;
        for (size_t i = 0; i < in.size(); ++i) {
          const at::Tensor block = explicit_block(tangents[i], in[i]);
          const at::Tensor term = node.attributes.coef[i] == 1 ? block : block * node.attributes.coef[i];
          total = total.defined() ? total + term : term;
        }
        return total;
      });
  kind.reverse = [](const Node& node, const Values&, const at::Tensor& value, const std::optional<at::Tensor>& g) {
    Blocks pulled;
    for (double c : node.attributes.coef) {
      pulled.push_back(c == 1 ? g : std::optional<at::Tensor>(explicit_block(g, value) * c));
    }
    return pulled;
  };
  return kind;
}

// The product (`quotient` false) or quotient of two values, broadcast against each other.
GraphKind product_kind(bool quotient) {
  GraphKind kind;
  kind.inputs = 2;
  kind.decode = [](const AttributeText&, Node&) -> size_t { return 0; };
  kind.value = [quotient](const Node&, const Values& in) { return quotient ? in[0] / in[1] : in[0] * in[1]; };
  kind.forward = value_then_tangent([quotient](const Node&, const Values& in, const Blocks& tangents,
                                               const at::Tensor& value) -> std::optional<at::Tensor> {
    const at::Tensor &a = in[0], &b = in[1];
    const at::Tensor ta = explicit_block(tangents[0], a), tb = explicit_block(tangents[1], b);
    const at::Tensor total = quotient ? ta / b.unsqueeze(1) - tb * (a / (b * b)).unsqueeze(1)
                                      : ta * b.unsqueeze(1) + tb * a.unsqueeze(1);
    return total.expand(with_leading({a.size(0), ta.size(1)}, per_sample_shape(value)));
  });
  kind.reverse = [quotient](const Node&, const Values& in, const at::Tensor& value,
                            const std::optional<at::Tensor>& cotangent) {
    const at::Tensor &a = in[0], &b = in[1];
    const at::Tensor g = explicit_block(cotangent, value);
    const at::Tensor da = quotient ? g / b.unsqueeze(1) : g * b.unsqueeze(1);
    const at::Tensor db = quotient ? -(g * (a / (b * b)).unsqueeze(1)) : g * a.unsqueeze(1);
    return Blocks{da.sum_to_size(with_leading({a.size(0), g.size(1)}, per_sample_shape(a))),
                  db.sum_to_size(with_leading({a.size(0), g.size(1)}, per_sample_shape(b)))};
  };
  return kind;
}

// The factor of a scale entry, broadcastable to its input x [B, *shape].
at::Tensor scale_factor(const Node& node, const at::Tensor& x) {
  if (node.attributes.factor) return at::scalar_tensor(*node.attributes.factor, x.options());
  const at::Tensor& factor = node.params[0];
  check_same_dtype_device(x, factor, kOp, "params (scale factor)");
  TORCH_CHECK_VALUE(factor.dim() <= x.dim(), kOp, ": ", where(node), " factor of shape ", factor.sizes(),
                    " would broadcast the input ", x.sizes(), " to a larger rank");
  return factor;
}

// x's factor against x's block [B, R, *shape].
at::Tensor block_factor(const Node& node, const at::Tensor& x) {
  const at::Tensor factor = scale_factor(node, x);
  return factor.dim() == x.dim() ? factor.unsqueeze(1) : factor;  // a batch axis: add the rows axis
}

GraphKind scale_kind() {
  GraphKind kind;
  kind.attribute_names = {"divide", "factor"};
  kind.decode = [](const AttributeText& text, Node& node) -> size_t {
    node.attributes.divide = text.flag("divide");
    node.attributes.factor = text.optional_number("factor");
    return node.attributes.factor ? 0 : 1;
  };
  kind.value = [](const Node& node, const Values& in) {
    const at::Tensor factor = scale_factor(node, in[0]);
    return node.attributes.divide ? in[0] / factor : in[0] * factor;
  };
  kind.forward = value_then_tangent(
      [](const Node& node, const Values& in, const Blocks& tangents, const at::Tensor&) -> std::optional<at::Tensor> {
        const at::Tensor t = explicit_block(tangents[0], in[0]), factor = block_factor(node, in[0]);
        return node.attributes.divide ? t / factor : t * factor;
      });
  kind.reverse = [](const Node& node, const Values& in, const at::Tensor& value, const std::optional<at::Tensor>& g) {
    const at::Tensor block = explicit_block(g, value), factor = block_factor(node, in[0]);
    return Blocks{node.attributes.divide ? block / factor : block * factor};
  };
  return kind;
}

// ---- attention: matrix products of values, softmax over one axis, scaled dot-product attention ----

// Products of a block [B, R, ..., n, k] (rows second) with a factor that has no rows axis: a value [B, ..., k, m]
// (`batched`) or a tensor of params [..., k, m] without the batch axis. einsum folds the rows into the block's
// matrix rows (n, or m on the right), so each is one product per sample and broadcast axis, not one per row;
// the axes between the batch and the matrices broadcast as in matmul.
at::Tensor block_times(const at::Tensor& block, const at::Tensor& factor, bool batched) {
  return at::einsum(batched ? "br...nk,b...km->br...nm" : "br...nk,...km->br...nm", {block, factor});
}

at::Tensor times_block(const at::Tensor& factor, const at::Tensor& block, bool batched) {
  return at::einsum(batched ? "b...nk,br...km->br...nm" : "...nk,br...km->br...nm", {factor, block});
}

// A pulled-back block summed over the axes its value was broadcast along.
at::Tensor summed_to(const at::Tensor& block, const at::Tensor& value) {
  return block.sum_to_size(with_leading({value.size(0), block.size(1)}, per_sample_shape(value)));
}

// The factors of a matmul entry: two values of one rank (>= 3, so that broadcasting keeps their batch axes
// together), or one value and a tensor of params with 2 to rank - 1 axes (it cannot reach the batch axis).
struct Factors {
  at::Tensor left, right;
  bool batched[2];
};

Factors matmul_factors(const Node& node, const Values& in) {
  const Attributes& a = node.attributes;
  Factors f{in[0], in.size() > 1 ? in[1] : at::Tensor(), {true, true}};
  if (a.constant_factor) {
    at::Tensor constant = node.params[0];
    check_same_dtype_device(in[0], constant, kOp, "params (matmul factor)");
    TORCH_CHECK_VALUE(constant.dim() >= 2 && constant.dim() < in[0].dim(), kOp, ": ", where(node),
                      " needs a constant factor with 2 to ", in[0].dim() - 1, " axes for a value of shape ",
                      in[0].sizes(), ", got ", constant.sizes());
    if (a.transpose) constant = constant.transpose(-2, -1);
    (*a.constant_factor == 0 ? f.left : f.right) = constant;
    (*a.constant_factor == 0 ? f.right : f.left) = in[0];
    f.batched[*a.constant_factor] = false;
  }
  for (int i = 0; i < 2; ++i) {
    const at::Tensor& factor = i == 0 ? f.left : f.right;
    TORCH_CHECK_VALUE(!f.batched[i] || factor.dim() >= 3, kOp, ": ", where(node),
                      " needs per-sample matrices (at least 2 axes after the batch), got shape ", factor.sizes());
  }
  TORCH_CHECK_VALUE(!f.batched[0] || !f.batched[1] || f.left.dim() == f.right.dim(), kOp, ": ", where(node),
                    " needs two values of one rank, got shapes ", f.left.sizes(), " and ", f.right.sizes());
  TORCH_CHECK_VALUE(f.left.size(-1) == f.right.size(-2), kOp, ": ", where(node), " cannot multiply ",
                    f.left.sizes(), " by ", f.right.sizes());
  return f;
}

GraphKind matmul_kind() {
  GraphKind kind;
  kind.attribute_names = {"constant", "transpose"};
  kind.inputs = 0;  // two values, or one with a constant factor
  kind.decode = [](const AttributeText& text, Node& node) -> size_t {
    Attributes& a = node.attributes;
    a.constant_factor = text.optional_integer("constant");
    a.transpose = text.has("transpose") && text.flag("transpose");
    TORCH_CHECK_VALUE(!a.constant_factor || *a.constant_factor == 0 || *a.constant_factor == 1, kOp, ": ",
                      where(node), " attribute constant must be 0 (the left factor) or 1 (the right), got ",
                      *a.constant_factor);
    TORCH_CHECK_VALUE(a.constant_factor || !a.transpose, kOp, ": ", where(node),
                      " attribute transpose applies to a constant factor only");
    const size_t values = a.constant_factor ? 1 : 2;
    TORCH_CHECK_VALUE(node.inputs.size() == values, kOp, ": ", where(node), " reads ", node.inputs.size(),
                      " slots, expected ", values);
    return a.constant_factor ? 1 : 0;
  };
  kind.value = [](const Node& node, const Values& in) {
    const Factors f = matmul_factors(node, in);
    return at::matmul(f.left, f.right);
  };
  kind.forward = value_then_tangent(
      [](const Node& node, const Values& in, const Blocks& tangents, const at::Tensor&) -> std::optional<at::Tensor> {
        // T = T_left right + left T_right, each term where that factor is a value (the values in input order).
        const Factors f = matmul_factors(node, in);
        std::optional<at::Tensor> total;
        if (f.batched[0]) total = block_times(explicit_block(tangents[0], in[0]), f.right, f.batched[1]);
        if (f.batched[1]) {
          const size_t i = in.size() - 1;
          const at::Tensor term = times_block(f.left, explicit_block(tangents[i], in[i]), f.batched[0]);
          total = total ? *total + term : term;
        }
        return total;
      });
  kind.reverse = [](const Node& node, const Values& in, const at::Tensor& value, const std::optional<at::Tensor>& g) {
    // G right^T for the left factor, left^T G for the right one, in input order.
    const Factors f = matmul_factors(node, in);
    const at::Tensor block = explicit_block(g, value);
    Blocks pulled;
    if (f.batched[0]) pulled.emplace_back(summed_to(block_times(block, f.right.transpose(-2, -1), f.batched[1]), f.left));
    if (f.batched[1]) pulled.emplace_back(summed_to(times_block(f.left.transpose(-2, -1), block, f.batched[0]), f.right));
    return pulled;
  };
  return kind;
}

// The softmax-family row update (the chain layers' kernel, softmax.cpp: saturation-stable) on a block [B, R, *shape]
// over per-sample axis `axis`, with the probabilities [B, *shape]: every other axis folded into the batch of its
// [N, R, H] rows. The softmax Jacobian is symmetric, so one update serves both sweeps; log-softmax has one per sweep.
at::Tensor softmax_block(const at::Tensor& block, const at::Tensor& probabilities, int64_t axis, SoftmaxVariant variant) {
  const int64_t rows = block.size(1), features = block.size(axis + 2);
  const at::Tensor moved = block.movedim(axis + 2, -1).movedim(1, -2);  // [B, *others, R, H]
  const int64_t folded_batch = c10::multiply_integers(moved.sizes().slice(0, moved.dim() - 2));  // no -1: B may be 0
  const at::Tensor folded = moved.reshape({folded_batch, rows, features});
  const at::Tensor p = probabilities.movedim(axis + 1, -1).reshape({folded_batch, features});
  const at::Tensor updated = softmax_rows(JacobianBlock::per_sample(folded), p, variant).values;
  return updated.view(moved.sizes()).movedim(-2, 1).movedim(-1, axis + 2);
}

// softmax (`log` false) or log_softmax over one per-sample axis of N-d features (attention's scores over the keys).
GraphKind axis_softmax_kind(bool log) {
  GraphKind kind;
  kind.attribute_names = {"dim"};
  kind.decode = [](const AttributeText& text, Node& node) -> size_t {
    node.attributes.dim = text.integer("dim");
    return 0;
  };
  kind.value = [log](const Node& node, const Values& in) {
    const int64_t axis = dim_axis(node, in[0]) + 1;
    return log ? at::log_softmax(in[0], axis) : at::softmax(in[0], axis);
  };
  kind.forward = value_then_tangent([log](const Node& node, const Values& in, const Blocks& tangents,
                                          const at::Tensor& value) -> std::optional<at::Tensor> {
    return softmax_block(explicit_block(tangents[0], in[0]), log ? value.exp() : value, dim_axis(node, in[0]),
                         log ? SoftmaxVariant::LogSoftmaxForward : SoftmaxVariant::Softmax);
  });
  kind.reverse = [log](const Node& node, const Values& in, const at::Tensor& value, const std::optional<at::Tensor>& g) {
    return Blocks{softmax_block(explicit_block(g, value), log ? value.exp() : value, dim_axis(node, in[0]),
                                log ? SoftmaxVariant::LogSoftmaxReverse : SoftmaxVariant::Softmax)};
  };
  return kind;
}

// F.scaled_dot_product_attention(q, k, v) without dropout, as its math reference: p = softmax(q k^T scale + mask),
// out = p v, the mask a tensor of params (boolean: where to attend; else added) and is_causal the lower triangle.
double attention_scale(const Node& node, const at::Tensor& q) {
  return node.attributes.factor.value_or(1.0 / std::sqrt(static_cast<double>(q.size(-1))));
}

at::Tensor attention_probabilities(const Node& node, const Values& in) {
  const at::Tensor &q = in[0], &k = in[1];
  const Attributes& a = node.attributes;
  at::Tensor scores = at::matmul(q, k.transpose(-2, -1)) * attention_scale(node, q);
  const double minus_infinity = -std::numeric_limits<double>::infinity();
  if (a.causal) {
    const at::Tensor keep = at::ones({scores.size(-2), scores.size(-1)}, q.options().dtype(at::kBool)).tril();
    scores = scores.masked_fill(keep.logical_not(), minus_infinity);
  }
  if (a.mask) {
    const at::Tensor& mask = node.params[0];
    TORCH_CHECK_VALUE(mask.device() == q.device(), kOp, ": ", where(node), " needs its mask on ", q.device(),
                      ", got ", mask.device());
    // The mask may not have the batch axis: it is the same for every call, whatever the batch size.
    TORCH_CHECK_VALUE(mask.dim() < scores.dim() || (mask.dim() == scores.dim() && mask.size(0) == 1), kOp, ": ",
                      where(node), " needs a mask without the batch axis (fewer axes than the scores ",
                      scores.sizes(), ", or size 1 there), got ", mask.sizes());
    bool broadcasts = true;
    for (int64_t i = 1; i <= mask.dim(); ++i) {
      broadcasts = broadcasts && (mask.size(-i) == 1 || mask.size(-i) == scores.size(-i));
    }
    TORCH_CHECK_VALUE(broadcasts, kOp, ": ", where(node), " needs a mask that broadcasts to the scores ",
                      scores.sizes(), ", got ", mask.sizes());
    if (mask.scalar_type() == at::kBool) {
      scores = scores.masked_fill(mask.logical_not(), minus_infinity);
    } else {
      check_same_dtype_device(q, mask, kOp, "params (attention mask)");
      scores = scores + mask;
    }
  }
  return at::softmax(scores, -1);
}

// The value from the inputs and the probabilities.
at::Tensor attention_output(const Values& in, const at::Tensor& probabilities) { return at::matmul(probabilities, in[2]); }

// q [B, ..., L, d], k [B, ..., S, d], v [B, ..., S, e]: one rank, one dtype and device, matching sizes.
void check_attention_inputs(const Node& node, const Values& in) {
  const at::Tensor &q = in[0], &k = in[1], &v = in[2];
  for (size_t i = 1; i < 3; ++i) check_same_dtype_device(q, in[i], kOp, "values (attention key and value)");
  TORCH_CHECK_VALUE(q.dim() >= 3 && k.dim() == q.dim() && v.dim() == q.dim() && k.size(-1) == q.size(-1) &&
                        v.size(-2) == k.size(-2),
                    kOp, ": ", where(node), " needs a query [B, ..., L, d], key [B, ..., S, d] and value [B, ..., S, e]",
                    " of one rank >= 3, got shapes ", q.sizes(), ", ", k.sizes(), " and ", v.sizes());
}

Blocks attention_reverse(const Node& node, const Values& in, const at::Tensor& p, const std::optional<at::Tensor>& cotangent) {
  const at::Tensor &q = in[0], &k = in[1], &v = in[2];
  // The lazy identity (the attention's output is the model's) sized by the value.
  const at::Tensor g = cotangent ? *cotangent : explicit_block(std::nullopt, attention_output(in, p));
  const at::Tensor g_p = block_times(g, v.transpose(-2, -1), true);
  const at::Tensor g_scores = softmax_block(g_p, p, p.dim() - 2, SoftmaxVariant::Softmax) * attention_scale(node, q);
  return Blocks{summed_to(block_times(g_scores, k, true), q),
                summed_to(block_times(g_scores.transpose(-2, -1), q, true), k),
                summed_to(times_block(p.transpose(-2, -1), g, true), v)};
}

GraphKind attention_kind() {
  GraphKind kind;
  kind.attribute_names = {"causal", "mask", "scale"};
  kind.inputs = 3;
  kind.decode = [](const AttributeText& text, Node& node) -> size_t {
    Attributes& a = node.attributes;
    a.causal = text.flag("causal");
    a.mask = text.flag("mask");
    a.factor = text.optional_number("scale");
    return a.mask ? 1 : 0;
  };
  kind.value = [](const Node& node, const Values& in) {
    check_attention_inputs(node, in);
    return attention_output(in, attention_probabilities(node, in));
  };
  kind.forward = [](const Node& node, const Values& in, const Blocks& tangents) {
    check_attention_inputs(node, in);
    const at::Tensor &q = in[0], &k = in[1], &v = in[2];
    const at::Tensor p = attention_probabilities(node, in);
    const at::Tensor t_q = explicit_block(tangents[0], q), t_k = explicit_block(tangents[1], k);
    const at::Tensor t_scores =
        (block_times(t_q, k.transpose(-2, -1), true) + times_block(q, t_k.transpose(-2, -1), true)) *
        attention_scale(node, q);
    const at::Tensor t_p = softmax_block(t_scores, p, p.dim() - 2, SoftmaxVariant::Softmax);
    const at::Tensor tangent = block_times(t_p, v, true) + times_block(p, explicit_block(tangents[2], v), true);
    return Forward{attention_output(in, p), tangent};
  };
  // The reverse sweep keeps the probabilities from its value pass instead of recomputing them.
  kind.value_saving = [](const Node& node, const Values& in) {
    check_attention_inputs(node, in);
    at::Tensor p = attention_probabilities(node, in);
    return std::pair<at::Tensor, at::Tensor>{attention_output(in, p), p};
  };
  kind.reverse_saved = [](const Node& node, const Values& in, const at::Tensor& p, const std::optional<at::Tensor>& g) {
    return attention_reverse(node, in, p, g);
  };
  kind.reverse = [](const Node& node, const Values& in, const at::Tensor&, const std::optional<at::Tensor>& g) {
    return attention_reverse(node, in, attention_probabilities(node, in), g);
  };
  return kind;
}

const std::map<std::string, GraphKind>& graph_kinds() {
  static const std::map<std::string, GraphKind> kinds = {
      {"roll", shift_kind(true)},
      {"flip", shift_kind(false)},
      {"pad", pad_kind()},
      {"normalize", normalize_kind()},
      {"einsum", einsum_kind()},
      {"conv", conv_kind()},
      {"batch_norm", batch_norm_kind()},
      {"layer_norm", layer_norm_kind()},
#if __has_include(<ATen/ops/rms_norm.h>)
      {"rms_norm", rms_norm_kind()},
#endif
      {"max_pool2d", max_pool2d_kind()},
      {"avg_pool2d", avg_pool2d_kind()},
      {"adaptive_avg_pool2d", adaptive_avg_pool2d_kind()},
      {"linear_last_axis", linear_last_axis_kind()},
      {"reshape", reshape_kind()},
      {"permute", permute_kind()},
      {"mean", reduction_kind(true)},
      {"sum", reduction_kind(false)},
      {"cat", cat_kind()},
      {"slice", slice_kind()},
      {"gather", selection_kind(true)},
      {"index_select", selection_kind(false)},
      {"add", add_kind()},
      {"mul", product_kind(false)},
      {"div", product_kind(true)},
      {"scale", scale_kind()},
      {"matmul", matmul_kind()},
      {"softmax_axis", axis_softmax_kind(false)},
      {"log_softmax_axis", axis_softmax_kind(true)},
      {"attention", attention_kind()},
  };
  return kinds;
}

}  // namespace

const GraphKind* find_graph_kind(const std::string& kind) {
  const auto found = graph_kinds().find(kind);
  return found == graph_kinds().end() ? nullptr : &found->second;
}

}  // namespace jacext::graph
