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

// Word i (of 4) of a 16-byte chunk of a q8 or bf16 row times its x values (one float4; bf16 words
// use half of it): a and b take alternate weights. A chunk's dot is the sum of its 4 words in
// order, then a + b.
template <int BITS>
__device__ __forceinline__ void dot_word(uint32_t v, float4 x, int i, float& a, float& b) {
  if constexpr (BITS == 8) {
    a = fmaf(qf(v & 255u), x.x, a);
    b = fmaf(qf((v >> 8) & 255u), x.y, b);
    a = fmaf(qf((v >> 16) & 255u), x.z, a);
    b = fmaf(qf(v >> 24), x.w, b);
  } else {
    a = fmaf(__uint_as_float(v << 16), i & 1 ? x.z : x.x, a);
    b = fmaf(__uint_as_float(v & 0xFFFF0000u), i & 1 ? x.w : x.y, b);
  }
}

__device__ __forceinline__ uint32_t word(const uint4& w, int i) { return i == 0 ? w.x : i == 1 ? w.y : i == 2 ? w.z : w.w; }

// Loads (16-byte chunks) of one lane's chunk group; two groups are in flight (the next is issued
// before the current one is consumed), and the first before the block builds x, so that the DRAM
// stream overlaps the prologue and the previous kernel's tail.
constexpr int kLoads = 4;

// One lane's share of one row of N same-shaped q8 or bf16 matrices: its chunks sub, sub + lpr, ...
// of the row, U chunks per group (N U = kLoads). Quantized rows use the rearranged form
// sum_g scale_g * dot(q_g, x_g) + bias_g * sum(x_g), with sum(x_g) precomputed in gsum. A row's
// sum runs over its chunks in ascending order.
template <int BITS, int N>
struct TileLoads {
  static constexpr int E = 128 / BITS;  // elements per chunk
  static constexpr int U = kLoads / N;
  uint4 w[U][N];
  uint16_t sc[U][N], bi[U][N];

  __device__ __forceinline__ void issue(const DevMat* m, int row, bool row_ok, int c0, int lpr) {
    const int cpr = m[0].cols / E, groups = m[0].cols / 64;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * lpr;
#pragma unroll
      for (int n = 0; n < N; ++n) {
        const bool ok = c < cpr && row_ok;
        w[u][n] = ok ? load_stream(reinterpret_cast<const uint4*>(m[n].data) + size_t(row) * cpr + c)
                     : make_uint4(0, 0, 0, 0);
        if constexpr (BITS == 8) {
          const size_t gi = size_t(row) * groups + c * E / 64;
          sc[u][n] = ok ? m[n].scales[gi] : uint16_t(0);
          bi[u][n] = ok ? m[n].biases[gi] : uint16_t(0);
        }
      }
    }
  }

  __device__ __forceinline__ void consume(int c0, int lpr, int cpr, const float4* xs, const float* gsum,
                                          float (&acc)[N]) const {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * lpr;
      if (c >= cpr) break;
      float a[N] = {}, b[N] = {};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float4 x = xs[swz((c * E + i * E / 4) / 4)];
#pragma unroll
        for (int n = 0; n < N; ++n) dot_word<BITS>(word(w[u][n], i), x, i, a[n], b[n]);
      }
      const float gs = BITS == 8 && (c * E) % 64 == 0 ? gsum[c * E / 64] : 0.0f;  // the bias term once per group
#pragma unroll
      for (int n = 0; n < N; ++n)
        if constexpr (BITS == 16)
          acc[n] += a[n] + b[n];
        else
          acc[n] += fmaf(bf16f(sc[u][n]), a[n] + b[n], bf16f(bi[u][n]) * gs);
    }
  }
};

// Rows [r0, r1) of N same-shaped q8 or bf16 matrices: a segment of lpr lanes takes one row (a
// whole warp for rows of 32+ chunks, else several rows side by side); worker w of `workers` (one
// warp each) takes tiles w, w + workers, ... of 32 / lpr rows, as a sequence of chunk groups:
// (tile, chunks from sub), (tile, chunks from sub + U lpr), ..., then the next tile. Each group's
// successor is issued before the group is consumed; the first group, before ready() (the block's
// x prologue, which every thread runs once).
template <int BITS, int N, class Ready, class Emit>
__device__ __forceinline__ void rows_dot_tiles(const DevMat* m, int r0, int r1, int worker, int workers,
                                               const float* xs, const float* gsum, Ready&& ready, Emit&& emit) {
  using T = TileLoads<BITS, N>;
  const int lane = threadIdx.x & 31;
  const int lpr = lanes_per_row(m[0].cols, BITS);
  const int cpr = m[0].cols / T::E;
  const int seg = lane / lpr, sub = lane % lpr;
  const int per_tile = 32 / lpr, stride = workers * per_tile;
  const float4* x4 = reinterpret_cast<const float4*>(xs);
  int base = r0 + worker * per_tile, c0 = sub;
  T t[2];
  t[0].issue(m, base + seg, base + seg < r1, c0, lpr);
  ready();
  float acc[N] = {};
  auto group = [&](T& cur, T& nxt) {
    int nb = base, nc = c0 + T::U * lpr;
    if (nc >= cpr) nc = sub, nb += stride;
    nxt.issue(m, nb + seg, nb + seg < r1, nc, lpr);
    cur.consume(c0, lpr, cpr, x4, gsum, acc);
    if (nb != base) {  // the tile is done
#pragma unroll
      for (int n = 0; n < N; ++n)
        for (int off = lpr >> 1; off > 0; off >>= 1) acc[n] += __shfl_xor_sync(0xffffffffu, acc[n], off);
      if (sub == 0 && base + seg < r1) {
        if constexpr (N == 1)
          emit(base + seg, acc[0]);
        else
          emit(base + seg, acc[0], acc[1]);
      }
#pragma unroll
      for (int n = 0; n < N; ++n) acc[n] = 0.0f;
    }
    base = nb, c0 = nc;
  };
  while (base < r1) {
    group(t[0], t[1]);
    if (base >= r1) break;
    group(t[1], t[0]);
  }
}

// Shared memory of a matvec-style block for an input of `cols` columns (offsets in floats): x
// (swizzled, padded to 32), group sums, reduction space (kWarps floats), then the q4 path's group
// scales, B fragments (kQ4FragBytes per 128-column step) and the partial sums of its column slices.
constexpr int kQ4FragBytes = 512;
constexpr int kMaxPartials = 8192;  // floats of slice partial sums per block
__host__ __device__ inline int q4_steps(int cols) { return (cols + 127) / 128; }
__host__ __device__ inline int q4_slices(int cols) { return q4_steps(cols) < kWarps ? q4_steps(cols) : kWarps; }

struct VecSmem {
  float* xs;
  float* gsum;
  float* red;
  float* q4scale;
  uint4* q4frag;
  uint4* q4zero;  // 32 zero bytes: the B fragments of lanes whose columns are another group's
  float* partial;
};
__host__ __device__ inline size_t vec_smem_floats(int cols, VecSmem* v = nullptr, float* base = nullptr) {
  const size_t xs = 0, gsum = xs + padded_cols(cols), red = gsum + cols / 64 + 4;
  const size_t q4scale = red + kWarps;
  const size_t q4frag = (q4scale + 2 * q4_steps(cols) + 3) / 4 * 4;
  const size_t q4zero = q4frag + size_t(q4_steps(cols)) * kQ4FragBytes / 4;
  const size_t partial = q4zero + 8;
  if (v)
    *v = {base + xs,
          base + gsum,
          base + red,
          base + q4scale,
          reinterpret_cast<uint4*>(base + q4frag),
          reinterpret_cast<uint4*>(base + q4zero),
          base + partial};
  return partial + kMaxPartials;
}

// ---- q4 rows on the integer tensor cores ----
// mma.sync m16n8k32 (u8 weights x s8 x, s32 accumulate) is exact. The block's x is held as four
// int8 parts per 64-column group G, x = S_G (p0 + p1 2^-7 + p2 2^-14 + p3 2^-21) with S_G a power
// of two and |p| <= 64 (x to 2^-27 of the group's largest |x|), so a row's dot with group G is
// S_G sum_p 2^-7p (q . p_p), each q . p_p an exact integer. Lane (g, t) = (lane / 4, lane % 4)
// loads 16 bytes (32 weights) of rows g and g + 8 at columns 128 s + 32 t.. of step s. MMA j
// (j = 0, 1) takes the even weights (low nibbles) of words 2j and 2j + 1 as A's k = 4t..4t+3 and
// k = 4t+16..4t+19, MMA 2 + j their odd weights as the high nibbles in place (16 q: one mask, no
// shift), into a second accumulator whose sum is then exactly 16 times the odd weights' dot.
// B's column n = 4 h + p holds part p of group 2 s + h in the lanes whose t / 2 = h and zeros
// elsewhere, so D[row][4h + p] = q . p_p over group 2 s + h: lane t holds its own group's parts
// 2 (t % 2) and 2 (t % 2) + 1.
//
// Warps split the columns into q4_slices(cols) slices (a function of cols alone, so the sums do
// not depend on the launch plan) and take a block's 16-row tiles in turn; the slices' partial sums
// meet in shared memory and are added in slice order.

// Byte of the B fragments holding part p of the even (odd = 0) or odd columns of chunk c (8
// columns, word i = c % 4 of lane t's 16 bytes): [step][t][p][MMA 2 odd + i / 2][word i % 2][4 bytes].
__device__ __forceinline__ int q4_frag_byte(int c, int p, int odd) {
  const int step = c >> 4, t = (c >> 2) & 3, i = c & 3;
  return (((step * 4 + t) * 4 + p) * 4 + 2 * odd + (i >> 1)) * 8 + (i & 1) * 4;
}

// The scale and parts of x[8 c .. 8 c + 8) (v) for the q4 path; the 8 lanes of a 64-column group
// call it together (mx: the group's largest |x|).
__device__ __forceinline__ void q4_split_chunk(int c, const float (&v)[8], float mx, const VecSmem& vs) {
  // mx = f 2^e, f in [0.5, 1): S = 2^(e - 6) keeps |x| / S < 64; the exponent field E is floored
  // so that every part's scale stays a normal float
  const int E = max(int(__float_as_uint(mx) >> 23), 40);
  if (c % 8 == 0) vs.q4scale[c / 8] = E >= 255 ? __uint_as_float(0x7fc00000u) : __uint_as_float(uint32_t(E - 5) << 23);
  // X = rint(x 2^21 / S), |X| < 2^27: the product is exact, and so is its rounding, one conversion
  // per column (the conversion pipe issues 16 per clock per SM). Its base-128 digits are the
  // parts: three low ones in [0, 127], the top one signed, x = S (p0 + p1 2^-7 + p2 2^-14 + p3
  // 2^-21) to half of 2^-21 S, the X that rounding part by part reaches too.
  const float to_x = __uint_as_float(uint32_t(280 - E) << 23);
  uint32_t word[4][2] = {};  // part p of the chunk's even and odd columns (q4_frag_byte)
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const int X = __float2int_rn(v[e] * to_x);
    const uint32_t d[4] = {uint32_t(X >> 21) & 255u, uint32_t(X >> 14) & 127u, uint32_t(X >> 7) & 127u,
                           uint32_t(X) & 127u};
#pragma unroll
    for (int p = 0; p < 4; ++p) word[p][e & 1] |= d[p] << (8 * (e >> 1));
  }
  uint8_t* frag = reinterpret_cast<uint8_t*>(vs.q4frag);
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    *reinterpret_cast<uint32_t*>(frag + q4_frag_byte(c, p, 0)) = word[p][0];
    *reinterpret_cast<uint32_t*>(frag + q4_frag_byte(c, p, 1)) = word[p][1];
  }
}

__device__ __forceinline__ void mma_u8s8(int (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                         uint32_t b1) {
  asm("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// One lane's loads of one (tile, step) of N same-shaped q4 matrices: rows g and g + 8 (h = 0, 1),
// with the (scale, bias) pair of its group (q4_group_major; the bias counts on even lanes only:
// one per group and row).
template <int N>
struct Q4Stage {
  uint4 w[N][2];
  uint32_t sb[N][2];

  // Row g's data at offset wo (uint4s) and its pair at so (words); row g + 8's at wo + w8 and so + 8.
  // A row past the block's or a group past the matrix's is not loaded: its registers keep an
  // earlier stage's values (finite weights and pairs, or the ring's zeros), which reach only rows
  // that are never emitted, or B columns that are zero (load_x_chunks zeroes the parts past cols).
  __device__ __forceinline__ void issue(const uint4* const (&data)[N], const uint32_t* const (&pairs)[N], uint32_t wo,
                                        uint32_t w8, uint32_t so, bool ok0, bool ok1) {
#pragma unroll
    for (int n = 0; n < N; ++n) {
      if (ok0) w[n][0] = load_stream(data[n] + wo), sb[n][0] = pairs[n][so];
      if (ok1) w[n][1] = load_stream(data[n] + wo + w8), sb[n][1] = pairs[n][so + 8];
    }
  }

  // fr: the lane's B fragments of the stage's step (a zero block on lanes whose B columns are
  // another group's); S: the step's group scale (zero past cols), gs: its sum of x (zero on odd
  // lanes); c1: the scale of the lane's second part relative to S (its first is 2^7 c1); bmask
  // keeps the bias on even lanes.
  __device__ __forceinline__ void consume(const uint4* fr, float S, float gs, float c1, uint32_t bmask,
                                          float (&acc)[N][2]) const {
    const uint4 b01 = fr[0], b23 = fr[1];
    const uint32_t b[8] = {b01.x, b01.y, b01.z, b01.w, b23.x, b23.y, b23.z, b23.w};
    // d2[0]: the even weights' dots; d2[1]: 16 times the odd weights' (see above)
    int d2[2][N][4] = {};
#pragma unroll
    for (int m = 0; m < 4; ++m)
#pragma unroll
      for (int n = 0; n < N; ++n) {
        const uint32_t mask = m < 2 ? 0x0F0F0F0Fu : 0xF0F0F0F0u;
        const int i = 2 * (m & 1);
        mma_u8s8(d2[m >> 1][n], word(w[n][0], i) & mask, word(w[n][1], i) & mask, word(w[n][0], i + 1) & mask,
                 word(w[n][1], i + 1) & mask, b[2 * m], b[2 * m + 1]);
      }
    // the lane's two parts are 2^7 apart: their dot is f1 (2^7 d0 + d1), an integer
    // below 2^24 (|d| < 2^17) times a power of two, exact in one conversion and one product
    const float f1 = S * c1;
#pragma unroll
    for (int n = 0; n < N; ++n)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int d0 = d2[0][n][2 * h] + (d2[1][n][2 * h] >> 4), d1 = d2[0][n][2 * h + 1] + (d2[1][n][2 * h + 1] >> 4);
        const float dot = __int2float_rn(d0 * 128 + d1) * f1;
        const float scale = __uint_as_float(sb[n][h] << 16);
        const float bias = __uint_as_float(sb[n][h] & bmask);
        acc[n][h] = fmaf(scale, dot, acc[n][h]);
        acc[n][h] = fmaf(bias, gs, acc[n][h]);
      }
  }
};

// Rows [r0, r1) of N same-shaped q4 matrices times the block's x (see above); r1 - r0 at most
// kMaxPartials / (N q4_slices(cols)). All threads call it; ready() builds x and its parts (after
// each warp's first loads are issued); emit(row, dots...) runs once per row.
template <int N, class Ready, class Emit>
__device__ __forceinline__ void rows_dot_q4(const DevMat* m, int r0, int r1, const VecSmem& v, Ready&& ready,
                                            Emit&& emit) {
  constexpr int D = N == 1 ? 4 : 2;  // stages in the ring: D - 1 in flight while one is consumed
  const int warp = int(threadIdx.x) >> 5, lane = int(threadIdx.x) & 31, g = lane >> 2, t = lane & 3;
  const int cols = m[0].cols, groups = cols / 64, steps = q4_steps(cols);
  const int slices = q4_slices(cols), slots = kWarps / slices;
  const int slice = warp % slices, slot = warp / slices;
  const int per = (steps + slices - 1) / slices, s0 = min(steps, slice * per), s1 = min(steps, s0 + per);
  const int rows = r1 - r0, tiles = (rows + 15) / 16;
  const int my_tiles = slot < slots && tiles > slot ? (tiles - slot + slots - 1) / slots : 0;
  const int n = my_tiles * (s1 - s0);
  // the next stage to issue: its step, lane row g, and offsets (Q4Stage::issue), advanced by adds
  const int mrows = m[0].rows, cpr4 = cols / 32, spans = s1 - s0;
  const uint32_t w8 = 8 * cpr4, tile_w = uint32_t(16 * slots * cpr4 - 4 * (spans - 1)),
                 tile_s = uint32_t(16 * slots - 2 * mrows * (spans - 1));
  const uint4* data[N];
  const uint32_t* pairs[N];
#pragma unroll
  for (int q = 0; q < N; ++q)
    data[q] = reinterpret_cast<const uint4*>(m[q].data), pairs[q] = reinterpret_cast<const uint32_t*>(m[q].scales);
  int is = s0, row = r0 + 16 * slot + g;
  uint32_t wo = uint32_t(row * cpr4 + 4 * s0 + t), so = uint32_t((2 * s0 + (t >> 1)) * mrows + row);
  auto issue = [&](Q4Stage<N>& st) {
    const bool gok = 2 * is + (t >> 1) < groups;
    st.issue(data, pairs, wo, w8, so, gok && row < r1, gok && row + 8 < r1);
    if (++is == s1) {
      is = s0, row += 16 * slots, wo += tile_w, so += tile_s;
    } else {
      wo += 4, so += 2 * mrows;
    }
  };
  Q4Stage<N> ring[D] = {};
#pragma unroll
  for (int j = 0; j < D - 1; ++j)
    if (j < n) issue(ring[j]);
  ready();
  // lane (g, t) supplies B column g, part g % 4 of group g / 4 of the step: the fragments of the
  // lanes whose t / 2 is that group, zeros on the others
  const bool b_on = (g >> 2) == (t >> 1);
  const uint4* fr0 = b_on ? v.q4frag + (t * 4 + (g & 3)) * 2 : v.q4zero;
  const int fr_step = b_on ? kQ4FragBytes / 16 : 0;
  const float* scale_t = v.q4scale + (t >> 1);
  const float* gsum_t = v.gsum + (t >> 1);
  const float c1 = t & 1 ? 0x1p-21f : 0x1p-7f;
  const uint32_t bmask = t & 1 ? 0u : 0xFFFF0000u;
  float acc[N][2] = {};
  int ct = slot, cs = s0;  // the stage being consumed
  for (int k0 = 0; k0 < n; k0 += D) {
#pragma unroll
    for (int j = 0; j < D; ++j) {
      if (k0 + j >= n) break;
      if (k0 + j + D - 1 < n) issue(ring[(j + D - 1) % D]);
      ring[j].consume(fr0 + cs * fr_step, scale_t[2 * cs], t & 1 ? 0.0f : gsum_t[2 * cs], c1, bmask, acc);
      if (++cs == s1) {  // the tile's slice is done: lane t = 0 adds the four lanes' sums
#pragma unroll
        for (int q = 0; q < N; ++q)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            float s = acc[q][h] + __shfl_xor_sync(0xffffffffu, acc[q][h], 1);
            s += __shfl_xor_sync(0xffffffffu, s, 2);
            const int r = 16 * ct + g + 8 * h;
            if (t == 0 && r < rows) v.partial[(q * slices + slice) * rows + r] = s;
            acc[q][h] = 0.0f;
          }
        cs = s0, ct += slots;
      }
    }
  }
  __syncthreads();
  for (int r = int(threadIdx.x); r < rows; r += int(blockDim.x)) {
    float sum[N];
#pragma unroll
    for (int q = 0; q < N; ++q) {
      sum[q] = 0.0f;
      for (int s = 0; s < slices; ++s) sum[q] += v.partial[(q * slices + s) * rows + r];
    }
    if constexpr (N == 1)
      emit(r0 + r, sum[0]);
    else
      emit(r0 + r, sum[0], sum[1]);
  }
}

// Rows [r0, r1) of N same-shaped matrices times the block's x: q4 rows on the tensor cores
// (rows_dot_q4), q8 and bf16 rows by rows_dot_tiles with warp w of the block as worker w. ready()
// builds x (all threads call it once, after their first weight loads are issued); emit(row,
// dots...) runs once per row. BITS = 4: every matrix is q4 (the launch's code holds that path
// alone); 0: the path is chosen per block.
template <int N, int BITS = 0, class Ready, class Emit>
__device__ __forceinline__ void rows_dot(const DevMat* m, int r0, int r1, const VecSmem& v, Ready&& ready,
                                         Emit&& emit) {
  const int warp = int(threadIdx.x) >> 5;
  if (BITS == 4 || m[0].bits == 4)
    rows_dot_q4<N>(m, r0, r1, v, ready, emit);
  else if (m[0].bits == 8)
    rows_dot_tiles<8, N>(m, r0, r1, warp, kWarps, v.xs, v.gsum, ready, emit);
  else
    rows_dot_tiles<16, N>(m, r0, r1, warp, kWarps, v.xs, v.gsum, ready, emit);
}

__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

// Builds the block's x, its group sums and, when `q4`, its int8 parts, for inputs of up to
// CH * 8 * kThreads columns; every thread of the block takes part. Thread t holds chunks t,
// t + kThreads, ... (8 columns each) in registers, so a 64-column group is 8 neighbouring lanes
// and a gated norm's head reads its few sums of squares: group sums are shuffles, and only
// the RMSNorm's block sum and the final barrier synchronise the block. Every input load is issued
// before any is used. The inputs are read as float4s: weights.bin tensors start 64-byte aligned
// and activations are whole buffers.
template <int CH>
__device__ void load_x_chunks(const PrologueArgs& p, int cols, const VecSmem& vs, bool q4) {
  constexpr int B = CH < 2 ? CH : 2;  // chunks whose loads are in flight together (registers)
  const int tid = int(threadIdx.x), nc = cols / 8;
  float v[CH][8];
  float ss = 0.0f;
#pragma unroll
  for (int i0 = 0; i0 < CH; i0 += B) {
    float w[B][8], hs[B][4];
#pragma unroll
    for (int i = i0; i < i0 + B; ++i) {
      const int c = tid + i * kThreads;
      if (c >= nc) break;
      load8(p.src + 8 * c, v[i]);
      if (p.kind == Prologue::Norm) load8(p.w + 8 * c, w[i - i0]);
      if (p.kind == Prologue::GatedNorm) {  // the head's sums, ceil(head_dim / 32) <= 4 of them
        const float* h = p.sumsq + 8 * c / p.head_dim * ((p.head_dim + 31) / 32);
#pragma unroll
        for (int q = 0; q < 4; ++q) hs[i - i0][q] = q * 32 < p.head_dim ? h[q] : 0.0f;
      }
    }
#pragma unroll
    for (int i = i0; i < i0 + B; ++i) {
      if (i * kThreads >= nc) break;
      const bool ok = tid + i * kThreads < nc;
      if (p.kind == Prologue::Norm) {
        float sq = 0.0f;
        if (ok)
#pragma unroll
          for (int e = 0; e < 8; ++e) sq += v[i][e] * v[i][e];
        ss += sq;
        if (ok)
#pragma unroll
          for (int e = 0; e < 8; ++e) v[i][e] *= 1.0f + w[i - i0][e];
      } else if (p.kind == Prologue::GatedNorm) {
        const float* h = hs[i - i0];
        const float inv = 1.0f / sqrtf((((h[0] + h[1]) + h[2]) + h[3]) / float(p.head_dim) + p.eps);
        if (ok)
#pragma unroll
          for (int e = 0; e < 8; ++e) v[i][e] *= inv;
      }
    }
  }
  trace::mark(trace::kLoaded);
  if (p.kind == Prologue::Norm) {
    const float inv = 1.0f / sqrtf(block_sum(ss, vs.red) / float(cols) + p.eps);
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      const int c = tid + i * kThreads;
      if (c >= nc) break;
#pragma unroll
      for (int e = 0; e < 8; ++e) v[i][e] *= inv;
    }
  }
  trace::mark(trace::kNormed);
  float4* x4 = reinterpret_cast<float4*>(vs.xs);
#pragma unroll
  for (int i = 0; i < CH; ++i) {
    if (i * kThreads >= nc) break;
    const int c = tid + i * kThreads;
    const bool ok = c < nc;
    float sum = 0.0f, mx = 0.0f;
    if (ok)
#pragma unroll
      for (int e = 0; e < 8; ++e) sum += v[i][e], mx = fmaxf(mx, fabsf(v[i][e]));
    for (int off = 1; off < 8; off <<= 1) {
      sum += __shfl_xor_sync(0xffffffffu, sum, off);
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    }
    if (!ok) continue;
    if (c % 8 == 0 && c / 8 < cols / 64) vs.gsum[c / 8] = sum;
    if (q4) {
      q4_split_chunk(c, v[i], mx, vs);
    } else {
      x4[swz(2 * c)] = {v[i][0], v[i][1], v[i][2], v[i][3]};
      x4[swz(2 * c + 1)] = {v[i][4], v[i][5], v[i][6], v[i][7]};
    }
  }
  if (q4) {
    if (tid < 8) reinterpret_cast<float*>(vs.q4zero)[tid] = 0.0f;
    if (cols % 128 && tid < 64) {  // the group past cols in the last step: zero parts, scale and sum
      reinterpret_cast<float*>(vs.q4frag + q4_steps(cols) * (kQ4FragBytes / 16) - 16)[tid] = 0.0f;
      if (tid == 0) vs.q4scale[cols / 64] = 0.0f, vs.gsum[cols / 64] = 0.0f;
    }
  }
  __syncthreads();
  trace::mark(trace::kReady);
}

// Chunks of 8 columns per thread that hold an input of `cols` columns (at most kMaxCols). Each
// kernel that builds an x is instantiated per count (CH), so that a launch's code holds one copy
// of load_x_chunks and runs in one stretch: its code comes from L2 at every launch (a decode
// layer runs about 145 KB of code against an instruction cache of about 32 KB; docs/cuda.md).
constexpr int kMaxChunks = kMaxCols / (8 * kThreads);
inline int x_chunks(int cols) { return cols <= 8 * kThreads ? 1 : cols <= 16 * kThreads ? 2 : kMaxChunks; }

// Blocks of the matvec-style kernels resident per SM (their launch bounds, 128 registers); a
// launch takes at most this many per SM, so that its blocks run in one wave. (At most one per SM,
// which leaves room for the next launch to start beside it, measured slower: 8 warps per SM hide
// too little latency.)
constexpr int kBlocksPerSm = 2;

// Rows per block and first blocks of a launch of njobs matrices (shapes m, each its own rows; n:
// matrices per tile, gate/up: 2). For a target block weight, each job takes the most rows per
// block that stay within it (whole units: a 16-row tile per warp slot for q4, a row per lane
// segment of every warp for q8 and bf16), so that a small bf16 matrix does not become one block
// heavier than the rest. Among
// targets that keep the launch within kBlocksPerSm blocks per SM (one wave), the plan minimises
// the busiest SM's time, modelled as its heaviest block times its blocks over its throughput,
// which a second block raises by half (more loads in flight); a launch of more jobs than that
// takes one block per job. Returns the launch's blocks. (The sums do not depend on the tiling.)
int plan_launch(const DevMat* m, int njobs, int n, int sms, int* rows_per_block, int* first_block) {
  static_assert(kBlocksPerSm == 2, "the SM throughput model below knows one or two blocks");
  const int64_t slots = int64_t(sms) * kBlocksPerSm;
  if (njobs > kMaxExperts) throw std::logic_error("plan_launch: more than kMaxExperts matrices");
  int unit[kMaxExperts];         // rows of one tile per warp (q4: one 16-row tile per slot)
  int max_units[kMaxExperts];    // q4: the slices' partial sums fit kMaxPartials
  double row_bits[kMaxExperts];  // weight bits of one row
  double lightest = INFINITY;
  for (int j = 0; j < njobs; ++j) {
    if (m[j].bits == 4) {
      const int slices = q4_slices(m[j].cols);
      unit[j] = 16 * (kWarps / slices);
      max_units[j] = std::max(1, kMaxPartials / (n * slices) / unit[j]);
    } else {
      unit[j] = kWarps * (32 / lanes_per_row(m[j].cols, m[j].bits));
      max_units[j] = INT_MAX;
    }
    row_bits[j] = double(m[j].cols) * m[j].bits;
    lightest = std::min(lightest, unit[j] * row_bits[j]);
  }
  double best = INFINITY;
  int t[kMaxExperts];
  for (double target = lightest;; target *= 1.08) {
    int64_t blocks = 0;
    double heaviest = 0;
    bool whole = true;  // every job one block (or its largest): heavier targets change nothing
    for (int j = 0; j < njobs; ++j) {
      const int units = std::max(1, std::min({int(target / (unit[j] * row_bits[j])), (m[j].rows + unit[j] - 1) / unit[j],
                                               max_units[j]}));
      t[j] = unit[j] * units;
      blocks += (m[j].rows + t[j] - 1) / t[j];
      heaviest = std::max(heaviest, std::min(t[j], m[j].rows) * row_bits[j]);
      whole = whole && (t[j] >= m[j].rows || units == max_units[j]);
    }
    const int64_t per_sm = (blocks + sms - 1) / sms;
    const double time = heaviest * double(per_sm) / (per_sm > 1 ? 1.5 : 1.0);
    if ((blocks <= slots || (whole && best == INFINITY)) && time < best) {  // whole: no plan fits one wave
      best = time;
      std::copy(t, t + njobs, rows_per_block);
    }
    if (whole) break;
  }
  int blocks = 0;
  for (int j = 0; j < njobs; ++j) {
    first_block[j] = blocks;
    blocks += (m[j].rows + rows_per_block[j] - 1) / rows_per_block[j];
  }
  first_block[njobs] = blocks;
  return blocks;
}

struct MatvecParams {
  PrologueArgs pro;
  int cols = 0, njobs = 0;
  MatvecJob jobs[kMaxJobs];
  int first_block[kMaxJobs + 1] = {};
  int rows_per_block[kMaxJobs] = {};
  TopkTail tail;
  bool own_rows = false;  // each block pulls its own rows into L2 at its start
};

// Launches whose weights take at most this many bytes (half the H200's 50 MB L2) pull each
// block's rows into L2 at the block's start; lm_head's 286 MB would evict its own rows.
constexpr uint64_t kOwnRowsMaxBytes = uint64_t(24) << 20;

template <int CH, int BITS>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) matvec_kernel(const __grid_constant__ MatvecParams p) {
  extern __shared__ float4 smem4[];
  trace::begin();
  int j = 0;
  while (j + 1 < p.njobs && int(blockIdx.x) >= p.first_block[j + 1]) ++j;
  const MatvecJob& job = p.jobs[j];
  const int r0 = (int(blockIdx.x) - p.first_block[j]) * p.rows_per_block[j];
  const int r1 = min(job.m.rows, r0 + p.rows_per_block[j]);
  VecSmem vs;
  vec_smem_floats(p.cols, &vs, reinterpret_cast<float*>(smem4));
  float* out = job.out;
  const bool acc = job.accumulate;
  if (p.own_rows) prefetch_rows(job.m, r0, r1);
  rows_dot<1, BITS>(
      &job.m, r0, r1, vs,
      [&] {
        pdl_sync();
        load_x_chunks<CH>(p.pro, p.cols, vs, BITS == 4 || job.m.bits == 4);
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
  trace::end(trace::kMatvec);
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
  trace::begin();
  pdl_sync();
  const int64_t row = step->token;
  for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < t.cols; c += gridDim.x * blockDim.x)
    x[c] = embed_value(t, row, c);
  trace::end(trace::kEmbed);
}

// One block per head: blocks [0, nh) the queries, [nh, nh+nkv) the keys (and their values).
__global__ void qk_prep_kernel(AttnArgs a) {
  trace::begin();
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
  trace::end(trace::kQkPrep);
}

// Block (head, split): online softmax over the split's positions, one warp per position at a
// time; writes (max, sum, unnormalised output) for the combine.
__global__ void __launch_bounds__(kAttnWarps * 32) attn_partial_kernel(AttnArgs a) {
  trace::begin();
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
  trace::end(trace::kAttnPartial);
}

// Block per head: merges the splits, divides by the softmax sum, applies the output gate. Warp 0
// finds the splits' common maximum and their scales once; the gate loads go out first.
constexpr int kAttnCombineThreads = 128;
__global__ void __launch_bounds__(kAttnCombineThreads) attn_combine_kernel(AttnArgs a) {
  trace::begin();
  __shared__ float scale[kAttnSplits];  // e^(m_s - M)
  __shared__ bool live[kAttnSplits];    // the split holds positions (m_s > -inf)
  __shared__ float total;               // the softmax sum
  pdl_sync();
  const int h = blockIdx.x, hd = a.hd, t = int(threadIdx.x);
  const float* part = a.partial + int64_t(h) * kAttnSplits * (hd + 2);
  constexpr int G = kMaxHeadDim / kAttnCombineThreads;
  float gate[G];
#pragma unroll
  for (int u = 0; u < G; ++u) {
    const int i = t + kAttnCombineThreads * u;
    gate[u] = i < hd ? a.qg[int64_t(h) * 2 * hd + hd + i] : 0.0f;
  }
  if (t < 32) {
    const float ms = t < kAttnSplits ? part[t * (hd + 2)] : -INFINITY;
    const float M = warp_max(ms);
    if (t < kAttnSplits) live[t] = ms > -INFINITY, scale[t] = ms > -INFINITY ? expf(ms - M) : 0.0f;
    __syncwarp();
    if (t == 0) {
      float L = 0.0f;
      for (int s = 0; s < kAttnSplits; ++s)
        if (live[s]) L += part[s * (hd + 2) + 1] * scale[s];
      total = L;
    }
  }
  __syncthreads();
#pragma unroll
  for (int u = 0; u < G; ++u) {
    const int i = t + kAttnCombineThreads * u;
    if (i >= hd) break;
    float o = 0.0f;
#pragma unroll
    for (int s = 0; s < kAttnSplits; ++s)
      if (live[s]) o += part[s * (hd + 2) + 2 + i] * scale[s];
    a.out[int64_t(h) * hd + i] = o / total * sigmoid(gate[u]);
  }
  trace::end(trace::kAttnCombine);
}

// One conv channel of the DeltaNet: its taps and its ring's K slots (the K - 1 previous inputs and
// a stale one), loaded before the wait (weights, and what this kernel wrote a token ago) without
// waiting for the position; then the input of this position.
struct ConvChannel {
  float w[kMaxConvKernel - 1], w_now, ring[kMaxConvKernel];  // taps of the past inputs and of x; slots
  int chan;
  __device__ __forceinline__ void load(const DeltaArgs& a, int channel, int ch) {
    const int K = a.kernel;
    chan = channel;
    w_now = a.conv_w[int64_t(chan) * K + K - 1];
#pragma unroll
    for (int t = 0; t < kMaxConvKernel; ++t) {
      if (t >= K) break;
      if (t < K - 1) w[t] = a.conv_w[int64_t(chan) * K + t];
      ring[t] = a.conv_ring[int64_t(t) * ch + chan];
    }
  }
  // silu(conv) given this position's input x; cur = pos mod K, the slot of this position, so that
  // the input of position pos - (K - 1) + t sits in slot (cur + 1 + t) mod K
  __device__ __forceinline__ float out(int K, int cur, float x) const {
    float acc = w_now * x;
    int slot = cur;
#pragma unroll
    for (int t = 0; t < kMaxConvKernel - 1; ++t) {
      if (t >= K - 1) break;
      slot = slot + 1 == K ? 0 : slot + 1;
      float past = 0.0f;
#pragma unroll
      for (int s = 0; s < kMaxConvKernel; ++s) past = s == slot ? ring[s] : past;
      acc += w[t] * past;
    }
    return silu(acc);
  }
};

// Block (value head j, 32 value columns): conv + SiLU of the q/k of its key head (thread c < 2 dk:
// channel c) and of its v columns (warp 0), L2 norms, gates, then the state columns: S = e^g S;
// S += k (beta (v - S^T k))^T; o = S^T q. Warp w holds state rows w, w+8, ... in registers between
// the two passes. Everything that does not depend on in_proj is loaded before the wait, and what
// does (the channels' inputs, b, a) is requested at once after it.
__global__ void __launch_bounds__(kDeltaWarps * 32) deltanet_kernel(DeltaArgs a) {
  extern __shared__ float sh[];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int j = blockIdx.x, cb = blockIdx.y * 32;
  const int dk = a.dk, dv = a.dv, K = a.kernel;
  const int kd = a.nk * dk, ch = 2 * kd + a.nv * dv, ratio = a.nv / a.nk, kh = j / ratio;
  trace::begin();
  const int64_t pos = a.step->pos;
  const int b = cb + lane;
  const bool col_ok = b < dv;
  float* S = a.state + int64_t(j) * dk * dv;
  float s[kDeltaRows];
#pragma unroll
  for (int i = 0; i < kDeltaRows; ++i) {
    const int r = warp + kDeltaWarps * i;
    s[i] = r < dk && col_ok ? S[int64_t(r) * dv + b] : 0.0f;
  }
  const bool has_qk = tid < 2 * dk, has_v = warp == 0 && col_ok;
  ConvChannel cq, cv;
  if (has_qk) cq.load(a, tid < dk ? kh * dk + tid : kd + kh * dk + (tid - dk), ch);
  if (has_v) cv.load(a, 2 * kd + j * dv + b, ch);
  const float a_log = a.a_log[j], dt_bias = a.dt_bias[j];
  const float w_norm = has_v ? a.out_norm[b] : 0.0f;
  pdl_sync();
  const float xq = has_qk ? a.mixed[cq.chan] : 0.0f, xv = has_v ? a.mixed[cv.chan] : 0.0f;
  const int cur = int(pos % K);
  const float gb = a.b[j], ga = a.a[j];
  const float gate = has_v ? silu(a.z[int64_t(j) * dv + b]) : 0.0f;
  float* qk = sh;           // [2*dk]: q then k of key head kh, normalised
  float* vs = qk + 2 * dk;  // [32]
  float* red = vs + 32;     // [2 * kDeltaWarps * 32]
  float2* red2 = reinterpret_cast<float2*>(red + 2 * kDeltaWarps * 32);  // [kDeltaWarps]
  // This position's inputs go to slot `cur`, which no block reads this step. q/k channels are
  // shared by the value heads of a key head: its first one writes them.
  if (has_qk && j % ratio == 0 && blockIdx.y == 0) a.conv_ring[int64_t(cur) * ch + cq.chan] = xq;
  if (has_v) {
    a.conv_ring[int64_t(cur) * ch + cv.chan] = xv;
    vs[lane] = cv.out(K, cur, xv);
  }
  const float y = has_qk ? cq.out(K, cur, xq) : 0.0f;
  float2 sum = {tid < dk ? y * y : 0.0f, tid >= dk ? y * y : 0.0f};  // q and k squares
  sum.x = warp_sum(sum.x), sum.y = warp_sum(sum.y);
  if (lane == 0) red2[warp] = sum;
  __syncthreads();
  sum = {0.0f, 0.0f};
  for (int w = 0; w < kDeltaWarps; ++w) sum.x += red2[w].x, sum.y += red2[w].y;
  if (has_qk) qk[tid] = tid < dk ? y / sqrtf(sum.x + 1e-6f) / sqrtf(float(dk)) : y / sqrtf(sum.y + 1e-6f);
  const float beta = sigmoid(gb);
  const float decay = expf(-expf(a_log) * softplus(ga + dt_bias));
  __syncthreads();

  const float o = delta_rule_step(s, qk + dk, qk, col_ok ? vs[lane] : 0.0f, decay, beta, dk, col_ok, red);
#pragma unroll
  for (int i = 0; i < kDeltaRows; ++i) {
    const int r = warp + kDeltaWarps * i;
    if (r < dk && col_ok) S[int64_t(r) * dv + b] = s[i];
  }
  if (warp == 0) {
    const float sq = warp_sum(col_ok ? o * o : 0.0f);
    if (lane == 0) a.o_sumsq[int64_t(j) * gridDim.y + blockIdx.y] = sq;
    if (col_ok) a.o[int64_t(j) * dv + b] = o * gate * w_norm;
  }
  trace::end(trace::kDeltaNet);
}

struct ExpertParams {
  ExpertArgs a;
  ExpertBatch b;
  int first_block[kMaxExperts + 1] = {};
  int rows_per_block[kMaxExperts] = {};
};

__device__ DevMat part_at(const uint8_t* base, const PartDesc& d) {
  DevMat m;
  m.data = base + d.data_off;
  if (d.bits != 16) m.scales = reinterpret_cast<const uint16_t*>(base + d.scales_off);
  if (d.bits == 8) m.biases = reinterpret_cast<const uint16_t*>(base + d.biases_off);
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

// act[1 + k] = silu(gate h) * (up h) for the block's entry and rows, h the post-attention RMSNorm
// of x. x was written two launches back (out_proj or o_proj), so the block builds h and its q4
// parts before its wait, while the router runs; a routed expert's weight loads start once its id
// is known, the shared expert's rows are pulled into L2 at the start.
template <int CH, int BITS>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) expert_gate_up_kernel(const __grid_constant__ ExpertParams p) {
  extern __shared__ float4 smem4[];
  trace::begin();
  const ExpertArgs& a = p.a;
  const int j = entry_of_block(p), k = p.b.k[j];
  const bool routed = k >= 0;
  const int rows = routed ? a.gate.rows : a.shared_gate.rows, bits = routed ? a.gate.bits : a.shared_gate.bits;
  const int r0 = (int(blockIdx.x) - p.first_block[j]) * p.rows_per_block[j];
  const int r1 = min(rows, r0 + p.rows_per_block[j]);
  if (!routed) prefetch_rows(a.shared_gate, r0, r1), prefetch_rows(a.shared_up, r0, r1);
  VecSmem vs;
  vec_smem_floats(a.hidden, &vs, reinterpret_cast<float*>(smem4));
  PrologueArgs norm;
  norm.kind = Prologue::Norm;
  norm.src = a.x;
  norm.w = a.norm_w;
  norm.eps = a.eps;
  load_x_chunks<CH>(norm, a.hidden, vs, BITS == 4 || bits == 4);
  pdl_sync();  // the routed experts' ids are the router's output
  DevMat m[2];
  if (routed) {
    const uint8_t* base = expert_block(a, k, p.b.slot[j]);
    m[0] = part_at(base, a.gate);
    m[1] = part_at(base, a.up);
  } else {
    m[0] = a.shared_gate;
    m[1] = a.shared_up;
  }
  float* act = a.act + int64_t(k + 1) * a.act_stride;
  rows_dot<2, BITS>(m, r0, r1, vs, [] {}, [&](int r, float g, float u) { act[r] = silu(g) * u; });
  trace::end(trace::kGateUp);
}

// y[1 + k] = down act[1 + k] for the block's entry and rows. The ids were written two launches
// back (the router), so the weight loads start before gate/up has finished.
template <int CH, int BITS>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) expert_down_kernel(const __grid_constant__ ExpertParams p) {
  extern __shared__ float4 smem4[];
  trace::begin();
  const ExpertArgs& a = p.a;
  const int j = entry_of_block(p), k = p.b.k[j];
  const DevMat m = k < 0 ? a.shared_down : part_at(expert_block(a, k, p.b.slot[j]), a.down);
  const int r0 = (int(blockIdx.x) - p.first_block[j]) * p.rows_per_block[j];
  const int r1 = min(m.rows, r0 + p.rows_per_block[j]);
  prefetch_rows(m, r0, r1);
  VecSmem vs;
  vec_smem_floats(m.cols, &vs, reinterpret_cast<float*>(smem4));
  PrologueArgs copy;
  copy.src = a.act + int64_t(k + 1) * a.act_stride;
  float* y = a.y + int64_t(k + 1) * a.hidden;
  rows_dot<1, BITS>(
      &m, r0, r1, vs,
      [&] {
        pdl_sync();  // act is gate/up's output
        load_x_chunks<CH>(copy, m.cols, vs, BITS == 4 || m.bits == 4);
      },
      [&](int r, float v) { y[r] = v; });
  // the last of the layer's entries to finish this row range adds the MoE output to its rows (each
  // block's y writes are fenced before it counts)
  const int range = int(blockIdx.x) - p.first_block[j];
  __shared__ int last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(a.row_counters + range, 1) == a.k;
  __syncthreads();
  if (last) {
    for (int r = r0 + int(threadIdx.x); r < r1; r += int(blockDim.x))
      a.x[r] = __ldcg(a.x + r) + moe_output(__ldcg(a.shared_logit), a.y, a.weights, a.y + a.hidden, a.k, a.hidden, r);
    if (threadIdx.x == 0) a.row_counters[range] = 0;
  }
  trace::end(trace::kDown);
}

__global__ void q4_pairs_kernel(const uint16_t* scales, const uint16_t* biases, int rows, int groups,
                                uint32_t* pairs) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // row-major: r * groups + g
  if (i >= int64_t(rows) * groups) return;
  pairs[i % groups * rows + i / groups] = uint32_t(scales[i]) | uint32_t(biases[i]) << 16;
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

size_t matvec_smem_bytes(int cols) { return vec_smem_floats(cols) * sizeof(float); }

// The kernels that build an x, instantiated for `ch` chunks per thread (x_chunks) and, when every
// matrix of the launch is q4, holding that path alone.
struct VecKernels {
  void (*matvec)(MatvecParams);
  void (*gate_up)(ExpertParams);
  void (*down)(ExpertParams);
};
template <int CH, int BITS>
constexpr VecKernels kVecKernels = {matvec_kernel<CH, BITS>, expert_gate_up_kernel<CH, BITS>,
                                    expert_down_kernel<CH, BITS>};
template <int BITS>
VecKernels vec_kernels(int ch) {
  return ch == 1 ? kVecKernels<1, BITS> : ch == 2 ? kVecKernels<2, BITS> : kVecKernels<kMaxChunks, BITS>;
}
VecKernels vec_kernels(int ch, bool q4) { return q4 ? vec_kernels<4>(ch) : vec_kernels<0>(ch); }

void set_smem_limits(size_t bytes) {
  const int b = int(bytes);
  for (int ch : {1, 2, kMaxChunks})
    for (bool q4 : {false, true}) {
      const VecKernels k = vec_kernels(ch, q4);
      FM_CUDA(cudaFuncSetAttribute(k.matvec, cudaFuncAttributeMaxDynamicSharedMemorySize, b));
      FM_CUDA(cudaFuncSetAttribute(k.gate_up, cudaFuncAttributeMaxDynamicSharedMemorySize, b));
      FM_CUDA(cudaFuncSetAttribute(k.down, cudaFuncAttributeMaxDynamicSharedMemorySize, b));
    }
}

size_t q4_pairs_bytes(int rows, int cols) { return size_t(rows) * size_t(cols / 64) * 4; }

void q4_group_major(cudaStream_t s, uint8_t* scales, const uint8_t* biases, int rows, int cols, uint8_t* tmp) {
  const size_t n = size_t(rows) * size_t(cols / 64);
  FM_CUDA(cudaMemcpyAsync(tmp, scales, 2 * n, cudaMemcpyDeviceToDevice, s));
  FM_CUDA(cudaMemcpyAsync(tmp + 2 * n, biases, 2 * n, cudaMemcpyDeviceToDevice, s));
  const uint16_t* t16 = reinterpret_cast<const uint16_t*>(tmp);
  q4_pairs_kernel<<<unsigned((n + 255) / 256), 256, 0, s>>>(t16, t16 + n, rows, cols / 64,
                                                              reinterpret_cast<uint32_t*>(scales));
  FM_CUDA(cudaGetLastError());
}

void matvec(cudaStream_t s, const PrologueArgs& pro, int cols, const MatvecJob* jobs, int njobs, int sms,
            const TopkTail* tail) {
  if (njobs < 1 || njobs > kMaxJobs) throw std::logic_error("matvec: 1..kMaxJobs jobs per launch");
  if (cols > kMaxCols) throw std::invalid_argument("CUDA matvec inputs are at most kMaxCols (8192) wide");
  if (pro.kind == Prologue::GatedNorm &&
      (pro.head_dim < 8 || pro.head_dim % 8 || pro.head_dim > 128 || cols % pro.head_dim))
    throw std::invalid_argument("gated norm: head_dim a multiple of 8 up to 128, cols a multiple of it");
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
  const int blocks = plan_launch(shapes, njobs, 1, sms, p.rows_per_block, p.first_block);
  uint64_t bytes = 0;
  for (int j = 0; j < njobs; ++j) bytes += uint64_t(shapes[j].rows) * shapes[j].cols * shapes[j].bits / 8;
  p.own_rows = bytes <= kOwnRowsMaxBytes;
  if (tail) {
    if (tail->k < 1 || tail->k >= kMaxExperts || tail->num_experts > 32 * kTopkPerLane || tail->k > tail->num_experts)
      throw std::invalid_argument("CUDA router: 1..32 experts per token out of at most 1024");
    p.tail = *tail;
  }
  bool q4 = true;
  for (int j = 0; j < njobs; ++j) q4 = q4 && jobs[j].m.bits == 4;
  launch(vec_kernels(x_chunks(cols), q4).matvec, blocks, kThreads, matvec_smem_bytes(cols), s, p);
}

namespace trace {
#ifdef FM_CUDA_TRACE
bool enabled() { return true; }
void arm(Record* records, uint32_t capacity) {
  const uint32_t zero = 0;
  FM_CUDA(cudaMemcpyToSymbol(g_count, &zero, sizeof(zero)));
  FM_CUDA(cudaMemcpyToSymbol(g_capacity, &capacity, sizeof(capacity)));
  FM_CUDA(cudaMemcpyToSymbol(g_records, &records, sizeof(records)));
}
uint32_t count() {
  uint32_t n = 0;
  FM_CUDA(cudaMemcpyFromSymbol(&n, g_count, sizeof(n)));
  return n;
}
#else
bool enabled() { return false; }
void arm(Record*, uint32_t) { throw std::logic_error("this build records no CUDA trace (FLASHMOE_CUDA_TRACE=OFF)"); }
uint32_t count() { return 0; }
#endif
}  // namespace trace

void embed(cudaStream_t s, const DevMat& table, const StepParams* step, float* x) {
  launch(embed_kernel, (table.cols + 255) / 256, 256, 0, s, table, step, x);
}

void attention(cudaStream_t s, const AttnArgs& a) {
  if (a.hd % 32 || a.hd > kMaxHeadDim || a.rotary_dim > a.hd || a.rotary_dim % 2)
    throw std::invalid_argument("CUDA attention needs head_dim a multiple of 32, at most 512");
  launch(qk_prep_kernel, a.nh + a.nkv, a.hd, 0, s, a);
  launch(attn_partial_kernel, dim3(a.nh, kAttnSplits), kAttnWarps * 32, 0, s, a);
  launch(attn_combine_kernel, a.nh, kAttnCombineThreads, 0, s, a);
}

void deltanet(cudaStream_t s, const DeltaArgs& a) {
  if (a.dk > kMaxDeltaKeyDim) throw std::invalid_argument("CUDA DeltaNet supports key head dims up to 128");
  if (a.dv > 128)  // out_proj's gated norm reads at most 4 sums of 32 columns per head
    throw std::invalid_argument("CUDA DeltaNet supports value head dims up to 128");
  if (a.kernel < 1 || a.kernel > kMaxConvKernel)
    throw std::invalid_argument("CUDA DeltaNet supports conv kernels of 1.." + std::to_string(kMaxConvKernel) + " taps");
  const size_t smem = (2 * size_t(a.dk) + 32 + 2 * kDeltaWarps * 32 + 2 * kDeltaWarps) * sizeof(float);
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
    return plan_launch(shapes, batch.n, n, sms, p.rows_per_block, p.first_block);
  };
  // gate/up: rows of the intermediate size; input h
  int blocks = plan(a.shared_up, routed_up, 2);
  const bool q4 = a.gate.bits == 4 && a.up.bits == 4 && a.down.bits == 4 && a.shared_gate.bits == 4 &&
                  a.shared_up.bits == 4 && a.shared_down.bits == 4;
  launch(vec_kernels(x_chunks(a.hidden), q4).gate_up, blocks, kThreads, matvec_smem_bytes(a.hidden), s, p);
  // down: rows of hidden, input act. Every entry of every batch takes the same row ranges (the
  // combine counts entries per range): those of a launch of all k + 1 entries, planned for the
  // wider of the two shapes (whose partial sums bound the rows per block).
  const DevMat& wider = a.shared_down.cols > routed_down.cols ? a.shared_down : routed_down;
  DevMat shapes[kMaxExperts];
  int rows[kMaxExperts], first[kMaxExperts + 1];
  for (int j = 0; j <= a.k; ++j) shapes[j] = wider;
  plan_launch(shapes, a.k + 1, 1, sms, rows, first);
  const int ranges = (wider.rows + rows[0] - 1) / rows[0];
  for (int j = 0; j < batch.n; ++j) p.rows_per_block[j] = rows[0];
  for (int j = 0; j <= batch.n; ++j) p.first_block[j] = j * ranges;
  blocks = batch.n * ranges;
  const int widest = std::max(a.shared_down.cols, routed_down.cols);
  launch(vec_kernels(x_chunks(widest), q4).down, blocks, kThreads, matvec_smem_bytes(widest), s, p);
}

}  // namespace fm::cuda
