// A Linear over the flattened output of an adaptive average pooling, as one program node. Where the pooling
// spreads a small map over a larger one (AlexNet's and VGG's heads on small images pool 1 x 1 features to
// 6 x 6 or 7 x 7), W flatten(pool(x)) = (W P) flatten(x) with P the pooling's matrix: the node multiplies the
// weight by P once per call, and every row of every block (B * C in reverse, B * D forward) then goes through
// the smaller W P instead of through W and the pooling's transpose. Where the pooling does not spread (as many
// input positions as output ones, or more), the node pools and then applies W, as the two entries would.
#include "jacext/checks.h"
#include "jacext/graph_program.h"

namespace jacext::graph {
namespace {

constexpr const char* kKind = "adaptive_avg_pool2d+linear";

std::optional<at::Tensor> linear_bias(const Node& node) {
  return node.attributes.bias ? std::optional<at::Tensor>(node.params[1]) : std::nullopt;
}

int64_t pooled_positions(const Node& node) { return node.attributes.size[0] * node.attributes.size[1]; }

// Whether the pooling spreads x's map over more positions: there the folded weight is the smaller one.
bool spreads(const Node& node, const at::Tensor& x) {
  return x.size(-2) * x.size(-1) < pooled_positions(node);
}

void check_args(const Node& node, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 3 || x.dim() == 4, kOp, ": ", where(node), " needs a per-sample [H, W] or [C, H, W] ",
                    "input, got ", x.sizes());
  const at::Tensor& weight = node.params[0];
  check_same_dtype_device(x, weight, kOp, "params (linear weight)");
  const int64_t planes = x.dim() == 4 ? x.size(1) : 1;
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == planes * pooled_positions(node), kOp, ": ", where(node),
                    " needs a linear weight [out, ", planes * pooled_positions(node), "] for a per-sample input ",
                    x.sizes().slice(1), " pooled to ", at::IntArrayRef(node.attributes.size), ", got ", weight.sizes());
  if (const auto bias = linear_bias(node)) {
    check_same_dtype_device(x, *bias, kOp, "params (linear bias)");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), kOp, ": ", where(node),
                      " needs a linear bias [", weight.size(0), "], got ", bias->sizes());
  }
}

// The weight applied to the flattened features: W P [out, planes * h * w] where the pooling spreads, else W.
at::Tensor applied_weight(const Node& node, const at::Tensor& x) {
  check_args(node, x);
  const at::Tensor& weight = node.params[0];
  if (!spreads(node, x)) return weight;
  const int64_t height = x.size(-2), width = x.size(-1), positions = height * width, pooled = pooled_positions(node);
  if (positions == 1) {  // every output position copies the one input position: a sum, faster than a product
    return weight.reshape({weight.size(0), -1, pooled}).sum(-1);
  }
  // Row i: the pooling of the map that is 1 at position i, so P transposed, [h * w, H * W].
  const at::Tensor pooling =
      at::adaptive_avg_pool2d(at::eye(positions, weight.options()).view({positions, height, width}),
                              node.attributes.size)
          .view({positions, pooled});
  return at::mm(weight.reshape({-1, pooled}), pooling.t()).view({weight.size(0), -1});
}

// The features the weight applies to, [N, weight.size(1)] for N maps [N, *shape] (samples or block rows).
at::Tensor features(const Node& node, const at::Tensor& x, const at::Tensor& maps, const at::Tensor& weight) {
  const at::Tensor pooled = spreads(node, x) ? maps : at::adaptive_avg_pool2d(maps, node.attributes.size);
  return pooled.reshape({maps.size(0), weight.size(1)});
}

at::Tensor value(const Node& node, const at::Tensor& x, const at::Tensor& weight) {
  return at::linear(features(node, x, x, weight), weight, linear_bias(node));
}

Blocks reverse(const Node& node, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& g) {
  const int64_t batch = x.size(0);
  // G W, or W itself for the identity (the output's own block), the same for every sample.
  const at::Tensor pulled =
      g ? at::matmul(*g, weight) : weight.unsqueeze(0).expand({batch, weight.size(0), weight.size(1)});
  const int64_t rows = pulled.size(1);
  if (spreads(node, x)) return {pulled.reshape(with_leading({batch, rows}, per_sample_shape(x)))};
  std::vector<int64_t> pooled_shape = per_sample_shape(x);
  pooled_shape.end()[-2] = node.attributes.size[0];
  pooled_shape.end()[-1] = node.attributes.size[1];
  return {adaptive_avg_pool2d_jac_reverse(x, pulled.reshape(with_leading({batch, rows}, pooled_shape)),
                                          node.attributes.size)};
}

GraphKind make_pooled_linear_kind() {
  GraphKind kind;
  kind.value = [](const Node& node, const Values& in) { return value(node, in[0], applied_weight(node, in[0])); };
  kind.forward = [](const Node& node, const Values& in, const Blocks& tangents) {
    const at::Tensor& x = in[0];
    const at::Tensor weight = applied_weight(node, x);
    const at::Tensor block = explicit_block(tangents[0], x);  // [B, D, *shape]
    const at::Tensor rows = features(node, x, block.flatten(0, 1), weight);
    const at::Tensor tangent = at::matmul(rows.view({x.size(0), block.size(1), weight.size(1)}), weight.t());
    return std::pair<at::Tensor, std::optional<at::Tensor>>{value(node, x, weight), tangent};
  };
  kind.reverse = [](const Node& node, const Values& in, const at::Tensor&, const std::optional<at::Tensor>& g) {
    return reverse(node, in[0], applied_weight(node, in[0]), g);
  };
  // The value pass keeps the applied weight, so that the reverse rule does not fold it again.
  kind.value_saving = [](const Node& node, const Values& in) {
    at::Tensor weight = applied_weight(node, in[0]);
    return std::pair<at::Tensor, at::Tensor>{value(node, in[0], weight), weight};
  };
  kind.reverse_saved = [](const Node& node, const Values& in, const at::Tensor& weight,
                          const std::optional<at::Tensor>& g) { return reverse(node, in[0], weight, g); };
  return kind;
}

const GraphKind& pooled_linear_kind() {
  static const GraphKind kind = make_pooled_linear_kind();
  return kind;
}

}  // namespace

void fuse_pooled_linears(Program& program) {
  std::vector<std::optional<size_t>> producer(program.readers.size());
  for (size_t n = 0; n < program.nodes.size(); ++n) producer[program.nodes[n].slot] = n;
  // The node that writes `slot`, where it is of `kind` and nothing else reads the slot.
  const auto sole_source = [&](size_t slot, const std::string& kind) -> std::optional<size_t> {
    if (!producer[slot] || program.readers[slot] != 1 || program.nodes[*producer[slot]].kind != kind) {
      return std::nullopt;
    }
    return producer[slot];
  };
  std::vector<bool> dropped(program.nodes.size(), false);
  std::vector<std::optional<Node>> ahead(program.nodes.size());  // a fused node to place before node n
  for (size_t n = 0; n < program.nodes.size(); ++n) {
    Node& chain = program.nodes[n];
    if (chain.kind != "chain" || (chain.chain_layers[0] != "linear" && chain.chain_layers[0] != "linear_no_bias")) {
      continue;
    }
    const std::optional<size_t> flatten = sole_source(chain.inputs[0], "reshape");
    if (!flatten || program.nodes[*flatten].attributes.shape.size() != 1) continue;
    const std::optional<size_t> pool = sole_source(program.nodes[*flatten].inputs[0], "adaptive_avg_pool2d");
    if (!pool) continue;
    const Node& pooling = program.nodes[*pool];
    const size_t taken = chain.chain_layers[0] == "linear" ? 2 : 1;
    Node fused;
    fused.kind = kKind;
    fused.rule = &pooled_linear_kind();
    fused.index = pooling.index;
    fused.inputs = pooling.inputs;
    fused.attributes.size = pooling.attributes.size;
    fused.attributes.bias = taken == 2;
    fused.params.assign(chain.params.begin(), chain.params.begin() + taken);
    const size_t flatten_slot = program.nodes[*flatten].slot;
    program.readers[pooling.slot] = 0;
    dropped[*pool] = dropped[*flatten] = true;
    if (chain.chain_layers.size() == 1) {  // the Linear alone: the fused node takes its place
      fused.slot = chain.slot;
      program.readers[flatten_slot] = 0;
      dropped[n] = true;
    } else {  // the rest of the run reads the fused node's value
      fused.slot = flatten_slot;
      chain.chain_layers.erase(chain.chain_layers.begin());
      chain.params.erase(chain.params.begin(), chain.params.begin() + taken);
    }
    ahead[n] = std::move(fused);
  }
  std::vector<Node> nodes;
  for (size_t n = 0; n < program.nodes.size(); ++n) {
    if (ahead[n]) nodes.push_back(*std::move(ahead[n]));
    if (!dropped[n]) nodes.push_back(std::move(program.nodes[n]));
  }
  program.nodes = std::move(nodes);
}

}  // namespace jacext::graph
