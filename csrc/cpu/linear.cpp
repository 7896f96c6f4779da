// y = x W^T for n input rows (n = 1 when decoding, a prompt chunk when prefilling), W in bf16 or
// group-affine q8/q4. One kernel per (dtype, ISA, token tile); the ISA is picked once at run time,
// so one build runs on any x86-64 and on arm64. Rows of W are split across the pool; each thread
// runs every token tile against a row while the row is in L1, so W is read from memory once per
// call whatever n is.
//
// Quantized rows use y = sum_g(scale_g * dot(q_g, x_g) + bias_g * sum(x_g)). The x86 kernels take
// x per group of 64 as 16-bit fixed point (x_g ~ xs_g * xi_g, xs_g = max|x_g| / 32767, error below
// 2^-16 of the group's largest element) so each dot is exact integer multiply-adds (pmaddwd) of
// codes and xi (pmaddwd, and vpdpwssd with AVX-512 VNNI); only the per-group results are scaled
// in fp32. The portable kernels stay in fp32.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "cpu/kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define FM_X86 1
#elif defined(__aarch64__)
#include <arm_neon.h>
#define FM_NEON 1
#endif

namespace fm::cpu {
namespace {

// How a kernel wants each token's x laid out in scratch, per group of 64 columns:
//   F32Nibble: fp32, x's even columns then its odd columns (low nibbles hold even columns)
//   F32:       fp32 as is
//   I16Nibble: int16, even then odd columns, plus one fp32 scale per group
//   I16:       int16 as is, plus one fp32 scale per group
enum class XLayout { F32Nibble, F32, I16Nibble, I16 };

// A tile of NT tokens against one quantized row:
//   out[t] = sum_g(scale_g * [xs_tg *] dot(q_g, x_tg)) + sum_g(bias_g * sum(x_tg)).
// Token t's prepared x starts at x + t * x_stride elements; its group scales and group sums at
// xs + t * groups and sums + t * groups.
using TileQ = void (*)(const uint8_t* q, const uint16_t* scales, const uint16_t* biases, const void* x,
                       const float* xs, const float* sums, int64_t x_stride, int64_t groups, float* out);
using RowBf16 = float (*)(const uint16_t* w, const float* x, int64_t cols);

float row_bf16_generic(const uint16_t* w, const float* x, int64_t cols) {
  float acc = 0.0f;
  for (int64_t c = 0; c < cols; ++c) acc += bf16_to_f32(w[c]) * x[c];
  return acc;
}

template <int NT>
void tile_q4_generic(const uint8_t* q0, const uint16_t* scales, const uint16_t* biases, const void* xv, const float*,
                     const float* sums, int64_t x_stride, int64_t groups, float* out) {
  for (int t = 0; t < NT; ++t) {
    const float* x = static_cast<const float*>(xv) + t * x_stride;
    const uint8_t* q = q0;
    float acc = 0.0f;
    for (int64_t g = 0; g < groups; ++g, q += 32, x += 64) {
      float d = 0.0f;
      for (int i = 0; i < 32; ++i) d += float(q[i] & 15) * x[i] + float(q[i] >> 4) * x[32 + i];
      acc += bf16_to_f32(scales[g]) * d;
    }
    out[t] = acc + row_bf16_generic(biases, sums + t * groups, groups);
  }
}

template <int NT>
void tile_q8_generic(const uint8_t* q0, const uint16_t* scales, const uint16_t* biases, const void* xv, const float*,
                     const float* sums, int64_t x_stride, int64_t groups, float* out) {
  for (int t = 0; t < NT; ++t) {
    const float* x = static_cast<const float*>(xv) + t * x_stride;
    const uint8_t* q = q0;
    float acc = 0.0f;
    for (int64_t g = 0; g < groups; ++g, q += 64, x += 64) {
      float d = 0.0f;
      for (int i = 0; i < 64; ++i) d += float(q[i]) * x[i];
      acc += bf16_to_f32(scales[g]) * d;
    }
    out[t] = acc + row_bf16_generic(biases, sums + t * groups, groups);
  }
}

// Column of x that position i of a laid-out group of 64 holds.
inline int source_column(bool nibble_order, int i) {
  return nibble_order ? (i < 32 ? 2 * i : 2 * (i - 32) + 1) : i;
}

// Lays one token's x out for a kernel (see XLayout) at `out` (cols elements), its int16 group
// scales at `xs`, and the plain sum of each group of 64 at `sums` (for the bias term).
using PrepareX = void (*)(XLayout layout, const float* x, int64_t groups, float* out, float* xs, float* sums);

void prepare_generic(XLayout layout, const float* x, int64_t groups, float* out, float* xs, float* sums) {
  for (int64_t g = 0; g < groups; ++g) {
    float s = 0.0f;
    for (int i = 0; i < 64; ++i) s += x[g * 64 + i];
    sums[g] = s;
  }
  const bool nibble = layout == XLayout::F32Nibble || layout == XLayout::I16Nibble;
  if (layout == XLayout::F32 || layout == XLayout::F32Nibble) {
    for (int64_t g = 0; g < groups; ++g)
      for (int i = 0; i < 64; ++i) out[g * 64 + i] = x[g * 64 + source_column(nibble, i)];
    return;
  }
  int16_t* xi = reinterpret_cast<int16_t*>(out);
  for (int64_t g = 0; g < groups; ++g) {
    const float* xg = x + g * 64;
    float amax = 0.0f;
    for (int i = 0; i < 64; ++i) amax = std::max(amax, std::fabs(xg[i]));
    const float inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
    xs[g] = amax / 32767.0f;
    for (int i = 0; i < 64; ++i) xi[g * 64 + i] = int16_t(std::lrint(xg[source_column(nibble, i)] * inv));
  }
}

#if FM_X86
#define FM_AVX2 __attribute__((target("avx2,fma")))
#define FM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")))

FM_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

FM_AVX2 inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
FM_AVX2 inline __m256i widen16(const uint8_t* p) {
  return _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

FM_AVX2 float row_bf16_avx2(const uint16_t* w, const float* x, int64_t cols) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= cols; c += 16) {
    __m256i a = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c)));
    __m256i b = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c + 8)));
    acc0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(a, 16)), _mm256_loadu_ps(x + c), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(b, 16)), _mm256_loadu_ps(x + c + 8), acc1);
  }
  float acc = hsum256(_mm256_add_ps(acc0, acc1));
  for (; c < cols; ++c) acc += bf16_to_f32(w[c]) * x[c];
  return acc;
}

template <int NT>
FM_AVX2 void tile_q4_avx2(const uint8_t* q, const uint16_t* scales, const uint16_t* biases, const void* xv,
                          const float* xs, const float* sums, int64_t x_stride, int64_t groups, float* out) {
  const int16_t* x = static_cast<const int16_t*>(xv);
  const __m256i low4 = _mm256_set1_epi16(15);
  __m256 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g, q += 32) {
    const __m256i w0 = widen16(q), w1 = widen16(q + 16);
    const __m256i l0 = _mm256_and_si256(w0, low4), l1 = _mm256_and_si256(w1, low4);
    const __m256i h0 = _mm256_srli_epi16(w0, 4), h1 = _mm256_srli_epi16(w1, 4);
    const float s = bf16_to_f32(scales[g]);
    for (int t = 0; t < NT; ++t) {
      const int16_t* xt = x + t * x_stride + g * 64;
      __m256i d = _mm256_add_epi32(_mm256_madd_epi16(l0, load256(xt)), _mm256_madd_epi16(l1, load256(xt + 16)));
      d = _mm256_add_epi32(d, _mm256_add_epi32(_mm256_madd_epi16(h0, load256(xt + 32)),
                                               _mm256_madd_epi16(h1, load256(xt + 48))));
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(s * xs[t * groups + g]), acc[t]);
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = hsum256(acc[t]) + row_bf16_avx2(biases, sums + t * groups, groups);
}

template <int NT>
FM_AVX2 void tile_q8_avx2(const uint8_t* q, const uint16_t* scales, const uint16_t* biases, const void* xv,
                          const float* xs, const float* sums, int64_t x_stride, int64_t groups, float* out) {
  const int16_t* x = static_cast<const int16_t*>(xv);
  __m256 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g, q += 64) {
    const __m256i w0 = widen16(q), w1 = widen16(q + 16), w2 = widen16(q + 32), w3 = widen16(q + 48);
    const float s = bf16_to_f32(scales[g]);
    for (int t = 0; t < NT; ++t) {
      const int16_t* xt = x + t * x_stride + g * 64;
      __m256i d = _mm256_add_epi32(_mm256_madd_epi16(w0, load256(xt)), _mm256_madd_epi16(w1, load256(xt + 16)));
      d = _mm256_add_epi32(d, _mm256_add_epi32(_mm256_madd_epi16(w2, load256(xt + 32)),
                                               _mm256_madd_epi16(w3, load256(xt + 48))));
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(s * xs[t * groups + g]), acc[t]);
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = hsum256(acc[t]) + row_bf16_avx2(biases, sums + t * groups, groups);
}


FM_AVX512 inline __m512i load512(const void* p) { return _mm512_loadu_si512(p); }
FM_AVX512 inline __m512i widen32(const uint8_t* p) {
  return _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Per-token scale of each group of a block of 16: scale_g * xs_tg, computed 16 at a time.
template <int NT>
FM_AVX512 __attribute__((always_inline)) inline void group_scales_avx512(const uint16_t* scales, const float* xs,
                                                                          int64_t groups, int64_t g0, int n,
                                                                          float (*sx)[16]) {
  const __mmask16 m = __mmask16((1u << n) - 1);
  const __m512i bits = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, scales + g0));
  const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
  for (int t = 0; t < NT; ++t) _mm512_store_ps(sx[t], _mm512_mul_ps(s, _mm512_maskz_loadu_ps(m, xs + t * groups + g0)));
}

// The bias term of NT tokens, 16 groups at a time, into their accumulators.
template <int NT>
FM_AVX512 __attribute__((always_inline)) inline void bias_avx512(const uint16_t* biases, const float* sums,
                                                                  int64_t groups, __m512* acc) {
  for (int64_t g0 = 0; g0 < groups; g0 += 16) {
    const __mmask16 m = __mmask16((1u << std::min<int64_t>(16, groups - g0)) - 1);
    const __m512i bits = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, biases + g0));
    const __m512 b = _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
    for (int t = 0; t < NT; ++t) acc[t] = _mm512_fmadd_ps(b, _mm512_maskz_loadu_ps(m, sums + t * groups + g0), acc[t]);
  }
}

// NR rows x NT tokens of q4, one accumulator per (row, token): the bias term first, then the
// groups in order, so that a (row, token) pair gets the same bits whatever tile it falls in. Each
// x load serves NR rows and each unpacked weight group NT tokens (4 x 4: 1.4-1.7x the 1 x 8 tile
// on Zen 4, whose loads of x from L2 bounded it). Row r's codes at q + r * q_stride, its scales
// and biases at r * groups; out[r * NT + t].
template <int NR, int NT>
FM_AVX512 void rows_q4_avx512(const uint8_t* q, int64_t q_stride, const uint16_t* scales, const uint16_t* biases,
                              const void* xv, const float* xs, const float* sums, int64_t x_stride, int64_t groups,
                              float* out) {
  const int16_t* x = static_cast<const int16_t*>(xv);
  __m512 acc[NR][NT];
  for (int r = 0; r < NR; ++r) {
    for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_setzero_ps();
    bias_avx512<NT>(biases + r * groups, sums, groups, acc[r]);
  }
  alignas(64) float sx[NR][NT][16];
  for (int64_t g0 = 0; g0 < groups; g0 += 16) {
    const int n = int(std::min<int64_t>(16, groups - g0));
    for (int r = 0; r < NR; ++r) group_scales_avx512<NT>(scales + r * groups, xs, groups, g0, n, sx[r]);
    for (int gi = 0; gi < n; ++gi) {
      const int64_t g = g0 + gi;
      __m512i lo[NR], hi[NR];
      for (int r = 0; r < NR; ++r) {
        const __m512i w = widen32(q + r * q_stride + g * 32);
        lo[r] = _mm512_and_si512(w, _mm512_set1_epi16(15));
        hi[r] = _mm512_srli_epi16(w, 4);
      }
      for (int t = 0; t < NT; ++t) {
        const int16_t* xt = x + t * x_stride + g * 64;
        const __m512i x0 = load512(xt), x1 = load512(xt + 32);
        for (int r = 0; r < NR; ++r) {
          const __m512i d = _mm512_dpwssd_epi32(_mm512_madd_epi16(lo[r], x0), hi[r], x1);
          acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(sx[r][t][gi]), acc[r][t]);
        }
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < NT; ++t) out[r * NT + t] = _mm512_reduce_add_ps(acc[r][t]);
}

template <int NT>
FM_AVX512 void tile_q4_avx512(const uint8_t* q, const uint16_t* scales, const uint16_t* biases, const void* xv,
                              const float* xs, const float* sums, int64_t x_stride, int64_t groups, float* out) {
  rows_q4_avx512<1, NT>(q, 0, scales, biases, xv, xs, sums, x_stride, groups, out);
}

template <int NT>
FM_AVX512 void rows4_q4_avx512(const uint8_t* q, int64_t q_stride, const uint16_t* scales, const uint16_t* biases,
                               const void* xv, const float* xs, const float* sums, int64_t x_stride, int64_t groups,
                               float* out) {
  rows_q4_avx512<4, NT>(q, q_stride, scales, biases, xv, xs, sums, x_stride, groups, out);
}

template <int NT>
FM_AVX512 void tile_q8_avx512(const uint8_t* q, const uint16_t* scales, const uint16_t* biases, const void* xv,
                              const float* xs, const float* sums, int64_t x_stride, int64_t groups, float* out) {
  const int16_t* x = static_cast<const int16_t*>(xv);
  __m512 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
  bias_avx512<NT>(biases, sums, groups, acc);
  for (int64_t g = 0; g < groups; ++g, q += 64) {
    const __m512i w0 = widen32(q), w1 = widen32(q + 32);
    const float s = bf16_to_f32(scales[g]);
    for (int t = 0; t < NT; ++t) {
      const int16_t* xt = x + t * x_stride + g * 64;
      const __m512i d = _mm512_dpwssd_epi32(_mm512_madd_epi16(w0, load512(xt)), w1, load512(xt + 32));
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(s * xs[t * groups + g]), acc[t]);
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = _mm512_reduce_add_ps(acc[t]);
}

FM_AVX512 float row_bf16_avx512(const uint16_t* w, const float* x, int64_t cols) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 32 <= cols; c += 32) {
    __m512i a = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c)));
    __m512i b = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c + 16)));
    acc0 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(a, 16)), _mm512_loadu_ps(x + c), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(b, 16)), _mm512_loadu_ps(x + c + 16), acc1);
  }
  float acc = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  for (; c < cols; ++c) acc += bf16_to_f32(w[c]) * x[c];
  return acc;
}

// prepare_generic for the int16 layouts, a group of 64 per iteration: the same codes and scales
// (the products round to nearest even, as lrint does); the group sums add in another order.
FM_AVX512 void prepare_avx512(XLayout layout, const float* x, int64_t groups, float* out, float* xs, float* sums) {
  if (layout != XLayout::I16 && layout != XLayout::I16Nibble) return prepare_generic(layout, x, groups, out, xs, sums);
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  int16_t* xi = reinterpret_cast<int16_t*>(out);
  for (int64_t g = 0; g < groups; ++g) {
    const float* xg = x + g * 64;
    __m512 v[4] = {_mm512_loadu_ps(xg), _mm512_loadu_ps(xg + 16), _mm512_loadu_ps(xg + 32), _mm512_loadu_ps(xg + 48)};
    sums[g] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(v[0], v[1]), _mm512_add_ps(v[2], v[3])));
    const __m512 m = _mm512_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])),
                                   _mm512_max_ps(_mm512_abs_ps(v[2]), _mm512_abs_ps(v[3])));
    const float amax = _mm512_reduce_max_ps(m);
    const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 32767.0f / amax : 0.0f);
    xs[g] = amax / 32767.0f;
    if (layout == XLayout::I16Nibble) {
      const __m512 e0 = _mm512_permutex2var_ps(v[0], even, v[1]), e1 = _mm512_permutex2var_ps(v[2], even, v[3]);
      const __m512 o0 = _mm512_permutex2var_ps(v[0], odd, v[1]), o1 = _mm512_permutex2var_ps(v[2], odd, v[3]);
      v[0] = e0, v[1] = e1, v[2] = o0, v[3] = o1;
    }
    for (int i = 0; i < 4; ++i)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xi + g * 64 + 16 * i),
                          _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(v[i], inv))));
  }
}
#endif

#if FM_NEON
// arm64: widening int16 multiply-accumulates (smlal) of codes and xi, 4 int32 lanes per vector.
inline int32x4_t mla_u8x8(int32x4_t acc, uint8x8_t codes, const int16_t* x) {
  const int16x8_t w = vreinterpretq_s16_u16(vmovl_u8(codes));
  const int16x8_t xv = vld1q_s16(x);
  acc = vmlal_s16(acc, vget_low_s16(w), vget_low_s16(xv));
  return vmlal_high_s16(acc, w, xv);
}

template <int NT>
void tile_q4_neon(const uint8_t* q, const uint16_t* scales, const uint16_t* biases, const void* xv, const float* xs,
                  const float* sums, int64_t x_stride, int64_t groups, float* out) {
  const int16_t* x = static_cast<const int16_t*>(xv);
  float32x4_t acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = vdupq_n_f32(0.0f);
  const uint8x16_t low4 = vdupq_n_u8(15);
  for (int64_t g = 0; g < groups; ++g, q += 32) {
    const uint8x16_t b0 = vld1q_u8(q), b1 = vld1q_u8(q + 16);
    const uint8x16_t l0 = vandq_u8(b0, low4), l1 = vandq_u8(b1, low4);
    const uint8x16_t h0 = vshrq_n_u8(b0, 4), h1 = vshrq_n_u8(b1, 4);
    const float s = bf16_to_f32(scales[g]);
    for (int t = 0; t < NT; ++t) {
      const int16_t* xt = x + t * x_stride + g * 64;
      int32x4_t d = vdupq_n_s32(0);
      d = mla_u8x8(d, vget_low_u8(l0), xt);
      d = mla_u8x8(d, vget_high_u8(l0), xt + 8);
      d = mla_u8x8(d, vget_low_u8(l1), xt + 16);
      d = mla_u8x8(d, vget_high_u8(l1), xt + 24);
      d = mla_u8x8(d, vget_low_u8(h0), xt + 32);
      d = mla_u8x8(d, vget_high_u8(h0), xt + 40);
      d = mla_u8x8(d, vget_low_u8(h1), xt + 48);
      d = mla_u8x8(d, vget_high_u8(h1), xt + 56);
      acc[t] = vfmaq_n_f32(acc[t], vcvtq_f32_s32(d), s * xs[t * groups + g]);
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = vaddvq_f32(acc[t]) + row_bf16_generic(biases, sums + t * groups, groups);
}

template <int NT>
void tile_q8_neon(const uint8_t* q, const uint16_t* scales, const uint16_t* biases, const void* xv, const float* xs,
                  const float* sums, int64_t x_stride, int64_t groups, float* out) {
  const int16_t* x = static_cast<const int16_t*>(xv);
  float32x4_t acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = vdupq_n_f32(0.0f);
  for (int64_t g = 0; g < groups; ++g, q += 64) {
    uint8x16_t b[4] = {vld1q_u8(q), vld1q_u8(q + 16), vld1q_u8(q + 32), vld1q_u8(q + 48)};
    const float s = bf16_to_f32(scales[g]);
    for (int t = 0; t < NT; ++t) {
      const int16_t* xt = x + t * x_stride + g * 64;
      int32x4_t d = vdupq_n_s32(0);
      for (int i = 0; i < 4; ++i) {
        d = mla_u8x8(d, vget_low_u8(b[i]), xt + 16 * i);
        d = mla_u8x8(d, vget_high_u8(b[i]), xt + 16 * i + 8);
      }
      acc[t] = vfmaq_n_f32(acc[t], vcvtq_f32_s32(d), s * xs[t * groups + g]);
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = vaddvq_f32(acc[t]) + row_bf16_generic(biases, sums + t * groups, groups);
}
#endif

// Token tiles of 8, 4, 2 and 1 (index 3, 2, 1, 0).
// Tiles of 4 rows x NT tokens (index 2, 1, 0: NT = 4, 2, 1) where a kernel has them: same
// results per (row, token) as the one-row tiles, which take the rows left over.
using Rows4Q = void (*)(const uint8_t* q, int64_t q_stride, const uint16_t* scales, const uint16_t* biases,
                        const void* x, const float* xs, const float* sums, int64_t x_stride, int64_t groups,
                        float* out);

struct QKernel {
  TileQ tile[4];
  XLayout layout;
  Rows4Q rows4[3] = {};
};
#define FM_TILES(fn) {fn<1>, fn<2>, fn<4>, fn<8>}

struct Kernels {
  const char* name;
  QKernel q4, q8;
  RowBf16 bf16;
  PrepareX prepare;
};

Kernels pick_kernels() {
  // FLASHMOE_SIMD=avx512|avx2|neon|generic caps the path (tests compare paths on one machine).
  const char* cap = std::getenv("FLASHMOE_SIMD");
  const std::string want = cap ? cap : "";
  auto allowed = [&](const std::string& level) {
    static const char* order[] = {"avx512", "avx2", "neon", "generic"};
    int w = 0, l = 0;
    for (int i = 0; i < 4; ++i) {
      if (want == order[i]) w = i;
      if (level == order[i]) l = i;
    }
    return l >= w;
  };
#if FM_X86
  __builtin_cpu_init();
  // the AVX-512 path needs VNNI (Ice Lake, Zen 4 and later); older AVX-512 parts take AVX2
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx512 && allowed("avx512"))
    return {"avx512",
            {FM_TILES(tile_q4_avx512), XLayout::I16Nibble, {rows4_q4_avx512<1>, rows4_q4_avx512<2>, rows4_q4_avx512<4>}},
            {FM_TILES(tile_q8_avx512), XLayout::I16},
            row_bf16_avx512, prepare_avx512};
  if (avx2 && allowed("avx2"))
    return {"avx2", {FM_TILES(tile_q4_avx2), XLayout::I16Nibble}, {FM_TILES(tile_q8_avx2), XLayout::I16},
            row_bf16_avx2, prepare_generic};
#endif
#if FM_NEON
  if (allowed("neon"))
    return {"neon", {FM_TILES(tile_q4_neon), XLayout::I16Nibble}, {FM_TILES(tile_q8_neon), XLayout::I16},
            row_bf16_generic, prepare_generic};
#endif
  (void)allowed;
  return {"generic", {FM_TILES(tile_q4_generic), XLayout::F32Nibble}, {FM_TILES(tile_q8_generic), XLayout::F32},
          row_bf16_generic, prepare_generic};
}

const Kernels& kernels() {
  static const Kernels k = pick_kernels();
  return k;
}

}  // namespace

const char* simd_path() { return kernels().name; }

LinearScratch::LinearScratch(int64_t max_tokens, int64_t max_cols)
    : max_tokens(max_tokens), max_cols(max_cols) {
  const size_t groups = size_t(max_cols / kGroupSize + 1) * size_t(max_tokens);
  void *a = nullptr, *b = nullptr, *c = nullptr;
  if (posix_memalign(&a, 64, size_t(max_tokens * max_cols) * 4) || posix_memalign(&b, 64, groups * 4) ||
      posix_memalign(&c, 64, groups * 4))
    throw std::bad_alloc();
  x_prep = static_cast<float*>(a);
  group_sums = static_cast<float*>(b);
  x_scale = static_cast<float*>(c);
}

LinearScratch::~LinearScratch() {
  std::free(x_prep);
  std::free(group_sums);
  std::free(x_scale);
}

void linear(const Matrix& w, const float* x, int64_t n, float* y, LinearScratch& scratch, ThreadPool& pool) {
  const Kernels& k = kernels();
  const int64_t rows = w.rows, cols = w.cols;
  if (n > scratch.max_tokens || cols > scratch.max_cols)
    throw std::logic_error("linear: scratch too small for this call");
  // Enough rows per thread that a split pays for the wake-up (~64 KiB of weights).
  const int64_t row_bytes = std::max<int64_t>(1, int64_t(w.nbytes / uint64_t(rows)));
  const int64_t min_rows = std::max<int64_t>(1, (64 << 10) / row_bytes);

  if (w.dtype == DType::BF16) {
    auto base = reinterpret_cast<const uint16_t*>(w.data);
    pool.parallel_for(rows, min_rows, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t t = 0; t < n; ++t) y[t * rows + r] = k.bf16(base + r * cols, x + t * cols, cols);
    });
    return;
  }
  if (w.dtype != DType::Q4 && w.dtype != DType::Q8)
    throw std::invalid_argument("linear: f32 matrices are not stored by the format");

  const int64_t groups = cols / kGroupSize;
  const bool q4 = w.dtype == DType::Q4;
  const QKernel& kern = q4 ? k.q4 : k.q8;
  // per token: group sums and the kernel's layout of x (split across the pool for a batch)
  pool.parallel_for(n, std::max<int64_t>(1, 4096 / cols), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      k.prepare(kern.layout, x + t * cols, groups, scratch.x_prep + t * cols, scratch.x_scale + t * groups,
                scratch.group_sums + t * groups);
  });
  const int64_t row_stride = q4 ? cols / 2 : cols;
  // int16 layouts hold cols int16 per token in a cols-float slot: the stride in elements is the same
  const int64_t x_stride = (kern.layout == XLayout::I16 || kern.layout == XLayout::I16Nibble) ? 2 * cols : cols;
  const bool int16 = x_stride == 2 * cols;
  // Rows in blocks of ~32 KiB of weights: a block stays in L1/L2 while every token tile runs
  // against it, and a tile's x stays in L1 across the block's rows. With 4-row tiles, blocks and
  // token tiles are multiples of 4 and at most 4 tokens wide.
  const bool rows4 = kern.rows4[0] != nullptr;
  const int64_t block_rows = std::max<int64_t>(rows4 ? 4 : 1, (32 << 10) / row_bytes / 4 * 4);
  pool.parallel_for(rows, min_rows, [&](int64_t r0, int64_t r1) {
    float out[32];
    for (int64_t rb = r0; rb < r1; rb += block_rows) {
      const int64_t rb_end = std::min(r1, rb + block_rows);
      for (int64_t t0 = 0; t0 < n;) {
        const int64_t left = n - t0;
        const int tile = left >= 8 && !rows4 ? 3 : left >= 4 ? 2 : left >= 2 ? 1 : 0;
        const int nt = 1 << tile;
        const void* xt = int16 ? static_cast<const void*>(reinterpret_cast<const int16_t*>(scratch.x_prep) + t0 * x_stride)
                               : static_cast<const void*>(scratch.x_prep + t0 * cols);
        const float* xs = scratch.x_scale + t0 * groups;
        const float* sums = scratch.group_sums + t0 * groups;
        int64_t r = rb;
        for (; rows4 && nt > 1 && r + 4 <= rb_end; r += 4) {
          kern.rows4[tile](w.data + r * row_stride, row_stride, w.scales + r * groups, w.biases + r * groups, xt, xs,
                           sums, x_stride, groups, out);
          for (int j = 0; j < 4; ++j)
            for (int i = 0; i < nt; ++i) y[(t0 + i) * rows + r + j] = out[j * nt + i];
        }
        for (; r < rb_end; ++r) {
          kern.tile[tile](w.data + r * row_stride, w.scales + r * groups, w.biases + r * groups, xt, xs, sums,
                          x_stride, groups, out);
          for (int i = 0; i < nt; ++i) y[(t0 + i) * rows + r] = out[i];
        }
        t0 += nt;
      }
    }
  });
}

}  // namespace fm::cpu
