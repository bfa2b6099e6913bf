// The walkers: a whole sequential plan of native layers in one C++ call, in forward or reverse mode.
//
// A plan is encoded with schema types only (so TorchScript, torch.export and C++ callers can build
// it): `layers` holds one name per layer, `params` the flat list of their tensors. "linear" takes two
// entries (weight, bias), "linear_no_bias" one (weight); "softmax", "log_softmax" and the activations
// take none (an activation's scalar parameters travel in its name, e.g. "leaky_relu:0.01"; grammar at
// activation_from_name). (No None entries: autograd wrappers only track all-tensor lists.)
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "cpu/masked_linear.h"
#include "jacext/chain_plan.h"
#include "jacext/checks.h"
#include "jacext/graph.h"
#include "jacext/ops.h"

#include <cmath>
#include <cstdlib>
#include <optional>
#include <string>
#include <utility>

namespace jacext {

std::vector<Layer> parse_plan(const at::Tensor& input, c10::ArrayRef<std::string> layers, const LayerParams& params,
                              const char* op) {
  std::vector<Layer> plan;
  plan.reserve(layers.size());
  size_t next_param = 0;
  int64_t features = input.size(1);
  for (size_t i = 0; i < layers.size(); ++i) {
    const std::string& name = layers[i];
    Layer layer;
    if (name == "linear" || name == "linear_no_bias") {
      const size_t count = name == "linear" ? 2 : 1;
      TORCH_CHECK_VALUE(next_param + count <= params.size(), op, ": layer ", i, " (", name, ") needs ", count,
                        " entries in params (weight", count == 2 ? ", bias" : "", ") but params has only ",
                        params.size() - next_param, " left");
      layer.weight = params[next_param];
      if (count == 2) layer.bias = params[next_param + 1];
      next_param += count;
      check_linear_params(input, features, layer.weight, layer.bias, op);
      features = layer.weight.size(0);
    } else if (name == "softmax") {
      layer.type = Layer::Type::Softmax;
    } else if (name == "log_softmax") {
      layer.type = Layer::Type::LogSoftmax;
    } else {
      layer.type = Layer::Type::Activation;
      layer.activation = activation_entry(name, op, i);
    }
    plan.push_back(std::move(layer));
  }
  TORCH_CHECK_VALUE(next_param == params.size(), op, ": params has ", params.size(), " entries but the layers use ",
                    next_param);
  return plan;
}

namespace {

// When to skip inactive units: the masked kernel (chain_masked_matrix) does work proportional to the
// fraction of nonzero factor entries, the dense GEMM chain does all of it at a better FLOP rate; the
// masked kernel wins below this fraction of active units in the batch, thread for thread.
// Measured with bench/masked_linear.py --threads 1 (B=256, 784-512-512-10 and B=64,
// 784-1024x3-10, float32, 2-core AMD EPYC with AVX2): dense / masked = 1.95x at 20% active, 1.47x
// (mnist) and 1.36x (deep) at 50%, 0.93x at 80%: even at about 70%; 0.65 keeps a margin.
constexpr double kMaskedLinearCrossover = 0.65;
// The same with one row per sample (a single-target attribution's reverse sweep): the kernel's register
// block then holds one row, so each weight vector it loads feeds one multiply-add, where the dense GEMM
// over all B rows reuses it across the batch. Measured like the above (B=32, 784-256-ReLU-1): even at
// about 25% active units, the dense chain faster at 50%.
constexpr double kMaskedLinearCrossoverOneRow = 0.3;
// Below this many dense multiply-adds (about 40 us of GEMM) the dense chain is kept without counting
// active units: the kernel's per-call work (counting, finiteness checks, packing) would not pay off.
// At 2^20 the bench's `small` case (1.3 million at its second Linear, 50% active) took the masked
// kernel: its op ran 141 us against 129 us with the dense chain forced (1 thread, minimum of 6 runs).
// JACEXT_MASKED_LINEAR_CROSSOVER, when set, decides alone (the tests force either kernel on small shapes).
constexpr double kMaskedLinearMinimumMacs = 1 << 21;
// Above this many weight bytes the dense chain is kept too. The masked kernel copies the weight into
// panels on every call and streams the active units' rows once per sample; a weight far beyond the cache
// is then read from memory B times, where the dense GEMM reads it about once. Measured (2-core AMD EPYC,
// float32): alexnet's classifier (9216x4096 and 4096x4096 weights, 151 and 67 MB, B=8, 10 rows, ~50%
// active) ran 0.95-1.02 s a call with the masked kernel and 0.69-0.73 s dense; deep's 4 MB weights gain
// from it (bench/masked_linear.py).
constexpr double kMaskedLinearMaximumWeightBytes = 16.0 * (1 << 20);

// JACEXT_MASKED_LINEAR_CROSSOVER, read once, overrides it (tests force either branch with 0 or 2).
std::optional<double> crossover_override() {
  static const std::optional<double> value = []() -> std::optional<double> {
    const char* text = std::getenv("JACEXT_MASKED_LINEAR_CROSSOVER");
    if (text == nullptr || *text == '\0') return std::nullopt;
    char* end = nullptr;
    const double parsed = std::strtod(text, &end);
    TORCH_CHECK_VALUE(*end == '\0', "JACEXT_MASKED_LINEAR_CROSSOVER must be a number (a fraction of active units), got '",
                      text, "'");
    return parsed;
  }();
  return value;
}

// The one decision between the masked kernel and the dense chain for rows @ diag(factor) @ matrix.
// CPU only (CUDA has no masked kernel); counts the factor's nonzeros once for the whole batch.
// Non-finite weights or block entries go dense too: there 0 * inf = NaN reaches the result, as in the
// reference (autograd multiplies by every zero), while skipping the inactive units would hide it.
// The cheap tests come first: on a small product the checks alone (finiteness of the weight and the
// block, the count of active units) cost more than skipping could save (tiny case: 4 isfinite passes were
// a third of the op's time).
bool skip_inactive_units(const at::Tensor& factor, const at::Tensor& block_values, const at::Tensor& matrix) {
  if (!factor.device().is_cpu() || factor.numel() == 0) return false;
  const std::optional<double> override = crossover_override();
  // The dense chain's multiply-adds: per-sample rows x features x outputs.
  const double dense_macs = static_cast<double>(factor.size(0)) * static_cast<double>(block_values.size(-2)) *
                            static_cast<double>(matrix.size(0)) * static_cast<double>(matrix.size(1));
  const double weight_bytes = static_cast<double>(matrix.numel()) * static_cast<double>(matrix.element_size());
  if (!override && (dense_macs < kMaskedLinearMinimumMacs || weight_bytes > kMaskedLinearMaximumWeightBytes)) {
    return false;
  }
  // The masked kernel has float and double copies only.
  if (factor.scalar_type() != at::kFloat && factor.scalar_type() != at::kDouble) return false;
  const at::Tensor dense_factor = factor.contiguous();
  int64_t active_units = 0;
  AT_DISPATCH_FLOATING_TYPES(dense_factor.scalar_type(), "jacext_count_active_units", [&] {
    active_units = cpu::count_nonzero(dense_factor.const_data_ptr<scalar_t>(), dense_factor.numel());
  });
  const double active = static_cast<double>(active_units) / static_cast<double>(factor.numel());
  const double crossover = block_values.size(-2) == 1 ? kMaskedLinearCrossoverOneRow : kMaskedLinearCrossover;
  if (active >= override.value_or(crossover)) return false;
  // One summing pass per tensor instead of isfinite's four (on mnist-sized weights these checks were
  // ~0.3 ms a call): a non-finite entry makes the sum non-finite. A finite tensor whose sum overflows
  // (float32 entries summing past 3e38) goes dense too, which is only slower.
  const auto all_finite = [](const at::Tensor& tensor) { return std::isfinite(tensor.sum().item<double>()); };
  return all_finite(matrix) && all_finite(block_values);
}

// A per-sample column factor (activation derivative) not yet applied to the block. Kept pending until
// the next rule, so that before a Linear it can scale the weight's rows instead of the block:
// (G diag(f_b)) M == G (diag(f_b) M), which materialises [B, H, K] instead of [B, R, H] and, for the
// identity, skips the diagonal [B, H, H] block and its GEMM entirely. A ReLU mask also stays pending on
// a per-sample block, so that the Linear can skip the inactive units' rows of its matrix (the masked
// kernel: W in reverse mode, W^T in forward mode, made contiguous by the kernel's call).
class PendingScale {
 public:
  void push(JacobianBlock& block, const at::Tensor& factor, Activation activation) {
    const bool maskable = activation.kind == ActivationKind::ReLU;
    if (block.kind == JacobianBlock::Kind::PerSample && !maskable && !maskable_) {
      block = scale_features(block, factor);  // nothing to gain by waiting
      return;
    }
    factor_ = factor_.defined() ? factor_ * factor : factor;  // two diagonal factors multiply
    maskable_ = maskable_ || maskable;                          // a zero of either is a zero of the product
  }

  // The block after the pending factor and then `matrix` [H, K] (rows @ matrix).
  JacobianBlock chain(const JacobianBlock& block, const at::Tensor& matrix) {
    if (!factor_.defined()) return chain_matrix(block, matrix);
    const at::Tensor factor = std::exchange(factor_, at::Tensor());
    const bool maskable = std::exchange(maskable_, false);
    const bool identity = block.kind == JacobianBlock::Kind::Identity;
    // The identity needs no GEMM at all (below); otherwise skip what the mask zeroes when it pays.
    if (!identity && maskable && skip_inactive_units(factor, block.values, matrix)) return chain_masked_matrix(block, factor, matrix);
    if (block.kind == JacobianBlock::Kind::PerSample) return chain_matrix(scale_features(block, factor), matrix);
    const int64_t batch = factor.size(0), features = matrix.size(0), narrow = matrix.size(1);
    if (!identity) {
      // Same GEMM either way; compare what each order writes per sample: scaled block [R, H] and
      // result [R, K], or scaled weight [K, H], product [K, R] and its transpose [R, K].
      const int64_t rows = block.values.size(0);
      if (narrow * (features + 2 * rows) >= rows * (features + narrow)) {
        return chain_matrix(scale_features(block, factor), matrix);
      }
    }
    // scaled[b, k, h] = matrix[h, k] * factor[b, h]
    const at::Tensor scaled = scale_features(JacobianBlock::shared(matrix.t().contiguous()), factor).values;
    if (identity) return JacobianBlock::per_sample(scaled.transpose(1, 2).contiguous());
    const at::Tensor& shared = block.values;  // [R, H]
    const at::Tensor product = at::mm(scaled.view({batch * narrow, features}), shared.t());
    return JacobianBlock::per_sample(product.view({batch, narrow, shared.size(0)}).transpose(1, 2).contiguous());
  }

  // The block with the pending factor applied, before any other rule.
  JacobianBlock flush(const JacobianBlock& block) {
    if (!factor_.defined()) return block;
    maskable_ = false;
    return scale_features(block, std::exchange(factor_, at::Tensor()));
  }

 private:
  at::Tensor factor_;
  bool maskable_ = false;  // the pending factor contains a ReLU mask
};

}  // namespace

SweepResult forward_sweep(at::Tensor hidden, JacobianBlock tangents, const std::vector<Layer>& plan) {
  // A ReLU zeroes the tangents' columns of inactive units, so the next Linear may skip their rows of W^T
  // as the reverse sweep skips W's (skip_inactive_units decides).
  PendingScale pending;
  for (const Layer& layer : plan) {
    switch (layer.type) {
      case Layer::Type::Linear:
        tangents = pending.chain(tangents, layer.weight.t());
        hidden = at::linear(hidden, layer.weight, layer.bias);
        break;
      case Layer::Type::Activation: {
        auto [output, derivative] = activation_with_derivative(hidden, layer.activation);
        pending.push(tangents, derivative, layer.activation);
        hidden = output;
        break;
      }
      case Layer::Type::Softmax:
        hidden = at::softmax(hidden, 1);
        tangents = softmax_rows(pending.flush(tangents), hidden, SoftmaxVariant::Softmax);
        break;
      case Layer::Type::LogSoftmax:
        hidden = at::log_softmax(hidden, 1);
        tangents = softmax_rows(pending.flush(tangents), hidden.exp(), SoftmaxVariant::LogSoftmaxForward);
        break;
    }
  }
  return {hidden, pending.flush(tangents)};
}

// The forward pass of a reverse sweep: the output and, per layer, the per-sample factor its reverse
// rule needs (activation derivative or softmax probabilities; undefined for Linear).
std::pair<at::Tensor, std::vector<at::Tensor>> forward_with_factors(at::Tensor hidden, const std::vector<Layer>& plan) {
  std::vector<at::Tensor> factors(plan.size());
  for (size_t i = 0; i < plan.size(); ++i) {
    const Layer& layer = plan[i];
    switch (layer.type) {
      case Layer::Type::Linear:
        hidden = at::linear(hidden, layer.weight, layer.bias);
        break;
      case Layer::Type::Activation:
        std::tie(hidden, factors[i]) = activation_with_derivative(hidden, layer.activation);
        break;
      case Layer::Type::Softmax:
        hidden = at::softmax(hidden, 1);
        factors[i] = hidden;
        break;
      case Layer::Type::LogSoftmax:
        hidden = at::log_softmax(hidden, 1);
        factors[i] = hidden.exp();
        break;
    }
  }
  return {hidden, std::move(factors)};
}

JacobianBlock reverse_sweep(JacobianBlock cotangents, const std::vector<Layer>& plan,
                            const std::vector<at::Tensor>& factors) {
  PendingScale pending;
  for (size_t i = plan.size(); i-- > 0;) {
    const Layer& layer = plan[i];
    switch (layer.type) {
      case Layer::Type::Linear:
        cotangents = pending.chain(cotangents, layer.weight);
        break;
      case Layer::Type::Activation:
        pending.push(cotangents, factors[i], layer.activation);
        break;
      case Layer::Type::Softmax:
        cotangents = softmax_rows(pending.flush(cotangents), factors[i], SoftmaxVariant::Softmax);
        break;
      case Layer::Type::LogSoftmax:
        cotangents = softmax_rows(pending.flush(cotangents), factors[i], SoftmaxVariant::LogSoftmaxReverse);
        break;
    }
  }
  return pending.flush(cotangents);
}

namespace {

// An operator output must not alias an input (an empty plan returns its input unchanged).
at::Tensor unaliased(const at::Tensor& output, const at::Tensor& input) {
  return output.is_alias_of(input) ? output.clone() : output;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sequential_jac_forward(const at::Tensor& input, const std::optional<at::Tensor>& jac,
                                                          c10::ArrayRef<std::string> layers, const LayerParams& params) {
  const char* op = "jacext::sequential_jac_forward";
  check_feature_matrix(input, op, "input");
  TORCH_CHECK_VALUE(!layers.empty(), op, ": layers must name at least one layer");
  const std::vector<Layer> plan = parse_plan(input, layers, params, op);
  SweepResult result = forward_sweep(input, tangents_from_jac(jac, input, op), plan);
  const int64_t features = result.output.size(1);
  return {unaliased(result.output, input),
          tangents_to_jac(result.block, input.size(0), features, input.options())};
}

std::tuple<at::Tensor, at::Tensor> sequential_jac_reverse(const at::Tensor& input,
                                                          const std::optional<at::Tensor>& cotangent,
                                                          c10::ArrayRef<std::string> layers, const LayerParams& params) {
  const char* op = "jacext::sequential_jac_reverse";
  check_feature_matrix(input, op, "input");
  TORCH_CHECK_VALUE(!layers.empty(), op, ": layers must name at least one layer");
  const std::vector<Layer> plan = parse_plan(input, layers, params, op);
  auto [output, factors] = forward_with_factors(input, plan);
  JacobianBlock seed = cotangents_from_arg(cotangent, input.size(0), output.size(1), input, op);
  JacobianBlock result = reverse_sweep(std::move(seed), plan, factors);
  return {unaliased(output, input), result.dense(input.size(0), input.size(1), input.options())};
}

std::tuple<at::Tensor, at::Tensor> batch_jacobian(const at::Tensor& input, c10::ArrayRef<std::string> layers,
                                                  const LayerParams& params, std::string_view mode) {
  const char* op = "jacext::batch_jacobian";
  TORCH_CHECK_VALUE(input.dim() >= 2, op, ": input must be [batch, *in_shape] with at least one feature dimension, got shape ",
                    input.sizes());
  TORCH_CHECK_VALUE(mode == "forward" || mode == "reverse", op, ": mode must be 'forward' or 'reverse', got '", mode,
                    "' (jacobian_ext.batch_jacobian and jacobian_ext.compile resolve mode='auto' before calling the op)");
  const int64_t batch = input.size(0);
  // [B, C, *in_shape]; a [B, D] input's Jacobian is already [B, C, D] and goes out without a view (a
  // view is a tensor of its own, a cost of every call at the smallest sizes), as its input goes in.
  const bool flat = input.dim() == 2;
  const auto shaped = [&](const at::Tensor& jacobian, int64_t out_features) {
    if (flat) return jacobian;
    at::DimVector shape{batch, out_features};
    shape.append(input.sizes().begin() + 1, input.sizes().end());
    return jacobian.view(shape);
  };
  if (is_graph_program(layers)) {
    auto [output, jacobian] = graph_jacobian(input, layers, params, mode == "reverse");
    return {output, shaped(jacobian, output.size(1))};
  }
  // Explicit width: reshape({0, -1}) is ambiguous for an empty batch.
  const at::Tensor flat_input =
      flat ? input : input.reshape({batch, c10::multiply_integers(input.sizes().slice(1))});
  check_feature_matrix(flat_input, op, "input");
  const std::vector<Layer> plan = parse_plan(flat_input, layers, params, op);
  const int64_t in_features = flat_input.size(1);

  at::Tensor output, jacobian;  // jacobian: [B, C, D]
  if (auto small = cpu::small_chain_jacobian(flat_input, plan, mode == "reverse")) {
    std::tie(output, jacobian) = *small;
  } else if (mode == "forward") {
    SweepResult result = forward_sweep(flat_input, JacobianBlock::identity(), plan);
    output = result.output;
    jacobian = result.block.dense(batch, output.size(1), input.options()).transpose(1, 2).contiguous();
  } else {
    std::vector<at::Tensor> factors;
    std::tie(output, factors) = forward_with_factors(flat_input, plan);
    jacobian = reverse_sweep(JacobianBlock::identity(), plan, factors).dense(batch, in_features, input.options());
  }
  return {unaliased(output, input), shaped(jacobian, output.size(1))};
}

}  // namespace jacext
