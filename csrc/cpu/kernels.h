// CPU kernels. Activations are fp32; weights are bf16 or group-affine q4/q8 (docs/format.md).
#pragma once
#include <cstdint>
#include <cstring>

#include "model.h"
#include "thread_pool.h"

namespace fm::cpu {

inline float bf16_to_f32(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Which SIMD path the linear kernels take on this CPU ("avx512", "avx2", "neon" or "generic").
const char* simd_path();

// Scratch the quantized kernels need for up to max_tokens inputs of up to max_cols: each token's
// x laid out for the kernel (at most 4 bytes per column), its per-group fixed-point scales, and
// per-group sums of x (the bias term is sum_g bias_g * sum(x_g)).
struct LinearScratch {
  LinearScratch(int64_t max_tokens, int64_t max_cols);
  ~LinearScratch();
  LinearScratch(const LinearScratch&) = delete;
  LinearScratch& operator=(const LinearScratch&) = delete;
  int64_t max_tokens, max_cols;
  float* x_prep;
  float* group_sums;
  float* x_scale;
};

// y[n, rows] = x[n, cols] W[rows, cols]^T, accumulated in fp32, rows split across the pool.
// Quantized rows use sum_g(scale_g * dot(q_g, x_g) + bias_g * sum(x_g)).
void linear(const Matrix& w, const float* x, int64_t n, float* y, LinearScratch& scratch, ThreadPool& pool);

// Row `row` of W widened to fp32 (embedding lookup).
void dequant_row(const Matrix& w, int64_t row, float* out);

// out = x * rsqrt(mean(x^2) + eps) * (offset + w); offset 1 for zero-centred norms, 0 for plain.
void rmsnorm(const float* x, const float* w, float offset, float eps, int n, float* out);

// NeoX rotate-half RoPE on the first rotary_dim dims of each of `heads` vectors of head_dim.
// inv_freq has rotary_dim/2 entries.
void rope(float* v, int heads, int head_dim, int rotary_dim, const float* inv_freq, int64_t pos);

// One query head against `len` cached positions: softmax(q.k / sqrt(hd)) v in one pass (running
// max and sum), so no score buffer grows with the context. Position t's key starts at
// k + t*stride, its value at v + t*stride. out [hd].
void attend(const float* q, const float* k, const float* v, int64_t stride, int64_t len, int hd, float* out);

// One Gated DeltaNet step of one value head, S [dk, dv] fp32 row-major:
// S = decay S; delta = beta (v - S^T k); S += k delta^T; o = S^T q. delta is scratch [dv].
void deltanet_step(float* S, const float* q, const float* k, const float* v, float beta, float decay, int dk,
                   int dv, float* delta, float* o);

inline float silu(float x) { return x / (1.0f + __builtin_expf(-x)); }
inline float sigmoid(float x) { return 1.0f / (1.0f + __builtin_expf(-x)); }
inline float softplus(float x) { return x > 20.0f ? x : __builtin_log1pf(__builtin_expf(x)); }

// In-place softmax over n values.
void softmax(float* x, int n);

// Indices of the k largest of p[n] (descending, ties to the lower index), written to idx.
void top_k(const float* p, int n, int k, int* idx);

}  // namespace fm::cpu
