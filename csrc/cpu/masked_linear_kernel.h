// The register-blocked row products of the CPU kernels: the masked rows product out[b] = values[b]
// diag(factor[b]) matrix, touching only the rows of `matrix` whose factor entry is nonzero (the active
// units of a ReLU mask), and the dense product of the small-chain kernel, out = a @ matrix.
//
// Included once per instruction set: by masked_linear.cpp (the build's baseline ISA) and through
// row_product_copy.h by masked_linear_avx2.cpp and masked_linear_avx512.cpp (chosen at run time).
// at::vec::Vectorized is whatever CPU_CAPABILITY the including file selected, so everything here lives
// in that capability's inline namespace: the copies never share a symbol.
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
// classic 6 x 16 GEMM micro-kernel). AVX-512's 32 registers hold 12 rows: a Jacobian block of up to 12
// rows (C <= 12 in reverse mode) then loads each active unit's weight row once per sample, not once per
// row block, and issues half the loads and broadcasts per multiply-add.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kMaxRowBlock = 12;
#else
constexpr int64_t kMaxRowBlock = 6;
#endif

// Where a register block finds the matrix row of its i-th step: the masked kernel passes the active
// units' offsets (an int64_t array), the dense product every row in turn.
struct EveryRow {
  int64_t stride;
  int64_t operator[](int64_t i) const { return i * stride; }
};

// One register block: kRows rows x kVecs vectors of columns of the output, summed over `steps`:
// out[r, :] = sum_i a[r * row_stride + i * step_stride] * weights[offsets[i] : + kVecs vectors]. The
// masked kernel's packed values are step-major (row_stride 1, step_stride kRows), the dense product
// reads a row-major block in place (row_stride its width, step_stride 1). out points at the block's
// first element, rows out_stride apart; with `accumulate` the sum is added to what out holds.
template <int64_t kRows, int64_t kVecs, typename scalar_t, typename Offsets>
inline void register_block(const scalar_t* a, int64_t row_stride, int64_t step_stride, const Offsets& offsets,
                           int64_t steps, const scalar_t* weights, scalar_t* out, int64_t out_stride,
                           bool accumulate) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t kWidth = Vec::size();
  Vec acc[kRows][kVecs];
  for (int64_t r = 0; r < kRows; ++r) {
    for (int64_t j = 0; j < kVecs; ++j) {
      acc[r][j] = accumulate ? Vec::loadu(out + r * out_stride + j * kWidth) : Vec(scalar_t(0));
    }
  }
  for (int64_t i = 0; i < steps; ++i) {
    const scalar_t* weight_row = weights + offsets[i];
    Vec w[kVecs];
    for (int64_t j = 0; j < kVecs; ++j) w[j] = Vec::loadu(weight_row + j * kWidth);
    const scalar_t* g = a + i * step_stride;
    for (int64_t r = 0; r < kRows; ++r) {
      const Vec gr(g[r * row_stride]);
      for (int64_t j = 0; j < kVecs; ++j) acc[r][j] = at::vec::fmadd(gr, w[j], acc[r][j]);
    }
  }
  for (int64_t r = 0; r < kRows; ++r) {
    for (int64_t j = 0; j < kVecs; ++j) acc[r][j].store(out + r * out_stride + j * kWidth);
  }
}

// A compile-time row count for the register block (the accumulators must be a fixed-size array to
// stay in registers): kRows if `rows` is kRows, else the next count up to kMaxRowBlock. `a` as in
// register_block, with step_stride `rows` when packed (the masked kernel) or 1 (the dense product); each
// layout spelled out, so that the packed one's strides are compile-time constants.
template <int64_t kVecs, int64_t kRows = 1, typename scalar_t, typename Offsets>
void register_block_rows(int64_t rows, const scalar_t* a, int64_t row_stride, bool packed, const Offsets& offsets,
                         int64_t steps, const scalar_t* weights, scalar_t* out, int64_t out_stride,
                         bool accumulate = false) {
  if constexpr (kRows < kMaxRowBlock) {
    if (rows != kRows) {
      return register_block_rows<kVecs, kRows + 1>(rows, a, row_stride, packed, offsets, steps, weights, out,
                                                   out_stride, accumulate);
    }
  }
  if (packed) return register_block<kRows, kVecs>(a, 1, kRows, offsets, steps, weights, out, out_stride, accumulate);
  register_block<kRows, kVecs>(a, row_stride, 1, offsets, steps, weights, out, out_stride, accumulate);
}

// A weight panel is one register block wide: two vectors of columns.
constexpr int64_t kPanelVectors = 2;

// Bytes of weight rows that several row blocks read in turn: half of a 32 KiB L1 data cache, so that the
// rows one block loaded are still there for the next (the packed values stream through the other half).
constexpr int64_t kReusedWeightBytes = 16 << 10;

// Rows are split into balanced blocks of at most kMaxRowBlock (10 rows run as 5 + 5, not 6 + 4).
inline int64_t rows_in_block(int64_t rows, int64_t blocks, int64_t block) {
  return rows / blocks + (block < rows % blocks ? 1 : 0);
}

// Samples [begin, end) of the problem, one at a time: compact the sample's active units, pack its
// scaled values unit-major per row block (so the micro-kernel reads its broadcasts sequentially), then
// sweep the columns: panels of two vectors (one or two cache lines per unit, contiguous, so the active
// units' lines of a panel are few pages apart and prefetchable, where the matrix's rows are a page or
// more apart), then one vector and a scalar tail read from the matrix. All row blocks of a panel run back
// to back over chunks of its active rows that fit L1, so each line is fetched once per sample.
template <typename scalar_t>
void masked_rows_matmul(const MaskedRowsProblem<scalar_t>& p, int64_t begin, int64_t end) {
  constexpr int64_t kWidth = at::vec::Vectorized<scalar_t>::size();
  constexpr int64_t kPanel = kPanelVectors * kWidth;
  const int64_t rows = p.rows, features = p.features, columns = p.columns;
  const int64_t blocks = (rows + kMaxRowBlock - 1) / kMaxRowBlock;
  const int64_t panels = columns / kPanel;
  std::vector<int64_t> units(features), matrix_offsets(features), panel_offsets(features);
  std::vector<scalar_t> packed(features * rows);
  for (int64_t b = begin; b < end; ++b) {
    const scalar_t* factor = p.factor + b * features;
    const scalar_t* values = p.values + b * p.values_batch_stride;
    scalar_t* out = p.out + b * rows * columns;
    // Branch-free: a ReLU mask's units are on and off at random, which a branch would mispredict.
    int64_t active = 0;
    for (int64_t h = 0; h < features; ++h) {
      units[active] = h;
      active += factor[h] != scalar_t(0);
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

    // One tile of columns for all row blocks. With several blocks the active units go in chunks whose
    // weight rows stay in L1 while every block reads them (each later chunk adds to the blocks' sums); one
    // block reads each row once anyway.
    const auto column_tile = [&](auto vecs, const scalar_t* weights, const int64_t* offsets, int64_t column) {
      constexpr int64_t kRowBytes = decltype(vecs)::value * kWidth * static_cast<int64_t>(sizeof(scalar_t));
      const int64_t chunk = blocks == 1 ? active : kReusedWeightBytes / kRowBytes;
      int64_t first_unit = 0;
      do {
        const int64_t units_in_chunk = std::min(chunk, active - first_unit);
        for (int64_t block = 0, first_row = 0; block < blocks; first_row += rows_in_block(rows, blocks, block++)) {
          const int64_t block_rows = rows_in_block(rows, blocks, block);
          register_block_rows<decltype(vecs)::value>(
              block_rows, packed.data() + first_row * active + first_unit * block_rows, 1, /*packed=*/true,
              offsets + first_unit, units_in_chunk, weights, out + first_row * columns + column, columns,
              /*accumulate=*/first_unit > 0);
        }
        first_unit += units_in_chunk;
      } while (first_unit < active);
    };
    for (int64_t panel = 0; panel < panels; ++panel) {
      column_tile(std::integral_constant<int64_t, kPanelVectors>(), p.panels + panel * features * kPanel,
                  panel_offsets.data(), panel * kPanel);
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

// kRows dot products out[r] = a[r, :] . column, a's rows `steps` long and contiguous like the column:
// one load of the column's vector serves kRows multiply-adds.
template <int64_t kRows, typename scalar_t>
inline void dot_rows(const scalar_t* a, const scalar_t* column, int64_t steps, scalar_t* out) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t kWidth = Vec::size();
  Vec acc[kRows];
  for (int64_t r = 0; r < kRows; ++r) acc[r] = Vec(scalar_t(0));
  int64_t i = 0;
  for (; i + kWidth <= steps; i += kWidth) {
    const Vec x = Vec::loadu(column + i);
    for (int64_t r = 0; r < kRows; ++r) acc[r] = at::vec::fmadd(Vec::loadu(a + r * steps + i), x, acc[r]);
  }
  for (int64_t r = 0; r < kRows; ++r) {
    scalar_t lanes[kWidth];
    acc[r].store(lanes);
    scalar_t sum = 0;
    for (int64_t lane = 0; lane < kWidth; ++lane) sum += lanes[lane];
    for (int64_t j = i; j < steps; ++j) sum += a[r * steps + j] * column[j];
    out[r] = sum;
  }
}

// The dense product out [R, N] = a [R, K] @ matrix [K, N] (DenseRowsProblem): tiles of two vectors of
// columns, then one, each run over all row blocks, then a scalar tail. a's rows are read in place:
// the small-chain kernel's blocks are a few rows, so packing them would cost as much as it saves.
// A single column (a matrix-vector product: the small-chain kernel's forward pass) has no vector of
// columns to tile, so it runs as dot products along a's contiguous rows instead.
template <typename scalar_t>
void dense_rows_matmul(const DenseRowsProblem<scalar_t>& p) {
  constexpr int64_t kWidth = at::vec::Vectorized<scalar_t>::size();
  const int64_t rows = p.rows, steps = p.steps, columns = p.columns;
  if (columns == 1) {
    constexpr int64_t kDotRows = 4;
    int64_t r = 0;
    for (; r + kDotRows <= rows; r += kDotRows) dot_rows<kDotRows>(p.a + r * steps, p.matrix, steps, p.out + r);
    for (; r < rows; ++r) dot_rows<1>(p.a + r * steps, p.matrix, steps, p.out + r);
    return;
  }
  const int64_t blocks = (rows + kMaxRowBlock - 1) / kMaxRowBlock;
  const EveryRow offsets{columns};
  const auto column_tile = [&](auto vecs, int64_t column) {
    for (int64_t block = 0, first_row = 0; block < blocks; first_row += rows_in_block(rows, blocks, block++)) {
      register_block_rows<decltype(vecs)::value>(rows_in_block(rows, blocks, block), p.a + first_row * steps, steps,
                                                 /*packed=*/false, offsets, steps, p.matrix + column,
                                                 p.out + first_row * columns + column, columns);
    }
  };
  int64_t column = 0;
  for (; column + 2 * kWidth <= columns; column += 2 * kWidth) column_tile(std::integral_constant<int64_t, 2>(), column);
  for (; column + kWidth <= columns; column += kWidth) column_tile(std::integral_constant<int64_t, 1>(), column);
  for (; column < columns; ++column) {
    for (int64_t r = 0; r < rows; ++r) {
      scalar_t sum = 0;
      for (int64_t i = 0; i < steps; ++i) sum += p.a[r * steps + i] * p.matrix[i * columns + column];
      p.out[r * columns + column] = sum;
    }
  }
}

// This instruction set's copy, for the run-time choice (masked_linear.cpp).
template <typename scalar_t>
RowProductKernels<scalar_t> this_copy_kernels() {
  return {kPanelVectors * at::vec::Vectorized<scalar_t>::size(), kMaxRowBlock, &masked_rows_matmul<scalar_t>,
          &dense_rows_matmul<scalar_t>};
}

}  // namespace CPU_CAPABILITY
}  // namespace jacext::cpu
