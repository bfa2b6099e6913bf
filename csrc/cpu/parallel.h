// Shared sizing for at::parallel_for over rows of a Jacobian block.
#pragma once

#include <algorithm>
#include <cstdint>

namespace jacext::cpu {

// Elements a thread should own before a parallel region pays for its start-up (~a few microseconds).
constexpr int64_t kParallelGrainElements = 32768;

inline int64_t row_grain(int64_t row_length) { return std::max<int64_t>(1, kParallelGrainElements / std::max<int64_t>(1, row_length)); }

}  // namespace jacext::cpu
