// The vector layer of pale_mm's fused fp32 CPU kernels (attention_cpu.cpp,
// dwconv_cpu.cpp): the one place that names an instruction set. The kernels are
// written once against these functions; the vector width is chosen at build time,
// and pale_mm/ops/kernels.py builds the same sources twice, as two extensions:
//   -DPALE_MM_VEC=16 -mavx512f -mfma: vec = __m512, 16 floats, 32 registers;
//   -DPALE_MM_VEC=8  -mavx2 -mfma:    vec = __m256, 8 floats, 16 registers.
// A `mask` selects the first k lanes (lanes_below); masked loads never touch the
// memory of the lanes they leave out. The functions live in an inline namespace
// named after the build, so the two builds' symbols differ (same names, different
// vector types) even where both are loaded into one process.
#pragma once

#include <immintrin.h>

#include <limits>

#ifndef PALE_MM_VEC
#error "pale_mm kernels: build with -DPALE_MM_VEC=16 (AVX-512) or -DPALE_MM_VEC=8 (AVX2)"
#endif

#if PALE_MM_VEC == 16
#define PALE_MM_ISA avx512
#elif PALE_MM_VEC == 8
#define PALE_MM_ISA avx2
#else
#error "pale_mm kernels: PALE_MM_VEC must be 16 (AVX-512) or 8 (AVX2)"
#endif

namespace pale_simd {
inline namespace PALE_MM_ISA {

#if PALE_MM_VEC == 16
#if !defined(__AVX512F__) || !defined(__FMA__)
#error "pale_mm kernels: PALE_MM_VEC=16 needs -mavx512f -mfma"
#endif

using vec = __m512;
using mask = __mmask16;
constexpr int W = 16;          // floats per vector
constexpr int kRegisters = 32;  // vector registers

inline vec zero() { return _mm512_setzero_ps(); }
inline vec set1(float x) { return _mm512_set1_ps(x); }
inline vec load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
inline vec sub(vec a, vec b) { return _mm512_sub_ps(a, b); }
inline vec mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
inline vec fmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec div(vec a, vec b) { return _mm512_div_ps(a, b); }
inline vec abs_ps(vec x) { return _mm512_abs_ps(x); }
// |a| with the sign of s
inline vec copy_sign(vec a, vec s) {
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(sign, _mm512_castps_si512(s),
                                                       _mm512_castps_si512(a), 0xCA));
}

// The lanes i < k (none for k <= 0, all for k >= W).
inline mask lanes_below(int k) {
  return k >= W ? static_cast<mask>(0xFFFF)
                : k <= 0 ? static_cast<mask>(0) : static_cast<mask>((1u << k) - 1);
}
inline vec maskz_load(mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
inline void mask_store(float* p, mask m, vec v) { _mm512_mask_storeu_ps(p, m, v); }
inline vec maskz(mask m, vec v) { return _mm512_maskz_mov_ps(m, v); }
// max(acc, x) in the lanes of m, acc elsewhere
inline vec mask_max(vec acc, mask m, vec x) { return _mm512_mask_max_ps(acc, m, acc, x); }
inline float reduce_add(vec v) { return _mm512_reduce_add_ps(v); }
inline float reduce_max(vec v) { return _mm512_reduce_max_ps(v); }

// p * 2^n for an integral n (exp2_ps below); scalef gives 0 or a denormal for very
// negative n, so exp2_ps needs no clamp here.
inline vec exp2_scale(vec p, vec n) { return _mm512_scalef_ps(p, n); }
inline vec round_nearest(vec x) {
  return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline vec clamp_exp2_arg(vec x) { return x; }

// In place: r[k] (row k of a 16 x 16 block) becomes column k of it.
inline void transpose(vec r[W]) {
  vec t[16], u[16];
  for (int i = 0; i < 8; i++) {  // per 128-bit lane L: rows 2i, 2i+1 of columns 4L.. 4L+3
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; i++) {  // u[4i + c], lane L: rows 4i..4i+3 of column 4L + c
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
    u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int c = 0; c < 4; c++) {  // column 4L + c gathers lane L of u[c], u[4+c], u[8+c], u[12+c]
    const vec x = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44);
    const vec y = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44);
    const vec x2 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xee);
    const vec y2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xee);
    r[c] = _mm512_shuffle_f32x4(x, y, 0x88);
    r[4 + c] = _mm512_shuffle_f32x4(x, y, 0xdd);
    r[8 + c] = _mm512_shuffle_f32x4(x2, y2, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(x2, y2, 0xdd);
  }
}

#else  // PALE_MM_VEC == 8
#if !defined(__AVX2__) || !defined(__FMA__)
#error "pale_mm kernels: PALE_MM_VEC=8 needs -mavx2 -mfma"
#endif

using vec = __m256;
using mask = __m256i;  // all-ones lanes are selected
constexpr int W = 8;
constexpr int kRegisters = 16;

inline vec zero() { return _mm256_setzero_ps(); }
inline vec set1(float x) { return _mm256_set1_ps(x); }
inline vec load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
inline vec sub(vec a, vec b) { return _mm256_sub_ps(a, b); }
inline vec mul(vec a, vec b) { return _mm256_mul_ps(a, b); }
inline vec fmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec div(vec a, vec b) { return _mm256_div_ps(a, b); }
inline vec abs_ps(vec x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), x); }
// |a| with the sign of s
inline vec copy_sign(vec a, vec s) {
  const vec sign = _mm256_set1_ps(-0.f);
  return _mm256_or_ps(_mm256_andnot_ps(sign, a), _mm256_and_ps(sign, s));
}

inline mask lanes_below(int k) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline vec maskz_load(mask m, const float* p) { return _mm256_maskload_ps(p, m); }
inline void mask_store(float* p, mask m, vec v) { _mm256_maskstore_ps(p, m, v); }
inline vec maskz(mask m, vec v) { return _mm256_and_ps(_mm256_castsi256_ps(m), v); }
inline vec mask_max(vec acc, mask m, vec x) {
  return _mm256_blendv_ps(acc, _mm256_max_ps(acc, x), _mm256_castsi256_ps(m));
}
inline float reduce_add(vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float reduce_max(vec v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

// p * 2^n for an integral n in [-127, 127], built in the exponent bits: n = -127
// gives exactly 0 (AVX-512's scalef gives a denormal there, below 1.2e-38).
inline vec exp2_scale(vec p, vec n) {
  const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(e, 23)));
}
inline vec round_nearest(vec x) {
  return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
// x >= -127, so that 2^round(x) has an exponent field; max(c, x) returns x when
// x is NaN, so a NaN still propagates.
inline vec clamp_exp2_arg(vec x) { return _mm256_max_ps(_mm256_set1_ps(-127.f), x); }

// In place: r[k] (row k of an 8 x 8 block) becomes column k of it.
inline void transpose(vec r[W]) {
  vec t[8], u[8];
  for (int i = 0; i < 4; i++) {  // per 128-bit lane L: rows 2i, 2i+1 of columns 4L.. 4L+3
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; i++) {  // u[4i + c], lane L: rows 4i..4i+3 of column 4L + c
    u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xee);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
  }
  for (int c = 0; c < 4; c++) {  // column c: low lanes of u[c], u[4+c]; column 4 + c: high
    r[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
    r[4 + c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
  }
}

#endif

// The first k floats at p (k may be <= 0 or >= W), zero in the other lanes: a plain
// load for a whole vector.
inline vec load_first(const float* p, int k) {
  return k >= W ? load(p) : maskz_load(lanes_below(k), p);
}

// 2^x for x <= 0 (differences to a row maximum, in log2 units; also valid up to
// x = 127); |rel err| < 2.5e-7 (a degree-5 relative-error minimax fit of 2^f on
// [-0.5, 0.5], evaluated in fp32); 0 (or a denormal) below -126.5; NaN stays NaN.
inline vec exp2_ps(vec x) {
  x = clamp_exp2_arg(x);
  const vec n = round_nearest(x);
  const vec f = sub(x, n);
  vec p = set1(1.32765e-3f);
  p = fmadd(p, f, set1(9.67554e-3f));
  p = fmadd(p, f, set1(5.550713e-2f));
  p = fmadd(p, f, set1(2.402212e-1f));
  p = fmadd(p, f, set1(6.9314697e-1f));
  p = fmadd(p, f, set1(1.00000007f));
  return exp2_scale(p, n);
}

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// exp(x) for x <= 0.
inline vec exp_ps(vec x) { return exp2_ps(mul(x, set1(kLog2e))); }

inline vec neg_inf() { return set1(-std::numeric_limits<float>::infinity()); }

}  // namespace PALE_MM_ISA
}  // namespace pale_simd
