// The masked-rows micro-kernel: out[b] = values[b] diag(factor[b]) matrix, touching only the rows of
// `matrix` whose factor entry is nonzero (the active units of a ReLU mask).
//
// Included once per instruction set: by masked_linear.cpp (the build's baseline ISA) and by
// masked_linear_avx2.cpp (AVX2 + FMA, chosen at run time). at::vec::Vectorized is whatever
// CPU_CAPABILITY the including file selected, so everything here lives in that capability's inline
// namespace: the two copies never share a symbol.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "masked_linear.h"

namespace jacext::cpu {
inline namespace CPU_CAPABILITY {

// Rows of accumulators in one register block. With two vectors of columns per row, 6 rows keep 12
// accumulators, 2 weight vectors and 1 broadcast in the 16 vector registers of AVX2 (the shape of a
// classic 6 x 16 GEMM micro-kernel); wider register files would allow more, but 6 already makes
// the block FMA-bound rather than load-bound (12 FMAs per 2 weight loads and 6 broadcasts).
constexpr int64_t kMaxRowBlock = 6;

// One register block: kRows rows x kVecs vectors of columns of the output. packed[i * kRows + r] is
// the scaled value of row r at the i-th active unit, whose kVecs weight vectors start at
// weights + offsets[i]; out points at the block's first element, rows out_stride apart.
template <int64_t kRows, int64_t kVecs, typename scalar_t>
inline void register_block(const scalar_t* packed, const int64_t* offsets, int64_t active, const scalar_t* weights,
                           scalar_t* out, int64_t out_stride) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t kWidth = Vec::size();
  Vec acc[kRows][kVecs];
  for (int64_t r = 0; r < kRows; ++r) {
    for (int64_t j = 0; j < kVecs; ++j) acc[r][j] = Vec(scalar_t(0));
  }
  for (int64_t i = 0; i < active; ++i) {
    const scalar_t* weight_row = weights + offsets[i];
    Vec w[kVecs];
    for (int64_t j = 0; j < kVecs; ++j) w[j] = Vec::loadu(weight_row + j * kWidth);
    const scalar_t* g = packed + i * kRows;
    for (int64_t r = 0; r < kRows; ++r) {
      const Vec gr(g[r]);
      for (int64_t j = 0; j < kVecs; ++j) acc[r][j] = at::vec::fmadd(gr, w[j], acc[r][j]);
    }
  }
  for (int64_t r = 0; r < kRows; ++r) {
    for (int64_t j = 0; j < kVecs; ++j) acc[r][j].store(out + r * out_stride + j * kWidth);
  }
}

// A compile-time row count for the register block (the accumulators must be a fixed-size array to
// stay in registers).
template <int64_t kVecs, typename scalar_t>
void register_block_rows(int64_t rows, const scalar_t* packed, const int64_t* offsets, int64_t active,
                         const scalar_t* weights, scalar_t* out, int64_t out_stride) {
  static_assert(kMaxRowBlock == 6, "extend the switch below");
  switch (rows) {
    case 1: return register_block<1, kVecs>(packed, offsets, active, weights, out, out_stride);
    case 2: return register_block<2, kVecs>(packed, offsets, active, weights, out, out_stride);
    case 3: return register_block<3, kVecs>(packed, offsets, active, weights, out, out_stride);
    case 4: return register_block<4, kVecs>(packed, offsets, active, weights, out, out_stride);
    case 5: return register_block<5, kVecs>(packed, offsets, active, weights, out, out_stride);
    default: return register_block<6, kVecs>(packed, offsets, active, weights, out, out_stride);
  }
}

// Rows are split into balanced blocks of at most kMaxRowBlock (10 rows run as 5 + 5, not 6 + 4).
inline int64_t rows_in_block(int64_t rows, int64_t blocks, int64_t block) {
  return rows / blocks + (block < rows % blocks ? 1 : 0);
}

// Samples [begin, end) of the problem, one at a time: compact the sample's active units, pack its
// scaled values unit-major per row block (so the micro-kernel reads its broadcasts sequentially), then
// sweep the columns: panels of two vectors (one cache line per unit, contiguous, so the active units'
// lines of a panel are few pages apart and prefetchable, where the matrix's rows are a page or more
// apart), then one vector and a scalar tail read from the matrix. All row blocks of a panel run back
// to back, so its active lines are fetched once per sample and then served from L1.
template <typename scalar_t>
void masked_rows_matmul(const MaskedRowsProblem<scalar_t>& p, int64_t begin, int64_t end) {
  constexpr int64_t kWidth = at::vec::Vectorized<scalar_t>::size();
  constexpr int64_t kPanel = kPanelWidth<scalar_t>;
  static_assert(kPanel == 2 * kWidth, "a panel is one register block of two vectors wide");
  const int64_t rows = p.rows, features = p.features, columns = p.columns;
  const int64_t blocks = (rows + kMaxRowBlock - 1) / kMaxRowBlock;
  const int64_t panels = columns / kPanel;
  std::vector<int64_t> units(features), matrix_offsets(features), panel_offsets(features);
  std::vector<scalar_t> packed(features * rows);
  for (int64_t b = begin; b < end; ++b) {
    const scalar_t* factor = p.factor + b * features;
    const scalar_t* values = p.values + b * p.values_batch_stride;
    scalar_t* out = p.out + b * rows * columns;
    int64_t active = 0;
    for (int64_t h = 0; h < features; ++h) {
      if (factor[h] != scalar_t(0)) units[active++] = h;
    }
    for (int64_t i = 0; i < active; ++i) {
      matrix_offsets[i] = units[i] * columns;
      panel_offsets[i] = units[i] * kPanel;
    }
    // packed: row block after row block, each [active][block_rows].
    for (int64_t block = 0, first_row = 0; block < blocks; first_row += rows_in_block(rows, blocks, block++)) {
      const int64_t block_rows = rows_in_block(rows, blocks, block);
      scalar_t* block_packed = packed.data() + first_row * active;
      for (int64_t i = 0; i < active; ++i) {
        const int64_t h = units[i];
        for (int64_t r = 0; r < block_rows; ++r) {
          block_packed[i * block_rows + r] = values[(first_row + r) * features + h] * factor[h];
        }
      }
    }

    const auto column_tile = [&](auto vecs, const scalar_t* weights, const int64_t* offsets, int64_t column) {
      for (int64_t block = 0, first_row = 0; block < blocks; first_row += rows_in_block(rows, blocks, block++)) {
        register_block_rows<decltype(vecs)::value>(rows_in_block(rows, blocks, block),
                                                   packed.data() + first_row * active, offsets, active, weights,
                                                   out + first_row * columns + column, columns);
      }
    };
    for (int64_t panel = 0; panel < panels; ++panel) {
      column_tile(std::integral_constant<int64_t, 2>(), p.panels + panel * features * kPanel, panel_offsets.data(),
                  panel * kPanel);
    }
    int64_t column = panels * kPanel;
    for (; column + kWidth <= columns; column += kWidth) {
      column_tile(std::integral_constant<int64_t, 1>(), p.matrix + column, matrix_offsets.data(), column);
    }
    for (; column < columns; ++column) {
      for (int64_t block = 0, first_row = 0; block < blocks; first_row += rows_in_block(rows, blocks, block++)) {
        const int64_t block_rows = rows_in_block(rows, blocks, block);
        const scalar_t* block_packed = packed.data() + first_row * active;
        for (int64_t r = 0; r < block_rows; ++r) {
          scalar_t sum = 0;
          for (int64_t i = 0; i < active; ++i) {
            sum += block_packed[i * block_rows + r] * p.matrix[matrix_offsets[i] + column];
          }
          out[(first_row + r) * columns + column] = sum;
        }
      }
    }
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace jacext::cpu
