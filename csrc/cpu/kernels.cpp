#include "cpu/kernels.h"

#include <algorithm>
#include <cmath>

// Loops below are written for the auto-vectoriser (-fopenmp-simd lets reductions reorder); on
// x86-64 each hot one is also built for AVX2 and AVX-512 and picked at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FM_CLONES
#endif

namespace fm::cpu {

void dequant_row(const Matrix& w, int64_t row, float* out) {
  const int64_t cols = w.cols;
  if (w.dtype == DType::BF16) {
    auto src = reinterpret_cast<const uint16_t*>(w.data) + row * cols;
    for (int64_t c = 0; c < cols; ++c) out[c] = bf16_to_f32(src[c]);
    return;
  }
  if (w.dtype == DType::F32) {
    std::memcpy(out, reinterpret_cast<const float*>(w.data) + row * cols, size_t(cols) * 4);
    return;
  }
  const int64_t groups = cols / kGroupSize;
  const uint16_t* s = w.scales + row * groups;
  const uint16_t* b = w.biases + row * groups;
  if (w.dtype == DType::Q8) {
    const uint8_t* q = w.data + row * cols;
    for (int64_t c = 0; c < cols; ++c)
      out[c] = float(q[c]) * bf16_to_f32(s[c / kGroupSize]) + bf16_to_f32(b[c / kGroupSize]);
    return;
  }
  const uint8_t* q = w.data + row * cols / 2;
  for (int64_t c = 0; c < cols; ++c) {
    int nib = (q[c / 2] >> (4 * (c & 1))) & 15;
    out[c] = float(nib) * bf16_to_f32(s[c / kGroupSize]) + bf16_to_f32(b[c / kGroupSize]);
  }
}

FM_CLONES void rmsnorm(const float* x, const float* w, float offset, float eps, int n, float* out) {
  float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
  for (int i = 0; i < n; ++i) ss += x[i] * x[i];
  float inv = 1.0f / std::sqrt(ss / float(n) + eps);
  for (int i = 0; i < n; ++i) out[i] = x[i] * inv * (offset + w[i]);
}

void rope(float* v, int heads, int head_dim, int rotary_dim, const float* inv_freq, int64_t pos) {
  const int half = rotary_dim / 2;
  for (int i = 0; i < half; ++i) {
    float angle = float(pos) * inv_freq[i];
    float c = std::cos(angle), s = std::sin(angle);
    for (int h = 0; h < heads; ++h) {
      float* x = v + int64_t(h) * head_dim;
      float a = x[i], b = x[i + half];
      x[i] = a * c - b * s;
      x[i + half] = b * c + a * s;
    }
  }
}

FM_CLONES void attend(const float* q, const float* k, const float* v, int64_t stride, int64_t len, int hd,
                      float* out) {
  const float scale = 1.0f / std::sqrt(float(hd));
  float m = -INFINITY, l = 0.0f;
  std::fill(out, out + hd, 0.0f);
  for (int64_t t = 0; t < len; ++t) {
    const float* kt = k + t * stride;
    float d = 0.0f;
#pragma omp simd reduction(+ : d)
    for (int i = 0; i < hd; ++i) d += q[i] * kt[i];
    d *= scale;
    const float* vt = v + t * stride;
    if (d > m) {  // rescale what was accumulated against the old maximum
      const float c = std::exp(m - d);
      l *= c;
      for (int i = 0; i < hd; ++i) out[i] *= c;
      m = d;
    }
    const float p = std::exp(d - m);
    l += p;
    for (int i = 0; i < hd; ++i) out[i] += p * vt[i];
  }
  for (int i = 0; i < hd; ++i) out[i] /= l;
}

FM_CLONES void deltanet_step(float* S, const float* q, const float* k, const float* v, float beta, float decay,
                             int dk, int dv, float* delta, float* o) {
  std::fill(delta, delta + dv, 0.0f);
  for (int a = 0; a < dk; ++a) {
    float* row = S + int64_t(a) * dv;
    const float ka = k[a];
#pragma omp simd
    for (int b = 0; b < dv; ++b) {
      row[b] *= decay;
      delta[b] += row[b] * ka;
    }
  }
#pragma omp simd
  for (int b = 0; b < dv; ++b) delta[b] = beta * (v[b] - delta[b]), o[b] = 0.0f;
  for (int a = 0; a < dk; ++a) {
    float* row = S + int64_t(a) * dv;
    const float ka = k[a], qa = q[a];
#pragma omp simd
    for (int b = 0; b < dv; ++b) {
      row[b] += ka * delta[b];
      o[b] += row[b] * qa;
    }
  }
}

void softmax(float* x, int n) {
  float mx = *std::max_element(x, x + n);
  float sum = 0.0f;
  for (int i = 0; i < n; ++i) sum += (x[i] = std::exp(x[i] - mx));
  for (int i = 0; i < n; ++i) x[i] /= sum;
}

void top_k(const float* p, int n, int k, int* idx) {
  // insertion into the k best so far (k is a handful, n a few hundred): no allocation per token
  int have = 0;
  for (int i = 0; i < n; ++i) {
    if (have == k && !(p[i] > p[idx[k - 1]])) continue;  // ties keep the lower index
    int j = have < k ? have++ : k - 1;
    for (; j > 0 && p[i] > p[idx[j - 1]]; --j) idx[j] = idx[j - 1];
    idx[j] = i;
  }
}

}  // namespace fm::cpu
