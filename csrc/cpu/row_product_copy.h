// One instruction set's copy of the row-product kernels (masked_linear_kernel.h), whatever the build's
// baseline ISA: included once by masked_linear_avx2.cpp and once by masked_linear_avx512.cpp, each
// defining JACEXT_ROW_PRODUCT_COPY as AVX2 or AVX512 first. masked_linear.cpp calls a copy only when the
// CPU has its instructions, so the extension stays loadable on any x86-64 (no -march=native).
// Everything included before the target switch is compiled for the baseline, so no inline function shared
// with other files gets the copy's instructions; only at::vec's namespace for the copy and the kernels do.
#include "masked_linear.h"

#ifdef JACEXT_ROW_PRODUCT_ISA_COPIES
#include <ATen/ATen.h>
// What the AVX2 and AVX-512 at::vec headers include beyond ATen.h, pulled in before the switch for that reason.
#include <ATen/AccumulateType.h>
#include <ATen/NumericUtils.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>
#include <c10/util/BFloat16-math.h>
#include <cfloat>
#include <cstdio>
#include <cstdlib>

#define JACEXT_COPY_AVX2 2
#define JACEXT_COPY_AVX512 3
#if JACEXT_ROW_PRODUCT_COPY == JACEXT_COPY_AVX512
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif JACEXT_ROW_PRODUCT_COPY == JACEXT_COPY_AVX2
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#else
#error "define JACEXT_ROW_PRODUCT_COPY as JACEXT_COPY_AVX2 or JACEXT_COPY_AVX512 before including row_product_copy.h"
#endif

// The target switch does not define the ISA macros in C++; sleef.h declares its AVX2 / AVX-512
// functions, and the at::vec headers use them, only under these (as if built with -mavx2 -mfma, or
// -mavx512f ...). Each file is its own translation unit, so they stay defined to its end.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#if JACEXT_ROW_PRODUCT_COPY == JACEXT_COPY_AVX512
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#endif
#include "masked_linear_kernel.h"

namespace jacext::cpu {
#if JACEXT_ROW_PRODUCT_COPY == JACEXT_COPY_AVX512
#define JACEXT_COPY_ISA RowProductIsa::Avx512
#else
#define JACEXT_COPY_ISA RowProductIsa::Avx2
#endif
// this_copy_kernels is the one copy this file compiled: its CPU_CAPABILITY namespace is inline.
template <>
RowProductKernels<float> row_product_kernels_for<JACEXT_COPY_ISA, float>() {
  return this_copy_kernels<float>();
}
template <>
RowProductKernels<double> row_product_kernels_for<JACEXT_COPY_ISA, double>() {
  return this_copy_kernels<double>();
}
}  // namespace jacext::cpu

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // JACEXT_ROW_PRODUCT_ISA_COPIES
