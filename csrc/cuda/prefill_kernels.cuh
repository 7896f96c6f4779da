// CUDA kernels of batched prefill: a chunk of n prompt tokens at positions pos0..pos0+n-1 as
// row-major fp32 activation matrices [n, width]. Projections are tiled matrix products that read
// each weight tile once per 64 tokens; the MoE runs each expert on its group of tokens; attention
// and the DeltaNet walk the chunk in order. Same math as the per-token kernels (kernels.cuh), in
// another summation order, so logits agree to rounding, not bit for bit.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/kernels.cuh"

namespace fm::cuda {

constexpr int kGemmRows = 64;  // input rows (tokens) per tile

enum class Epilogue : int {
  Store,       // y = x W^T
  Accumulate,  // y += x W^T (residual add)
  SwiGLU,      // y = silu(x G^T) * (x U^T), G = w, U = w2
};

// Rows [row0, row0 + rows) of the (gathered) input times the matrices in the block at `base`.
struct GemmTile {
  const uint8_t* base = nullptr;
  int row0 = 0, rows = 0;
};

// y[yrow(r)] (op)= x[xrow(r)] W^T for the tiles' rows r, where xrow(r) = xrows ? xrows[r] : r and
// likewise yrow. w (and w2) are parts of the block each tile points at. Dense use: tiles = null,
// base and m give one group of m rows.
struct GemmArgs {
  PartDesc w, w2;
  const GemmTile* tiles = nullptr;  // device array of ntiles
  int ntiles = 0;
  const uint8_t* base = nullptr;
  int m = 0;
  const float* x = nullptr;
  int ldx = 0;
  const int* xrows = nullptr;
  float* y = nullptr;
  int ldy = 0;
  const int* yrows = nullptr;
  Epilogue ep = Epilogue::Store;
  bool x_vec4 = false;  // set by gemm(): rows of x can be read as float4s
};
void gemm(cudaStream_t s, const GemmArgs& a);

// x[t] = row tokens[t] of the embedding matrix, widened to fp32; x is [n, cols].
void embed_rows(cudaStream_t s, const DevMat& table, const int32_t* tokens, int n, float* x);
// out[t] = x[t] * rsqrt(mean(x[t]^2) + eps) * (1 + w), rows of `cols`.
void rmsnorm_rows(cudaStream_t s, const float* x, const float* w, float eps, int n, int cols, float* out);

// Full attention of a chunk after q/k/v projections: qg [n, nh*2*hd] (query | gate per head),
// kraw/vraw [n, nkv*hd]. Writes K/V of every chunk position into the cache, then each query
// attends causally over the cache up to its own position; out [n, nh*hd] is gated by sigmoid.
struct ChunkAttnArgs {
  const float* qg = nullptr;
  const float* kraw = nullptr;
  const float* vraw = nullptr;
  const float* q_norm = nullptr;
  const float* k_norm = nullptr;
  const float* inv_freq = nullptr;
  float* q = nullptr;   // [n, nh*hd] normalised, rotated queries
  float* kv = nullptr;  // [cap, 2, nkv*hd]
  float* out = nullptr;
  int64_t pos0 = 0;
  int n = 0, nh = 0, nkv = 0, hd = 0, rotary_dim = 0;
  float eps = 0;
};
void chunk_attention(cudaStream_t s, const ChunkAttnArgs& a);

// Gated DeltaNet of a chunk after in_proj_qkv/z/b/a: mixed [n, ch] pre-conv q|k|v, b/a [n, nv].
// The causal conv continues from the ring (positions before pos0) and leaves the chunk's last
// inputs in it; then one scan over the chunk per (value head, 32 value columns) keeps that state
// slice in registers. o [n, nv*dv] (before the gated norm); conv [n, ch] is scratch.
struct ChunkDeltaArgs {
  const float* mixed = nullptr;
  float* conv = nullptr;
  float* b = nullptr;  // becomes beta = sigmoid(b)
  float* a = nullptr;  // becomes the decay exp(-exp(A_log) * softplus(a + dt_bias))
  const float* conv_w = nullptr;
  const float* a_log = nullptr;
  const float* dt_bias = nullptr;
  float* conv_ring = nullptr;
  float* state = nullptr;
  float* o = nullptr;
  int64_t pos0 = 0;
  int n = 0, nk = 0, nv = 0, dk = 0, dv = 0, kernel = 0;
};
void chunk_deltanet(cudaStream_t s, const ChunkDeltaArgs& a);

// Per token and head of head_dim: o = o * rsqrt(mean_head(o^2) + eps) * w * silu(z), in place.
void gated_norm_rows(cudaStream_t s, float* o, const float* z, const float* w, float eps, int n, int heads,
                     int head_dim);

// Softmax and top-k per token of logits [n, num_experts] into ids/weights [n, k].
void topk_rows(cudaStream_t s, const float* logits, int n, int num_experts, int k, bool renormalize, int* ids,
               float* weights);

// x[t] += sigmoid(shared_logit[t]) * y_shared[t] + sum_j weights[t, j] * y_routed[t * k + j], in that
// order (moe_output, as the decode down launch's combine tail sums one token).
void combine_rows(cudaStream_t s, float* x, const float* shared_logit, const float* y_shared,
                  const float* weights, const float* y_routed, int n, int k, int hidden);

}  // namespace fm::cuda
