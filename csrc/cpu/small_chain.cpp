// The small-chain kernel: batch_jacobian of a small sequential plan on the CPU in plain loops.
//
// Through ATen, a 16-64-64-4 MLP's Jacobian takes about 30 ATen calls (linear, t, addmm, expand,
// empty, copy...) of a few microseconds each, for some 27 thousand multiply-adds: the call is all
// overhead. Here each sample runs its forward pass and its sweep over raw buffers, with the same rules
// as the ATen walker (lazy identity seed, activation factors from rule_math.h, the softmax row
// updates), and samples run in parallel. Larger plans stay on the ATen walker, whose GEMMs are faster.
//
// Both sweeps multiply a sample's block by a weight with the register-blocked dense product of
// masked_linear_kernel.h (each weight row loaded once per tile of rows, accumulators in vector
// registers). For that the forward sweep keeps its tangents transposed, [H, D] (one row per feature of
// the current layer), so that a Linear is W [out, in] @ T [in, D] with no transpose of W, and the
// last block is the Jacobian [C, D] itself; the reverse sweep's cotangents are [C, H] as on the walker.
#include <ATen/Parallel.h>

#include "cpu/masked_linear.h"
#include "jacext/chain_plan.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <vector>

namespace jacext::cpu {
namespace {

// Multiply-adds of a whole call (the forward pass and the sweep, all samples) up to which this kernel
// runs. What decides it: below, the walker's fixed cost (some 30 ATen calls, each a few microseconds)
// outweighs its GEMMs' better rate; above, its GEMMs over all B * rows rows at once run faster than
// this kernel's per-sample register blocks (measured with bench/op_latency.py on the bench's tiny and
// small cases at several batch sizes and a 784-wide input, both paths forced; numbers in the commit
// that set it). A B = 1 call stays faster here somewhat beyond the limit (the walker's GEMMs then have
// only C rows), but a per-call limit keeps the rule simple and errs towards the walker.
constexpr double kDefaultMaxMacs = 1 << 22;
// Multiply-adds a thread should own before a parallel region pays for its start-up.
constexpr double kParallelGrainMacs = 1 << 16;

// JACEXT_SMALL_CHAIN_MAX_MACS, read once, overrides the limit (0 = never; the tests force each path).
double max_macs() {
  static const double value = []() {
    const char* text = std::getenv("JACEXT_SMALL_CHAIN_MAX_MACS");
    if (text == nullptr || *text == '\0') return kDefaultMaxMacs;
    char* end = nullptr;
    const double parsed = std::strtod(text, &end);
    TORCH_CHECK_VALUE(*end == '\0' && parsed >= 0, "JACEXT_SMALL_CHAIN_MAX_MACS must be a non-negative number, got '",
                      text, "'");
    return parsed;
  }();
  return value;
}

template <typename scalar_t>
struct ChainStep {
  Layer::Type type;
  Activation activation;
  const scalar_t* weight = nullptr;  // [out, in], row-major
  const scalar_t* bias = nullptr;
  int64_t in = 0, out = 0;
  int64_t factor_offset = 0;  // where this step's per-sample factor lives in the sample's factor buffer
};

// A Jacobian block of one sample, row-major: reverse mode [C, H] (cotangents, `rows` fixed), forward
// mode [H, D] (transposed tangents, `width` fixed); or the lazy identity (rows == width).
template <typename scalar_t>
struct Block {
  scalar_t* values = nullptr;  // views of the thread's workspace (run_samples)
  scalar_t* scratch = nullptr;
  int64_t rows = 0, width = 0;
  bool identity = true;

  void materialise() {
    if (!identity) return;
    std::fill(values, values + rows * width, scalar_t(0));
    for (int64_t r = 0; r < rows; ++r) values[r * width + r] = scalar_t(1);
    identity = false;
  }
};

// Reverse mode: an activation scales the cotangents' columns.
template <typename scalar_t>
void scale_columns(Block<scalar_t>& block, const scalar_t* factor) {
  block.materialise();
  for (int64_t r = 0; r < block.rows; ++r) {
    scalar_t* row = block.values + r * block.width;
#pragma omp simd
    for (int64_t j = 0; j < block.width; ++j) row[j] *= factor[j];
  }
}

// Forward mode: an activation scales the (transposed) tangents' rows.
template <typename scalar_t>
void scale_rows(Block<scalar_t>& block, const scalar_t* factor) {
  block.materialise();
  for (int64_t r = 0; r < block.rows; ++r) {
    scalar_t* row = block.values + r * block.width;
    const scalar_t f = factor[r];
#pragma omp simd
    for (int64_t j = 0; j < block.width; ++j) row[j] *= f;
  }
}

template <typename scalar_t>
void transpose(const scalar_t* from, int64_t rows, int64_t width, scalar_t* to) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < width; ++j) to[j * rows + r] = from[r * width + j];
  }
}

// Softmax (symmetric Jacobian: the same update in both directions) and log-softmax with the
// probabilities s (rule_math.h's row rule, over the feature axis). The forward sweep's transposed
// tangents go through their [D, H] transpose: a softmax is a narrow head, so the two copies are small.
template <typename scalar_t>
void softmax_family_update(Block<scalar_t>& block, const scalar_t* s, Layer::Type type, bool reverse) {
  block.materialise();
  const SoftmaxVariant variant = type == Layer::Type::Softmax ? SoftmaxVariant::Softmax
                                 : reverse                    ? SoftmaxVariant::LogSoftmaxReverse
                                                              : SoftmaxVariant::LogSoftmaxForward;
  const int64_t rows = reverse ? block.rows : block.width, features = reverse ? block.width : block.rows;
  scalar_t* feature_rows = reverse ? block.values : block.scratch;
  if (!reverse) transpose(block.values, block.rows, block.width, feature_rows);
  for (int64_t r = 0; r < rows; ++r) {
    scalar_t* row = feature_rows + r * features;
    softmax_family_row<scalar_t>(variant, row, s, row, features);
  }
  if (!reverse) transpose(feature_rows, rows, features, block.values);
}

// A Linear on the block: reverse G' [C, in] = G [C, out] @ W, forward T' [out, D] = W @ T [in, D]. On
// the identity both are W itself.
template <typename scalar_t>
void linear_update(Block<scalar_t>& block, const ChainStep<scalar_t>& step, bool reverse) {
  if (block.identity) {
    std::copy(step.weight, step.weight + step.out * step.in, block.values);
    block.identity = false;
  } else if (reverse) {
    run_dense_rows_matmul(DenseRowsProblem<scalar_t>{block.values, step.weight, block.scratch,
                                                     block.rows, step.out, step.in});
    std::swap(block.values, block.scratch);
  } else {
    run_dense_rows_matmul(DenseRowsProblem<scalar_t>{step.weight, block.values, block.scratch,
                                                     step.out, step.in, block.width});
    std::swap(block.values, block.scratch);
  }
  if (reverse) {
    block.width = step.in;
  } else {
    block.rows = step.out;
  }
}

// The forward pass of one sample: hidden holds the input and ends holding the output; each
// activation's derivative and each softmax's probabilities go to factors (and, in forward mode, onto
// the tangent block right away).
template <typename scalar_t>
void forward_pass(const std::vector<ChainStep<scalar_t>>& steps, scalar_t*& hidden, scalar_t*& next,
                  scalar_t* factors, Block<scalar_t>* tangents) {
  for (const ChainStep<scalar_t>& step : steps) {
    scalar_t* factor = factors + step.factor_offset;
    switch (step.type) {
      case Layer::Type::Linear:
        run_dense_rows_matmul(DenseRowsProblem<scalar_t>{step.weight, hidden, next, step.out, step.in, 1});
        if (step.bias != nullptr) {
          for (int64_t o = 0; o < step.out; ++o) next[o] += step.bias[o];
        }
        std::swap(hidden, next);
        if (tangents != nullptr) linear_update(*tangents, step, /*reverse=*/false);
        continue;
      case Layer::Type::Activation:
        for (int64_t j = 0; j < step.in; ++j) {
          const scalar_t z = hidden[j];
          const scalar_t y = activation_value(step.activation, z);
          factor[j] = activation_derivative(step.activation, z, y);
          hidden[j] = y;
        }
        if (tangents != nullptr) scale_rows(*tangents, factor);
        continue;
      case Layer::Type::Softmax:
      case Layer::Type::LogSoftmax: {
        scalar_t largest = -std::numeric_limits<scalar_t>::infinity();
        for (int64_t j = 0; j < step.in; ++j) largest = std::max(largest, hidden[j]);
        scalar_t sum = 0;
        for (int64_t j = 0; j < step.in; ++j) sum += std::exp(hidden[j] - largest);
        const scalar_t log_sum = std::log(sum);
        for (int64_t j = 0; j < step.in; ++j) {
          const scalar_t log_s = hidden[j] - largest - log_sum;
          factor[j] = std::exp(log_s);
          hidden[j] = step.type == Layer::Type::Softmax ? factor[j] : log_s;
        }
        if (tangents != nullptr) softmax_family_update(*tangents, factor, step.type, /*reverse=*/false);
        continue;
      }
    }
  }
}

template <typename scalar_t>
void run_samples(const at::Tensor& input, const std::vector<ChainStep<scalar_t>>& steps, int64_t factor_size,
                 int64_t max_width, bool reverse, at::Tensor& output, at::Tensor& jacobian, int64_t grain) {
  const int64_t in_features = input.size(1), out_features = output.size(1);
  const scalar_t* input_data = input.const_data_ptr<scalar_t>();
  scalar_t* output_data = output.data_ptr<scalar_t>();
  scalar_t* jacobian_data = jacobian.data_ptr<scalar_t>();
  at::parallel_for(0, input.size(0), grain, [&](int64_t begin, int64_t end) {
    // The fixed side of the block: C rows in reverse mode, D columns in forward mode.
    const int64_t fixed = reverse ? out_features : in_features;
    // One allocation per thread for all its buffers (at the smallest sizes a call's mallocs count).
    std::vector<scalar_t> workspace(2 * max_width + factor_size + 2 * fixed * max_width);
    scalar_t* hidden = workspace.data();
    scalar_t* next = hidden + max_width;
    scalar_t* factors = next + max_width;
    Block<scalar_t> block;
    block.values = factors + factor_size;
    block.scratch = block.values + fixed * max_width;
    for (int64_t b = begin; b < end; ++b) {
      std::copy(input_data + b * in_features, input_data + (b + 1) * in_features, hidden);
      block.identity = true;
      block.rows = block.width = fixed;
      forward_pass(steps, hidden, next, factors, reverse ? nullptr : &block);
      std::copy(hidden, hidden + out_features, output_data + b * out_features);
      if (reverse) {
        for (auto step = steps.rbegin(); step != steps.rend(); ++step) {
          if (step->type == Layer::Type::Linear) {
            linear_update(block, *step, /*reverse=*/true);
          } else if (step->type == Layer::Type::Activation) {
            scale_columns(block, factors + step->factor_offset);
          } else {
            softmax_family_update(block, factors + step->factor_offset, step->type, /*reverse=*/true);
          }
        }
      }
      block.materialise();  // a plan without layers: the identity
      // Either way the block is now [C, D], the sample's Jacobian.
      std::copy(block.values, block.values + out_features * in_features,
                jacobian_data + b * out_features * in_features);
    }
  });
}

}  // namespace

std::optional<std::tuple<at::Tensor, at::Tensor>> small_chain_jacobian(const at::Tensor& input,
                                                                       const std::vector<Layer>& plan, bool reverse) {
  if (!input.device().is_cpu() || (input.scalar_type() != at::kFloat && input.scalar_type() != at::kDouble)) {
    return std::nullopt;
  }
  const int64_t batch = input.size(0), in_features = input.size(1);
  int64_t width = in_features, max_width = in_features;
  double linear_macs = 0;
  for (const Layer& layer : plan) {
    if (layer.type == Layer::Type::Linear) {
      linear_macs += static_cast<double>(layer.weight.size(0)) * static_cast<double>(layer.weight.size(1));
      width = layer.weight.size(0);
      max_width = std::max(max_width, width);
    }
  }
  const int64_t out_features = width;
  // The forward pass, then every Linear once per row of the block (C rows reverse, D forward).
  const double rows = static_cast<double>(reverse ? out_features : in_features);
  const double sample_macs = linear_macs * (1 + rows) + rows * static_cast<double>(max_width);
  if (static_cast<double>(batch) * sample_macs > max_macs()) return std::nullopt;

  std::vector<at::Tensor> contiguous;  // keeps contiguous copies of the parameters alive
  contiguous.reserve(2 * plan.size());
  at::Tensor output = at::empty({batch, out_features}, input.options());
  at::Tensor jacobian = at::empty({batch, out_features, in_features}, input.options());
  const at::Tensor flat = input.contiguous();
  const int64_t grain = std::max<int64_t>(1, static_cast<int64_t>(kParallelGrainMacs / std::max(sample_macs, 1.0)));
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "jacext_small_chain", [&] {
    std::vector<ChainStep<scalar_t>> steps;
    steps.reserve(plan.size());
    int64_t features = in_features, factor_size = 0;
    for (const Layer& layer : plan) {
      ChainStep<scalar_t> step{layer.type, layer.activation};
      step.in = features;
      if (layer.type == Layer::Type::Linear) {
        contiguous.push_back(layer.weight.contiguous());
        step.weight = contiguous.back().const_data_ptr<scalar_t>();
        if (layer.bias) {
          contiguous.push_back(layer.bias->contiguous());
          step.bias = contiguous.back().const_data_ptr<scalar_t>();
        }
        features = layer.weight.size(0);
      } else {
        step.factor_offset = factor_size;
        factor_size += features;
      }
      step.out = features;
      steps.push_back(step);
    }
    run_samples<scalar_t>(flat, steps, factor_size, max_width, reverse, output, jacobian, grain);
  });
  return std::make_tuple(output, jacobian);
}

}  // namespace jacext::cpu
