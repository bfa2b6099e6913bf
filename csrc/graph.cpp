// The graph executor: a whole model of native rules (residual adds, concatenation, convolutions, batch
// norm, pooling, reshapes and permutes, Linear, activations, softmax, attention) as one call of
// jacext::batch_jacobian, in forward or reverse mode, with no Python per node. The program is read in
// graph_program.cpp; the rule of each graph kind is one entry of graph_kinds.cpp.
//
// Program encoding (schema types only, so TorchScript, torch.export and C++ callers can build it): one
// string per entry, `kind key=value key=value ...`. Entry k writes value slot k + 1; slot 0 is the model
// input; `in=i,j` names the slots an entry reads (default: the previous slot); the last entry is the
// model output. Tensors travel in `params`, consumed in entry order. Kinds and their attributes (lists
// are comma-separated integers, possibly empty; flags 0 or 1; per-sample axes count from 0 after the
// batch axis):
//   linear | linear_no_bias | softmax | log_softmax | <activation>   the chain layers of sequential.cpp
//   roll shifts= dims= | flip dims=                                 torch.roll / torch.flip over per-sample axes
//   pad pad= value=                                                 F.pad in constant mode (F.pad's order of
//                                                                   amounts, last axis first; negative crops)
//   normalize dim= eps=                                             F.normalize with p=2
//   einsum in= equation= constants=                                 torch.einsum; equation: letters, commas and
//                                                                   one -> (no ...), each value's letters and
//                                                                   the output's starting with the batch letter;
//                                                                   constants=: per operand, 1 for the next
//                                                                   tensor of params, 0 for the next in= slot
//   conv stride= padding= dilation= groups= bias=                   params weight[, bias]
//   batch_norm eps= weight= bias=                                   params [weight][bias] mean var
//   layer_norm shape= eps= weight= bias=                            params [weight][bias]
//   rms_norm shape= [eps=] weight=                                  params [weight]; no eps: the dtype's epsilon
//   max_pool2d kernel= stride= padding= dilation= ceil=
//   avg_pool2d kernel= stride= padding= ceil= count_include_pad= [divisor=]
//   adaptive_avg_pool2d size=
//   linear_last_axis bias=                                          params weight[, bias]; over the last axis
//   reshape shape=            permute dims=          mean|sum dims= keepdim=
//   cat in= dim= [constants=]                                       constants: a flag per part, 1 for a tensor
//                                                                   param [1, ...] expanded over the batch
//   slice dim= start= stop= step=                                   basic slicing of one per-sample axis
//   gather dim= | index_select dim=                                 params index; x.gather / x.index_select
//                                                                   (a gather index of batch 1 broadcasts)
//   add in= coef= [offset=number] [offset_param=coefficient]       sum of coef_i * in_i (+ constants;
//                                                                   offset_param takes one tensor)
//   mul in=a,b | div in=a,b                                         product / quotient of two values
//   scale divide= (factor=number | one tensor param)                in * factor or in / factor
//   matmul in=a,b | matmul constant=0|1 [transpose=1]               a @ b of two values of one rank, or of one value
//                                                                   and a tensor param, the left (0) or right (1)
//                                                                   factor, without the batch axis (transposed: W^T)
//   softmax_axis dim= | log_softmax_axis dim=                       over one per-sample axis of N-d features
//   attention in=q,k,v causal= mask= [scale=number]                 F.scaled_dot_product_attention without dropout;
//                                                                   mask=1 takes one tensor (boolean, or added)
// A run of chain layers in which each reads the one before, alone, becomes one sweep of the chain
// walkers (pending scales, the masked ReLU kernel), as in a pure chain.
//
// Blocks keep the per-sample shape intact with the rows second: tangents T[b, d, *shape], cotangents
// G[b, c, *shape]. std::nullopt is the lazy identity (the model input in forward mode, the model
// output in reverse mode, and reshapes of them); index maps that need rows materialise it.
#include "jacext/chain_plan.h"
#include "jacext/checks.h"
#include "jacext/graph.h"
#include "jacext/graph_program.h"

#include <algorithm>
#include <optional>
#include <utility>
#include <vector>

namespace jacext {
namespace {

using graph::Blocks;
using graph::Node;
using graph::Program;
using graph::Values;
using graph::explicit_block;
using graph::kOp;
using graph::parse_program;
using graph::per_sample_shape;
using graph::where;
using graph::with_leading;
using graph::writable;

// A chain block as [B, R, *shape]: Shared blocks expand over the batch.
at::Tensor block_tensor(const JacobianBlock& block, int64_t batch, int64_t features, const at::TensorOptions& options,
                        at::IntArrayRef shape) {
  at::Tensor values = block.kind == JacobianBlock::Kind::Shared
                          ? block.values.unsqueeze(0).expand({batch, block.values.size(0), block.values.size(1)})
                          : block.dense(batch, features, options);
  return values.reshape(with_leading({batch, values.size(1)}, shape));
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

// ---- forward mode ----

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
    } else {
      std::tie(value, tangent) = node.rule->forward(node, in, in_tangents);
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
  // The sum over whichever block is writable (a rule's fresh result), else into a fresh one.
  std::optional<at::Tensor>& stored = store[slot];
  if (stored && contribution && writable(*contribution)) {
    contribution->add_(*stored);
    stored = std::move(contribution);
  } else if (stored && contribution && writable(*stored)) {
    stored->add_(*contribution);
  } else {
    stored = explicit_block(stored, value) + explicit_block(contribution, value);
  }
}

// An eval-mode batch norm whose input is a convolution's output that nothing else reads: in reverse mode
// its per-channel scale can multiply the convolution's weight instead of the cotangent block, which is
// cheaper where the weight is the smaller of the two (an RGB stem's [64, 3, 7, 7] weight against B * C
// cotangent rows of [64, 16, 16]). The scale to fold, or nullopt where the pair does not qualify (a
// mismatched parameter is then left to the batch norm's own checks).
std::optional<at::Tensor> foldable_scale(const Program& program, const std::vector<std::optional<size_t>>& producer,
                                         const Node& norm, const std::optional<at::Tensor>& cotangent) {
  if (norm.kind != "batch_norm" || !cotangent) return std::nullopt;
  const size_t slot = norm.inputs[0];
  if (!producer[slot] || program.readers[slot] != 1) return std::nullopt;
  const Node& conv = program.nodes[*producer[slot]];
  if (conv.kind != "conv" || conv.params[0].numel() >= cotangent->numel()) return std::nullopt;
  const at::Tensor& conv_weight = conv.params[0];
  const std::optional<at::Tensor> weight =
      norm.attributes.weight ? std::optional<at::Tensor>(norm.params[0]) : std::nullopt;
  const at::Tensor& running_var = norm.params.back();
  for (const at::Tensor* vector : {&running_var, weight ? &*weight : nullptr}) {
    if (vector && (vector->dim() != 1 || vector->size(0) != conv_weight.size(0) ||
                   vector->scalar_type() != conv_weight.scalar_type() || vector->device() != conv_weight.device())) {
      return std::nullopt;
    }
  }
  return batch_norm_scale(weight, running_var, norm.attributes.eps);
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
  // What a kind's value_saving kept for its reverse_saved.
  std::vector<at::Tensor> saved(program.nodes.size());
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
    } else if (node.rule->value_saving) {
      std::tie(values[node.slot], saved[n]) = node.rule->value_saving(node, in);
    } else {
      values[node.slot] = node.rule->value(node, in);
    }
  }

  std::vector<std::optional<size_t>> producer(slots);
  for (size_t n = 0; n < program.nodes.size(); ++n) producer[program.nodes[n].slot] = n;
  std::vector<std::optional<at::Tensor>> folded_scales(program.nodes.size());  // per conv node, from its norm
  std::vector<std::optional<at::Tensor>> cotangents(slots);
  std::vector<bool> reached(slots, false);
  reached[program.output_slot] = true;  // the identity
  for (size_t n = program.nodes.size(); n-- > 0;) {
    const Node& node = program.nodes[n];
    if (!reached[node.slot]) continue;
    std::optional<at::Tensor> cotangent = std::exchange(cotangents[node.slot], std::nullopt);
    std::vector<at::Tensor> in;
    for (size_t slot : node.inputs) in.push_back(values[slot]);
    const at::Tensor& x = in[0];
    if (node.rule && node.rule->reverse_into && node.inputs.size() == 1 && cotangents[node.inputs[0]] &&
        writable(*cotangents[node.inputs[0]])) {
      node.rule->reverse_into(node, in, values[node.slot], cotangent, *cotangents[node.inputs[0]]);
      continue;
    }
    std::vector<std::optional<at::Tensor>> pulled;
    if (auto scale = foldable_scale(program, producer, node, cotangent)) {
      folded_scales[*producer[node.inputs[0]]] = std::move(scale);
      pulled.push_back(std::move(cotangent));  // the scale goes into the convolution's weight
    } else if (folded_scales[n]) {
      Node scaled = node;
      std::vector<int64_t> shape(node.params[0].dim(), 1);
      shape[0] = node.params[0].size(0);
      scaled.params[0] = node.params[0] * folded_scales[n]->view(shape);
      pulled = node.rule->reverse(scaled, in, values[node.slot], std::move(cotangent));
    } else if (node.kind == "chain" && cotangent && !runs[n]->out_shape.empty() && writable(*cotangent)) {
      // Activations only, on a block no one else holds: each derivative scales it in place.
      const std::vector<int64_t> factor_shape = with_leading({x.size(0), 1}, per_sample_shape(x));
      for (size_t i = runs[n]->plan.size(); i-- > 0;) cotangent->mul_(factors[n][i].view(factor_shape));
      pulled.push_back(std::move(cotangent));
    } else if (node.kind == "chain") {
      const ChainRun& run = *runs[n];
      const int64_t batch = x.size(0), features = run.flat.size(1);
      const at::Tensor& value = values[node.slot];
      const int64_t out_features = c10::multiply_integers(value.sizes().slice(1));
      JacobianBlock block =
          cotangent ? JacobianBlock::per_sample(cotangent->reshape({batch, cotangent->size(1), out_features}).contiguous())
                    : JacobianBlock::identity();
      JacobianBlock result = reverse_sweep(std::move(block), run.plan, factors[n]);
      pulled.emplace_back(block_tensor(result, batch, features, x.options(), per_sample_shape(x)));
    } else if (saved[n].defined()) {
      pulled = node.rule->reverse_saved(node, in, saved[n], cotangent);
    } else {
      pulled = node.rule->reverse(node, in, values[node.slot], std::move(cotangent));
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
    if (entry.find(' ') != std::string::npos || graph::find_graph_kind(entry) != nullptr) return true;
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
