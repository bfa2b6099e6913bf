// The small-chain kernel: batch_jacobian of a small sequential plan on the CPU, the whole call in one
// parallel region.
//
// Through ATen a small MLP's Jacobian is a few dozen ATen calls (linear, addmm, expand, copy...) of a few
// microseconds each, every one its own parallel region, around little arithmetic: the call is mostly
// overhead. Here the batch is cut into tiles of a few samples; each tile runs its forward pass and its
// sweep over raw buffers that stay in cache, with the same rules as the ATen walker (lazy identity seed,
// activation factors from rule_math.h, the softmax row updates), and tiles run in parallel. Larger plans
// stay on the ATen walker, whose GEMMs over the whole batch (and masked ReLU kernel) are faster.
//
// Both modes sweep a stack of rows: R per sample (reverse: the cotangents [C, H], one row per output;
// forward: the tangents transposed, [D, H], one row per input direction), the tile's S samples one after
// the other, [S R, H]. A Linear multiplies the whole stack by one matrix, W [out, in] in reverse mode and
// W^T [in, out] in forward mode; an activation scales each sample's rows by that sample's derivative; a
// softmax updates each row. The forward pass is the same product on the tile's S hidden rows with W^T.
// So the register-blocked dense product (masked_linear.h) gets S R rows for each weight row it loads
// into registers, and the activations run over the whole tile at once with the vectorised element loop
// of the activation kernels (activation_loop.h). A forward-mode stack ends as [D, C] per sample and is
// transposed as it is written out.
#include <ATen/Parallel.h>

#include "cpu/activation_loop.h"
#include "cpu/masked_linear.h"
#include "jacext/chain_plan.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
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
// Samples per tile at most: S R rows make several register blocks of rows (up to 6 each) per weight row
// loaded, and more samples would only make fewer tiles to share between threads.
constexpr int64_t kMaxTileSamples = 32;
// A tile's buffers (hidden values, factors, the stack and its scratch) at most, so that they stay in a
// core's L2 cache beside the weights.
constexpr int64_t kTileBytes = 256 * 1024;
// Products with fewer rows than this run row by row (multiply).
constexpr int64_t kMinBlockRows = 3;
// Rows of register-blocked products by W^T, over a whole call, that pay for making W^T (a strided copy
// of every weight entry) with their better rate than the row-by-row products by W.
constexpr int64_t kMinTransposedRows = 16;

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
  const scalar_t* weight = nullptr;    // W [out, in], row-major
  const scalar_t* weight_t = nullptr;  // W^T [in, out], row-major, or null (choose_transposes)
  const scalar_t* bias = nullptr;
  int64_t in = 0, out = 0;
  // Where this step's factors start in a tile's factor buffer, in units of the tile's sample count: the
  // factors of a tile of S samples are [S, in] at S * factor_offset.
  int64_t factor_offset = 0;
};

template <typename scalar_t>
void transpose(const scalar_t* from, int64_t rows, int64_t width, scalar_t* to) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < width; ++j) to[j * rows + r] = from[r * width + j];
  }
}

// out [R, N] = a [R, K] @ matrix [K, N], given also transposed = matrix^T [N, K] (all row-major; either
// may be null, not both: choose_transposes decides which W^T a call makes). The register blocks run
// along vectors of N columns and over blocks of rows; with few rows, or N too narrow for a vector of
// columns (the columns left over run in a scalar tail), each row runs as the matrix-vector product
// transposed @ a's row instead, dot products along contiguous rows. One column needs neither: the dense
// product takes it as dot products itself.
template <typename scalar_t>
void multiply(const scalar_t* a, const scalar_t* matrix, const scalar_t* transposed, scalar_t* out, int64_t rows,
              int64_t steps, int64_t columns) {
  const bool blocks = columns == 1 || (rows >= kMinBlockRows && columns >= kPanelWidth<scalar_t>);
  if (matrix != nullptr && (blocks || transposed == nullptr)) {
    run_dense_rows_matmul(DenseRowsProblem<scalar_t>{a, matrix, out, rows, steps, columns});
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    run_dense_rows_matmul(DenseRowsProblem<scalar_t>{transposed, a + r * steps, out + r * columns, columns, steps, 1});
  }
}

// values [S, R, H] *= factors [S, 1, H]: each sample's R rows by its own factors. A multiply, not a
// select, for ReLU's 0/1 factor too: a non-finite entry times 0 stays NaN, as on the walker.
template <typename scalar_t>
JACEXT_ISA_CLONES void scale_sample_rows(scalar_t* __restrict__ values, const scalar_t* __restrict__ factors,
                                         int64_t samples, int64_t rows, int64_t width) {
  for (int64_t s = 0; s < samples; ++s) {
    const scalar_t* factor = factors + s * width;
    for (int64_t r = 0; r < rows; ++r) {
      scalar_t* row = values + (s * rows + r) * width;
      for (int64_t j = 0; j < width; ++j) row[j] *= factor[j];
    }
  }
}

template <typename scalar_t>
JACEXT_ISA_CLONES void add_bias(scalar_t* __restrict__ values, const scalar_t* __restrict__ bias, int64_t rows,
                                int64_t width) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < width; ++j) values[r * width + j] += bias[j];
  }
}

// A tile's Jacobian rows: `rows` per sample (R), the samples one after the other, each row `width` long,
// [samples * rows, width] row-major; or the lazy identity (rows == width).
template <typename scalar_t>
struct RowStack {
  scalar_t* values = nullptr;  // views of the thread's workspace (run_tiles)
  scalar_t* scratch = nullptr;
  int64_t samples = 0, rows = 0, width = 0;
  bool identity = true;

  void materialise() {
    if (!identity) return;
    std::fill(values, values + samples * rows * width, scalar_t(0));
    for (int64_t s = 0; s < samples; ++s) {
      for (int64_t r = 0; r < rows; ++r) values[(s * rows + r) * width + r] = scalar_t(1);
    }
    identity = false;
  }

  // Every row times matrix [width, columns] (transposed: its transpose; either may be null, as in
  // multiply); on the identity, the matrix itself for every sample.
  void multiply_by(const scalar_t* matrix, const scalar_t* transposed, int64_t columns) {
    if (identity) {
      for (int64_t s = 0; s < samples; ++s) {
        scalar_t* sample_rows = values + s * width * columns;
        if (matrix != nullptr) {
          std::copy(matrix, matrix + width * columns, sample_rows);
        } else {
          transpose(transposed, columns, width, sample_rows);
        }
      }
      identity = false;
    } else {
      multiply(values, matrix, transposed, scratch, samples * rows, width, columns);
      std::swap(values, scratch);
    }
    width = columns;
  }

  void scale_columns(const scalar_t* factors) {
    materialise();
    scale_sample_rows(values, factors, samples, rows, width);
  }

  // Softmax and log-softmax with each sample's probabilities (rule_math.h's row rule, over the features).
  void update_softmax_rows(const scalar_t* probabilities, SoftmaxVariant variant) {
    materialise();
    for (int64_t s = 0; s < samples; ++s) {
      for (int64_t r = 0; r < rows; ++r) {
        scalar_t* row = values + (s * rows + r) * width;
        softmax_family_row<scalar_t>(variant, row, probabilities + s * width, row, width);
      }
    }
  }
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

// One step of the sweep (reverse mode walks the steps backwards, forward mode forwards).
template <typename scalar_t>
void sweep_step(RowStack<scalar_t>& stack, const ChainStep<scalar_t>& step, const scalar_t* factors, bool reverse) {
  const scalar_t* factor = factors + stack.samples * step.factor_offset;
  switch (step.type) {
    case Layer::Type::Linear:
      if (reverse) {
        stack.multiply_by(step.weight, step.weight_t, step.in);
      } else {
        stack.multiply_by(step.weight_t, step.weight, step.out);
      }
      return;
    case Layer::Type::Activation:
      stack.scale_columns(factor);
      return;
    case Layer::Type::Softmax:
      stack.update_softmax_rows(factor, SoftmaxVariant::Softmax);
      return;
    case Layer::Type::LogSoftmax:
      stack.update_softmax_rows(factor, reverse ? SoftmaxVariant::LogSoftmaxReverse : SoftmaxVariant::LogSoftmaxForward);
      return;
  }
}

// How the batch is cut: tiles of tile_samples (the last one possibly fewer), tiles_per_task per task of
// the parallel loop.
struct Tiling {
  int64_t tile_samples = 1, tiles_per_task = 1;
};

template <typename scalar_t>
void run_tiles(const at::Tensor& input, const std::vector<ChainStep<scalar_t>>& steps, int64_t factor_size,
               int64_t max_width, bool reverse, const Tiling& tiling, at::Tensor& output, at::Tensor& jacobian) {
  const int64_t batch = input.size(0), in_features = input.size(1), out_features = output.size(1);
  const int64_t capacity = tiling.tile_samples;
  const int64_t tiles = (batch + capacity - 1) / capacity;
  // Rows per sample of the stack: C in reverse mode, D in forward mode.
  const int64_t rows = reverse ? out_features : in_features;
  const scalar_t* input_data = input.const_data_ptr<scalar_t>();
  scalar_t* output_data = output.data_ptr<scalar_t>();
  scalar_t* jacobian_data = jacobian.data_ptr<scalar_t>();
  at::parallel_for(0, tiles, tiling.tiles_per_task, [&](int64_t begin, int64_t end) {
    // One allocation per thread for all its buffers (at the smallest sizes a call's mallocs count).
    std::vector<scalar_t> workspace(capacity * (2 * max_width + factor_size + 2 * rows * max_width));
    scalar_t* hidden = workspace.data();
    scalar_t* next = hidden + capacity * max_width;
    scalar_t* factors = next + capacity * max_width;
    RowStack<scalar_t> stack;
    stack.values = factors + capacity * factor_size;
    stack.scratch = stack.values + capacity * rows * max_width;
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t first = tile * capacity, samples = std::min(capacity, batch - first);
      std::copy(input_data + first * in_features, input_data + (first + samples) * in_features, hidden);
      forward_pass(steps, samples, hidden, next, factors);
      std::copy(hidden, hidden + samples * out_features, output_data + first * out_features);
      stack.samples = samples;
      stack.rows = stack.width = rows;
      stack.identity = true;
      if (reverse) {
        for (auto step = steps.rbegin(); step != steps.rend(); ++step) sweep_step(stack, *step, factors, reverse);
      } else {
        for (const ChainStep<scalar_t>& step : steps) sweep_step(stack, step, factors, reverse);
      }
      stack.materialise();  // a plan without layers: the identity
      // The stack is now each sample's Jacobian [C, D] (reverse) or its transpose [D, C] (forward).
      scalar_t* tile_jacobian = jacobian_data + first * out_features * in_features;
      if (reverse) {
        std::copy(stack.values, stack.values + samples * out_features * in_features, tile_jacobian);
      } else {
        for (int64_t s = 0; s < samples; ++s) {
          const int64_t offset = s * out_features * in_features;
          transpose(stack.values + offset, in_features, out_features, tile_jacobian + offset);
        }
      }
    }
  });
}

// Whether a call makes W^T [in, out] of a Linear (else its products take W, multiply): where the rows
// that would read it in register blocks pay for it (the forward pass's B rows, and B D more in forward
// mode), or where W^T is small and a reverse sweep needs it for a product too narrow for vectors.
template <typename scalar_t>
bool makes_transposed_weight(int64_t in, int64_t out, int64_t batch, int64_t in_features, bool reverse) {
  const int64_t register_rows = batch * (reverse ? 1 : 1 + in_features);
  if (out >= kPanelWidth<scalar_t> && register_rows >= kMinTransposedRows) return true;
  return reverse && in > 1 && in < kPanelWidth<scalar_t>;
}

// Samples per tile: as many as fit kTileBytes, at most kMaxTileSamples, and few enough that every thread
// the call's work pays for gets a tile.
Tiling choose_tiling(int64_t batch, double sample_macs, int64_t sample_bytes) {
  const int64_t fitting = std::clamp<int64_t>(kTileBytes / std::max<int64_t>(sample_bytes, 1), 1, kMaxTileSamples);
  const double call_macs = static_cast<double>(batch) * sample_macs;
  const int64_t threads = std::clamp<int64_t>(static_cast<int64_t>(call_macs / kParallelGrainMacs), 1,
                                              at::get_num_threads());
  Tiling tiling;
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
  for (const Layer& layer : plan) {
    if (layer.type == Layer::Type::Linear) {
      linear_macs += static_cast<double>(layer.weight.size(0)) * static_cast<double>(layer.weight.size(1));
      weight_size += layer.weight.numel();
      width = layer.weight.size(0);
      max_width = std::max(max_width, width);
    } else {
      factor_size += width;
    }
  }
  const int64_t out_features = width;
  // The forward pass, then every Linear once per row of the stack (C rows reverse, D forward).
  const int64_t rows = reverse ? out_features : in_features;
  const double sample_macs =
      linear_macs * (1 + static_cast<double>(rows)) + static_cast<double>(rows) * static_cast<double>(max_width);
  if (static_cast<double>(batch) * sample_macs > max_macs()) return std::nullopt;

  std::vector<at::Tensor> contiguous;  // keeps contiguous copies of the parameters alive
  contiguous.reserve(2 * plan.size());
  at::Tensor output = at::empty({batch, out_features}, input.options());
  at::Tensor jacobian = at::empty({batch, out_features, in_features}, input.options());
  const at::Tensor flat = input.contiguous();
  const int64_t sample_bytes = (2 * max_width + factor_size + 2 * rows * max_width) * input.element_size();
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
        } else if (makes_transposed_weight<scalar_t>(step.in, features, batch, in_features, reverse)) {
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
