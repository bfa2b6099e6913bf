// Element loops in copies for AVX-512 and for AVX2 besides the build's baseline ISA, the CPU's best picked
// when the library loads (GCC's target_clones, an ifunc): the extension is built for baseline x86-64, whose
// 4-wide vectors leave a transcendental loop such as tanh's well behind what the CPU's wider vectors do. No FMA
// contraction (GCC's C++ default would fuse a * b + c where the copy's ISA has FMA): so every copy, and a vector
// loop's body and its scalar remainder, round alike, and a result depends neither on the CPU nor on where in a
// row an element sits. One copy where the compiler or platform lacks ifuncs.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define JACEXT_ISA_CLONES \
  __attribute__((target_clones("avx512f", "arch=x86-64-v3", "default"), optimize("fp-contract=off")))
#else
#define JACEXT_ISA_CLONES
#endif
