// CUDA kernels of the per-token loop (see kernels.cuh). Every reduction has a fixed order, so a
// token's logits are the same bits each time it is run.
#include <algorithm>
#include <cmath>
#include <cstdio>

#include "cuda/device_util.cuh"
#include "cuda/kernels.cuh"

namespace fm::cuda {

void check(cudaError_t err, const char* what, const char* file, int line) {
  if (err == cudaSuccess) return;
  throw std::runtime_error(std::string("CUDA error at ") + file + ":" + std::to_string(line) + " (" + what +
                           "): " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

namespace {

constexpr int kWarps = kThreads / 32;

__host__ __device__ inline int padded_cols(int cols) { return (cols + 31) / 32 * 32; }
__host__ __device__ inline int lanes_per_row(int cols, int bits) {
  const int cpr = cols * bits / 128;  // 16-byte chunks per row
  int lpr = 32;
  while (lpr > cpr) lpr >>= 1;
  return lpr;
}

// x lives in shared memory as float4s whose index is XOR-swizzled within each group of 8, so the
// lanes of a warp reading consecutive 16/32/64-byte chunks of x hit distinct banks.
__device__ __forceinline__ int swz(int f) { return f ^ ((f >> 3) & 7); }
__device__ __forceinline__ int xpos(int i) { return swz(i >> 2) * 4 + (i & 3); }

// Word i (of 4) of a 16-byte chunk of a row times its x values (x: 2, 1 or 1 float4s for q4, q8,
// bf16; bf16 words use half of it): a and b take alternate weights. A chunk's dot is the sum of
// its 4 words in order, then a + b.
template <int BITS>
__device__ __forceinline__ void dot_word(uint32_t v, const float4* x, int i, float& a, float& b) {
  if constexpr (BITS == 4) {
    a = fmaf(qf(v & 15u), x[0].x, a);
    b = fmaf(qf((v >> 4) & 15u), x[0].y, b);
    a = fmaf(qf((v >> 8) & 15u), x[0].z, a);
    b = fmaf(qf((v >> 12) & 15u), x[0].w, b);
    a = fmaf(qf((v >> 16) & 15u), x[1].x, a);
    b = fmaf(qf((v >> 20) & 15u), x[1].y, b);
    a = fmaf(qf((v >> 24) & 15u), x[1].z, a);
    b = fmaf(qf(v >> 28), x[1].w, b);
  } else if constexpr (BITS == 8) {
    a = fmaf(qf(v & 255u), x[0].x, a);
    b = fmaf(qf((v >> 8) & 255u), x[0].y, b);
    a = fmaf(qf((v >> 16) & 255u), x[0].z, a);
    b = fmaf(qf(v >> 24), x[0].w, b);
  } else {
    a = fmaf(__uint_as_float(v << 16), i & 1 ? x[0].z : x[0].x, a);
    b = fmaf(__uint_as_float(v & 0xFFFF0000u), i & 1 ? x[0].w : x[0].y, b);
  }
}

__device__ __forceinline__ uint32_t word(const uint4& w, int i) { return i == 0 ? w.x : i == 1 ? w.y : i == 2 ? w.z : w.w; }

// Loads (16-byte chunks) of one lane's chunk group; two groups are in flight (the next is issued
// before the current one is consumed), and the first before the block builds x, so that the DRAM
// stream overlaps the prologue and the previous kernel's tail.
constexpr int kLoads = 4;

// One lane's share of N same-shaped matrices' rows row0..row0+nrows-1 (nrows <= RT): its chunks
// sub, sub+lpr, ... of each row, U chunks of each row per group (N * RT * U = kLoads). Quantized
// rows use the rearranged form sum_g scale_g * dot(q_g, x_g) + bias_g * sum(x_g), with sum(x_g)
// precomputed in gsum. A row's sum runs over its chunks in ascending order whatever RT and U are.
template <int BITS, int N, int RT>
struct TileLoads {
  static constexpr int E = 128 / BITS;  // elements per chunk
  static constexpr int X4 = E / 4;
  static constexpr int U = kLoads / (N * RT) > 0 ? kLoads / (N * RT) : 1;
  uint4 w[U][N][RT];
  uint16_t sc[U][N][RT], bi[U][N][RT];

  __device__ __forceinline__ void issue(const DevMat* m, int row0, int nrows, int c0, int lpr) {
    const int cpr = m[0].cols / E, groups = m[0].cols / 64;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * lpr;
#pragma unroll
      for (int n = 0; n < N; ++n)
#pragma unroll
        for (int r = 0; r < RT; ++r) {
          const bool ok = c < cpr && r < nrows;
          w[u][n][r] = ok ? load_stream(reinterpret_cast<const uint4*>(m[n].data) + size_t(row0 + r) * cpr + c)
                          : make_uint4(0, 0, 0, 0);
          if constexpr (BITS != 16) {
            const size_t gi = size_t(row0 + r) * groups + c * E / 64;
            sc[u][n][r] = ok ? m[n].scales[gi] : uint16_t(0);
            bi[u][n][r] = ok ? m[n].biases[gi] : uint16_t(0);
          }
        }
    }
  }

  // x is loaded word by word, so that its registers are few while the tile's loads are held.
  __device__ __forceinline__ void consume(int c0, int lpr, int cpr, const float4* xs, const float* gsum,
                                          float (&acc)[N][RT]) const {
    constexpr int XW = X4 >= 4 ? X4 / 4 : 1;  // float4s of x per word
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * lpr;
      if (c >= cpr) break;
      float a[N][RT] = {}, b[N][RT] = {};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float4 x[XW];
#pragma unroll
        for (int q = 0; q < XW; ++q) x[q] = xs[swz((c * E + i * E / 4) / 4 + q)];
#pragma unroll
        for (int n = 0; n < N; ++n)
#pragma unroll
          for (int r = 0; r < RT; ++r) dot_word<BITS>(word(w[u][n][r], i), x, i, a[n][r], b[n][r]);
      }
      const float gs = BITS != 16 && (c * E) % 64 == 0 ? gsum[c * E / 64] : 0.0f;  // the bias term once per group
#pragma unroll
      for (int n = 0; n < N; ++n)
#pragma unroll
        for (int r = 0; r < RT; ++r)
          if constexpr (BITS == 16)
            acc[n][r] += a[n][r] + b[n][r];
          else
            acc[n][r] += fmaf(bf16f(sc[u][n][r]), a[n][r] + b[n][r], bf16f(bi[u][n][r]) * gs);
    }
  }
};

// The tiles of one worker (see rows_dot) as a sequence of chunk groups: (tile, chunks from sub),
// (tile, chunks from sub + U * lpr), ..., then the next tile. Each group's successor is issued
// before the group is consumed; the first group, before ready() (the block's x prologue, which
// every thread runs once).
template <int BITS, int N, int RT, class Ready, class Emit>
__device__ __forceinline__ void rows_dot_tiles(const DevMat* m, int r0, int r1, int worker, int workers,
                                               const float* xs, const float* gsum, Ready&& ready, Emit&& emit) {
  using T = TileLoads<BITS, N, RT>;
  const int lane = threadIdx.x & 31;
  const int lpr = lanes_per_row(m[0].cols, BITS);
  const int cpr = m[0].cols / T::E;
  const int seg = lane / lpr, sub = lane % lpr;
  const int per_tile = (32 / lpr) * RT, stride = workers * per_tile;
  auto rows_at = [&](int b) { return b < r1 ? max(0, min(RT, r1 - (b + seg * RT))) : 0; };
  const float4* x4 = reinterpret_cast<const float4*>(xs);
  int base = r0 + worker * per_tile, c0 = sub;
  T t[2];
  t[0].issue(m, base + seg * RT, rows_at(base), c0, lpr);
  ready();
  float acc[N][RT] = {};
  auto group = [&](T& cur, T& nxt) {
    int nb = base, nc = c0 + T::U * lpr;
    if (nc >= cpr) nc = sub, nb += stride;
    nxt.issue(m, nb + seg * RT, rows_at(nb), nc, lpr);
    cur.consume(c0, lpr, cpr, x4, gsum, acc);
    if (nb != base) {  // the tile is done
      const int row0 = base + seg * RT, nrows = rows_at(base);
#pragma unroll
      for (int n = 0; n < N; ++n)
#pragma unroll
        for (int r = 0; r < RT; ++r)
          for (int off = lpr >> 1; off > 0; off >>= 1) acc[n][r] += __shfl_xor_sync(0xffffffffu, acc[n][r], off);
      if (sub == 0)
#pragma unroll
        for (int r = 0; r < RT; ++r) {
          if (r >= nrows) break;
          if constexpr (N == 1)
            emit(row0 + r, acc[0][r]);
          else
            emit(row0 + r, acc[0][r], acc[1][r]);
        }
#pragma unroll
      for (int n = 0; n < N; ++n)
#pragma unroll
        for (int r = 0; r < RT; ++r) acc[n][r] = 0.0f;
    }
    base = nb, c0 = nc;
  };
  while (base < r1) {
    group(t[0], t[1]);
    if (base >= r1) break;
    group(t[1], t[0]);
  }
}

template <int N, int RT, class Ready, class Emit>
__device__ __forceinline__ void rows_dot_rt(const DevMat* m, int r0, int r1, int worker, int workers,
                                            const float* xs, const float* gsum, Ready&& ready, Emit&& emit) {
  if (m[0].bits == 4)
    rows_dot_tiles<4, N, RT>(m, r0, r1, worker, workers, xs, gsum, ready, emit);
  else if (m[0].bits == 8)
    rows_dot_tiles<8, N, RT>(m, r0, r1, worker, workers, xs, gsum, ready, emit);
  else
    rows_dot_tiles<16, N, RT>(m, r0, r1, worker, workers, xs, gsum, ready, emit);
}

// Rows [r0, r1) of N same-shaped matrices times the block's x, as tiles of rt rows per segment of
// lpr lanes (a whole warp for rows of 32+ chunks, else several rows side by side). Worker w of
// `workers` (one warp each) takes tiles w, w+workers, ...; ready() builds x (all threads call it
// once, after their first weight loads are issued); emit(row, dots...) runs on one lane per row.
template <int N, class Ready, class Emit>
__device__ __forceinline__ void rows_dot(const DevMat* m, int rt, int r0, int r1, int worker, int workers,
                                         const float* xs, const float* gsum, Ready&& ready, Emit&& emit) {
  if (rt == 4)
    rows_dot_rt<N, 4>(m, r0, r1, worker, workers, xs, gsum, ready, emit);
  else if (rt == 2)
    rows_dot_rt<N, 2>(m, r0, r1, worker, workers, xs, gsum, ready, emit);
  else
    rows_dot_rt<N, 1>(m, r0, r1, worker, workers, xs, gsum, ready, emit);
}

// Shared memory of one input vector: x (swizzled, padded to 32), group sums, reduction space.
__host__ __device__ inline size_t vector_floats(int cols) { return size_t(padded_cols(cols)) + cols / 64 + 4; }

// float4s of the prologue's inputs each thread loads before using any: one L2 round trip per
// kXBatch * kThreads * 4 columns (4096 at 256 threads) instead of one per element.
constexpr int kXBatch = 4;

__device__ __forceinline__ float4 operator*(float4 a, float4 b) { return {a.x * b.x, a.y * b.y, a.z * b.z, a.w * b.w}; }
__device__ __forceinline__ float4 operator*(float4 a, float s) { return {a.x * s, a.y * s, a.z * s, a.w * s}; }
__device__ __forceinline__ float sum_sq(float4 v) { return v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w; }
__device__ __forceinline__ float4 silu4(float4 v) { return {silu(v.x), silu(v.y), silu(v.z), silu(v.w)}; }

// Builds the block's x and group sums from the prologue; every thread of the block takes part.
// red: kWarps floats, then kMaxHeads head sums, then cols/4 squares (GatedNorm). The inputs are
// read as float4s: weights.bin tensors start 64-byte aligned and activations are whole buffers
// (or rows of a multiple of 4 floats).
__device__ void load_x(const PrologueArgs& p, int cols, float* xs, float* gsum, float* red) {
  const int tid = threadIdx.x, nt = blockDim.x, warp = tid >> 5, lane = tid & 31, nw = nt >> 5;
  const int n4 = cols / 4, hd4 = p.head_dim / 4;
  const float4* src = reinterpret_cast<const float4*>(p.src);
  const float4* w4 = reinterpret_cast<const float4*>(p.w);
  const float4* z4 = reinterpret_cast<const float4*>(p.z);
  float4* x4 = reinterpret_cast<float4*>(xs);
  float* head_ss = red + nw;
  float* sq = head_ss + kMaxHeads;
  float ss = 0.0f;
  // x = src, src * (1 + w) (Norm: the block's scalar norm comes after) or src * w * silu(z)
  for (int base = tid; base < n4; base += nt * kXBatch) {
    float4 v[kXBatch], w[kXBatch], z[kXBatch];
#pragma unroll
    for (int j = 0; j < kXBatch; ++j) {
      const int f = base + j * nt;
      if (f >= n4) break;
      v[j] = src[f];
      if (p.kind == Prologue::Norm) w[j] = w4[f];
      if (p.kind == Prologue::GatedNorm) w[j] = w4[f % hd4], z[j] = z4[f];
    }
#pragma unroll
    for (int j = 0; j < kXBatch; ++j) {
      const int f = base + j * nt;
      if (f >= n4) break;
      if (p.kind == Prologue::Copy) {
        x4[swz(f)] = v[j];
      } else if (p.kind == Prologue::Norm) {
        ss += sum_sq(v[j]);
        x4[swz(f)] = v[j] * float4{1.0f + w[j].x, 1.0f + w[j].y, 1.0f + w[j].z, 1.0f + w[j].w};
      } else {
        sq[f] = sum_sq(v[j]);
        x4[swz(f)] = v[j] * w[j] * silu4(z[j]);
      }
    }
  }
  if (p.kind == Prologue::Norm) {
    const float inv = 1.0f / sqrtf(block_sum(ss, red) / float(cols) + p.eps);
    for (int f = tid; f < n4; f += nt) {
      const float4 v = x4[swz(f)] * inv;
      x4[swz(f)] = v;
      if (p.norm_out && blockIdx.x == 0) reinterpret_cast<float4*>(p.norm_out)[f] = v;
    }
  } else if (p.kind == Prologue::GatedNorm) {
    __syncthreads();
    for (int h = warp; h < n4 / hd4; h += nw) {
      float s = 0.0f;
      for (int i = lane; i < hd4; i += 32) s += sq[h * hd4 + i];
      s = warp_sum(s);
      if (lane == 0) head_ss[h] = 1.0f / sqrtf(s / float(p.head_dim) + p.eps);
    }
    __syncthreads();
    for (int f = tid; f < n4; f += nt) x4[swz(f)] = x4[swz(f)] * head_ss[f / hd4];
  }
  __syncthreads();
  for (int g = warp; g < cols / 64; g += nw) {
    float s = xs[xpos(g * 64 + lane)] + xs[xpos(g * 64 + 32 + lane)];
    s = warp_sum(s);
    if (lane == 0) gsum[g] = s;
  }
  __syncthreads();
}

// Blocks of the matvec-style kernels resident per SM (their launch bounds, 128 registers); a
// launch takes at most this many per SM, so that its blocks run in one wave. (At most one per SM,
// which leaves room for the next launch to start beside it, measured slower: 8 warps per SM hide
// too little latency.)
constexpr int kBlocksPerSm = 2;

// How a launch covers a matrix: rt rows per warp tile and rows per block.
struct Tiling {
  int rt = 1, rows_per_block = 0;
};

// Tiles and first blocks of a launch of njobs matrices (shapes m, each its own rows; n: matrices
// per tile, gate/up: 2). For a target block weight, each job takes the most rows per block that
// stay within it (whole tiles of its tallest fitting height, at least one tile of one row per
// segment), so that a small bf16 matrix does not become one block heavier than the rest. Among
// targets that keep the launch within kBlocksPerSm blocks per SM (one wave), the plan minimises
// the busiest SM's time, modelled as its heaviest block times its blocks over its throughput,
// which a second block raises by half (more loads in flight); a launch of more jobs than that
// takes one block per job. Returns the launch's blocks. (The sums do not depend on the tiling.)
int plan_launch(const DevMat* m, int njobs, int n, int sms, Tiling* tiles, int* first_block) {
  static_assert(kBlocksPerSm == 2, "the SM throughput model below knows one or two blocks");
  const int64_t slots = int64_t(sms) * kBlocksPerSm;
  if (njobs > kMaxExperts) throw std::logic_error("plan_launch: more than kMaxExperts matrices");
  const int rt_max = kLoads / n;
  int unit[kMaxExperts];         // rows of one tile per warp at rt = 1
  double row_bits[kMaxExperts];  // weight bits of one row
  double lightest = INFINITY;
  for (int j = 0; j < njobs; ++j) {
    unit[j] = kWarps * (32 / lanes_per_row(m[j].cols, m[j].bits));
    row_bits[j] = double(m[j].cols) * m[j].bits;
    lightest = std::min(lightest, unit[j] * row_bits[j]);
  }
  double best = INFINITY;
  Tiling t[kMaxExperts];
  for (double target = lightest;; target *= 1.08) {
    int64_t blocks = 0;
    double heaviest = 0;
    bool whole = true;  // every job one block: heavier targets change nothing
    for (int j = 0; j < njobs; ++j) {
      const int units = std::max(1, std::min(int(target / (unit[j] * row_bits[j])), (m[j].rows + unit[j] - 1) / unit[j]));
      t[j].rt = units % 4 == 0 && rt_max >= 4 ? 4 : units % 2 == 0 && rt_max >= 2 ? 2 : 1;
      t[j].rows_per_block = unit[j] * units;
      blocks += (m[j].rows + t[j].rows_per_block - 1) / t[j].rows_per_block;
      heaviest = std::max(heaviest, std::min(t[j].rows_per_block, m[j].rows) * row_bits[j]);
      whole = whole && t[j].rows_per_block >= m[j].rows;
    }
    const int64_t per_sm = (blocks + sms - 1) / sms;
    const double time = heaviest * double(per_sm) / (per_sm > 1 ? 1.5 : 1.0);
    if ((blocks <= slots || (whole && best == INFINITY)) && time < best) {  // whole: no plan fits one wave
      best = time;
      std::copy(t, t + njobs, tiles);
    }
    if (whole) break;
  }
  int blocks = 0;
  for (int j = 0; j < njobs; ++j) {
    first_block[j] = blocks;
    blocks += (m[j].rows + tiles[j].rows_per_block - 1) / tiles[j].rows_per_block;
  }
  first_block[njobs] = blocks;
  return blocks;
}

struct MatvecParams {
  PrologueArgs pro;
  int cols = 0, njobs = 0;
  MatvecJob jobs[kMaxJobs];
  int first_block[kMaxJobs + 1] = {};
  Tiling tiles[kMaxJobs];
  TopkTail tail;
  Prefetch prefetch;
};

__global__ void __launch_bounds__(kThreads, kBlocksPerSm) matvec_kernel(const __grid_constant__ MatvecParams p) {
  extern __shared__ float4 smem4[];
  int j = 0;
  while (j + 1 < p.njobs && int(blockIdx.x) >= p.first_block[j + 1]) ++j;
  const MatvecJob& job = p.jobs[j];
  const int r0 = (int(blockIdx.x) - p.first_block[j]) * p.tiles[j].rows_per_block;
  const int r1 = min(job.m.rows, r0 + p.tiles[j].rows_per_block);
  float* xs = reinterpret_cast<float*>(smem4);
  float* gsum = xs + padded_cols(p.cols);
  float* red = gsum + p.cols / 64 + 4;
  float* out = job.out;
  const bool acc = job.accumulate;
  prefetch_l2(p.prefetch);
  rows_dot<1>(
      &job.m, p.tiles[j].rt, r0, r1, threadIdx.x >> 5, kWarps, xs, gsum,
      [&] {
        pdl_sync();
        load_x(p.pro, p.cols, xs, gsum, red);
      },
      [&](int r, float v) {
        if (acc)
          out[r] += v;
        else
          out[r] = v;
      });
  if (p.tail.counter) {
    // the last block to finish sees every logit (each block's writes are fenced before it counts)
    __shared__ int last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(p.tail.counter, 1) == int(gridDim.x) - 1;
    __syncthreads();
    if (last) {
      if (threadIdx.x < 32) warp_topk(p.tail);
      if (threadIdx.x == 0) *p.tail.counter = 0;
    }
  }
}

void check_matrix(const DevMat& m, int cols) {
  if (m.cols != cols) throw std::logic_error("matvec: a job's cols differ from the launch's");
  if (m.bits == 4 || m.bits == 8) {
    if (cols % 64) throw std::invalid_argument("quantized matrix cols must be a multiple of 64");
  } else if (m.bits == 16) {
    if (cols % 8) throw std::invalid_argument("bf16 matrix cols must be a multiple of 8 for the CUDA kernels");
  } else {
    throw std::invalid_argument("CUDA matvec supports q4, q8 and bf16 matrices");
  }
}

__global__ void embed_kernel(DevMat t, const StepParams* step, float* x) {
  pdl_sync();
  const int64_t row = step->token;
  for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < t.cols; c += gridDim.x * blockDim.x)
    x[c] = embed_value(t, row, c);
}

// One block per head: blocks [0, nh) the queries, [nh, nh+nkv) the keys (and their values).
__global__ void qk_prep_kernel(AttnArgs a) {
  pdl_sync();
  __shared__ float buf[kMaxHeadDim];
  __shared__ float red[32];
  const int hd = a.hd, t = threadIdx.x, head = blockIdx.x;
  const int64_t pos = a.step->pos;
  const bool is_q = head < a.nh;
  const int kvh = head - a.nh;
  const float* src = is_q ? a.qg + int64_t(head) * 2 * hd : a.kraw + int64_t(kvh) * hd;
  const float out = norm_rope(src, is_q ? a.q_norm : a.k_norm, a.inv_freq, pos, hd, a.rotary_dim, a.eps, buf, red);
  if (is_q) {
    a.q[int64_t(head) * hd + t] = out;
  } else {
    const int kv_dim = a.nkv * hd;
    float* row = a.kv + pos * 2 * kv_dim;
    row[kvh * hd + t] = out;
    row[kv_dim + kvh * hd + t] = a.vraw[kvh * hd + t];
  }
}

// Block (head, split): online softmax over the split's positions, one warp per position at a
// time; writes (max, sum, unnormalised output) for the combine.
__global__ void __launch_bounds__(kAttnWarps * 32) attn_partial_kernel(AttnArgs a) {
  pdl_sync();
  __shared__ float sm[kAttnWarps], sl[kAttnWarps];
  __shared__ float sacc[kAttnWarps][kMaxHeadDim];
  const int h = blockIdx.x, s = blockIdx.y, hd = a.hd;
  const int64_t len = a.step->pos + 1;
  const int64_t chunk = (len + kAttnSplits - 1) / kAttnSplits;
  const int64_t t0 = s * chunk, t1 = min(len, t0 + chunk);
  const AttnPartial p =
      block_attend(a.q + int64_t(h) * hd, a.kv, a.nkv * hd, h / (a.nh / a.nkv), hd, t0, t1, sacc, sm, sl);
  float* out = a.partial + (int64_t(h) * kAttnSplits + s) * (hd + 2);
  for (int i = threadIdx.x; i < hd; i += blockDim.x) out[2 + i] = sacc[0][i];
  if (threadIdx.x == 0) out[0] = p.m, out[1] = p.l;
}

// Block per head: merges the splits, divides by the softmax sum, applies the output gate.
__global__ void attn_combine_kernel(AttnArgs a) {
  pdl_sync();
  const int h = blockIdx.x, hd = a.hd;
  const float* part = a.partial + int64_t(h) * kAttnSplits * (hd + 2);
  float M = -INFINITY;
  for (int s = 0; s < kAttnSplits; ++s) M = fmaxf(M, part[s * (hd + 2)]);
  float L = 0.0f;
  for (int s = 0; s < kAttnSplits; ++s) {
    const float ms = part[s * (hd + 2)];
    if (ms > -INFINITY) L += part[s * (hd + 2) + 1] * expf(ms - M);
  }
  for (int i = threadIdx.x; i < hd; i += blockDim.x) {
    float o = 0.0f;
    for (int s = 0; s < kAttnSplits; ++s) {
      const float ms = part[s * (hd + 2)];
      if (ms > -INFINITY) o += part[s * (hd + 2) + 2 + i] * expf(ms - M);
    }
    a.out[int64_t(h) * hd + i] = o / L * sigmoid(a.qg[int64_t(h) * 2 * hd + hd + i]);
  }
}

// Block (value head j, 32 value columns): conv + SiLU of the q/k of its key head and of its v
// columns, L2 norms, gates, then the state columns: S = e^g S; S += k (beta (v - S^T k))^T;
// o = S^T q. Warp w holds state rows w, w+8, ... in registers between the two passes.
__global__ void __launch_bounds__(kDeltaWarps * 32) deltanet_kernel(DeltaArgs a) {
  extern __shared__ float sh[];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int j = blockIdx.x, cb = blockIdx.y * 32;
  const int dk = a.dk, dv = a.dv, K = a.kernel;
  const int kd = a.nk * dk, ch = 2 * kd + a.nv * dv, ratio = a.nv / a.nk, kh = j / ratio;
  const int64_t pos = a.step->pos;
  const int cur = int(pos % K);
  // the state columns first (this kernel wrote them a token ago, so before the wait): their loads
  // fly while in_proj finishes and the conv and norms are computed
  const int b = cb + lane;
  const bool col_ok = b < dv;
  float* S = a.state + int64_t(j) * dk * dv;
  float s[kDeltaRows];
#pragma unroll
  for (int i = 0; i < kDeltaRows; ++i) {
    const int r = warp + kDeltaWarps * i;
    s[i] = r < dk && col_ok ? S[int64_t(r) * dv + b] : 0.0f;
  }
  pdl_sync();
  float* qk = sh;           // [2*dk]: q then k of key head kh
  float* vs = qk + 2 * dk;  // [32]
  float* red = vs + 32;     // [2 * kDeltaWarps * 32]
  auto conv = [&](int chan) {
    float acc = a.conv_w[int64_t(chan) * K + K - 1] * a.mixed[chan];
    for (int t = 0; t < K - 1; ++t) {
      const int64_t p = pos - (K - 1) + t;  // the input of position p sits in slot p mod K (0 before p=0)
      const int slot = int(((p % K) + K) % K);
      acc += a.conv_w[int64_t(chan) * K + t] * a.conv_ring[int64_t(slot) * ch + chan];
    }
    return silu(acc);
  };
  auto qk_chan = [&](int c) { return c < dk ? kh * dk + c : kd + kh * dk + (c - dk); };
  for (int c = tid; c < 2 * dk; c += blockDim.x) qk[c] = conv(qk_chan(c));
  if (warp == 0 && col_ok) vs[lane] = conv(2 * kd + j * dv + cb + lane);
  // This position's inputs go to slot `cur`, which no block reads this step. q/k channels are
  // shared by the value heads of a key head: its first one writes them.
  if (j % ratio == 0 && blockIdx.y == 0)
    for (int c = tid; c < 2 * dk; c += blockDim.x) a.conv_ring[int64_t(cur) * ch + qk_chan(c)] = a.mixed[qk_chan(c)];
  if (warp == 0 && col_ok) {
    const int chan = 2 * kd + j * dv + cb + lane;
    a.conv_ring[int64_t(cur) * ch + chan] = a.mixed[chan];
  }
  __syncthreads();

  float sq = 0.0f, sk = 0.0f;
  for (int c = tid; c < dk; c += blockDim.x) sq += qk[c] * qk[c], sk += qk[dk + c] * qk[dk + c];
  sq = block_sum(sq, red);
  sk = block_sum(sk, red);
  const float iq = 1.0f / sqrtf(sq + 1e-6f) / sqrtf(float(dk));
  const float ik = 1.0f / sqrtf(sk + 1e-6f);
  for (int c = tid; c < dk; c += blockDim.x) qk[c] *= iq, qk[dk + c] *= ik;
  const float beta = sigmoid(a.b[j]);
  const float decay = expf(-expf(a.a_log[j]) * softplus(a.a[j] + a.dt_bias[j]));
  __syncthreads();

  const float o = delta_rule_step(s, qk + dk, qk, col_ok ? vs[lane] : 0.0f, decay, beta, dk, col_ok, red);
#pragma unroll
  for (int i = 0; i < kDeltaRows; ++i) {
    const int r = warp + kDeltaWarps * i;
    if (r < dk && col_ok) S[int64_t(r) * dv + b] = s[i];
  }
  if (warp == 0 && col_ok) a.o[int64_t(j) * dv + b] = o;
}

struct ExpertParams {
  ExpertArgs a;
  ExpertBatch b;
  int first_block[kMaxExperts + 1] = {};
  Tiling tiles[kMaxExperts];
};

__device__ DevMat part_at(const uint8_t* base, const PartDesc& d) {
  DevMat m;
  m.data = base + d.data_off;
  if (d.bits != 16) {
    m.scales = reinterpret_cast<const uint16_t*>(base + d.scales_off);
    m.biases = reinterpret_cast<const uint16_t*>(base + d.biases_off);
  }
  m.rows = d.rows;
  m.cols = d.cols;
  m.bits = d.bits;
  return m;
}

__device__ const uint8_t* expert_block(const ExpertArgs& a, int k, int slot) {
  const int s = slot >= 0 ? slot : a.layer * a.num_experts + __ldcg(a.ids + k);
  return a.cache + uint64_t(s) * a.stride;
}

__device__ int entry_of_block(const ExpertParams& p) {
  int j = 0;
  while (j + 1 < p.b.n && int(blockIdx.x) >= p.first_block[j + 1]) ++j;
  return j;
}

// act[1 + k] = silu(gate h) * (up h) for the block's entry and rows. The shared expert's weight
// loads start before the router has finished; a routed expert's, once its id is known.
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) expert_gate_up_kernel(const __grid_constant__ ExpertParams p) {
  extern __shared__ float4 smem4[];
  const ExpertArgs& a = p.a;
  const int j = entry_of_block(p), k = p.b.k[j];
  const bool routed = k >= 0;
  if (routed) {
    pdl_sync();  // the routed experts' ids are the router's output
    // the expert's down projection, which the next launch reads, split among this entry's blocks
    const PartDesc& d = a.down;
    const uint64_t end = d.bits == 16 ? d.data_off + uint64_t(d.rows) * d.cols * 2
                                      : d.biases_off + uint64_t(d.rows) * (d.cols / 64) * 2;
    if (threadIdx.x == 0)
      prefetch_slice(expert_block(a, k, p.b.slot[j]) + d.data_off, end - d.data_off,
                     blockIdx.x - p.first_block[j], p.first_block[j + 1] - p.first_block[j]);
  }
  DevMat m[2];
  if (routed) {
    const uint8_t* base = expert_block(a, k, p.b.slot[j]);
    m[0] = part_at(base, a.gate);
    m[1] = part_at(base, a.up);
  } else {
    m[0] = a.shared_gate;
    m[1] = a.shared_up;
  }
  const Tiling t = p.tiles[j];
  const int r0 = (int(blockIdx.x) - p.first_block[j]) * t.rows_per_block;
  const int r1 = min(m[0].rows, r0 + t.rows_per_block);
  float* xs = reinterpret_cast<float*>(smem4);
  float* gsum = xs + padded_cols(a.hidden);
  float* red = gsum + a.hidden / 64 + 4;
  PrologueArgs copy;
  copy.src = a.h;
  float* act = a.act + int64_t(k + 1) * a.act_stride;
  rows_dot<2>(
      m, t.rt, r0, r1, threadIdx.x >> 5, kWarps, xs, gsum,
      [&] {
        if (!routed) pdl_sync();
        load_x(copy, a.hidden, xs, gsum, red);
      },
      [&](int r, float g, float u) { act[r] = silu(g) * u; });
}

// y[1 + k] = down act[1 + k] for the block's entry and rows. The ids were written two launches
// back (the router), so the weight loads start before gate/up has finished.
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) expert_down_kernel(const __grid_constant__ ExpertParams p) {
  extern __shared__ float4 smem4[];
  const ExpertArgs& a = p.a;
  const int j = entry_of_block(p), k = p.b.k[j];
  const DevMat m = k < 0 ? a.shared_down : part_at(expert_block(a, k, p.b.slot[j]), a.down);
  const Tiling t = p.tiles[j];
  const int r0 = (int(blockIdx.x) - p.first_block[j]) * t.rows_per_block;
  const int r1 = min(m.rows, r0 + t.rows_per_block);
  float* xs = reinterpret_cast<float*>(smem4);
  float* gsum = xs + padded_cols(m.cols);
  float* red = gsum + m.cols / 64 + 4;
  PrologueArgs copy;
  copy.src = a.act + int64_t(k + 1) * a.act_stride;
  float* y = a.y + int64_t(k + 1) * a.hidden;
  rows_dot<1>(
      &m, t.rt, r0, r1, threadIdx.x >> 5, kWarps, xs, gsum,
      [&] {
        pdl_sync();  // act is gate/up's output
        load_x(copy, m.cols, xs, gsum, red);
      },
      [&](int r, float v) { y[r] = v; });
}

__global__ void expert_combine_kernel(ExpertArgs a, int K) {
  pdl_sync();
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r < a.hidden) a.x[r] += moe_output(a.shared_logit[0], a.y, a.weights, a.y + a.hidden, K, a.hidden, r);
}

DevMat part_shape(const PartDesc& d) {
  DevMat m;
  m.rows = d.rows;
  m.cols = d.cols;
  m.bits = d.bits;
  return m;
}

}  // namespace

namespace {
bool g_programmatic = false;
}  // namespace

void set_programmatic_launch(bool on) { g_programmatic = on; }
bool programmatic_launch() { return g_programmatic; }

size_t matvec_smem_bytes(int cols) {
  return (vector_floats(cols) + kWarps + kMaxHeads + size_t(cols) / 4) * sizeof(float);
}

void set_smem_limits(size_t bytes) {
  const int b = int(bytes);
  FM_CUDA(cudaFuncSetAttribute(matvec_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, b));
  FM_CUDA(cudaFuncSetAttribute(expert_gate_up_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, b));
  FM_CUDA(cudaFuncSetAttribute(expert_down_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, b));
}

void Prefetch::add(const void* ptr, uint64_t size) {
  if (n == kMaxPrefetch) throw std::logic_error("Prefetch: more than kMaxPrefetch ranges");
  p[n] = ptr, bytes[n] = size, ++n;
}

void Prefetch::add(const DevMat& m) {
  const uint64_t weights = uint64_t(m.rows) * uint64_t(m.cols);
  add(m.data, weights * uint64_t(m.bits) / 8);
  if (m.bits != 16) add(m.scales, weights / 64 * 2), add(m.biases, weights / 64 * 2);
}

void matvec(cudaStream_t s, const PrologueArgs& pro, int cols, const MatvecJob* jobs, int njobs, int sms,
            const TopkTail* tail, const Prefetch* prefetch) {
  if (njobs < 1 || njobs > kMaxJobs) throw std::logic_error("matvec: 1..kMaxJobs jobs per launch");
  if (pro.kind == Prologue::GatedNorm &&
      (pro.head_dim <= 0 || pro.head_dim % 4 || cols % pro.head_dim || cols / pro.head_dim > kMaxHeads))
    throw std::invalid_argument("gated norm: head_dim a multiple of 4, cols a multiple of head_dim, at most 128 heads");
  MatvecParams p;
  p.pro = pro;
  p.cols = cols;
  p.njobs = njobs;
  DevMat shapes[kMaxJobs];
  for (int j = 0; j < njobs; ++j) {
    check_matrix(jobs[j].m, cols);
    p.jobs[j] = jobs[j];
    shapes[j] = jobs[j].m;
  }
  const int blocks = plan_launch(shapes, njobs, 1, sms, p.tiles, p.first_block);
  if (tail) {
    if (tail->k < 1 || tail->k >= kMaxExperts || tail->num_experts > 32 * kTopkPerLane || tail->k > tail->num_experts)
      throw std::invalid_argument("CUDA router: 1..32 experts per token out of at most 1024");
    p.tail = *tail;
  }
  if (prefetch) p.prefetch = *prefetch;
  launch(matvec_kernel, blocks, kThreads, matvec_smem_bytes(cols), s, p);
}

void embed(cudaStream_t s, const DevMat& table, const StepParams* step, float* x) {
  launch(embed_kernel, (table.cols + 255) / 256, 256, 0, s, table, step, x);
}

void attention(cudaStream_t s, const AttnArgs& a) {
  if (a.hd % 32 || a.hd > kMaxHeadDim || a.rotary_dim > a.hd || a.rotary_dim % 2)
    throw std::invalid_argument("CUDA attention needs head_dim a multiple of 32, at most 512");
  launch(qk_prep_kernel, a.nh + a.nkv, a.hd, 0, s, a);
  launch(attn_partial_kernel, dim3(a.nh, kAttnSplits), kAttnWarps * 32, 0, s, a);
  launch(attn_combine_kernel, a.nh, 128, 0, s, a);
}

void deltanet(cudaStream_t s, const DeltaArgs& a) {
  if (a.dk > kMaxDeltaKeyDim) throw std::invalid_argument("CUDA DeltaNet supports key head dims up to 128");
  const size_t smem = (2 * size_t(a.dk) + 32 + 2 * kDeltaWarps * 32) * sizeof(float);
  launch(deltanet_kernel, dim3(a.nv, (a.dv + 31) / 32), kDeltaWarps * 32, smem, s, a);
}

void experts(cudaStream_t s, const ExpertArgs& a, const ExpertBatch& batch, int sms) {
  if (batch.n < 1 || batch.n > kMaxExperts) throw std::logic_error("experts: 1..kMaxExperts entries");
  ExpertParams p;
  p.a = a;
  p.b = batch;
  const DevMat routed_up = part_shape(a.up), routed_down = part_shape(a.down);
  auto plan = [&](const DevMat& shared, const DevMat& routed, int n) {
    DevMat shapes[kMaxExperts];
    for (int j = 0; j < batch.n; ++j) shapes[j] = batch.k[j] < 0 ? shared : routed;
    return plan_launch(shapes, batch.n, n, sms, p.tiles, p.first_block);
  };
  // gate/up: rows of the intermediate size; input h
  int blocks = plan(a.shared_up, routed_up, 2);
  launch(expert_gate_up_kernel, blocks, kThreads, matvec_smem_bytes(a.hidden), s, p);
  // down: rows of hidden; input act
  blocks = plan(a.shared_down, routed_down, 1);
  const int widest = std::max(a.shared_down.cols, routed_down.cols);
  launch(expert_down_kernel, blocks, kThreads, matvec_smem_bytes(widest), s, p);
}

void expert_combine(cudaStream_t s, const ExpertArgs& a, int k) {
  launch(expert_combine_kernel, (a.hidden + 255) / 256, 256, 0, s, a, k);
}

}  // namespace fm::cuda
