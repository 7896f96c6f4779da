// Device helpers shared by the CUDA kernel files: bf16 and small-integer conversions, the
// activations, warp/block reductions, programmatic dependent launch and the launch wrapper.
#pragma once
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "cuda/kernels.cuh"
#include "cuda/trace.cuh"

namespace fm::cuda {

// Whether launch() asks for programmatic dependent launch (set_programmatic_launch).
bool programmatic_launch();

__device__ __forceinline__ float bf16f(uint16_t v) { return __uint_as_float(uint32_t(v) << 16); }
__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }
__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ float softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

// Small integer q (< 2^23) to float exactly: one OR and one subtract instead of a slow I2F.
__device__ __forceinline__ float qf(uint32_t q) { return __uint_as_float(0x4B000000u | q) - 8388608.0f; }

__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Programmatic dependent launch (sm_90): a kernel may start while its predecessor runs. Before
// pdl_wait() it touches only what no kernel of this token writes (weights) or
// what the kernel two launches back wrote; it calls pdl_trigger() only after its own wait, so
// the next kernel starts no earlier than this one's predecessor has finished.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  trace::mark(trace::kWaited);
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_sync() {
  pdl_wait();
  pdl_trigger();
}

// Bytes [ptr, ptr + bytes) pulled into L2 by one bulk prefetch (sm_90; a no-op before), its ends
// rounded down to 16 bytes.
__device__ __forceinline__ void prefetch_l2(const void* ptr, uint64_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const uint64_t p = reinterpret_cast<uint64_t>(ptr);
  const uint64_t lo = p & ~uint64_t(15), hi = (p + bytes) & ~uint64_t(15);
  if (hi > lo) asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(lo), "r"(uint32_t(hi - lo)) : "memory");
#endif
}

// Rows [r0, r1) of m pulled into L2 by the block that will read them, before its wait, so that the
// DRAM stream starts while the previous launch runs (measured faster than an earlier launch
// prefetching them for it: docs/cuda.md). Thread 0 takes the data; q8's scales and biases are two
// more ranges, q4's pairs one range per group (threads 1..groups).
__device__ __forceinline__ void prefetch_rows(const DevMat& m, int r0, int r1) {
  const int t = int(threadIdx.x);
  if (r1 <= r0) return;
  if (t == 0) {
    const uint64_t row = uint64_t(m.cols) * m.bits / 8;
    prefetch_l2(m.data + row * r0, row * (r1 - r0));
  } else if (m.bits == 8 && t <= 2) {
    const uint64_t row = uint64_t(m.cols / 64) * 2;
    prefetch_l2(reinterpret_cast<const uint8_t*>(t == 1 ? m.scales : m.biases) + row * r0, row * (r1 - r0));
  } else if (m.bits == 4 && t <= m.cols / 64) {
    prefetch_l2(reinterpret_cast<const uint32_t*>(m.scales) + int64_t(t - 1) * m.rows + r0, uint64_t(r1 - r0) * 4);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// Sum over the block, returned to every thread; red holds blockDim.x/32 floats.
__device__ inline float block_sum(float v, float* red) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = 0.0f;
  for (int i = 0; i < nw; ++i) t += red[i];
  __syncthreads();
  return t;
}
// Softmax, top-k (ties to the lower index) and optional renormalisation by one warp; the
// probabilities live in registers, P per lane (at most kTopkPerLane).
constexpr int kTopkPerLane = 32;
template <int P>
__device__ inline void warp_topk_p(const TopkTail& t) {
  const int lane = threadIdx.x & 31, E = t.num_experts;
  float v[P];
  float mx = -INFINITY;
#pragma unroll
  for (int i = 0; i < P; ++i) {
    const int e = lane + 32 * i;
    v[i] = e < E ? __ldcg(t.logits + e) : -INFINITY;  // L2: written by other blocks
    mx = fmaxf(mx, v[i]);
  }
  mx = warp_max(mx);
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < P; ++i) {
    v[i] = lane + 32 * i < E ? expf(v[i] - mx) : -1.0f;  // -1: no expert, kept out of the sum
    sum += fmaxf(v[i], 0.0f);
  }
  sum = warp_sum(sum);
#pragma unroll
  for (int i = 0; i < P; ++i)
    if (lane + 32 * i < E) v[i] /= sum;
  // A probability's key is its bits + 1 (non-negative floats order as their bits), 0 once chosen:
  // each round is a warp max of the lanes' best keys, then a warp min of the indices holding it.
  uint32_t key[P];
#pragma unroll
  for (int i = 0; i < P; ++i) key[i] = lane + 32 * i < E ? __float_as_uint(v[i]) + 1u : 0u;
  float my_w = 0.0f, wsum = 0.0f;
  int my_id = 0;
  for (int k = 0; k < t.k; ++k) {
    uint32_t best = 0, at = 0;
#pragma unroll
    for (int i = 0; i < P; ++i)
      if (key[i] > best) best = key[i], at = lane + 32 * i;  // i ascending: ties keep the lower index
    const uint32_t top = __reduce_max_sync(0xffffffffu, best);
    const int id = int(__reduce_min_sync(0xffffffffu, best == top ? at : UINT_MAX));
#pragma unroll
    for (int i = 0; i < P; ++i)
      if (lane + 32 * i == id) key[i] = 0;
    const float bv = __uint_as_float(top - 1u);
    if (lane == k) my_id = id, my_w = bv;
    wsum += bv;
  }
  if (lane < t.k) {
    t.ids[lane] = my_id;
    t.weights[lane] = t.renormalize ? my_w / wsum : my_w;
  }
}
// The shortest scan that holds num_experts: each of the k rounds scans P values per lane.
__device__ inline void warp_topk(const TopkTail& t) {
  if (t.num_experts <= 32 * 8)
    warp_topk_p<8>(t);
  else
    warp_topk_p<kTopkPerLane>(t);
}

// One token's MoE output at column c: sigmoid(shared_logit) * y_shared[c] + sum_j weights[j] *
// y_routed[j * hidden + c], in that order (the same bits whichever launches computed the y). The
// y are read from L2: the decode path sums them in the launch whose other blocks wrote them.
__device__ __forceinline__ float moe_output(float shared_logit, const float* y_shared, const float* weights,
                                            const float* y_routed, int k, int hidden, int c) {
  float out = sigmoid(shared_logit) * __ldcg(y_shared + c);
  for (int j = 0; j < k; ++j) out += __ldcg(weights + j) * __ldcg(y_routed + int64_t(j) * hidden + c);
  return out;
}

// DeltaNet state slices: a block of kDeltaWarps warps holds 32 value columns of a value head's
// state, warp w rows w, w + kDeltaWarps, ... of column `lane`, kDeltaRows per thread.
constexpr int kDeltaWarps = 8;
constexpr int kDeltaRows = kMaxDeltaKeyDim / kDeltaWarps;

// One token of the gated delta rule on such a slice: S = decay S; S += k (beta (v - S^T k))^T;
// returns o = S^T q for the thread's column on warp 0. k, q: the token's normalised key and query
// (q prescaled by dk^-1/2); v: the column's value. red: 2 x kDeltaWarps x 32 floats of shared
// memory, double-buffered so that back-to-back tokens need only the two barriers inside.
__device__ __forceinline__ float delta_rule_step(float (&s)[kDeltaRows], const float* k, const float* q, float v,
                                                 float decay, float beta, int dk, bool col_ok, float* red) {
  const int warp = int(threadIdx.x) >> 5, lane = int(threadIdx.x) & 31;
  float part = 0.0f;
#pragma unroll
  for (int i = 0; i < kDeltaRows; ++i) {
    const int r = warp + kDeltaWarps * i;
    if (r < dk) {
      s[i] *= decay;
      part += s[i] * k[r];
    }
  }
  red[warp * 32 + lane] = part;
  __syncthreads();
  float ks = 0.0f;
  for (int w = 0; w < kDeltaWarps; ++w) ks += red[w * 32 + lane];
  const float delta = col_ok ? beta * (v - ks) : 0.0f;
  float po = 0.0f;
#pragma unroll
  for (int i = 0; i < kDeltaRows; ++i) {
    const int r = warp + kDeltaWarps * i;
    if (r < dk) {
      s[i] = fmaf(k[r], delta, s[i]);
      po += s[i] * q[r];
    }
  }
  float* red_o = red + kDeltaWarps * 32;
  red_o[warp * 32 + lane] = po;
  __syncthreads();
  float o = 0.0f;
  if (warp == 0)
    for (int w = 0; w < kDeltaWarps; ++w) o += red_o[w * 32 + lane];
  return o;
}

constexpr int kAttnWarps = 4;     // warps of an attention block, one position each at a time
constexpr int kMaxHeadDim = 512;

// Element c of row `row` of an embedding table, widened to fp32.
__device__ __forceinline__ float embed_value(const DevMat& t, int64_t row, int c) {
  const int cols = t.cols;
  if (t.bits == 16) return bf16f(reinterpret_cast<const uint16_t*>(t.data)[row * cols + c]);
  if (t.bits == 8) {
    const int64_t g = row * (cols / 64) + c / 64;
    return float(t.data[row * cols + c]) * bf16f(t.scales[g]) + bf16f(t.biases[g]);
  }
  const uint32_t q = (t.data[(row * cols + c) / 2] >> (4 * (c & 1))) & 15u;
  const uint32_t pair = reinterpret_cast<const uint32_t*>(t.scales)[int64_t(c / 64) * t.rows + row];
  return float(q) * __uint_as_float(pair << 16) + __uint_as_float(pair & 0xFFFF0000u);
}

// Zero-centred RMSNorm of one head (src[hd], weight 1 + w) and partial NeoX RoPE at `pos`, by a
// block of hd threads; returns element threadIdx.x. buf: hd floats, red: 32 floats of shared memory.
__device__ inline float norm_rope(const float* src, const float* w, const float* inv_freq, int64_t pos, int hd,
                                  int rotary_dim, float eps, float* buf, float* red) {
  const int t = int(threadIdx.x);
  const float v = src[t];
  const float inv = 1.0f / sqrtf(block_sum(v * v, red) / float(hd) + eps);
  buf[t] = v * inv * (1.0f + w[t]);
  __syncthreads();
  const int half = rotary_dim / 2;
  if (t >= rotary_dim) return buf[t];
  const float angle = float(pos) * inv_freq[t < half ? t : t - half];
  const float c = cosf(angle), s = sinf(angle);
  return t < half ? buf[t] * c - buf[t + half] * s : buf[t] * c + buf[t - half] * s;
}

// One warp's online softmax over KV positions first, first + step, ... < end for query q (hd
// floats, prescaled by nothing): returns the running max and sum, and leaves the unnormalised
// output in acc_out[hd]. kv: [positions, 2, kv_dim], the head's keys at kvh * hd.
struct AttnPartial {
  float m, l;
};
__device__ inline AttnPartial warp_attend(const float* q_ptr, const float* kv, int kv_dim, int kvh, int hd,
                                          int64_t first, int64_t end, int step, float* acc_out) {
  constexpr int kE = kMaxHeadDim / 32;
  const int lane = int(threadIdx.x) & 31, E = hd / 32;
  const float scale = 1.0f / sqrtf(float(hd));
  float q[kE], acc[kE];
#pragma unroll
  for (int e = 0; e < kE; ++e) {
    q[e] = e < E ? q_ptr[lane + 32 * e] : 0.0f;
    acc[e] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  for (int64_t t = first; t < end; t += step) {
    const float* k = kv + t * 2 * kv_dim + int64_t(kvh) * hd;
    const float* v = k + kv_dim;
    float d = 0.0f;
#pragma unroll
    for (int e = 0; e < kE; ++e)
      if (e < E) d += q[e] * k[lane + 32 * e];
    d = warp_sum(d) * scale;
    const float mn = fmaxf(m, d);
    const float c = expf(m - mn), p = expf(d - mn);
    l = l * c + p;
#pragma unroll
    for (int e = 0; e < kE; ++e)
      if (e < E) acc[e] = acc[e] * c + p * v[lane + 32 * e];
    m = mn;
  }
#pragma unroll
  for (int e = 0; e < kE; ++e)
    if (e < E) acc_out[lane + 32 * e] = acc[e];
  return {m, l};
}

// A block of kAttnWarps warps attends q over KV positions [first, end) (warp w takes first + w,
// first + w + kAttnWarps, ...) and merges the warps: returns the max and softmax sum and leaves the
// unnormalised output in sacc[0][0..hd). sm, sl: kAttnWarps floats of shared memory.
__device__ inline AttnPartial block_attend(const float* q, const float* kv, int kv_dim, int kvh, int hd,
                                           int64_t first, int64_t end, float (*sacc)[kMaxHeadDim], float* sm,
                                           float* sl) {
  const int warp = int(threadIdx.x) >> 5;
  const AttnPartial p = warp_attend(q, kv, kv_dim, kvh, hd, first + warp, end, kAttnWarps, sacc[warp]);
  if ((threadIdx.x & 31) == 0) sm[warp] = p.m, sl[warp] = p.l;
  __syncthreads();
  float M = -INFINITY, L = 0.0f;
  for (int w = 0; w < kAttnWarps; ++w) M = fmaxf(M, sm[w]);
  for (int w = 0; w < kAttnWarps; ++w)
    if (sm[w] > -INFINITY) L += sl[w] * expf(sm[w] - M);
  for (int i = int(threadIdx.x); i < hd; i += int(blockDim.x)) {
    float o = 0.0f;
    for (int w = 0; w < kAttnWarps; ++w)
      if (sm[w] > -INFINITY) o += sacc[w][i] * expf(sm[w] - M);
    sacc[0][i] = o;  // each thread reads and writes its own columns
  }
  __syncthreads();
  return {M, L};
}

template <class... Params, class... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t s, const Args&... args) {
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cfg.attrs = &attr;
  cfg.numAttrs = programmatic_launch() ? 1 : 0;
  FM_CUDA(cudaLaunchKernelEx(&cfg, kernel, args...));
}


}  // namespace fm::cuda
