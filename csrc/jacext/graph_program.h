// A graph program as the executor (graph.cpp) runs it: its entries decoded once per call
// (graph_program.cpp) and the rule of each graph kind, one table entry per kind (graph_kinds.cpp).
// The grammar is in graph.cpp's header.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "jacext/ops.h"

namespace jacext::graph {

inline constexpr const char* kOp = "jacext::batch_jacobian";

// An entry's attributes, decoded from their text where the program is read, so that no rule parses a
// string while it runs. Each kind's decoder sets the fields its grammar line names.
struct Attributes {
  std::vector<int64_t> stride, padding, dilation, kernel, size, shape, dims;
  std::vector<double> coef;
  int64_t groups = 1, dim = 0, start = 0, stop = 0, step = 1;
  std::optional<int64_t> divisor;
  std::optional<double> offset, offset_param, factor;
  double eps = 0;
  bool dtype_eps = false;  // rms_norm without eps=: the epsilon of the input's dtype, as at::rms_norm
  bool weight = false, bias = false, ceil = false, count_include_pad = false, keepdim = false, divide = false;
  // roll, pad, einsum; cat and einsum: per operand, 1 where it is a tensor of params (constants=)
  std::vector<int64_t> shifts, pad, constants;
  double pad_value = 0;
  std::string equation;
  // matmul: which factor is a tensor of params (0 left, 1 right; none: both are values), and whether it is used
  // transposed; attention: is_causal, and whether a mask travels in params (its scale in `factor`)
  std::optional<int64_t> constant_factor;
  bool transpose = false, causal = false, mask = false;
};

struct GraphKind;

// One entry of the program, or a run of chain layers fused into one sweep.
struct Node {
  std::string kind;                 // a graph kind, or "chain"
  const GraphKind* rule = nullptr;  // the graph kind's rule; nullptr for a chain run
  size_t index = 0;                 // entry index of its (last) entry, for messages
  std::vector<size_t> inputs;       // the value slots it reads
  Attributes attributes;
  std::vector<std::string> chain_layers;  // kind "chain": the layer names
  std::vector<at::Tensor> params;
  size_t slot = 0;  // the value slot it writes
};

// "layers[i] (kind)", for messages.
std::string where(const Node& node);

// The key=value text of one entry, read with messages that name the entry.
class AttributeText {
 public:
  AttributeText(const std::map<std::string, std::string>& text, const Node& node) : text_(text), node_(node) {}
  bool has(const std::string& key) const { return text_.count(key) != 0; }
  std::vector<int64_t> ints(const std::string& key) const;  // comma-separated, possibly none
  int64_t integer(const std::string& key) const;
  std::vector<double> numbers(const std::string& key) const;  // comma-separated, possibly none
  double number(const std::string& key) const;
  bool flag(const std::string& key) const;  // 0 or 1
  std::optional<int64_t> optional_integer(const std::string& key) const;
  std::optional<double> optional_number(const std::string& key) const;
  const std::string& word(const std::string& key) const { return text(key); }  // the text as it is

 private:
  const std::string& text(const std::string& key) const;
  const std::map<std::string, std::string>& text_;
  const Node& node_;
};

using Values = std::vector<at::Tensor>;
// Per input of a node: its tangent block [B, D, *shape] (forward) or cotangent block [B, C, *shape]
// (reverse), or std::nullopt, the lazy identity.
using Blocks = std::vector<std::optional<at::Tensor>>;

// Everything the program knows about one graph kind.
struct GraphKind {
  std::set<std::string> attribute_names;  // accepted besides in=
  size_t inputs = 1;                      // slots it reads; 0: any number from 1
  // Reads the entry's attributes into node.attributes (node.inputs is set); returns how many tensors of
  // `params` the entry takes.
  std::function<size_t(const AttributeText&, Node&)> decode;
  // The value (reverse mode's value pass).
  std::function<at::Tensor(const Node&, const Values& in)> value;
  // Value and output tangent from the inputs' values and tangents (forward mode).
  std::function<std::pair<at::Tensor, std::optional<at::Tensor>>(const Node&, const Values& in, const Blocks& tangents)>
      forward;
  // The inputs' cotangents from the output's value and cotangent (reverse mode). The cotangent comes by value:
  // where `writable` says nothing else holds it, the rule may write its result over it.
  std::function<Blocks(const Node&, const Values& in, const at::Tensor& value, std::optional<at::Tensor> cotangent)>
      reverse;
  // Optional, reverse mode, both or neither: the value with what `reverse` would recompute from the inputs
  // (max pooling's argmax), and the reverse rule given it, so that the reverse walker evaluates it once.
  std::function<std::pair<at::Tensor, at::Tensor>(const Node&, const Values& in)> value_saving;
  std::function<Blocks(const Node&, const Values& in, const at::Tensor& saved, const std::optional<at::Tensor>& cotangent)>
      reverse_saved;
  // Optional, reverse mode: adds the input's cotangent into `stored`, the input's block that another reader's
  // contribution already holds and nothing else does, instead of returning a block of the input's whole shape (a
  // slice adds its box alone: q, k and v of qkv.unbind fill one block, not three blocks of zeros summed).
  std::function<void(const Node&, const Values& in, const at::Tensor& value, const std::optional<at::Tensor>& cotangent,
                     at::Tensor& stored)>
      reverse_into;
};

// The rule of a graph kind, or nullptr for a chain layer's kind (linear, an activation, ...).
const GraphKind* find_graph_kind(const std::string& kind);

struct Program {
  std::vector<Node> nodes;
  size_t output_slot = 0;
  std::vector<int64_t> readers;  // per slot: how many nodes read it
};

// Decodes the entries into nodes (fusing chain runs and pooled Linears) and checks every reference and count.
Program parse_program(c10::ArrayRef<std::string> layers, const LayerParams& params);

// An adaptive_avg_pool2d entry read only by a flatten (a reshape to one axis), itself read only by a chain run
// that starts with a Linear, becomes one node with that Linear (pooled_linear.cpp), ahead of the rest of the run.
void fuse_pooled_linears(Program& program);

// ---- block shapes, shared by the kinds and the executor ----

std::vector<int64_t> per_sample_shape(const at::Tensor& value);
// `leading` sizes (the batch, the rows axis) followed by `shape`.
std::vector<int64_t> with_leading(std::initializer_list<int64_t> leading, at::IntArrayRef shape);
// The block itself, or the identity block of `value` [B, *shape]: eye(R) as [B, R, *shape].
at::Tensor explicit_block(const std::optional<at::Tensor>& block, const at::Tensor& value);
// Whether a block is the only reference to its memory (no other slot, value, view or parameter holds it) and
// covers it densely, so that a rule may overwrite it instead of allocating its result: the executor hands each
// block on by value, and most are read once (a residual sum's is read twice, and then not writable).
bool writable(const at::Tensor& block);

}  // namespace jacext::graph
