// Matrix-vector products over bf16 and group-affine q8/q4 rows. One row kernel per (dtype, ISA);
// the ISA is picked once at run time, so one build runs on any x86-64 and on arm64.
#include <algorithm>
#include <cstdlib>
#include <string>
#include <stdexcept>

#include "cpu/kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define FM_X86 1
#endif

namespace fm::cpu {
namespace {

// Row kernels: dot(W[row], x). Quantized rows take x as prepared by their XPrep and return
// sum_g(scale_g * dot(q_g, x_g)); the caller adds sum_g(bias_g * sum(x_g)).
//   Nibble:     each group of 64 holds x's even columns then its odd columns, matching the low
//               nibbles (even columns) and high nibbles (odd columns) of the packed bytes.
//   Lanes16:    for AVX-512, which broadcasts a group's 8 words to 16 lanes and shifts lane i by
//               8k (i < 8) or 8k+4 (i >= 8): block k of 16 holds columns 8i+2k, then 8i+2k+1.
enum class XPrep { Nibble, Lanes16 };
using RowQ = float (*)(const uint8_t* q, const uint16_t* scales, const void* x, int64_t groups);
using RowBf16 = float (*)(const uint16_t* w, const float* x, int64_t cols);

float row_q4_generic(const uint8_t* q, const uint16_t* scales, const void* xv, int64_t groups) {
  const float* x = static_cast<const float*>(xv);
  float acc = 0.0f;
  for (int64_t g = 0; g < groups; ++g, q += 32, x += 64) {
    float t = 0.0f;
    for (int i = 0; i < 32; ++i) t += float(q[i] & 15) * x[i] + float(q[i] >> 4) * x[32 + i];
    acc += bf16_to_f32(scales[g]) * t;
  }
  return acc;
}

float row_q8_generic(const uint8_t* q, const uint16_t* scales, const void* xv, int64_t groups) {
  const float* x = static_cast<const float*>(xv);
  float acc = 0.0f;
  for (int64_t g = 0; g < groups; ++g, q += 64, x += 64) {
    float t = 0.0f;
    for (int i = 0; i < 64; ++i) t += float(q[i]) * x[i];
    acc += bf16_to_f32(scales[g]) * t;
  }
  return acc;
}

float row_bf16_generic(const uint16_t* w, const float* x, int64_t cols) {
  float acc = 0.0f;
  for (int64_t c = 0; c < cols; ++c) acc += bf16_to_f32(w[c]) * x[c];
  return acc;
}

#if FM_X86
#define FM_AVX2 __attribute__((target("avx2,fma")))
#define FM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))

FM_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

FM_AVX2 inline __m256 u8x8_to_ps(__m128i bytes) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)); }

FM_AVX2 float row_q4_avx2(const uint8_t* q, const uint16_t* scales, const void* xv, int64_t groups) {
  const float* x = static_cast<const float*>(xv);
  const __m256i low4 = _mm256_set1_epi8(15);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g, q += 32, x += 64) {
    __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
    __m256i lo = _mm256_and_si256(v, low4);
    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
    __m128i lo0 = _mm256_castsi256_si128(lo), lo1 = _mm256_extracti128_si256(lo, 1);
    __m128i hi0 = _mm256_castsi256_si128(hi), hi1 = _mm256_extracti128_si256(hi, 1);
    __m256 t0 = _mm256_mul_ps(u8x8_to_ps(lo0), _mm256_loadu_ps(x));
    __m256 t1 = _mm256_mul_ps(u8x8_to_ps(_mm_srli_si128(lo0, 8)), _mm256_loadu_ps(x + 8));
    t0 = _mm256_fmadd_ps(u8x8_to_ps(lo1), _mm256_loadu_ps(x + 16), t0);
    t1 = _mm256_fmadd_ps(u8x8_to_ps(_mm_srli_si128(lo1, 8)), _mm256_loadu_ps(x + 24), t1);
    t0 = _mm256_fmadd_ps(u8x8_to_ps(hi0), _mm256_loadu_ps(x + 32), t0);
    t1 = _mm256_fmadd_ps(u8x8_to_ps(_mm_srli_si128(hi0, 8)), _mm256_loadu_ps(x + 40), t1);
    t0 = _mm256_fmadd_ps(u8x8_to_ps(hi1), _mm256_loadu_ps(x + 48), t0);
    t1 = _mm256_fmadd_ps(u8x8_to_ps(_mm_srli_si128(hi1, 8)), _mm256_loadu_ps(x + 56), t1);
    __m256 s = _mm256_set1_ps(bf16_to_f32(scales[g]));
    acc0 = _mm256_fmadd_ps(t0, s, acc0);
    acc1 = _mm256_fmadd_ps(t1, s, acc1);
  }
  return hsum256(_mm256_add_ps(acc0, acc1));
}

FM_AVX2 float row_q8_avx2(const uint8_t* q, const uint16_t* scales, const void* xv, int64_t groups) {
  const float* x = static_cast<const float*>(xv);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g, q += 64, x += 64) {
    __m256 t0 = _mm256_setzero_ps(), t1 = _mm256_setzero_ps();
    for (int i = 0; i < 64; i += 16) {
      __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i));
      t0 = _mm256_fmadd_ps(u8x8_to_ps(v), _mm256_loadu_ps(x + i), t0);
      t1 = _mm256_fmadd_ps(u8x8_to_ps(_mm_srli_si128(v, 8)), _mm256_loadu_ps(x + i + 8), t1);
    }
    acc = _mm256_fmadd_ps(_mm256_add_ps(t0, t1), _mm256_set1_ps(bf16_to_f32(scales[g])), acc);
  }
  return hsum256(acc);
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

FM_AVX512 inline __m512 u8x16_to_ps(__m128i bytes) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));
}

FM_AVX512 inline __m512 nibbles(__m512i words, __m512i shifts, __m512i low4) {
  return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(words, shifts), low4));
}

FM_AVX512 float row_q4_avx512(const uint8_t* q, const uint16_t* scales, const void* xv, int64_t groups) {
  const float* x = static_cast<const float*>(xv);
  const __m512i low4 = _mm512_set1_epi32(15);
  const __m512i sh0 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4);
  const __m512i sh8 = _mm512_set1_epi32(8);
  const __m512i sh1 = _mm512_add_epi32(sh0, sh8), sh2 = _mm512_add_epi32(sh1, sh8);
  const __m512i sh3 = _mm512_add_epi32(sh2, sh8);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g, q += 32, x += 64) {
    __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
    __m512 t0 = _mm512_mul_ps(nibbles(v, sh0, low4), _mm512_loadu_ps(x));
    __m512 t1 = _mm512_mul_ps(nibbles(v, sh1, low4), _mm512_loadu_ps(x + 16));
    t0 = _mm512_fmadd_ps(nibbles(v, sh2, low4), _mm512_loadu_ps(x + 32), t0);
    t1 = _mm512_fmadd_ps(nibbles(v, sh3, low4), _mm512_loadu_ps(x + 48), t1);
    __m512 s = _mm512_set1_ps(bf16_to_f32(scales[g]));
    acc0 = _mm512_fmadd_ps(t0, s, acc0);
    acc1 = _mm512_fmadd_ps(t1, s, acc1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

FM_AVX512 float row_q8_avx512(const uint8_t* q, const uint16_t* scales, const void* xv, int64_t groups) {
  const float* x = static_cast<const float*>(xv);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g, q += 64, x += 64) {
    __m512i v = _mm512_loadu_si512(q);
    __m512 t0 = _mm512_mul_ps(u8x16_to_ps(_mm512_castsi512_si128(v)), _mm512_loadu_ps(x));
    __m512 t1 = _mm512_mul_ps(u8x16_to_ps(_mm512_extracti32x4_epi32(v, 1)), _mm512_loadu_ps(x + 16));
    t0 = _mm512_fmadd_ps(u8x16_to_ps(_mm512_extracti32x4_epi32(v, 2)), _mm512_loadu_ps(x + 32), t0);
    t1 = _mm512_fmadd_ps(u8x16_to_ps(_mm512_extracti32x4_epi32(v, 3)), _mm512_loadu_ps(x + 48), t1);
    acc = _mm512_fmadd_ps(_mm512_add_ps(t0, t1), _mm512_set1_ps(bf16_to_f32(scales[g])), acc);
  }
  return _mm512_reduce_add_ps(acc);
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

#endif

struct Kernels {
  const char* name;
  RowQ q4;
  XPrep q4_prep;
  RowQ q8;
  RowBf16 bf16;
};

Kernels pick_kernels() {
  // FLASHMOE_SIMD=avx512|avx2|generic caps the path (tests compare paths on one machine).
  const char* cap = std::getenv("FLASHMOE_SIMD");
  const std::string want = cap ? cap : "";
  auto allowed = [&](const char* level) {
    static const char* order[] = {"avx512", "avx2", "generic"};
    int w = 0, l = 0;
    for (int i = 0; i < 3; ++i) {
      if (want == order[i]) w = i;
      if (std::string(level) == order[i]) l = i;
    }
    return l >= w;
  };
#if FM_X86
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx512 && allowed("avx512"))
    return {"avx512", row_q4_avx512, XPrep::Lanes16, row_q8_avx512, row_bf16_avx512};
  if (avx2 && allowed("avx2")) return {"avx2", row_q4_avx2, XPrep::Nibble, row_q8_avx2, row_bf16_avx2};
#endif
  return {"generic", row_q4_generic, XPrep::Nibble, row_q8_generic, row_bf16_generic};
}

const Kernels& kernels() {
  static const Kernels k = pick_kernels();
  return k;
}

}  // namespace

const char* simd_path() { return kernels().name; }

MatvecScratch::MatvecScratch(int64_t max_cols) {
  void* a = nullptr;
  void* b = nullptr;
  if (posix_memalign(&a, 64, size_t(max_cols) * 4) || posix_memalign(&b, 64, size_t(max_cols / kGroupSize + 1) * 4))
    throw std::bad_alloc();
  x_prep = static_cast<float*>(a);
  group_sums = static_cast<float*>(b);
}

MatvecScratch::~MatvecScratch() {
  std::free(x_prep);
  std::free(group_sums);
}

namespace {

// Lays x out in scratch as `prep` says (see XPrep).
void prepare_x(XPrep prep, const float* x, int64_t groups, float* out) {
  for (int64_t g = 0; g < groups; ++g) {
    const float* xg = x + g * 64;
    float* o = out + g * 64;
    if (prep == XPrep::Nibble) {
      for (int i = 0; i < 32; ++i) o[i] = xg[2 * i], o[32 + i] = xg[2 * i + 1];
    } else {
      for (int k = 0; k < 4; ++k)
        for (int i = 0; i < 8; ++i) o[16 * k + i] = xg[8 * i + 2 * k], o[16 * k + 8 + i] = xg[8 * i + 2 * k + 1];
    }
  }
}

}  // namespace

void matvec(const Matrix& w, const float* x, float* y, MatvecScratch& scratch, ThreadPool& pool) {
  const Kernels& k = kernels();
  const int64_t rows = w.rows, cols = w.cols;
  // Enough rows per thread that a split pays for the wake-up (~64 KiB of weights).
  const int64_t row_bytes = std::max<int64_t>(1, int64_t(w.nbytes / uint64_t(rows)));
  const int64_t min_rows = std::max<int64_t>(1, (64 << 10) / row_bytes);

  if (w.dtype == DType::BF16) {
    auto base = reinterpret_cast<const uint16_t*>(w.data);
    pool.parallel_for(rows, min_rows, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) y[r] = k.bf16(base + r * cols, x, cols);
    });
    return;
  }
  if (w.dtype != DType::Q4 && w.dtype != DType::Q8)
    throw std::invalid_argument("matvec: f32 matrices are not stored by the format");

  const int64_t groups = cols / kGroupSize;
  for (int64_t g = 0; g < groups; ++g) {
    const float* xg = x + g * kGroupSize;
    float s = 0.0f;
    for (int i = 0; i < kGroupSize; ++i) s += xg[i];
    scratch.group_sums[g] = s;
  }
  const void* xq = x;
  RowQ row = k.q8;
  int64_t row_stride = cols;
  if (w.dtype == DType::Q4) {
    prepare_x(k.q4_prep, x, groups, scratch.x_prep);
    xq = scratch.x_prep;
    row = k.q4;
    row_stride = cols / 2;
  }
  const float* sums = scratch.group_sums;
  pool.parallel_for(rows, min_rows, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint16_t* s = w.scales + r * groups;
      const uint16_t* b = w.biases + r * groups;
      float bias_term = 0.0f;
      for (int64_t g = 0; g < groups; ++g)
        bias_term += bf16_to_f32(b[g]) * sums[g];
      y[r] = row(w.data + r * row_stride, s, xq, groups) + bias_term;
    }
  });
}

}  // namespace fm::cpu
