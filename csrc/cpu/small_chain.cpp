// The small-chain kernel: batch_jacobian of a small sequential plan on the CPU, the whole call in one
// parallel region.
//
// Through ATen a small MLP's Jacobian is a few dozen ATen calls (linear, addmm, expand, copy...) of a few
// microseconds each, every one its own parallel region, around little arithmetic: the call is mostly
// overhead. Here the batch is cut into tiles of a few samples; each tile runs its forward pass and its
// sweep over raw buffers that stay in cache, with the same rules as the ATen walker (lazy identity seed,
// activation factors from rule_math.h, the softmax row updates), and tiles run in parallel. It takes small
// plans and narrow chains of any batch size; wider plans stay on the ATen walker, whose GEMMs over the
// whole batch (and masked ReLU kernel) are faster there (takes_call).
//
// Both sweeps stack the tile's Jacobian blocks so that one product per Linear serves every sample
// (tile_stacks.h): the reverse sweep's cotangents [C, H] as rows, [S C, H], times W [out, in]; the forward
// sweep's tangents transposed, [D, H], as rows too, times W^T [in, out], where the batch pays for making
// W^T once per call, else as columns side by side, [H, S D], with W times them. An activation scales each
// sample's features by that sample's derivative; a softmax updates each sample's rows. The forward pass
// multiplies the tile's hidden rows [S, in] by W^T where it is made, else row by row by W. So the
// register-blocked dense product (masked_linear.h) gets many rows or columns for each weight row it loads
// into registers, and the activations run over the whole tile at once with the vectorised element loop
// of the activation kernels (activation_loop.h).
#include <ATen/Parallel.h>

#include "cpu/activation_loop.h"
#include "cpu/masked_linear.h"
#include "cpu/tile_stacks.h"
#include "jacext/chain_plan.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

namespace jacext::cpu {
namespace {

// Which calls this kernel runs (takes_call). Any plan up to kDefaultMaxMacs multiply-adds in the whole
// call (the forward pass and the sweep, all samples): below, the walker's fixed cost (some 30 ATen calls,
// each a few microseconds and its own parallel region) outweighs its GEMMs' better rate (measured with
// bench/op_latency.py on the bench's tiny and small cases at several batch sizes and a 784-wide input,
// both paths forced; numbers in the commit that set it). Beyond it, a narrow chain of any size: weights
// that stay in a core's cache while a tile reuses them (kNarrowChainWeightBytes in all), tiles of at least
// kNarrowChainTileSamples samples within kTileBytes, and activations that the element loop vectorises
// (evaluated_without_libm). There the tile's register blocks keep up with the walker's GEMMs, whose
// element-wise passes go through memory. Wider weights, or many rows per sample (tiles of a sample or
// two, which stream the weights once per sample), run faster on the walker, a ReLU chain's also through
// its masked kernel, which skips the inactive units (bench/small_chain.py; numbers in
// bench/SMALL_CHAIN.md).
constexpr double kDefaultMaxMacs = 1 << 22;
constexpr int64_t kNarrowChainWeightBytes = 512 * 1024;
constexpr int64_t kNarrowChainTileSamples = 8;
// Multiply-adds a thread should own before a parallel region pays for its start-up.
constexpr double kParallelGrainMacs = 1 << 16;
// Samples per tile at most: S R rows make several register blocks of rows (up to 6 or 12 each, by ISA) per
// weight row loaded, and more samples would only make fewer tiles to share between threads.
constexpr int64_t kMaxTileSamples = 32;
// A tile's buffers (hidden values, factors, the stack and its scratch) at most, so that they stay in a
// core's L2 cache beside the weights.
constexpr int64_t kTileBytes = 256 * 1024;
// Rows of register-blocked products by W^T, over a whole call, that pay for making W^T (a copy of every
// weight entry) with their better rate than the row-by-row products by W.
constexpr int64_t kMinTransposedRows = 16;

// JACEXT_SMALL_CHAIN_MAX_MACS, read once, replaces the choice by a limit on the call's multiply-adds
// (0 = never; the tests force each path).
std::optional<double> max_macs_override() {
  static const std::optional<double> value = []() -> std::optional<double> {
    const char* text = std::getenv("JACEXT_SMALL_CHAIN_MAX_MACS");
    if (text == nullptr || *text == '\0') return std::nullopt;
    char* end = nullptr;
    const double parsed = std::strtod(text, &end);
    TORCH_CHECK_VALUE(*end == '\0' && parsed >= 0, "JACEXT_SMALL_CHAIN_MAX_MACS must be a non-negative number, got '",
                      text, "'");
    return parsed;
  }();
  return value;
}

// Whether the element loop (activation_loop.h) evaluates the kind without libm: rule_math.h's formulas
// with exp, expm1, log1p, erf or libm's tanh call it once per element, where the walker runs ATen's
// vectorised kernels (tanh is tanh_math.h's, which vectorises).
constexpr bool evaluated_without_libm(ActivationKind kind) {
  switch (kind) {
    case ActivationKind::ReLU:
    case ActivationKind::Tanh:
    case ActivationKind::LeakyReLU:
    case ActivationKind::Hardtanh:
    case ActivationKind::Hardswish:
    case ActivationKind::Hardsigmoid:
      return true;
    default:
      return false;
  }
}

// Whether this kernel runs a call (kDefaultMaxMacs says which), from its multiply-adds, the bytes of its
// weights and of a sample's buffers, and whether every activation is evaluated_without_libm.
bool takes_call(double call_macs, int64_t weight_bytes, int64_t sample_bytes, bool vectorised_activations) {
  if (const std::optional<double> limit = max_macs_override()) return call_macs <= *limit;
  if (call_macs <= kDefaultMaxMacs) return true;
  return weight_bytes <= kNarrowChainWeightBytes &&
         kTileBytes / std::max<int64_t>(sample_bytes, 1) >= kNarrowChainTileSamples && vectorised_activations;
}

template <typename scalar_t>
struct ChainStep {
  Layer::Type type;
  Activation activation;
  const scalar_t* weight = nullptr;    // W [out, in], row-major
  const scalar_t* weight_t = nullptr;  // W^T [in, out], row-major, or null (makes_transposed_weight)
  const scalar_t* bias = nullptr;
  int64_t in = 0, out = 0;
  // Where this step's factors start in a tile's factor buffer, in units of the tile's sample count: the
  // factors of a tile of S samples are [S, in] at S * factor_offset.
  int64_t factor_offset = 0;
};

// The forward pass of a tile's samples: hidden [S, D] holds their inputs and ends holding their outputs
// [S, C]; each activation's derivatives and each softmax's probabilities go to factors.
template <typename scalar_t>
void forward_pass(const std::vector<ChainStep<scalar_t>>& steps, int64_t samples, scalar_t*& hidden, scalar_t*& next,
                  scalar_t* factors) {
  for (const ChainStep<scalar_t>& step : steps) {
    scalar_t* factor = factors + samples * step.factor_offset;
    switch (step.type) {
      case Layer::Type::Linear:
        multiply(hidden, step.weight_t, step.weight, next, samples, step.in, step.out);
        if (step.bias != nullptr) add_bias(next, step.bias, samples, step.out);
        std::swap(hidden, next);
        continue;
      case Layer::Type::Activation:
        visit_activation_kind(step.activation.kind, [&](auto kind) {
          activation_range<decltype(kind)::value, ValueSource::Write>(hidden, static_cast<const scalar_t*>(nullptr),
                                                                      next, factor, samples * step.in,
                                                                      step.activation);
        });
        std::swap(hidden, next);
        continue;
      case Layer::Type::Softmax:
      case Layer::Type::LogSoftmax:
        for (int64_t s = 0; s < samples; ++s) {
          scalar_t* row = hidden + s * step.in;
          scalar_t* probabilities = factor + s * step.in;
          scalar_t largest = -std::numeric_limits<scalar_t>::infinity();
          for (int64_t j = 0; j < step.in; ++j) largest = std::max(largest, row[j]);
          scalar_t sum = 0;
          for (int64_t j = 0; j < step.in; ++j) sum += std::exp(row[j] - largest);
          const scalar_t log_sum = std::log(sum);
          for (int64_t j = 0; j < step.in; ++j) {
            const scalar_t log_s = row[j] - largest - log_sum;
            probabilities[j] = std::exp(log_s);
            row[j] = step.type == Layer::Type::Softmax ? probabilities[j] : log_s;
          }
        }
        continue;
    }
  }
}

// One step of a sweep: reverse mode walks the steps backwards on a RowStack, forward mode forwards on a
// RowStack (times W^T) or a ColumnStack (W times it).
template <typename scalar_t, typename Stack>
void sweep_step(Stack& stack, const ChainStep<scalar_t>& step, const scalar_t* factors, bool reverse) {
  const scalar_t* factor = factors + stack.samples * step.factor_offset;
  switch (step.type) {
    case Layer::Type::Linear:
      if constexpr (std::is_same_v<Stack, ColumnStack<scalar_t>>) {
        stack.multiply_by(step.weight, step.out);
      } else if (reverse) {
        stack.multiply_by(step.weight, step.weight_t, step.in);
      } else {
        stack.multiply_by(step.weight_t, step.weight, step.out);
      }
      return;
    case Layer::Type::Activation:
      stack.scale_features(factor);
      return;
    case Layer::Type::Softmax:
      stack.update_softmax_rows(factor, SoftmaxVariant::Softmax);
      return;
    case Layer::Type::LogSoftmax:
      stack.update_softmax_rows(factor,
                                reverse ? SoftmaxVariant::LogSoftmaxReverse : SoftmaxVariant::LogSoftmaxForward);
      return;
  }
}

// How the batch is cut: tiles of tile_samples (the last one possibly fewer), tiles_per_task per task of
// the parallel loop; and whether a forward sweep runs on a RowStack, times the W^T that a batch of at
// least kMinTransposedRows pays for (else on a ColumnStack, whose per-feature scalings cost more).
struct Tiling {
  int64_t tile_samples = 1, tiles_per_task = 1;
  bool forward_on_rows = false;
};

template <typename scalar_t>
void run_tiles(const at::Tensor& input, const std::vector<ChainStep<scalar_t>>& steps, int64_t factor_size,
               int64_t max_width, bool reverse, const Tiling& tiling, at::Tensor& output, at::Tensor& jacobian) {
  const int64_t batch = input.size(0), in_features = input.size(1), out_features = output.size(1);
  const int64_t capacity = tiling.tile_samples;
  const int64_t tiles = (batch + capacity - 1) / capacity;
  // Rows (reverse) or columns (forward) per sample of the stack: C in reverse mode, D in forward mode.
  const int64_t rows = reverse ? out_features : in_features;
  const scalar_t* input_data = input.const_data_ptr<scalar_t>();
  scalar_t* output_data = output.data_ptr<scalar_t>();
  scalar_t* jacobian_data = jacobian.data_ptr<scalar_t>();
  at::parallel_for(0, tiles, tiling.tiles_per_task, [&](int64_t begin, int64_t end) {
    // One allocation per thread for all its buffers (at the smallest sizes a call's mallocs count), not
    // zeroed: every buffer is written before it is read.
    const auto workspace =
        std::make_unique_for_overwrite<scalar_t[]>(capacity * (2 * max_width + factor_size + 2 * rows * max_width));
    scalar_t* hidden = workspace.get();
    scalar_t* next = hidden + capacity * max_width;
    scalar_t* factors = next + capacity * max_width;
    scalar_t* stack_values = factors + capacity * factor_size;
    scalar_t* stack_scratch = stack_values + capacity * rows * max_width;
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t first = tile * capacity, samples = std::min(capacity, batch - first);
      std::copy(input_data + first * in_features, input_data + (first + samples) * in_features, hidden);
      forward_pass(steps, samples, hidden, next, factors);
      std::copy(hidden, hidden + samples * out_features, output_data + first * out_features);
      // Each sample's Jacobian [C, D] (its transpose [D, C] on a forward RowStack) goes out of the stack.
      scalar_t* tile_jacobian = jacobian_data + first * out_features * in_features;
      if (reverse || tiling.forward_on_rows) {
        RowStack<scalar_t> stack{stack_values, stack_scratch, samples, rows, rows};
        if (reverse) {
          for (auto step = steps.rbegin(); step != steps.rend(); ++step) sweep_step(stack, *step, factors, reverse);
        } else {
          for (const ChainStep<scalar_t>& step : steps) sweep_step(stack, step, factors, reverse);
        }
        stack.materialise();  // a plan without layers: the identity
        if (reverse) {
          std::copy(stack.values, stack.values + samples * out_features * in_features, tile_jacobian);
        } else {
          for (int64_t s = 0; s < samples; ++s) {
            const int64_t offset = s * out_features * in_features;
            transpose(stack.values + offset, in_features, out_features, tile_jacobian + offset);
          }
        }
      } else {
        ColumnStack<scalar_t> stack{stack_values, stack_scratch, samples, rows, rows};
        for (const ChainStep<scalar_t>& step : steps) sweep_step(stack, step, factors, reverse);
        stack.materialise();
        stack.write_jacobians(tile_jacobian);
      }
    }
  });
}

// Whether a call makes W^T [in, out] of a Linear (else its products take W, multiply): where multiply runs
// the forward pass's product (a tile's samples as rows, out columns) in register blocks and the batch pays
// for the copy (kMinTransposedRows; a forward RowStack's products are then by W^T too), or where a reverse
// sweep's product (a tile's samples times stack_rows = C rows, in columns) is too narrow for the register
// blocks and W^T is small. Each product asks the kernel copy that runs it for its panel width, as multiply does.
template <typename scalar_t>
bool makes_transposed_weight(int64_t in, int64_t out, int64_t batch, int64_t tile_samples, int64_t stack_rows,
                             bool reverse) {
  if (batch >= kMinTransposedRows && out >= row_product_kernels<scalar_t>(tile_samples).panel_width) return true;
  return reverse && in > 1 && in < row_product_kernels<scalar_t>(tile_samples * stack_rows).panel_width;
}

// Samples per tile: as many as fit kTileBytes, at most kMaxTileSamples, and few enough that every thread
// the call's work pays for gets a tile.
Tiling choose_tiling(int64_t batch, double sample_macs, int64_t sample_bytes) {
  const int64_t fitting = std::clamp<int64_t>(kTileBytes / std::max<int64_t>(sample_bytes, 1), 1, kMaxTileSamples);
  const double call_macs = static_cast<double>(batch) * sample_macs;
  const int64_t threads = std::clamp<int64_t>(static_cast<int64_t>(call_macs / kParallelGrainMacs), 1,
                                              at::get_num_threads());
  Tiling tiling;
  tiling.forward_on_rows = batch >= kMinTransposedRows;
  tiling.tile_samples = std::max<int64_t>(1, std::min(fitting, (batch + threads - 1) / threads));
  const double tile_macs = static_cast<double>(tiling.tile_samples) * sample_macs;
  tiling.tiles_per_task = std::max<int64_t>(1, static_cast<int64_t>(kParallelGrainMacs / std::max(tile_macs, 1.0)));
  return tiling;
}

}  // namespace

std::optional<std::tuple<at::Tensor, at::Tensor>> small_chain_jacobian(const at::Tensor& input,
                                                                       const std::vector<Layer>& plan, bool reverse) {
  if (!input.device().is_cpu() || (input.scalar_type() != at::kFloat && input.scalar_type() != at::kDouble)) {
    return std::nullopt;
  }
  const int64_t batch = input.size(0), in_features = input.size(1);
  int64_t width = in_features, max_width = in_features, factor_size = 0, weight_size = 0;
  double linear_macs = 0;
  bool vectorised_activations = true;
  for (const Layer& layer : plan) {
    if (layer.type == Layer::Type::Linear) {
      linear_macs += static_cast<double>(layer.weight.size(0)) * static_cast<double>(layer.weight.size(1));
      weight_size += layer.weight.numel();
      width = layer.weight.size(0);
      max_width = std::max(max_width, width);
    } else {
      factor_size += width;
      if (layer.type == Layer::Type::Activation) {
        vectorised_activations = vectorised_activations && evaluated_without_libm(layer.activation.kind);
      }
    }
  }
  const int64_t out_features = width;
  // The forward pass, then every Linear once per row of the stack (C rows reverse, D forward).
  const int64_t rows = reverse ? out_features : in_features;
  const double sample_macs =
      linear_macs * (1 + static_cast<double>(rows)) + static_cast<double>(rows) * static_cast<double>(max_width);
  const int64_t sample_bytes = (2 * max_width + factor_size + 2 * rows * max_width) * input.element_size();
  if (!takes_call(static_cast<double>(batch) * sample_macs, weight_size * input.element_size(), sample_bytes,
                  vectorised_activations)) {
    return std::nullopt;
  }

  std::vector<at::Tensor> contiguous;  // keeps contiguous copies of the parameters alive
  contiguous.reserve(2 * plan.size());
  at::Tensor output = at::empty({batch, out_features}, input.options());
  at::Tensor jacobian = at::empty({batch, out_features, in_features}, input.options());
  const at::Tensor flat = input.contiguous();
  const Tiling tiling = choose_tiling(batch, sample_macs, sample_bytes);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "jacext_small_chain", [&] {
    // Every W^T the call makes, in one allocation (uninitialised: each is written whole).
    const auto transposed_weights = std::make_unique_for_overwrite<scalar_t[]>(weight_size);
    std::vector<ChainStep<scalar_t>> steps;
    steps.reserve(plan.size());
    int64_t features = in_features, factor_offset = 0, transposed_offset = 0;
    for (const Layer& layer : plan) {
      ChainStep<scalar_t> step{layer.type, layer.activation};
      step.in = features;
      if (layer.type == Layer::Type::Linear) {
        contiguous.push_back(layer.weight.contiguous());
        step.weight = contiguous.back().const_data_ptr<scalar_t>();
        features = layer.weight.size(0);
        if (features == 1) {
          step.weight_t = step.weight;  // W [1, in] is W^T
        } else if (makes_transposed_weight<scalar_t>(step.in, features, batch, tiling.tile_samples, rows, reverse)) {
          scalar_t* weight_t = transposed_weights.get() + transposed_offset;
          transpose(step.weight, features, step.in, weight_t);
          step.weight_t = weight_t;
          transposed_offset += features * step.in;
        }
        if (layer.bias) {
          contiguous.push_back(layer.bias->contiguous());
          step.bias = contiguous.back().const_data_ptr<scalar_t>();
        }
      } else {
        step.factor_offset = factor_offset;
        factor_offset += features;
      }
      step.out = features;
      steps.push_back(step);
    }
    run_tiles<scalar_t>(flat, steps, factor_size, max_width, reverse, tiling, output, jacobian);
  });
  return std::make_tuple(output, jacobian);
}

}  // namespace jacext::cpu
