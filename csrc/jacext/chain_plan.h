// A decoded sequential plan (the `layers` and `params` arguments of the sequential ops), shared by the
// ATen walker (sequential.cpp) and the CPU small-chain kernel (cpu/small_chain.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <utility>
#include <string>
#include <vector>

#include "jacext/jacobian_block.h"
#include "jacext/ops.h"
#include "jacext/rule_math.h"

namespace jacext {

struct Layer {
  enum class Type { Linear, Activation, Softmax, LogSoftmax };
  Type type = Type::Linear;
  Activation activation;
  at::Tensor weight;
  std::optional<at::Tensor> bias;
};

// Decodes and validates a plan for `input` [B, H]: dtype, device and every width along the chain.
std::vector<Layer> parse_plan(const at::Tensor& input, c10::ArrayRef<std::string> layers, const LayerParams& params,
                              const char* op);

// The chain's sweeps over `input` [B, H] (the graph executor, graph.cpp, runs its chain runs with them too).
struct SweepResult {
  at::Tensor output;
  JacobianBlock block;  // forward: tangents [.., D, H_out]; reverse: cotangents [.., C, H_in]
};
// Forward mode from the tangents of the chain's input.
SweepResult forward_sweep(at::Tensor input, JacobianBlock tangents, const std::vector<Layer>& plan);
// The value pass of a reverse sweep: the output and, per layer, the per-sample factor its reverse rule
// needs (activation derivative or softmax probabilities; undefined for Linear).
std::pair<at::Tensor, std::vector<at::Tensor>> forward_with_factors(at::Tensor input, const std::vector<Layer>& plan);
// Reverse mode from the cotangents of the chain's output, with forward_with_factors's factors.
JacobianBlock reverse_sweep(JacobianBlock cotangents, const std::vector<Layer>& plan,
                            const std::vector<at::Tensor>& factors);

namespace cpu {

// (output [B, C], jacobian [B, C, D]) of the whole plan for a CPU float32/float64 `input` [B, D], or
// std::nullopt when the call is too large for it: for small models a call through ATen costs mostly
// per-op overhead (about 30 ATen calls of a few microseconds each for a 3-layer MLP), which this kernel
// avoids by running the forward pass and the sweep for each sample in plain loops over raw buffers.
std::optional<std::tuple<at::Tensor, at::Tensor>> small_chain_jacobian(const at::Tensor& input,
                                                                       const std::vector<Layer>& plan, bool reverse);

}  // namespace cpu
}  // namespace jacext
