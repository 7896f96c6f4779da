// CUDA kernels of batched prefill (see prefill_kernels.cuh). Each kernel waits for its
// predecessor before touching memory (griddepcontrol.wait) and lets its successor start only when
// it ends, so they mix safely with the per-token kernels' programmatic launches.
#include <cmath>

#include "cuda/device_util.cuh"
#include "cuda/prefill_kernels.cuh"

namespace fm::cuda {
namespace {

constexpr int kTileCols = 64;     // weight rows (output columns) per tile
constexpr int kTileK = 32;        // reduction depth per shared-memory stage
constexpr int kGemmThreads = 256;  // 16 x 16 threads, each 4 x 4 outputs

struct TileRows {
  const uint8_t* base;
  int row0, rows;
};

__device__ __forceinline__ TileRows tile_of(const GemmArgs& a) {
  if (a.tiles) {
    const GemmTile t = a.tiles[blockIdx.y];
    return {t.base, t.row0, t.rows};
  }
  const int row0 = int(blockIdx.y) * kGemmRows;
  return {a.base, row0, min(kGemmRows, a.m - row0)};
}

// Weights k..k+7 of `row`, dequantised (q * scale + bias for q4/q8).
template <int BITS>
__device__ __forceinline__ void load_w8(const uint8_t* base, const PartDesc& d, int row, int k, float (&v)[8]) {
  if constexpr (BITS == 16) {
    const uint4 w = *reinterpret_cast<const uint4*>(base + d.data_off + (size_t(row) * d.cols + k) * 2);
    const uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = __uint_as_float(u[i] << 16);
      v[2 * i + 1] = __uint_as_float(u[i] & 0xFFFF0000u);
    }
  } else {
    float sc, bi;
    if constexpr (BITS == 8) {
      const size_t g = size_t(row) * (d.cols / 64) + k / 64;
      sc = bf16f(reinterpret_cast<const uint16_t*>(base + d.scales_off)[g]);
      bi = bf16f(reinterpret_cast<const uint16_t*>(base + d.biases_off)[g]);
    } else {
      const uint32_t pair = reinterpret_cast<const uint32_t*>(base + d.scales_off)[size_t(k / 64) * d.rows + row];
      sc = __uint_as_float(pair << 16), bi = __uint_as_float(pair & 0xFFFF0000u);
    }
    if constexpr (BITS == 8) {
      const uint2 w = *reinterpret_cast<const uint2*>(base + d.data_off + size_t(row) * d.cols + k);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        v[i] = fmaf(qf((w.x >> (8 * i)) & 255u), sc, bi);
        v[4 + i] = fmaf(qf((w.y >> (8 * i)) & 255u), sc, bi);
      }
    } else {
      const uint32_t w = *reinterpret_cast<const uint32_t*>(base + d.data_off + (size_t(row) * d.cols + k) / 2);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = fmaf(qf((w >> (4 * i)) & 15u), sc, bi);
    }
  }
}

// One 64 x 64 output tile: 64 input rows of the tile's group times 64 weight rows, through shared
// memory in steps of 32 columns (x transposed, weights dequantised to fp32).
template <int BITS, bool SWIGLU>
__global__ void __launch_bounds__(kGemmThreads) gemm_kernel(const __grid_constant__ GemmArgs a) {
  constexpr int NW = SWIGLU ? 2 : 1;
  __shared__ float xs[kTileK][kGemmRows + 1];
  __shared__ float ws[NW][kTileK][kTileCols + 1];
  pdl_wait();
  const TileRows t = tile_of(a);
  const int n0 = int(blockIdx.x) * kTileCols, N = a.w.rows, K = a.w.cols;
  const int tid = int(threadIdx.x), tx = tid % 16, ty = tid / 16;
  const float* xrow[2];
#pragma unroll
  for (int it = 0; it < 2; ++it) {
    const int r = (tid + kGemmThreads * it) / 8;
    xrow[it] = r < t.rows ? a.x + size_t(a.xrows ? a.xrows[t.row0 + r] : t.row0 + r) * a.ldx : nullptr;
  }
  const int wn = tid / 4, wk = (tid % 4) * 8;  // this thread's weight row and 8 columns of a stage
  const bool w_ok = n0 + wn < N;
  float acc[NW][4][4] = {};
  for (int k0 = 0; k0 < K; k0 += kTileK) {
#pragma unroll
    for (int it = 0; it < 2; ++it) {
      const int idx = tid + kGemmThreads * it, r = idx / 8, c = (idx % 8) * 4;
      float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if (xrow[it]) {
        if (a.x_vec4 && k0 + c + 4 <= K) {
          const float4 f = *reinterpret_cast<const float4*>(xrow[it] + k0 + c);
          v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
        } else {
          for (int i = 0; i < 4 && k0 + c + i < K; ++i) v[i] = xrow[it][k0 + c + i];
        }
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) xs[c + i][r] = v[i];
    }
#pragma unroll
    for (int m = 0; m < NW; ++m) {
      float v[8] = {};
      if (w_ok && k0 + wk < K) load_w8<BITS>(t.base, m ? a.w2 : a.w, n0 + wn, k0 + wk, v);
#pragma unroll
      for (int i = 0; i < 8; ++i) ws[m][wk + i][wn] = v[i];
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < kTileK; ++k) {
      float xv[4], wv[NW][4];
#pragma unroll
      for (int i = 0; i < 4; ++i) xv[i] = xs[k][ty + 16 * i];
#pragma unroll
      for (int m = 0; m < NW; ++m)
#pragma unroll
        for (int j = 0; j < 4; ++j) wv[m][j] = ws[m][k][tx + 16 * j];
#pragma unroll
      for (int m = 0; m < NW; ++m)
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[m][i][j] = fmaf(xv[i], wv[m][j], acc[m][i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = ty + 16 * i;
    if (r >= t.rows) continue;
    float* y = a.y + size_t(a.yrows ? a.yrows[t.row0 + r] : t.row0 + r) * a.ldy;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = n0 + tx + 16 * j;
      if (n >= N) continue;
      if constexpr (SWIGLU)
        y[n] = silu(acc[0][i][j]) * acc[1][i][j];
      else if (a.ep == Epilogue::Accumulate)
        y[n] += acc[0][i][j];
      else
        y[n] = acc[0][i][j];
    }
  }
}

__global__ void embed_rows_kernel(DevMat t, const int32_t* tokens, float* x) {
  pdl_wait();
  const int row = int(blockIdx.y);
  float* out = x + size_t(row) * t.cols;
  for (int c = int(blockIdx.x * blockDim.x + threadIdx.x); c < t.cols; c += int(gridDim.x * blockDim.x))
    out[c] = embed_value(t, tokens[row], c);
}

__global__ void rmsnorm_rows_kernel(const float* x, const float* w, float eps, int cols, float* out) {
  __shared__ float red[32];
  pdl_wait();
  const float* xr = x + size_t(blockIdx.x) * cols;
  float ss = 0.0f;
  for (int i = int(threadIdx.x); i < cols; i += int(blockDim.x)) ss += xr[i] * xr[i];
  const float inv = 1.0f / sqrtf(block_sum(ss, red) / float(cols) + eps);
  float* o = out + size_t(blockIdx.x) * cols;
  for (int i = int(threadIdx.x); i < cols; i += int(blockDim.x)) o[i] = xr[i] * inv * (1.0f + w[i]);
}

// Block (head, token): q/k norm + RoPE at the token's position; keys and values into the cache.
__global__ void chunk_qk_prep_kernel(ChunkAttnArgs a) {
  __shared__ float buf[kMaxHeadDim];
  __shared__ float red[32];
  pdl_wait();
  const int hd = a.hd, head = int(blockIdx.x), t = int(blockIdx.y);
  const int64_t pos = a.pos0 + t;
  const int kv_dim = a.nkv * hd;
  const bool is_q = head < a.nh;
  const int kvh = head - a.nh;
  const float* src = is_q ? a.qg + size_t(t) * a.nh * 2 * hd + size_t(head) * 2 * hd
                          : a.kraw + size_t(t) * kv_dim + size_t(kvh) * hd;
  const float out = norm_rope(src, is_q ? a.q_norm : a.k_norm, a.inv_freq, pos, hd, a.rotary_dim, a.eps, buf, red);
  if (is_q) {
    a.q[size_t(t) * a.nh * hd + size_t(head) * hd + threadIdx.x] = out;
  } else {
    float* row = a.kv + size_t(pos) * 2 * kv_dim;
    row[kvh * hd + threadIdx.x] = out;
    row[kv_dim + kvh * hd + threadIdx.x] = a.vraw[size_t(t) * kv_dim + size_t(kvh) * hd + threadIdx.x];
  }
}

// Block (head, token): online softmax over positions 0..pos0+t, one warp per position at a time,
// then the warps' partial results merged and gated.
__global__ void __launch_bounds__(kAttnWarps * 32) chunk_attend_kernel(ChunkAttnArgs a) {
  __shared__ float sm[kAttnWarps], sl[kAttnWarps];
  __shared__ float sacc[kAttnWarps][kMaxHeadDim];
  pdl_wait();
  const int h = int(blockIdx.x), t = int(blockIdx.y), hd = a.hd;
  const float* q = a.q + size_t(t) * a.nh * hd + size_t(h) * hd;
  const AttnPartial p = block_attend(q, a.kv, a.nkv * hd, h / (a.nh / a.nkv), hd, 0, a.pos0 + t + 1, sacc, sm, sl);
  const float* gate = a.qg + size_t(t) * a.nh * 2 * hd + size_t(h) * 2 * hd + hd;
  float* out = a.out + size_t(t) * a.nh * hd + size_t(h) * hd;
  for (int i = int(threadIdx.x); i < hd; i += int(blockDim.x)) out[i] = sacc[0][i] / p.l * sigmoid(gate[i]);
}

// Thread per channel: the causal conv over the chunk, continuing from the ring, then the chunk's
// last inputs into the ring (each thread reads its channel's ring entries before writing them).
__global__ void chunk_conv_kernel(ChunkDeltaArgs a) {
  pdl_wait();
  const int ch = 2 * a.nk * a.dk + a.nv * a.dv, ld = ch;
  const int c = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (c >= ch) return;
  const int K = a.kernel;
  float w[kMaxConvKernel], win[kMaxConvKernel];  // win[i]: input of position pos0 - (K-1) + i
#pragma unroll
  for (int i = 0; i < kMaxConvKernel; ++i) {
    w[i] = i < K ? a.conv_w[size_t(c) * K + i] : 0.0f;
    const int64_t p = a.pos0 - (K - 1) + i;
    win[i] = i < K - 1 ? a.conv_ring[size_t(((p % K) + K) % K) * ch + c] : 0.0f;
  }
  float w_last = 0.0f;  // constant indices only, so the arrays stay in registers
#pragma unroll
  for (int i = 0; i < kMaxConvKernel; ++i)
    if (i == K - 1) w_last = w[i];
  for (int t = 0; t < a.n; ++t) {
    const float in = a.mixed[size_t(t) * ld + c];
    float acc = w_last * in;
#pragma unroll
    for (int i = 0; i < kMaxConvKernel - 1; ++i)
      if (i < K - 1) acc += w[i] * win[i];
#pragma unroll
    for (int i = 0; i < kMaxConvKernel - 1; ++i)
      if (i < K - 2) win[i] = win[i + 1];
      else if (i == K - 2) win[i] = in;
    a.conv[size_t(t) * ld + c] = silu(acc);
  }
  for (int t = max(0, a.n - K); t < a.n; ++t)
    a.conv_ring[size_t((a.pos0 + t) % K) * ch + c] = a.mixed[size_t(t) * ld + c];
}

// Block (key head, token): L2-normalised q (times 1/sqrt(dk)) and k in place; block (0, token)
// also turns b and a into beta and the decay of every value head.
__global__ void chunk_delta_prep_kernel(ChunkDeltaArgs a) {
  __shared__ float red[32];
  pdl_wait();
  const int kh = int(blockIdx.x), t = int(blockIdx.y), dk = a.dk, kd = a.nk * dk;
  const int ld = 2 * kd + a.nv * a.dv, ldg = a.nv;
  float* q = a.conv + size_t(t) * ld + size_t(kh) * dk;
  float* k = q + kd;
  float sq = 0.0f, sk = 0.0f;
  for (int i = int(threadIdx.x); i < dk; i += int(blockDim.x)) sq += q[i] * q[i], sk += k[i] * k[i];
  sq = block_sum(sq, red);
  sk = block_sum(sk, red);
  const float iq = 1.0f / sqrtf(sq + 1e-6f) / sqrtf(float(dk)), ik = 1.0f / sqrtf(sk + 1e-6f);
  for (int i = int(threadIdx.x); i < dk; i += int(blockDim.x)) q[i] *= iq, k[i] *= ik;
  if (kh == 0)
    for (int j = int(threadIdx.x); j < a.nv; j += int(blockDim.x)) {
      float* b = a.b + size_t(t) * ldg + j;
      float* g = a.a + size_t(t) * ldg + j;
      *b = sigmoid(*b);
      *g = expf(-expf(a.a_log[j]) * softplus(*g + a.dt_bias[j]));
    }
}

// Block (value head j, 32 value columns): deltanet_kernel's state slice, held in registers over
// the whole chunk while delta_rule_step runs token by token.
__global__ void __launch_bounds__(kDeltaWarps * 32) chunk_delta_scan_kernel(ChunkDeltaArgs a) {
  __shared__ float red[2 * kDeltaWarps * 32];
  pdl_wait();
  const int warp = int(threadIdx.x) >> 5, lane = int(threadIdx.x) & 31;
  const int j = int(blockIdx.x), b = int(blockIdx.y) * 32 + lane;
  const int dk = a.dk, dv = a.dv, kd = a.nk * dk, kh = j / (a.nv / a.nk);
  const int ld = 2 * kd + a.nv * dv, ldg = a.nv, ldo = a.nv * dv;
  const bool col_ok = b < dv;
  float* S = a.state + size_t(j) * dk * dv;
  float s[kDeltaRows];
#pragma unroll
  for (int i = 0; i < kDeltaRows; ++i) {
    const int r = warp + kDeltaWarps * i;
    s[i] = r < dk && col_ok ? S[size_t(r) * dv + b] : 0.0f;
  }
  for (int t = 0; t < a.n; ++t) {
    const float* q = a.conv + size_t(t) * ld + size_t(kh) * dk;
    const float v = col_ok ? a.conv[size_t(t) * ld + 2 * kd + size_t(j) * dv + b] : 0.0f;
    const float decay = a.a[size_t(t) * ldg + j], beta = a.b[size_t(t) * ldg + j];
    const float o = delta_rule_step(s, q + kd, q, v, decay, beta, dk, col_ok, red);
    if (warp == 0 && col_ok) a.o[size_t(t) * ldo + size_t(j) * dv + b] = o;
  }
#pragma unroll
  for (int i = 0; i < kDeltaRows; ++i) {
    const int r = warp + kDeltaWarps * i;
    if (r < dk && col_ok) S[size_t(r) * dv + b] = s[i];
  }
}

// Block (head, token): the gated RMSNorm of one head of o, in place.
__global__ void gated_norm_rows_kernel(float* o, const float* z, const float* w, float eps, int heads,
                                       int head_dim) {
  __shared__ float red[32];
  pdl_wait();
  const size_t off = size_t(blockIdx.y) * heads * head_dim + size_t(blockIdx.x) * head_dim;
  float* x = o + off;
  float ss = 0.0f;
  for (int i = int(threadIdx.x); i < head_dim; i += int(blockDim.x)) ss += x[i] * x[i];
  const float inv = 1.0f / sqrtf(block_sum(ss, red) / float(head_dim) + eps);
  for (int i = int(threadIdx.x); i < head_dim; i += int(blockDim.x)) x[i] = x[i] * inv * w[i] * silu(z[off + i]);
}

__global__ void topk_rows_kernel(TopkTail t, int n) {
  pdl_wait();
  const int row = int(blockIdx.x) * (int(blockDim.x) >> 5) + (int(threadIdx.x) >> 5);
  if (row >= n) return;
  t.logits += size_t(row) * t.num_experts;
  t.ids += size_t(row) * t.k;
  t.weights += size_t(row) * t.k;
  warp_topk(t);
}

__global__ void combine_rows_kernel(float* x, const float* shared_logit, const float* y_shared,
                                    const float* weights, const float* y_routed, int k, int hidden) {
  pdl_wait();
  const int c = int(blockIdx.x * blockDim.x + threadIdx.x), t = int(blockIdx.y);
  if (c < hidden)
    x[size_t(t) * hidden + c] += moe_output(shared_logit[t], y_shared + size_t(t) * hidden, weights + size_t(t) * k,
                                            y_routed + size_t(t) * k * hidden, k, hidden, c);
}

}  // namespace

void gemm(cudaStream_t s, const GemmArgs& a) {
  const PartDesc& w = a.w;
  if ((w.bits != 16 && w.cols % 64) || w.cols % 8 || (w.bits != 4 && w.bits != 8 && w.bits != 16))
    throw std::invalid_argument("batched matmul: q4/q8 need cols % 64 == 0, bf16 cols % 8 == 0");
  if (a.ep == Epilogue::SwiGLU && (a.w2.rows != w.rows || a.w2.cols != w.cols || a.w2.bits != w.bits))
    throw std::logic_error("batched matmul: SwiGLU's gate and up must have one shape");
  GemmArgs args = a;
  args.x_vec4 = a.ldx % 4 == 0 && reinterpret_cast<uintptr_t>(a.x) % 16 == 0;
  const int groups = a.tiles ? a.ntiles : (a.m + kGemmRows - 1) / kGemmRows;
  if (groups == 0) return;
  const dim3 grid(unsigned((w.rows + kTileCols - 1) / kTileCols), unsigned(groups));
  const bool swiglu = a.ep == Epilogue::SwiGLU;
  if (w.bits == 4)
    launch(swiglu ? gemm_kernel<4, true> : gemm_kernel<4, false>, grid, kGemmThreads, 0, s, args);
  else if (w.bits == 8)
    launch(swiglu ? gemm_kernel<8, true> : gemm_kernel<8, false>, grid, kGemmThreads, 0, s, args);
  else
    launch(swiglu ? gemm_kernel<16, true> : gemm_kernel<16, false>, grid, kGemmThreads, 0, s, args);
}

void embed_rows(cudaStream_t s, const DevMat& table, const int32_t* tokens, int n, float* x) {
  launch(embed_rows_kernel, dim3(unsigned((table.cols + 255) / 256), unsigned(n)), 256, 0, s, table, tokens, x);
}

void rmsnorm_rows(cudaStream_t s, const float* x, const float* w, float eps, int n, int cols, float* out) {
  launch(rmsnorm_rows_kernel, n, 256, 0, s, x, w, eps, cols, out);
}

void chunk_attention(cudaStream_t s, const ChunkAttnArgs& a) {
  if (a.hd % 32 || a.hd > kMaxHeadDim || a.rotary_dim > a.hd || a.rotary_dim % 2)
    throw std::invalid_argument("CUDA attention needs head_dim a multiple of 32, at most 512");
  launch(chunk_qk_prep_kernel, dim3(unsigned(a.nh + a.nkv), unsigned(a.n)), a.hd, 0, s, a);
  launch(chunk_attend_kernel, dim3(unsigned(a.nh), unsigned(a.n)), kAttnWarps * 32, 0, s, a);
}

void chunk_deltanet(cudaStream_t s, const ChunkDeltaArgs& a) {
  if (a.dk > kMaxDeltaKeyDim) throw std::invalid_argument("CUDA DeltaNet supports key head dims up to 128");
  if (a.kernel < 1 || a.kernel > kMaxConvKernel) throw std::invalid_argument("CUDA DeltaNet conv kernel must be 1..8");
  const int ch = 2 * a.nk * a.dk + a.nv * a.dv;
  launch(chunk_conv_kernel, (ch + 127) / 128, 128, 0, s, a);
  launch(chunk_delta_prep_kernel, dim3(unsigned(a.nk), unsigned(a.n)), 128, 0, s, a);
  launch(chunk_delta_scan_kernel, dim3(unsigned(a.nv), unsigned((a.dv + 31) / 32)), kDeltaWarps * 32, 0, s, a);
}

void gated_norm_rows(cudaStream_t s, float* o, const float* z, const float* w, float eps, int n, int heads,
                     int head_dim) {
  launch(gated_norm_rows_kernel, dim3(unsigned(heads), unsigned(n)), 128, 0, s, o, z, w, eps, heads, head_dim);
}

void topk_rows(cudaStream_t s, const float* logits, int n, int num_experts, int k, bool renormalize, int* ids,
               float* weights) {
  if (k < 1 || k >= kMaxExperts || num_experts > 32 * kTopkPerLane || k > num_experts)
    throw std::invalid_argument("CUDA router: 1..32 experts per token out of at most 1024");
  TopkTail t;
  t.logits = logits;
  t.num_experts = num_experts;
  t.k = k;
  t.renormalize = renormalize;
  t.ids = ids;
  t.weights = weights;
  launch(topk_rows_kernel, (n + 7) / 8, 256, 0, s, t, n);
}

void combine_rows(cudaStream_t s, float* x, const float* shared_logit, const float* y_shared,
                  const float* weights, const float* y_routed, int n, int k, int hidden) {
  launch(combine_rows_kernel, dim3(unsigned((hidden + 255) / 256), unsigned(n)), 256, 0, s, x, shared_logit,
         y_shared, weights, y_routed, k, hidden);
}

}  // namespace fm::cuda
