// Matrix-vector products over bf16 and group-affine q8/q4 rows. One row kernel per (dtype, ISA);
// the ISA is picked once at run time, so one build runs on any x86-64 and on arm64.
//
// Quantized rows use y = sum_g(scale_g * dot(q_g, x_g) + bias_g * sum(x_g)). The x86 kernels take
// x per group of 64 as 16-bit fixed point (x_g ~ xs_g * xi_g, xs_g = max|x_g| / 32767, error below
// 2^-16 of the group's largest element) so each dot is exact integer multiply-adds (pmaddwd) of
// codes and xi; only the per-group results are scaled in fp32. The portable kernels stay in fp32.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "cpu/kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define FM_X86 1
#endif

namespace fm::cpu {
namespace {

// How a kernel wants x laid out in scratch, per group of 64 columns:
//   F32Nibble: fp32, x's even columns then its odd columns (low nibbles hold even columns)
//   F32:       fp32 as is
//   I16Nibble: int16, even then odd columns, plus one fp32 scale per group
//   I16:       int16 as is, plus one fp32 scale per group
enum class XLayout { F32Nibble, F32, I16Nibble, I16 };

// sum_g(scale_g * [xs_g *] dot(q_g, x_g)); the caller adds the bias term.
using RowQ = float (*)(const uint8_t* q, const uint16_t* scales, const void* x, const float* xs,
                       int64_t groups);
using RowBf16 = float (*)(const uint16_t* w, const float* x, int64_t cols);

float row_q4_generic(const uint8_t* q, const uint16_t* scales, const void* xv, const float*,
                     int64_t groups) {
  const float* x = static_cast<const float*>(xv);
  float acc = 0.0f;
  for (int64_t g = 0; g < groups; ++g, q += 32, x += 64) {
    float t = 0.0f;
    for (int i = 0; i < 32; ++i) t += float(q[i] & 15) * x[i] + float(q[i] >> 4) * x[32 + i];
    acc += bf16_to_f32(scales[g]) * t;
  }
  return acc;
}

float row_q8_generic(const uint8_t* q, const uint16_t* scales, const void* xv, const float*,
                     int64_t groups) {
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

FM_AVX2 inline __m256 group_scale256(const uint16_t* scales, const float* xs, int64_t g) {
  return _mm256_set1_ps(bf16_to_f32(scales[g]) * xs[g]);
}

FM_AVX2 inline __m256i load_i16x16(const int16_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

FM_AVX2 float row_q4_avx2(const uint8_t* q, const uint16_t* scales, const void* xv, const float* xs,
                          int64_t groups) {
  const int16_t* x = static_cast<const int16_t*>(xv);
  const __m256i low4 = _mm256_set1_epi16(15);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g, q += 32, x += 64) {
    __m256i w0 = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    __m256i w1 = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16)));
    __m256i d = _mm256_madd_epi16(_mm256_and_si256(w0, low4), load_i16x16(x + 0));
    d = _mm256_add_epi32(d, _mm256_madd_epi16(_mm256_and_si256(w1, low4), load_i16x16(x + 16)));
    d = _mm256_add_epi32(d, _mm256_madd_epi16(_mm256_srli_epi16(w0, 4), load_i16x16(x + 32)));
    d = _mm256_add_epi32(d, _mm256_madd_epi16(_mm256_srli_epi16(w1, 4), load_i16x16(x + 48)));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), group_scale256(scales, xs, g), acc);
  }
  return hsum256(acc);
}

FM_AVX2 float row_q8_avx2(const uint8_t* q, const uint16_t* scales, const void* xv, const float* xs,
                          int64_t groups) {
  const int16_t* x = static_cast<const int16_t*>(xv);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g, q += 64, x += 64) {
    __m256i d = _mm256_setzero_si256();
    for (int i = 0; i < 64; i += 16) {
      __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i)));
      d = _mm256_add_epi32(d, _mm256_madd_epi16(w, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i))));
    }
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), group_scale256(scales, xs, g), acc);
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

FM_AVX512 float row_q4_avx512(const uint8_t* q, const uint16_t* scales, const void* xv, const float* xs,
                              int64_t groups) {
  const int16_t* x = static_cast<const int16_t*>(xv);
  const __m512i low4 = _mm512_set1_epi16(15);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t g = 0;
  // two groups per iteration: independent chains for the two accumulators
  for (; g + 2 <= groups; g += 2, q += 64, x += 128) {
    __m512i w0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
    __m512i w1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32)));
    __m512i d0 = _mm512_add_epi32(_mm512_madd_epi16(_mm512_and_si512(w0, low4), _mm512_loadu_si512(x)),
                                  _mm512_madd_epi16(_mm512_srli_epi16(w0, 4), _mm512_loadu_si512(x + 32)));
    __m512i d1 = _mm512_add_epi32(_mm512_madd_epi16(_mm512_and_si512(w1, low4), _mm512_loadu_si512(x + 64)),
                                  _mm512_madd_epi16(_mm512_srli_epi16(w1, 4), _mm512_loadu_si512(x + 96)));
    acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_set1_ps(bf16_to_f32(scales[g]) * xs[g]), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), _mm512_set1_ps(bf16_to_f32(scales[g + 1]) * xs[g + 1]), acc1);
  }
  for (; g < groups; ++g, q += 32, x += 64) {
    __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
    __m512i d = _mm512_add_epi32(_mm512_madd_epi16(_mm512_and_si512(w, low4), _mm512_loadu_si512(x)),
                                 _mm512_madd_epi16(_mm512_srli_epi16(w, 4), _mm512_loadu_si512(x + 32)));
    acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(bf16_to_f32(scales[g]) * xs[g]), acc0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

FM_AVX512 float row_q8_avx512(const uint8_t* q, const uint16_t* scales, const void* xv, const float* xs,
                              int64_t groups) {
  const int16_t* x = static_cast<const int16_t*>(xv);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g, q += 64, x += 64) {
    __m512i w0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
    __m512i w1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32)));
    __m512i d = _mm512_add_epi32(_mm512_madd_epi16(w0, _mm512_loadu_si512(x)),
                                 _mm512_madd_epi16(w1, _mm512_loadu_si512(x + 32)));
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(bf16_to_f32(scales[g]) * xs[g]), acc);
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
  RowQ q4, q8;
  XLayout q4_x, q8_x;
  RowBf16 bf16;
};

Kernels pick_kernels() {
  // FLASHMOE_SIMD=avx512|avx2|generic caps the path (tests compare paths on one machine).
  const char* cap = std::getenv("FLASHMOE_SIMD");
  const std::string want = cap ? cap : "";
  auto allowed = [&](const std::string& level) {
    static const char* order[] = {"avx512", "avx2", "generic"};
    int w = 0, l = 0;
    for (int i = 0; i < 3; ++i) {
      if (want == order[i]) w = i;
      if (level == order[i]) l = i;
    }
    return l >= w;
  };
#if FM_X86
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx512 && allowed("avx512"))
    return {"avx512", row_q4_avx512, row_q8_avx512, XLayout::I16Nibble, XLayout::I16, row_bf16_avx512};
  if (avx2 && allowed("avx2"))
    return {"avx2", row_q4_avx2, row_q8_avx2, XLayout::I16Nibble, XLayout::I16, row_bf16_avx2};
#endif
  (void)allowed;
  return {"generic", row_q4_generic, row_q8_generic, XLayout::F32Nibble, XLayout::F32, row_bf16_generic};
}

const Kernels& kernels() {
  static const Kernels k = pick_kernels();
  return k;
}

// Column of x that position i of a laid-out group of 64 holds.
inline int source_column(bool nibble_order, int i) {
  return nibble_order ? (i < 32 ? 2 * i : 2 * (i - 32) + 1) : i;
}

// Lays x out in scratch for a kernel (see XLayout); returns the pointer the kernel reads.
const void* prepare_x(XLayout layout, const float* x, int64_t groups, MatvecScratch& s) {
  if (layout == XLayout::F32) return x;
  const bool nibble = layout == XLayout::F32Nibble || layout == XLayout::I16Nibble;
  if (layout == XLayout::F32Nibble) {
    for (int64_t g = 0; g < groups; ++g)
      for (int i = 0; i < 64; ++i) s.x_prep[g * 64 + i] = x[g * 64 + source_column(nibble, i)];
    return s.x_prep;
  }
  int16_t* xi = reinterpret_cast<int16_t*>(s.x_prep);
  for (int64_t g = 0; g < groups; ++g) {
    const float* xg = x + g * 64;
    float amax = 0.0f;
    for (int i = 0; i < 64; ++i) amax = std::max(amax, std::fabs(xg[i]));
    const float scale = amax / 32767.0f;
    const float inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
    s.x_scale[g] = scale;
    for (int i = 0; i < 64; ++i) xi[g * 64 + i] = int16_t(std::lrint(xg[source_column(nibble, i)] * inv));
  }
  return xi;
}

}  // namespace

const char* simd_path() { return kernels().name; }

MatvecScratch::MatvecScratch(int64_t max_cols) {
  const size_t groups = size_t(max_cols / kGroupSize + 1);
  void *a = nullptr, *b = nullptr, *c = nullptr;
  if (posix_memalign(&a, 64, size_t(max_cols) * 4) || posix_memalign(&b, 64, groups * 4) ||
      posix_memalign(&c, 64, groups * 4))
    throw std::bad_alloc();
  x_prep = static_cast<float*>(a);
  group_sums = static_cast<float*>(b);
  x_scale = static_cast<float*>(c);
}

MatvecScratch::~MatvecScratch() {
  std::free(x_prep);
  std::free(group_sums);
  std::free(x_scale);
}

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
  const bool q4 = w.dtype == DType::Q4;
  const RowQ row = q4 ? k.q4 : k.q8;
  const int64_t row_stride = q4 ? cols / 2 : cols;
  const void* xq = prepare_x(q4 ? k.q4_x : k.q8_x, x, groups, scratch);
  const float* xs = scratch.x_scale;
  const float* sums = scratch.group_sums;
  pool.parallel_for(rows, min_rows, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint16_t* s = w.scales + r * groups;
      const uint16_t* b = w.biases + r * groups;
      float bias_term = 0.0f;
      for (int64_t g = 0; g < groups; ++g) bias_term += bf16_to_f32(b[g]) * sums[g];
      y[r] = row(w.data + r * row_stride, s, xq, xs, groups) + bias_term;
    }
  });
}

}  // namespace fm::cpu
