// The row-product kernels (masked and dense) compiled for AVX2 + FMA, whatever the build's baseline ISA: masked_linear.cpp
// calls it only when the CPU reports both, so the extension stays loadable on any x86-64 (no
// -march=native). Everything this file includes before the target switch is compiled for the
// baseline, so no inline function shared with other files gets AVX2 code; only at::vec's AVX2
// namespace and the kernel below do.
#include "masked_linear.h"

#ifdef JACEXT_MASKED_ROWS_AVX2
#include <ATen/ATen.h>
// What the AVX2 at::vec headers include beyond ATen.h, pulled in before the switch for that reason.
#include <ATen/AccumulateType.h>
#include <ATen/NumericUtils.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>
#include <c10/util/BFloat16-math.h>
#include <cfloat>
#include <cstdio>
#include <cstdlib>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
// The target switch does not define the ISA macros in C++; sleef.h declares its AVX2 functions, and
// the at::vec AVX2 headers use them, only under these (as if built with -mavx2 -mfma).
#ifndef __AVX__
#define __AVX__ 1
#define JACEXT_UNDEF_AVX
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#define JACEXT_UNDEF_AVX2
#endif
#ifndef __FMA__
#define __FMA__ 1
#define JACEXT_UNDEF_FMA
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "masked_linear_kernel.h"

namespace jacext::cpu {
void masked_rows_matmul_avx2(const MaskedRowsProblem<float>& problem, int64_t begin, int64_t end) {
  AVX2::masked_rows_matmul(problem, begin, end);
}
void masked_rows_matmul_avx2(const MaskedRowsProblem<double>& problem, int64_t begin, int64_t end) {
  AVX2::masked_rows_matmul(problem, begin, end);
}
void dense_rows_matmul_avx2(const DenseRowsProblem<float>& problem) { AVX2::dense_rows_matmul(problem); }
void dense_rows_matmul_avx2(const DenseRowsProblem<double>& problem) { AVX2::dense_rows_matmul(problem); }
}  // namespace jacext::cpu

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#ifdef JACEXT_UNDEF_AVX
#undef __AVX__
#endif
#ifdef JACEXT_UNDEF_AVX2
#undef __AVX2__
#endif
#ifdef JACEXT_UNDEF_FMA
#undef __FMA__
#endif
#endif  // JACEXT_MASKED_ROWS_AVX2
