// Triton's tl.randn stream (triton/language/random.py), reproduced for the CPU and CUDA ops so that a plan
// draws the same noise whichever backend runs its solver updates.
//
// Per element: Philox 4x32 with 10 rounds, key (seed_lo, seed_hi) from the int64 seed, counter
// (offset_lo, offset_hi, 0, 0) from the int64 element offset; the first two outputs become uniforms
// (uint_to_uniform_float) and the first Box-Muller normal of the pair is the draw.  Only the integer part and
// the uniforms live here; log / cos / sqrt differ per backend (see philox_normal in each .cpp / .cu file).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FEWSTEP_HD __host__ __device__ __forceinline__
#else
#define FEWSTEP_HD inline
#endif

namespace fewstep {

// Constants as Triton's compiled kernel holds them (fp32 bit patterns read off its PTX for sm_90).
constexpr float kUniformScale = 0x1.fffffep-32f;  // 4.6566127342e-10 -> 0x2FFFFFFF: max int32 * scale < 1
constexpr float kTwoPi = 0x1.921fb6p+2f;          // 6.283185307179586 -> 0x40C90FDB
constexpr float kMinUniform = 0x1.ad7f2ap-24f;    // 1.0e-7 -> 0x33D6BF95

FEWSTEP_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

constexpr uint32_t kPhiloxA = 0xD2511F53u;  // PHILOX_ROUND_A
constexpr uint32_t kPhiloxB = 0xCD9E8D57u;  // PHILOX_ROUND_B
constexpr uint32_t kKeyA = 0x9E3779B9u;     // PHILOX_KEY_A
constexpr uint32_t kKeyB = 0xBB67AE85u;     // PHILOX_KEY_B

// One round of philox_impl on the counter (c0, c1, c2, c3) with key (k0, k1); the caller raises the key.
FEWSTEP_HD void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
  const uint32_t a = c0, b = c2;
  c0 = mulhi32(kPhiloxB, b) ^ c1 ^ k0;
  c2 = mulhi32(kPhiloxA, a) ^ c3 ^ k1;
  c1 = kPhiloxB * b;
  c3 = kPhiloxA * a;
}

// The first two words of philox_impl(offset_lo, offset_hi, 0, 0, seed_lo, seed_hi) (randint4x's i1, i2).
FEWSTEP_HD void philox_pair(uint64_t seed, uint64_t offset, uint32_t& out0, uint32_t& out1) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    philox_round(c0, c1, c2, c3, k0, k1);
    k0 += kKeyA;
    k1 += kKeyB;
  }
  out0 = c0;
  out1 = c1;
}

// uint_to_uniform_float for 32-bit words: bitcast to int32, fold negatives with ~x, int -> fp32 (round to
// nearest), times kUniformScale (one fp32 rounding).  The result lies in [0, 1).
FEWSTEP_HD int32_t uniform_int(uint32_t x) {
  const int32_t i = static_cast<int32_t>(x);
  return i < 0 ? ~i : i;
}

}  // namespace fewstep
