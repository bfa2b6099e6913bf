// The graph executor: a whole model of native rules (residual adds, concatenation, convolutions, batch
// norm, pooling, reshapes and permutes, Linear, activations, softmax) as one call of
// jacext::batch_jacobian, in forward or reverse mode, with no Python per node.
//
// Program encoding (schema types only, so TorchScript, torch.export and C++ callers can build it): one
// string per entry, `kind key=value key=value ...`. Entry k writes value slot k + 1; slot 0 is the model
// input; `in=i,j` names the slots an entry reads (default: the previous slot); the last entry is the
// model output. Tensors travel in `params`, consumed in entry order. Kinds and their attributes (lists
// are comma-separated integers, possibly empty; flags 0 or 1; per-sample axes count from 0 after the
// batch axis):
//   linear | linear_no_bias | softmax | log_softmax | <activation>   the chain layers of sequential.cpp
//   conv stride= padding= dilation= groups= bias=                   params weight[, bias]
//   batch_norm eps= weight= bias=                                   params [weight][bias] mean var
//   layer_norm shape= eps= weight= bias=                            params [weight][bias]
//   max_pool2d kernel= stride= padding= dilation= ceil=
//   avg_pool2d kernel= stride= padding= ceil= count_include_pad= [divisor=]
//   adaptive_avg_pool2d size=
//   reshape shape=            permute dims=          mean|sum dims= keepdim=       cat in= dim=
//   slice dim= start= stop= step=                                   basic slicing of one per-sample axis
//   add in= coef= [offset=number] [offset_param=coefficient]       sum of coef_i * in_i (+ constants;
//                                                                   offset_param takes one tensor)
//   mul in=a,b | div in=a,b                                         product / quotient of two values
//   scale divide= (factor=number | one tensor param)                in * factor or in / factor
// A run of chain layers in which each reads the one before, alone, becomes one sweep of the chain
// walkers (pending scales, the masked ReLU kernel), as in a pure chain.
//
// Blocks keep the per-sample shape intact with the rows second: tangents T[b, d, *shape], cotangents
// G[b, c, *shape]. std::nullopt is the lazy identity (the model input in forward mode, the model
// output in reverse mode, and reshapes of them); index maps that need rows materialise it.
#include "jacext/chain_plan.h"
#include "jacext/checks.h"
#include "jacext/graph.h"
#include "jacext/ops.h"

#include <cerrno>
#include <cstdlib>
#include <map>
#include <numeric>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace jacext {
namespace {

constexpr const char* kOp = "jacext::batch_jacobian";

// Graph kinds and the attributes each accepts ("in" is accepted by all).
const std::map<std::string, std::set<std::string>>& graph_kinds() {
  static const std::map<std::string, std::set<std::string>> kinds = {
      {"conv", {"stride", "padding", "dilation", "groups", "bias"}},
      {"batch_norm", {"eps", "weight", "bias"}},
      {"layer_norm", {"shape", "eps", "weight", "bias"}},
      {"max_pool2d", {"kernel", "stride", "padding", "dilation", "ceil"}},
      {"avg_pool2d", {"kernel", "stride", "padding", "ceil", "count_include_pad", "divisor"}},
      {"adaptive_avg_pool2d", {"size"}},
      {"reshape", {"shape"}},
      {"permute", {"dims"}},
      {"mean", {"dims", "keepdim"}},
      {"sum", {"dims", "keepdim"}},
      {"cat", {"dim"}},
      {"slice", {"dim", "start", "stop", "step"}},
      {"add", {"coef", "offset", "offset_param"}},
      {"mul", {}},
      {"div", {}},
      {"scale", {"divide", "factor"}},
  };
  return kinds;
}

bool is_chain_kind(const std::string& kind) { return graph_kinds().count(kind) == 0; }

// One entry of the program, or a run of chain layers fused into one sweep.
struct Node {
  std::string kind;  // a graph kind, or "chain"
  size_t index = 0;  // entry index of its (last) entry, for messages
  std::vector<size_t> inputs;
  std::map<std::string, std::string> attributes;
  std::vector<std::string> chain_layers;  // kind "chain": the layer names
  std::vector<at::Tensor> params;
  size_t slot = 0;  // the value slot it writes
};

std::string where(const Node& node) { return "layers[" + std::to_string(node.index) + "] (" + node.kind + ")"; }

const std::string& attribute(const Node& node, const std::string& key) {
  const auto found = node.attributes.find(key);
  TORCH_CHECK_VALUE(found != node.attributes.end(), kOp, ": ", where(node), " needs the attribute ", key, "=");
  return found->second;
}

bool has(const Node& node, const std::string& key) { return node.attributes.count(key) != 0; }

double number(const Node& node, const std::string& key, const std::string& text) {
  char* end = nullptr;
  errno = 0;
  const double value = std::strtod(text.c_str(), &end);
  TORCH_CHECK_VALUE(!text.empty() && *end == '\0' && errno == 0, kOp, ": ", where(node), " attribute ", key,
                    " must be a number, got '", text, "'");
  return value;
}

double float_attribute(const Node& node, const std::string& key) { return number(node, key, attribute(node, key)); }

std::vector<int64_t> int_list(const Node& node, const std::string& key, const std::string& text) {
  std::vector<int64_t> values;
  size_t start = 0;
  while (start < text.size()) {
    const size_t comma = std::min(text.find(',', start), text.size());
    const std::string part = text.substr(start, comma - start);
    char* end = nullptr;
    const long long value = std::strtoll(part.c_str(), &end, 10);
    TORCH_CHECK_VALUE(!part.empty() && *end == '\0', kOp, ": ", where(node), " attribute ", key,
                      " must be comma-separated integers, got '", text, "'");
    values.push_back(value);
    start = comma + 1;
  }
  return values;
}

std::vector<int64_t> ints(const Node& node, const std::string& key) { return int_list(node, key, attribute(node, key)); }

int64_t int_attribute(const Node& node, const std::string& key) {
  const std::vector<int64_t> values = ints(node, key);
  TORCH_CHECK_VALUE(values.size() == 1, kOp, ": ", where(node), " attribute ", key, " must be one integer, got '",
                    attribute(node, key), "'");
  return values[0];
}

bool flag(const Node& node, const std::string& key) {
  const std::string& text = attribute(node, key);
  TORCH_CHECK_VALUE(text == "0" || text == "1", kOp, ": ", where(node), " attribute ", key, " must be 0 or 1, got '",
                    text, "'");
  return text == "1";
}

// How many tensors of `params` an entry takes.
size_t param_count(const Node& node) {
  const std::string& kind = node.kind;
  if (kind == "linear") return 2;
  if (kind == "linear_no_bias") return 1;
  if (kind == "conv") return 1 + flag(node, "bias");
  if (kind == "batch_norm") return 2 + flag(node, "weight") + flag(node, "bias");
  if (kind == "layer_norm") return flag(node, "weight") + flag(node, "bias");
  if (kind == "add") return has(node, "offset_param") ? 1 : 0;
  if (kind == "scale") return has(node, "factor") ? 0 : 1;
  return 0;
}

size_t input_count(const std::string& kind) {
  if (kind == "mul" || kind == "div") return 2;
  if (kind == "add" || kind == "cat") return 0;  // any number from 1
  return 1;
}

struct Program {
  std::vector<Node> nodes;
  size_t output_slot = 0;
  std::vector<int64_t> readers;  // per slot: how many nodes read it
};

// Decodes the entries into nodes (fusing chain runs) and checks every reference and count.
Program parse_program(c10::ArrayRef<std::string> layers, const LayerParams& params) {
  std::vector<Node> entries;
  size_t next_param = 0;
  for (size_t i = 0; i < layers.size(); ++i) {
    Node node;
    node.index = i;
    node.slot = i + 1;
    const std::string& text = layers[i];
    size_t start = 0;
    bool first = true;
    while (start <= text.size()) {
      const size_t space = std::min(text.find(' ', start), text.size());
      const std::string token = text.substr(start, space - start);
      start = space + 1;
      if (token.empty()) {
        if (space == text.size()) break;
        continue;
      }
      if (first) {
        node.kind = token;
        first = false;
        continue;
      }
      const size_t equals = token.find('=');
      TORCH_CHECK_VALUE(equals != std::string::npos, kOp, ": layers[", i, "] ('", text,
                        "'): attributes are key=value, got '", token, "'");
      node.attributes[token.substr(0, equals)] = token.substr(equals + 1);
    }
    TORCH_CHECK_VALUE(!node.kind.empty(), kOp, ": layers[", i, "] is empty");
    if (is_chain_kind(node.kind)) {
      if (node.kind != "linear" && node.kind != "linear_no_bias" && node.kind != "softmax" &&
          node.kind != "log_softmax") {
        const std::string arg = "layers[" + std::to_string(i) + "] (" + kLayerEntryKinds + ")";
        activation_from_name(node.kind, kOp, arg.c_str());  // throws for an unknown kind
      }
      for (const auto& [key, value] : node.attributes) {
        TORCH_CHECK_VALUE(key == "in", kOp, ": ", where(node), " takes no attribute ", key, " (only in=)");
      }
      node.chain_layers = {node.kind};
    } else {
      const auto& accepted = graph_kinds().at(node.kind);
      for (const auto& [key, value] : node.attributes) {
        TORCH_CHECK_VALUE(key == "in" || accepted.count(key), kOp, ": ", where(node), " takes no attribute ", key);
      }
    }
    if (has(node, "in")) {
      for (int64_t slot : ints(node, "in")) {
        TORCH_CHECK_VALUE(slot >= 0 && static_cast<size_t>(slot) <= i, kOp, ": ", where(node),
                          " reads slot ", slot, " but only slots 0 (the input) to ", i, " are written before it");
        node.inputs.push_back(static_cast<size_t>(slot));
      }
      node.attributes.erase("in");
    } else {
      node.inputs = {i};
    }
    const size_t expected = input_count(node.kind);
    TORCH_CHECK_VALUE(expected == 0 ? !node.inputs.empty() : node.inputs.size() == expected, kOp, ": ", where(node),
                      " reads ", node.inputs.size(), " slots, expected ", expected == 0 ? "at least 1" : std::to_string(expected));
    const size_t count = param_count(node);
    TORCH_CHECK_VALUE(next_param + count <= params.size(), kOp, ": ", where(node), " takes ", count,
                      " tensors of params but only ", params.size() - next_param, " are left");
    node.params.assign(params.begin() + next_param, params.begin() + next_param + count);
    next_param += count;
    entries.push_back(std::move(node));
  }
  TORCH_CHECK_VALUE(next_param == params.size(), kOp, ": params has ", params.size(), " tensors but the layers take ",
                    next_param);

  Program program;
  program.readers.assign(layers.size() + 1, 0);
  for (const Node& node : entries) {
    for (size_t slot : node.inputs) ++program.readers[slot];
  }
  for (Node& node : entries) {
    // A chain layer that alone reads the previous chain run's output joins that run.
    if (node.kind != "chain" && is_chain_kind(node.kind) && !program.nodes.empty()) {
      Node& last = program.nodes.back();
      if (last.kind == "chain" && node.inputs.size() == 1 && node.inputs[0] == last.slot &&
          program.readers[last.slot] == 1) {
        last.chain_layers.push_back(node.kind);
        last.params.insert(last.params.end(), node.params.begin(), node.params.end());
        last.slot = node.slot;
        last.index = node.index;
        continue;
      }
    }
    if (is_chain_kind(node.kind)) node.kind = "chain";
    program.nodes.push_back(std::move(node));
  }
  program.output_slot = layers.size();
  return program;
}

std::vector<int64_t> per_sample_shape(const at::Tensor& value) { return value.sizes().slice(1).vec(); }

// [B, *shape] with shape after a leading size (the batch or rows axis).
std::vector<int64_t> with_leading(std::initializer_list<int64_t> leading, at::IntArrayRef shape) {
  std::vector<int64_t> sizes(leading);
  sizes.insert(sizes.end(), shape.begin(), shape.end());
  return sizes;
}

// The identity block of a value [B, *shape]: eye(R) as [B, R, *shape] (one copy, expanded over the batch).
at::Tensor identity_block(const at::Tensor& value) {
  const std::vector<int64_t> shape = per_sample_shape(value);
  const int64_t rows = c10::multiply_integers(shape);
  return at::eye(rows, value.options()).view(with_leading({1, rows}, shape)).expand(with_leading({value.size(0), rows}, shape));
}

at::Tensor explicit_block(const std::optional<at::Tensor>& block, const at::Tensor& value) {
  return block ? *block : identity_block(value);
}

// A chain block as [B, R, *shape]: Shared blocks expand over the batch.
at::Tensor block_tensor(const JacobianBlock& block, int64_t batch, int64_t features, const at::TensorOptions& options,
                        at::IntArrayRef shape) {
  at::Tensor values = block.kind == JacobianBlock::Kind::Shared
                          ? block.values.unsqueeze(0).expand({batch, block.values.size(0), block.values.size(1)})
                          : block.dense(batch, features, options);
  return values.reshape(with_leading({batch, values.size(1)}, shape));
}

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

// ---- chain runs ----

struct ChainRun {
  at::Tensor flat;  // the input as [B, H]
  std::vector<Layer> plan;
  std::vector<int64_t> out_shape;
};

ChainRun chain_run(const Node& node, const at::Tensor& x) {
  const int64_t batch = x.size(0);
  ChainRun run;
  run.flat = x.reshape({batch, c10::multiply_integers(x.sizes().slice(1))});
  run.plan = parse_plan(run.flat, node.chain_layers, node.params, kOp);
  const bool pointwise = std::all_of(run.plan.begin(), run.plan.end(),
                                     [](const Layer& layer) { return layer.type == Layer::Type::Activation; });
  TORCH_CHECK_VALUE(pointwise || x.dim() == 2, kOp, ": ", where(node),
                    " (a run of chain layers with a Linear or softmax) needs a [B, H] input, got ", x.sizes());
  run.out_shape = pointwise ? per_sample_shape(x) : std::vector<int64_t>{};
  return run;
}

at::Tensor chain_output(const ChainRun& run, const at::Tensor& output) {
  return run.out_shape.empty() ? output : output.reshape(with_leading({output.size(0)}, run.out_shape));
}

// ---- values (the value pass of reverse mode, and index maps in forward mode) ----

std::vector<double> add_coefficients(const Node& node, size_t inputs) {
  const std::string& text = attribute(node, "coef");
  std::vector<double> coef;
  size_t start = 0;
  while (start <= text.size()) {
    const size_t comma = std::min(text.find(',', start), text.size());
    coef.push_back(number(node, "coef", text.substr(start, comma - start)));
    start = comma + 1;
  }
  TORCH_CHECK_VALUE(coef.size() == inputs, kOp, ": ", where(node), " has ", coef.size(), " coefficients for ",
                    inputs, " inputs");
  return coef;
}

at::Tensor add_value(const Node& node, const std::vector<at::Tensor>& inputs) {
  const std::vector<double> coef = add_coefficients(node, inputs.size());
  at::Tensor total;
  for (size_t i = 0; i < inputs.size(); ++i) {
    at::Tensor term = coef[i] == 1 ? inputs[i] : inputs[i] * coef[i];
    total = total.defined() ? total + term : term;
  }
  if (has(node, "offset")) total = total + float_attribute(node, "offset");
  if (has(node, "offset_param")) {
    check_same_dtype_device(inputs[0], node.params[0], kOp, "params (add offset)");
    total = total + node.params[0] * float_attribute(node, "offset_param");
  }
  return total;
}

// The factor of a scale entry, broadcastable to the block [B, R, *shape] of an input of rank `rank`.
at::Tensor scale_factor(const Node& node, const at::Tensor& x) {
  if (has(node, "factor")) return at::scalar_tensor(float_attribute(node, "factor"), x.options());
  const at::Tensor& factor = node.params[0];
  check_same_dtype_device(x, factor, kOp, "params (scale factor)");
  TORCH_CHECK_VALUE(factor.dim() <= x.dim(), kOp, ": ", where(node), " factor of shape ", factor.sizes(),
                    " would broadcast the input ", x.sizes(), " to a larger rank");
  return factor;
}

at::Tensor block_factor(const at::Tensor& factor, const at::Tensor& x) {
  return factor.dim() == x.dim() ? factor.unsqueeze(1) : factor;  // a batch axis: add the rows axis
}

at::Tensor reshape_value(const Node& node, const at::Tensor& x) {
  const std::vector<int64_t> shape = ints(node, "shape");
  TORCH_CHECK_VALUE(c10::multiply_integers(shape) == c10::multiply_integers(x.sizes().slice(1)), kOp, ": ",
                    where(node), " cannot reshape per-sample shape ", x.sizes().slice(1), " to ", shape);
  return x.reshape(with_leading({x.size(0)}, shape));
}

std::vector<int64_t> permutation(const Node& node, const at::Tensor& x) {
  const std::vector<int64_t> dims = sample_axes(node, ints(node, "dims"), x.dim() - 1);
  std::vector<int64_t> sorted = dims;
  std::sort(sorted.begin(), sorted.end());
  std::vector<int64_t> expected(x.dim() - 1);
  std::iota(expected.begin(), expected.end(), 0);
  TORCH_CHECK_VALUE(sorted == expected, kOp, ": ", where(node), " dims must be a permutation of the ", x.dim() - 1,
                    " per-sample axes, got ", dims);
  return dims;
}

std::vector<int64_t> reduced_axes(const Node& node, const at::Tensor& x) {
  return sample_axes(node, ints(node, "dims"), x.dim() - 1);
}

int64_t dim_axis(const Node& node, const at::Tensor& x) {
  return sample_axes(node, {int_attribute(node, "dim")}, x.dim() - 1)[0];
}

struct Slice {
  int64_t axis, start, stop, step;
};

// A slice entry's bounds, checked against the input (Python's slice.indices has resolved them already).
Slice slice_of(const Node& node, const at::Tensor& x) {
  const Slice cut{dim_axis(node, x), int_attribute(node, "start"), int_attribute(node, "stop"), int_attribute(node, "step")};
  const int64_t size = x.size(cut.axis + 1);
  TORCH_CHECK_VALUE(cut.step >= 1 && 0 <= cut.start && cut.start <= cut.stop && cut.stop <= size, kOp, ": ", where(node),
                    " needs 0 <= start <= stop <= ", size, " and step >= 1, got start=", cut.start, " stop=", cut.stop,
                    " step=", cut.step);
  return cut;
}

at::Tensor index_map_value(const Node& node, const std::vector<at::Tensor>& in) {
  const std::string& kind = node.kind;
  const at::Tensor& x = in[0];
  if (kind == "reshape") return reshape_value(node, x);
  if (kind == "permute") return x.permute(with_leading({0}, shifted(permutation(node, x), 1)));
  if (kind == "mean" || kind == "sum") {
    const std::vector<int64_t> axes = shifted(reduced_axes(node, x), 1);
    return kind == "mean" ? x.mean(axes, flag(node, "keepdim")) : x.sum(axes, flag(node, "keepdim"));
  }
  if (kind == "cat") return at::cat(in, dim_axis(node, x) + 1);
  if (kind == "slice") {
    const Slice cut = slice_of(node, x);
    return x.slice(cut.axis + 1, cut.start, cut.stop, cut.step);
  }
  if (kind == "add") return add_value(node, in);
  if (kind == "mul") return in[0] * in[1];
  if (kind == "div") return in[0] / in[1];
  if (kind == "scale") {
    const at::Tensor factor = scale_factor(node, x);
    return flag(node, "divide") ? x / factor : x * factor;
  }
  TORCH_INTERNAL_ASSERT(false, "not an index map: ", kind);
}

bool is_layer_kind(const std::string& kind) {
  return kind == "conv" || kind == "batch_norm" || kind == "layer_norm" || kind == "max_pool2d" ||
         kind == "avg_pool2d" || kind == "adaptive_avg_pool2d";
}

// Optional weight/bias tensors of batch_norm and layer_norm, in params order, and the rest.
struct Affine {
  std::optional<at::Tensor> weight, bias;
  size_t next = 0;
};

Affine affine(const Node& node) {
  Affine result;
  if (flag(node, "weight")) result.weight = node.params[result.next++];
  if (flag(node, "bias")) result.bias = node.params[result.next++];
  return result;
}

std::optional<int64_t> divisor(const Node& node) {
  return has(node, "divisor") ? std::optional<int64_t>(int_attribute(node, "divisor")) : std::nullopt;
}

std::optional<at::Tensor> conv_bias(const Node& node) {
  return flag(node, "bias") ? std::optional<at::Tensor>(node.params[1]) : std::nullopt;
}

// The value of a layer kind with ATen (reverse mode's value pass).
at::Tensor layer_value(const Node& node, const at::Tensor& x) {
  const std::string& kind = node.kind;
  if (kind == "conv") {
    const at::Tensor& weight = node.params[0];
    check_same_dtype_device(x, weight, kOp, "params (conv weight)");
    return conv_value(x, weight, conv_bias(node), ints(node, "stride"), ints(node, "padding"), ints(node, "dilation"),
                      int_attribute(node, "groups"));
  }
  if (kind == "batch_norm") {
    const Affine a = affine(node);
    return at::batch_norm(x, a.weight, a.bias, node.params[a.next], node.params[a.next + 1], false, 0.0,
                          float_attribute(node, "eps"), true);
  }
  if (kind == "layer_norm") {
    const Affine a = affine(node);
    return at::layer_norm(x, ints(node, "shape"), a.weight, a.bias, float_attribute(node, "eps"));
  }
  if (kind == "max_pool2d") {
    return at::max_pool2d(x, ints(node, "kernel"), ints(node, "stride"), ints(node, "padding"), ints(node, "dilation"),
                          flag(node, "ceil"));
  }
  if (kind == "avg_pool2d") {
    return at::avg_pool2d(x, ints(node, "kernel"), ints(node, "stride"), ints(node, "padding"), flag(node, "ceil"),
                          flag(node, "count_include_pad"), divisor(node));
  }
  if (kind == "adaptive_avg_pool2d") return at::adaptive_avg_pool2d(x, ints(node, "size"));
  TORCH_INTERNAL_ASSERT(false, "not a layer kind: ", kind);
}

// Forward rule of a layer kind: (value, tangent) through the per-layer op. `jac` is [B, *in, D] or nullopt.
std::tuple<at::Tensor, at::Tensor> layer_forward(const Node& node, const at::Tensor& x,
                                                 const std::optional<at::Tensor>& jac) {
  const std::string& kind = node.kind;
  if (kind == "conv") {
    return conv_jac_forward(x, jac, node.params[0], conv_bias(node), ints(node, "stride"), ints(node, "padding"),
                            ints(node, "dilation"), int_attribute(node, "groups"));
  }
  if (kind == "batch_norm") {
    const Affine a = affine(node);
    return batch_norm_jac_forward(x, jac, a.weight, a.bias, node.params[a.next], node.params[a.next + 1],
                                  float_attribute(node, "eps"));
  }
  if (kind == "layer_norm") {
    const Affine a = affine(node);
    return layer_norm_jac_forward(x, jac, ints(node, "shape"), a.weight, a.bias, float_attribute(node, "eps"));
  }
  if (kind == "max_pool2d") {
    return max_pool2d_jac_forward(x, jac, ints(node, "kernel"), ints(node, "stride"), ints(node, "padding"),
                                  ints(node, "dilation"), flag(node, "ceil"));
  }
  if (kind == "avg_pool2d") {
    return avg_pool2d_jac_forward(x, jac, ints(node, "kernel"), ints(node, "stride"), ints(node, "padding"),
                                  flag(node, "ceil"), flag(node, "count_include_pad"), divisor(node));
  }
  return adaptive_avg_pool2d_jac_forward(x, jac, ints(node, "size"));
}

// Reverse rule of a layer kind: the input's cotangent [B, C, *in] from the output's ([B, C, *out] or nullopt).
at::Tensor layer_reverse(const Node& node, const at::Tensor& x, const std::optional<at::Tensor>& cotangent) {
  const std::string& kind = node.kind;
  if (kind == "conv") {
    return conv_jac_reverse(x, cotangent, node.params[0], ints(node, "stride"), ints(node, "padding"),
                            ints(node, "dilation"), int_attribute(node, "groups"));
  }
  if (kind == "batch_norm") {
    const Affine a = affine(node);
    return batch_norm_jac_reverse(x, cotangent, a.weight, node.params[a.next + 1], float_attribute(node, "eps"));
  }
  if (kind == "layer_norm") {
    const Affine a = affine(node);
    return layer_norm_jac_reverse(x, cotangent, ints(node, "shape"), a.weight, float_attribute(node, "eps"));
  }
  if (kind == "max_pool2d") {
    return max_pool2d_jac_reverse(x, cotangent, ints(node, "kernel"), ints(node, "stride"), ints(node, "padding"),
                                  ints(node, "dilation"), flag(node, "ceil"));
  }
  if (kind == "avg_pool2d") {
    return avg_pool2d_jac_reverse(x, cotangent, ints(node, "kernel"), ints(node, "stride"), ints(node, "padding"),
                                  flag(node, "ceil"), flag(node, "count_include_pad"), divisor(node));
  }
  return adaptive_avg_pool2d_jac_reverse(x, cotangent, ints(node, "size"));
}

// ---- forward mode ----

// Tangent of an index map from its inputs' values and tangents (nullopt: identity over that input).
std::optional<at::Tensor> index_map_forward(const Node& node, const std::vector<at::Tensor>& in,
                                            const std::vector<std::optional<at::Tensor>>& tangents,
                                            const at::Tensor& value) {
  const std::string& kind = node.kind;
  const at::Tensor& x = in[0];
  if (kind == "reshape") {
    if (!tangents[0]) return std::nullopt;  // a reshape of the identity is the identity of the new shape
    return tangents[0]->reshape(with_leading({x.size(0), tangents[0]->size(1)}, per_sample_shape(value)));
  }
  const at::Tensor t = explicit_block(tangents[0], x);
  const int64_t batch = x.size(0), rows = t.size(1);
  if (kind == "permute") return t.permute(with_leading({0, 1}, shifted(permutation(node, x), 2)));
  if (kind == "slice") {
    const Slice cut = slice_of(node, x);
    return t.slice(cut.axis + 2, cut.start, cut.stop, cut.step);
  }
  if (kind == "mean" || kind == "sum") {
    const std::vector<int64_t> axes = shifted(reduced_axes(node, x), 2);
    const at::Tensor reduced = kind == "mean" ? t.mean(axes, true) : t.sum(axes, true);
    return reduced.reshape(with_leading({batch, rows}, per_sample_shape(value)));
  }
  if (kind == "cat") {
    std::vector<at::Tensor> blocks;
    for (size_t i = 0; i < in.size(); ++i) blocks.push_back(explicit_block(tangents[i], in[i]));
    return at::cat(blocks, dim_axis(node, x) + 2);
  }
  if (kind == "add") {
    const std::vector<double> coef = add_coefficients(node, in.size());
    at::Tensor total;
    for (size_t i = 0; i < in.size(); ++i) {
      const at::Tensor block = i == 0 ? t : explicit_block(tangents[i], in[i]);
      const at::Tensor term = coef[i] == 1 ? block : block * coef[i];
      total = total.defined() ? total + term : term;
    }
    return total;
  }
  if (kind == "mul" || kind == "div") {
    const at::Tensor& a = in[0];
    const at::Tensor& b = in[1];
    const at::Tensor ta = t, tb = explicit_block(tangents[1], b);
    const at::Tensor total = kind == "mul" ? ta * b.unsqueeze(1) + tb * a.unsqueeze(1)
                                           : ta / b.unsqueeze(1) - tb * (a / (b * b)).unsqueeze(1);
    return total.expand(with_leading({batch, rows}, per_sample_shape(value)));
  }
  // scale
  const at::Tensor factor = block_factor(scale_factor(node, x), x);
  return flag(node, "divide") ? t / factor : t * factor;
}

struct ForwardResult {
  at::Tensor output;
  std::optional<at::Tensor> tangent;  // [B, D, *out] or nullopt (the output is a reshape of the input)
};

ForwardResult run_forward(const Program& program, const at::Tensor& input) {
  const size_t slots = program.readers.size();
  std::vector<at::Tensor> values(slots);
  std::vector<std::optional<at::Tensor>> tangents(slots);
  std::vector<int64_t> pending = program.readers;  // reads left per slot, to free values after their last use
  values[0] = input;
  for (const Node& node : program.nodes) {
    std::vector<at::Tensor> in;
    std::vector<std::optional<at::Tensor>> in_tangents;
    for (size_t slot : node.inputs) {
      in.push_back(values[slot]);
      in_tangents.push_back(tangents[slot]);
    }
    const at::Tensor& x = in[0];
    at::Tensor value;
    std::optional<at::Tensor> tangent;
    if (node.kind == "chain") {
      const ChainRun run = chain_run(node, x);
      const int64_t batch = x.size(0), features = run.flat.size(1);
      JacobianBlock block = in_tangents[0]
                                ? JacobianBlock::per_sample(in_tangents[0]->reshape({batch, in_tangents[0]->size(1), features}).contiguous())
                                : JacobianBlock::identity();
      SweepResult result = forward_sweep(run.flat, std::move(block), run.plan);
      value = chain_output(run, result.output);
      tangent = block_tensor(result.block, batch, result.output.size(1), x.options(), per_sample_shape(value));
    } else if (is_layer_kind(node.kind)) {
      const std::optional<at::Tensor> jac =
          in_tangents[0] ? std::optional<at::Tensor>(in_tangents[0]->movedim(1, -1)) : std::nullopt;
      at::Tensor jac_out;
      std::tie(value, jac_out) = layer_forward(node, x, jac);
      tangent = jac_out.movedim(-1, 1);
    } else {
      value = index_map_value(node, in);
      tangent = index_map_forward(node, in, in_tangents, value);
    }
    for (size_t slot : node.inputs) {
      if (--pending[slot] == 0 && slot != 0) {
        values[slot] = at::Tensor();
        tangents[slot].reset();
      }
    }
    values[node.slot] = std::move(value);
    tangents[node.slot] = std::move(tangent);
  }
  return {values[program.output_slot], tangents[program.output_slot]};
}

// ---- reverse mode ----

void accumulate(std::vector<std::optional<at::Tensor>>& store, std::vector<bool>& reached, size_t slot,
                std::optional<at::Tensor> contribution, const at::Tensor& value) {
  if (!reached[slot]) {
    store[slot] = std::move(contribution);
    reached[slot] = true;
    return;
  }
  store[slot] = explicit_block(store[slot], value) + explicit_block(contribution, value);
}

// Input cotangents of an index map from its output's cotangent.
std::vector<std::optional<at::Tensor>> index_map_reverse(const Node& node, const std::vector<at::Tensor>& in,
                                                         const at::Tensor& value,
                                                         const std::optional<at::Tensor>& cotangent) {
  const std::string& kind = node.kind;
  const at::Tensor& x = in[0];
  if (kind == "reshape") {
    if (!cotangent) return {std::nullopt};
    return {cotangent->reshape(with_leading({x.size(0), cotangent->size(1)}, per_sample_shape(x)))};
  }
  if (kind == "add") {
    const std::vector<double> coef = add_coefficients(node, in.size());
    std::vector<std::optional<at::Tensor>> pulled;
    for (double c : coef) {
      pulled.push_back(c == 1 ? cotangent : std::optional<at::Tensor>(explicit_block(cotangent, value) * c));
    }
    return pulled;
  }
  const at::Tensor g = explicit_block(cotangent, value);
  const int64_t batch = x.size(0), rows = g.size(1);
  if (kind == "permute") {
    const std::vector<int64_t> dims = permutation(node, x);
    std::vector<int64_t> inverse(dims.size() + 2);
    inverse[0] = 0;
    inverse[1] = 1;
    for (size_t i = 0; i < dims.size(); ++i) inverse[dims[i] + 2] = static_cast<int64_t>(i) + 2;
    return {g.permute(inverse)};
  }
  if (kind == "mean" || kind == "sum") {
    const std::vector<int64_t> axes = reduced_axes(node, x);
    std::vector<int64_t> kept{batch, rows};
    int64_t count = 1;
    for (int64_t axis = 0; axis < x.dim() - 1; ++axis) {
      const bool reduced = std::find(axes.begin(), axes.end(), axis) != axes.end();
      kept.push_back(reduced ? 1 : x.size(axis + 1));
      if (reduced) count *= x.size(axis + 1);
    }
    at::Tensor spread = g.reshape(kept).expand(with_leading({batch, rows}, per_sample_shape(x)));
    return {kind == "mean" ? spread / static_cast<double>(count) : spread};
  }
  if (kind == "slice") {  // the cotangent written into zeros of the input's block
    const Slice cut = slice_of(node, x);
    at::Tensor pulled = at::zeros(with_leading({batch, rows}, per_sample_shape(x)), g.options());
    pulled.slice(cut.axis + 2, cut.start, cut.stop, cut.step).copy_(g);
    return {pulled};
  }
  if (kind == "cat") {
    const int64_t axis = dim_axis(node, x);
    std::vector<int64_t> sizes;
    for (const at::Tensor& part : in) sizes.push_back(part.size(axis + 1));
    std::vector<std::optional<at::Tensor>> pulled;
    for (const at::Tensor& piece : g.split_with_sizes(sizes, axis + 2)) pulled.emplace_back(piece);
    return pulled;
  }
  if (kind == "mul" || kind == "div") {
    const at::Tensor& a = in[0];
    const at::Tensor& b = in[1];
    const at::Tensor da = kind == "mul" ? g * b.unsqueeze(1) : g / b.unsqueeze(1);
    const at::Tensor db = kind == "mul" ? g * a.unsqueeze(1) : -(g * (a / (b * b)).unsqueeze(1));
    return {da.sum_to_size(with_leading({batch, rows}, per_sample_shape(a))),
            db.sum_to_size(with_leading({batch, rows}, per_sample_shape(b)))};
  }
  // scale
  const at::Tensor factor = block_factor(scale_factor(node, x), x);
  return {flag(node, "divide") ? g / factor : g * factor};
}

struct ReverseResult {
  at::Tensor output;
  std::optional<at::Tensor> cotangent;  // [B, C, *in] or nullopt (the input is a reshape of the output)
  bool reached = false;                 // whether the output depends on the input at all
};

ReverseResult run_reverse(const Program& program, const at::Tensor& input) {
  const size_t slots = program.readers.size();
  std::vector<at::Tensor> values(slots);
  // Chain runs: decoded once in the value pass, with forward_with_factors's factors, for the pull-back.
  std::vector<std::optional<ChainRun>> runs(program.nodes.size());
  std::vector<std::vector<at::Tensor>> factors(program.nodes.size());
  values[0] = input;
  for (size_t n = 0; n < program.nodes.size(); ++n) {
    const Node& node = program.nodes[n];
    std::vector<at::Tensor> in;
    for (size_t slot : node.inputs) in.push_back(values[slot]);
    if (node.kind == "chain") {
      const ChainRun& run = runs[n].emplace(chain_run(node, in[0]));
      at::Tensor output;
      std::tie(output, factors[n]) = forward_with_factors(run.flat, run.plan);
      values[node.slot] = chain_output(run, output);
    } else if (is_layer_kind(node.kind)) {
      values[node.slot] = layer_value(node, in[0]);
    } else {
      values[node.slot] = index_map_value(node, in);
    }
  }

  std::vector<std::optional<at::Tensor>> cotangents(slots);
  std::vector<bool> reached(slots, false);
  reached[program.output_slot] = true;  // the identity
  for (size_t n = program.nodes.size(); n-- > 0;) {
    const Node& node = program.nodes[n];
    if (!reached[node.slot]) continue;
    const std::optional<at::Tensor> cotangent = std::exchange(cotangents[node.slot], std::nullopt);
    std::vector<at::Tensor> in;
    for (size_t slot : node.inputs) in.push_back(values[slot]);
    const at::Tensor& x = in[0];
    std::vector<std::optional<at::Tensor>> pulled;
    if (node.kind == "chain") {
      const ChainRun& run = *runs[n];
      const int64_t batch = x.size(0), features = run.flat.size(1);
      const at::Tensor& value = values[node.slot];
      const int64_t out_features = c10::multiply_integers(value.sizes().slice(1));
      JacobianBlock block =
          cotangent ? JacobianBlock::per_sample(cotangent->reshape({batch, cotangent->size(1), out_features}).contiguous())
                    : JacobianBlock::identity();
      JacobianBlock result = reverse_sweep(std::move(block), run.plan, factors[n]);
      pulled.emplace_back(block_tensor(result, batch, features, x.options(), per_sample_shape(x)));
    } else if (is_layer_kind(node.kind)) {
      pulled.emplace_back(layer_reverse(node, x, cotangent));
    } else {
      pulled = index_map_reverse(node, in, values[node.slot], cotangent);
    }
    for (size_t i = 0; i < node.inputs.size(); ++i) {
      accumulate(cotangents, reached, node.inputs[i], std::move(pulled[i]), values[node.inputs[i]]);
    }
  }
  return {values[program.output_slot], cotangents[0], reached[0]};
}

}  // namespace

bool is_graph_program(c10::ArrayRef<std::string> layers) {
  for (const std::string& entry : layers) {
    if (entry.find(' ') != std::string::npos || !is_chain_kind(entry)) return true;
  }
  return false;
}

std::tuple<at::Tensor, at::Tensor> graph_jacobian(const at::Tensor& input, c10::ArrayRef<std::string> layers,
                                                  const LayerParams& params, bool reverse) {
  check_floating_tensor(input, kOp, "input");
  TORCH_CHECK_VALUE(!layers.empty(), kOp, ": layers must hold at least one entry");
  const Program program = parse_program(layers, params);
  const int64_t batch = input.size(0);
  const int64_t in_features = c10::multiply_integers(input.sizes().slice(1));
  at::Tensor output, jacobian;  // jacobian: [B, C, D]
  if (reverse) {
    ReverseResult result = run_reverse(program, input);
    output = result.output;
    const int64_t out_features = c10::multiply_integers(output.sizes().slice(1));
    if (!result.reached) {
      jacobian = at::zeros({batch, out_features, in_features}, input.options());
    } else if (!result.cotangent) {  // the output is a reshape of the input
      jacobian = at::eye(in_features, input.options()).expand({batch, in_features, in_features});
    } else {
      jacobian = result.cotangent->reshape({batch, out_features, in_features});
    }
  } else {
    ForwardResult result = run_forward(program, input);
    output = result.output;
    const int64_t out_features = c10::multiply_integers(output.sizes().slice(1));
    jacobian = result.tangent ? result.tangent->reshape({batch, in_features, out_features}).transpose(1, 2)
                              : at::eye(in_features, input.options()).expand({batch, in_features, in_features});
  }
  // Operator outputs are fresh memory: never a view of the input, a weight or an expanded block.
  output = output.reshape({batch, c10::multiply_integers(output.sizes().slice(1))});
  const auto fresh = [&](const at::Tensor& result) {
    bool aliased = result.is_alias_of(input);
    for (const at::Tensor& param : params) aliased = aliased || result.is_alias_of(param);
    return aliased || !result.is_contiguous() ? result.clone(at::MemoryFormat::Contiguous) : result;
  };
  output = fresh(output);
  jacobian = fresh(jacobian);
  return {output, jacobian};
}

}  // namespace jacext
