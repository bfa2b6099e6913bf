// The element loop of the activation rule: value and derivative of one kind over a contiguous range, in
// copies for the CPU's best vector ISA (isa.h). Shared by the activation kernels (pointwise.cpp) and the
// small-chain kernel (small_chain.cpp), which runs it over a tile of samples.
#pragma once

#include <cstdint>

#include "../jacext/rule_math.h"
#include "isa.h"

namespace jacext::cpu {
namespace {

// Where activation_range takes activation(input) from: torch's kernel wrote it (Read), the loop computes
// and writes it (Write), or the derivative does not read it and no one needs it (Skip).
enum class ValueSource { Read, Write, Skip };

// derivative[i] = activation'(input[i]) for i < count, reading activation(input[i]) from given_value[i]
// (Read) or writing it to computed_value[i] (Write). The kind is a template argument so that the switch in
// rule_math.h folds away and the loop vectorises; everything it reads arrives by value (through captured
// references GCC reloaded the pointers and the activation's kind, an int8_t that every store may alias,
// after each store, so the switch stayed a jump per element and nothing vectorised). Internal linkage (the
// unnamed namespace): each file that includes it keeps its own ifunc-resolved copies.
template <ActivationKind kKind, ValueSource kSource, typename scalar_t>
JACEXT_ISA_CLONES void activation_range(const scalar_t* input, const scalar_t* given_value, scalar_t* computed_value,
                                        scalar_t* derivative, int64_t count, const Activation& parameters) {
  const Activation activation{kKind, parameters.first, parameters.second};  // the kind a constant
  for (int64_t i = 0; i < count; ++i) {
    const scalar_t z = input[i];
    scalar_t y = z;  // Skip: activation_derivative does not read it
    if constexpr (kSource == ValueSource::Read) y = given_value[i];
    if constexpr (kSource == ValueSource::Write) computed_value[i] = y = activation_value(activation, z);
    derivative[i] = activation_derivative(activation, z, y);
  }
}

}  // namespace
}  // namespace jacext::cpu
