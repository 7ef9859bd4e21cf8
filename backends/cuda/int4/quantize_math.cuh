// The activation quantizer's arithmetic: q = rint(v / d) with d = amax / 127, bit for bit as the
// reference (reference.py: an IEEE division, then round half to even), in fewer and cheaper
// instructions than the compiler's division and cvt.rni. int4_mm.cu's quantizer runs it;
// tests/quantizer_rounding.cu checks it against the IEEE division on every pair of bf16 values.
#pragma once

#include <cuda_runtime.h>

namespace et_int4::cuda {

// 1.5 * 2^23: for |i| < 2^22 the float with bits (i + kMagicBits) is exactly kMagic + i, so an integer
// and its float convert by one FADD or IADD either way (no I2F or F2I, which run on the XU pipe at a
// quarter of the FMA pipe's rate).
constexpr int kMagicBits = 0x4B400000;
constexpr float kMagic = 12582912.f;

// rint(t), half to even, for |t| < 2^22: the FADD rounds t to an integer at kMagic's exponent.
__device__ __forceinline__ int round_to_int(float t) { return __float_as_int(t + kMagic) - kMagicBits; }

// The divisors for which divide_by() is checked equal to the IEEE quotient for every bf16 v with
// |v| <= 127 d (tests/quantizer_rounding.cu); 1/d stays in the normal range there.
constexpr float kMinFastDivisor = 0x1p-100f;
constexpr float kMaxFastDivisor = 0x1p100f;

// 1/d as the division's fast path refines it: MUFU.RCP and one Newton step.
__device__ __forceinline__ float refined_rcp(float d) {
  float r0;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r0) : "f"(d));
  return fmaf(r0, fmaf(-d, r0, 1.f), r0);
}

// v / d from r = refined_rcp(d), rounded as the IEEE division (the fast path's last three steps).
__device__ __forceinline__ float divide_by(float v, float d, float r) {
  const float q0 = v * r;
  return fmaf(r, fmaf(-d, q0, v), q0);
}

// q[i] = rint(v[i] / d) for a lane's elements of a finite block, d = its amax / 127; q = 0 where d is 0
// (an all-zero block, whose 0 / 0 would be NaN). The elements share d: where they are several, the
// reciprocal is refined once and each quotient takes three FMA-pipe instructions, in place of a
// division each (MUFU.RCP, FCHK, a branch to the slow path and five FFMAs); other divisors take the
// IEEE division.
template <int kElems>
__device__ __forceinline__ void quantize_elements(const float (&v)[kElems], float d, int (&q)[kElems]) {
  float t[kElems];
  if (kElems > 1 && d >= kMinFastDivisor && d <= kMaxFastDivisor) {
    const float r = refined_rcp(d);
#pragma unroll
    for (int i = 0; i < kElems; ++i) t[i] = divide_by(v[i], d, r);
  } else {
#pragma unroll
    for (int i = 0; i < kElems; ++i) t[i] = v[i] / d;
  }
#pragma unroll
  for (int i = 0; i < kElems; ++i) q[i] = d != 0.f ? round_to_int(t[i]) : 0;
}

}  // namespace et_int4::cuda
