// A tile's Jacobian blocks in the small-chain kernel (small_chain.cpp), stacked so that one product per
// Linear serves every sample of the tile, and the products, scalings and softmax updates the sweeps apply
// to them, over raw row-major buffers: as rows (RowStack, times a matrix) or as columns (ColumnStack, W
// times them: the forward sweep without W^T).
#pragma once

#include <algorithm>
#include <cstdint>

#include "../jacext/rule_math.h"
#include "isa.h"
#include "masked_linear.h"

namespace jacext::cpu {
namespace {

// Products with fewer rows than this run row by row (multiply).
constexpr int64_t kMinBlockRows = 3;

// Entries per side of the squares that transpose moves one at a time: the square's rows in `from` and in
// `to` (16 cache lines each) stay in L1 while it is read and written, where whole rows of a weight matrix
// larger than L1 would be fetched once per entry written.
constexpr int64_t kTransposeBlock = 16;

// to [width, rows] = from [rows, width]^T, both row-major.
template <typename scalar_t>
JACEXT_ISA_CLONES void transpose(const scalar_t* __restrict__ from, int64_t rows, int64_t width,
                                 scalar_t* __restrict__ to) {
  for (int64_t r0 = 0; r0 < rows; r0 += kTransposeBlock) {
    const int64_t r1 = std::min(rows, r0 + kTransposeBlock);
    for (int64_t j0 = 0; j0 < width; j0 += kTransposeBlock) {
      const int64_t j1 = std::min(width, j0 + kTransposeBlock);
      for (int64_t j = j0; j < j1; ++j) {
        for (int64_t r = r0; r < r1; ++r) to[j * rows + r] = from[r * width + j];
      }
    }
  }
}

// out [R, N] = a [R, K] @ matrix [K, N], given also transposed = matrix^T [N, K] (all row-major; either
// may be null, not both: the small-chain kernel makes W^T only where it pays). The register blocks run
// along vectors of N columns and over blocks of rows; with few rows, or N too narrow for a vector of
// columns (the columns left over run in a scalar tail), each row runs as the matrix-vector product
// transposed @ a's row instead, dot products along contiguous rows. One column needs neither: the dense
// product takes it as dot products itself.
template <typename scalar_t>
void multiply(const scalar_t* a, const scalar_t* matrix, const scalar_t* transposed, scalar_t* out, int64_t rows,
              int64_t steps, int64_t columns) {
  const bool blocks =
      columns == 1 || (rows >= kMinBlockRows && columns >= row_product_kernels<scalar_t>(rows).panel_width);
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

// values [H, S, R] *= factors [S, H] (as [H, S, 1]): each sample's R columns by its own factors, feature
// by feature.
template <typename scalar_t>
JACEXT_ISA_CLONES void scale_sample_columns(scalar_t* __restrict__ values, const scalar_t* __restrict__ factors,
                                            int64_t samples, int64_t rows, int64_t width) {
  for (int64_t h = 0; h < width; ++h) {
    for (int64_t s = 0; s < samples; ++s) {
      const scalar_t factor = factors[s * width + h];
      scalar_t* block_row = values + (h * samples + s) * rows;
      for (int64_t r = 0; r < rows; ++r) block_row[r] *= factor;
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

// A tile's Jacobian blocks as rows: `rows` per sample, the samples one after the other, each row `width`
// long, [samples * rows, width] row-major; or the lazy identity (rows == width). The reverse sweep's
// cotangents [C, H] (times W), and the forward sweep's tangents transposed, [D, H] (times W^T), where the
// batch pays for making W^T.
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

  // Each sample's features (here columns) times its factors [samples, width].
  void scale_features(const scalar_t* factors) {
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

// The forward sweep's tangents of a tile where no W^T is made, side by side: each sample's block
// [width, rows] (rows = D, one column per input direction) in columns s * rows.., [width, samples * rows]
// row-major; or the lazy identity (rows == width). A Linear is then W [out, width] @ the whole stack, one product with
// W's rows for the register blocks' rows and the samples' directions for their vectors of columns.
template <typename scalar_t>
struct ColumnStack {
  scalar_t* values = nullptr;  // views of the thread's workspace (run_tiles)
  scalar_t* scratch = nullptr;
  int64_t samples = 0, rows = 0, width = 0;
  bool identity = true;

  int64_t columns() const { return samples * rows; }

  void materialise() {
    if (!identity) return;
    std::fill(values, values + width * columns(), scalar_t(0));
    for (int64_t s = 0; s < samples; ++s) {
      for (int64_t r = 0; r < rows; ++r) values[r * columns() + s * rows + r] = scalar_t(1);
    }
    identity = false;
  }

  // weight [out, width] @ every sample's block; on the identity, the weight itself for every sample (the
  // samples innermost: a copy of a weight row per sample, a few entries, would be a memmove call each).
  void multiply_by(const scalar_t* weight, int64_t out) {
    if (identity) {
      for (int64_t o = 0; o < out; ++o) {
        for (int64_t d = 0; d < width; ++d) {
          const scalar_t entry = weight[o * width + d];
          for (int64_t s = 0; s < samples; ++s) values[o * columns() + s * rows + d] = entry;
        }
      }
      identity = false;
    } else {
      run_dense_rows_matmul(DenseRowsProblem<scalar_t>{weight, values, scratch, out, width, columns()});
      std::swap(values, scratch);
    }
    width = out;
  }

  // Each sample's features (here rows) times its factors [samples, width].
  void scale_features(const scalar_t* factors) {
    materialise();
    scale_sample_columns(values, factors, samples, rows, width);
  }

  // Writes each sample's Jacobian [C = width, D = rows] to jacobian [samples, C, D] (the samples
  // innermost, as in multiply_by).
  void write_jacobians(scalar_t* jacobian) const {
    for (int64_t c = 0; c < width; ++c) {
      for (int64_t d = 0; d < rows; ++d) {
        for (int64_t s = 0; s < samples; ++s) {
          jacobian[(s * width + c) * rows + d] = values[c * columns() + s * rows + d];
        }
      }
    }
  }

  // Softmax and log-softmax with each sample's probabilities, on the sample's tangent rows [rows, width]
  // (its block transposed into scratch and back: a softmax is a narrow head, so the copies are small).
  void update_softmax_rows(const scalar_t* probabilities, SoftmaxVariant variant) {
    materialise();
    for (int64_t s = 0; s < samples; ++s) {
      for (int64_t h = 0; h < width; ++h) {
        for (int64_t r = 0; r < rows; ++r) scratch[r * width + h] = values[h * columns() + s * rows + r];
      }
      for (int64_t r = 0; r < rows; ++r) {
        scalar_t* row = scratch + r * width;
        softmax_family_row<scalar_t>(variant, row, probabilities + s * width, row, width);
      }
      for (int64_t h = 0; h < width; ++h) {
        for (int64_t r = 0; r < rows; ++r) values[h * columns() + s * rows + r] = scratch[r * width + h];
      }
    }
  }
};

}  // namespace
}  // namespace jacext::cpu
