// tanh for the CPU kernels in a form that a compiler vectorises: no libm call and no branch. torch's own
// CPU tanh ran several times slower than its sigmoid on the benchmark machine (an AMD EPYC; it was half of
// the pinn case's time), and libm's scalar tanh is slower still.
//
// With a = |z| and t = expm1(-2a):  tanh(a) = -t / (t + 2),  t in (-1, 0],
// which neither overflows nor cancels (for small a, t ~ -2a is accurate to its last bit, where 1 - 2/(e^2a + 1)
// would cancel). expm1 by Cody-Waite reduction, u = n ln2 + r with |r| <= ln2 / 2 and a Taylor polynomial
// in r: expm1(u) = 2^n expm1(r) + (2^n - 1), both terms exact but the polynomial's. Error against the
// correctly rounded tanh: at most 2.5 ulp in float and double (tests/test_tanh.py bounds it by 3).
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>

namespace jacext {

// Per type: the integer of the same width; |z| above which tanh(z) rounds to +-1 (|z| is clamped there,
// so 2^n stays a normal number); the rounding shifter 1.5 * 2^mantissa_bits (x + shifter rounds x to an
// integer, held in the low bits of its representation); ln 2 split so that n * high is exact for the n
// reached; the Taylor degree whose truncation stays below a quarter ulp on |r| <= ln2 / 2.
template <typename T>
struct TanhConstants;

template <>
struct TanhConstants<float> {
  using Bits = uint32_t;
  static constexpr int kMantissaBits = 23, kExponentBias = 127, kDegree = 7;
  static constexpr float kSaturation = 9.1f;  // 1 - tanh(9.1) < 2^-25, half an ulp below 1
  static constexpr float kShifter = 0x1.8p23f;
  static constexpr float kLog2e = 1.44269504088896341f;
  static constexpr float kLn2High = 0x1.62e400p-1f, kLn2Low = 0x1.7f7d1cp-20f;
};

template <>
struct TanhConstants<double> {
  using Bits = uint64_t;
  static constexpr int kMantissaBits = 52, kExponentBias = 1023, kDegree = 13;
  static constexpr double kSaturation = 19.1;  // 1 - tanh(19.1) < 2^-54
  static constexpr double kShifter = 0x1.8p52;
  static constexpr double kLog2e = 1.44269504088896340736;
  static constexpr double kLn2High = 6.93147180369123816490e-01, kLn2Low = 1.90821492927058770002e-10;
};

// 1/k! + r/(k+1)! + ... + r^(degree-k)/degree!, in Horner form.
template <typename T, int k, int degree>
inline __attribute__((always_inline)) T inverse_factorial_series(T r) {
  constexpr T coefficient = [] {
    T value = 1;
    for (int i = 2; i <= k; ++i) value /= T(i);
    return value;
  }();
  if constexpr (k == degree) {
    return coefficient;
  } else {
    return coefficient + r * inverse_factorial_series<T, k + 1, degree>(r);
  }
}

// tanh(z) for T = float or double; NaN stays NaN, tanh(+-0) = +-0, tanh(+-inf) = +-1.
template <typename T>
inline __attribute__((always_inline)) T tanh_via_expm1(T z) {
  using C = TanhConstants<T>;
  using Bits = typename C::Bits;
  const T a = std::fabs(z);
  // min(a, saturation) with NaN kept, as bit masks: GCC (under its default -ftrapping-math) vectorises
  // no float select whose arms it may compute apart, and it splits `a > s ? s : a` into a constant arm.
  const Bits over = std::bit_cast<Bits>(a > C::kSaturation ? std::bit_cast<T>(~Bits(0)) : T(0));
  const T clamped = std::bit_cast<T>((std::bit_cast<Bits>(a) & ~over) | (std::bit_cast<Bits>(C::kSaturation) & over));
  const T u = T(-2) * clamped;
  const T shifted = u * C::kLog2e + C::kShifter;
  const T n = shifted - C::kShifter;
  const T r = (u - n * C::kLn2High) - n * C::kLn2Low;
  const T expm1_r = r + r * r * inverse_factorial_series<T, 2, C::kDegree>(r);
  // 2^n from n's bits in `shifted` (n <= 0 and 2^n normal: unsigned wrap-around gives n + bias)
  const Bits biased = std::bit_cast<Bits>(shifted) - std::bit_cast<Bits>(C::kShifter) + Bits(C::kExponentBias);
  const T scale = std::bit_cast<T>(biased << C::kMantissaBits);
  const T t = scale * expm1_r + (scale - T(1));
  return std::copysign(-t / (t + T(2)), z);
}

}  // namespace jacext
