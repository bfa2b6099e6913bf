// A decoded sequential plan (the `layers` and `params` arguments of the sequential ops), shared by the
// ATen walker (sequential.cpp) and the CPU small-chain kernel (cpu/small_chain.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

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

namespace cpu {

// (output [B, C], jacobian [B, C, D]) of the whole plan for a CPU float32/float64 `input` [B, D], or
// std::nullopt when the call is too large for it: for small models a call through ATen costs mostly
// per-op overhead (about 30 ATen calls of a few microseconds each for a 3-layer MLP), which this kernel
// avoids by running the forward pass and the sweep for each sample in plain loops over raw buffers.
std::optional<std::tuple<at::Tensor, at::Tensor>> small_chain_jacobian(const at::Tensor& input,
                                                                       const std::vector<Layer>& plan, bool reverse);

}  // namespace cpu
}  // namespace jacext
