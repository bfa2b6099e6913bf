// The graph executor (graph.cpp): a program of native rules over value slots, for jacext::batch_jacobian.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <string_view>
#include <tuple>

#include "jacext/ops.h"
#include "jacext/rule_math.h"

namespace jacext {

// What an entry of `layers` may be, for error messages.
inline constexpr const char* kLayerEntryKinds =
    "linear, linear_no_bias, softmax, log_softmax, an activation, or an entry of a graph program: conv, batch_norm, "
    "layer_norm, rms_norm, max_pool2d, avg_pool2d, adaptive_avg_pool2d, linear_last_axis, reshape, permute, mean, sum, cat, slice, gather, index_select, add, mul, div, scale, "
    "matmul, softmax_axis, log_softmax_axis, attention, roll, flip, pad, normalize, einsum; "
    "grammar in csrc/graph.cpp";

// Entry `index` of `layers` as an activation (activation_from_name's grammar); a bad one raises an error
// naming the entry and the kinds an entry may be. The plan parsers run on every call of the op, so the
// message is built only then.
Activation activation_entry(std::string_view name, const char* op, size_t index);

// Whether `layers` is a graph program (an entry with attributes or of a graph kind) rather than a chain.
bool is_graph_program(c10::ArrayRef<std::string> layers);

// (output [B, C], jacobian [B, C, D]) of a graph program (encoding in graph.cpp) at `input` [B, *in].
std::tuple<at::Tensor, at::Tensor> graph_jacobian(const at::Tensor& input, c10::ArrayRef<std::string> layers,
                                                  const LayerParams& params, bool reverse);

}  // namespace jacext
