// Whether a q4 row loop is bound by the loads it keeps in flight or by its arithmetic. Streams an
// lm_head-shaped q4 matrix (248320 x 2048, 254 MB) with the matvec access pattern (264 blocks of 8
// warps, each warp 4 rows x one 16-byte chunk per lane per group, D groups in flight) three ways:
// loads only, loads with an fp32 dequantise-and-FMA loop (the CUDA backend's q4 loop before the
// tensor-core path), and the loads alone on a 16 MB matrix that stays in L2. A device copy in the
// same run is the ceiling. H200: bench/results/stream_pattern_h200.txt, docs/cuda.md.
//   nvcc -O3 -std=c++17 -arch=sm_90 -Icsrc bench/stream_pattern.cu -o /tmp/stream_pattern && /tmp/stream_pattern
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda/device_util.cuh"
#include "cuda_check.cuh"

using fm::cuda::load_stream;
using fm::cuda::qf;

constexpr int kThreads = 256, kWarps = kThreads / 32;
constexpr int kCols = 2048, kChunks = kCols / 32;  // 16-byte chunks of 32 q4 weights per row
constexpr int kRt = 4;                              // rows per group, one chunk of each per lane

// Group k of a warp: rows row0 + 4 (k / halves) .. + 3, chunk lane + 32 (k % halves).
struct Group {
  uint4 w[kRt];
};

// MATH: the fp32 dot of each word with x (in registers), as the matvec kernels do; otherwise the
// words are only folded together so that the loads must complete.
template <int D, bool MATH>
__global__ void __launch_bounds__(kThreads, 2) stream_kernel(const uint4* m, int rows, int rows_per_block, float* out) {
  const int warp = int(threadIdx.x) >> 5, lane = int(threadIdx.x) & 31;
  const int r0 = int(blockIdx.x) * rows_per_block, r1 = min(rows, r0 + rows_per_block);
  constexpr int halves = kChunks / 32;
  const int tiles = (r1 - r0 + kRt - 1) / kRt;
  const int n = ((tiles - warp + kWarps - 1) / kWarps) * halves;  // this warp's groups
  float x[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) x[i] = 1.0f + 0.01f * float(i + lane);
  auto issue = [&](Group& g, int k) {
    const int tile = warp + kWarps * (k / halves), c = lane + 32 * (k % halves);
#pragma unroll
    for (int r = 0; r < kRt; ++r) {
      const int row = r0 + kRt * tile + r;
      g.w[r] = row < r1 ? load_stream(m + size_t(row) * kChunks + c) : make_uint4(0, 0, 0, 0);
    }
  };
  float acc = 0.0f;
  uint32_t fold = 0;
  auto consume = [&](const Group& g) {
#pragma unroll
    for (int r = 0; r < kRt; ++r) {
      const uint32_t v[4] = {g.w[r].x, g.w[r].y, g.w[r].z, g.w[r].w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if constexpr (MATH) {
          float a = 0.0f, b = 0.0f;
#pragma unroll
          for (int e = 0; e < 8; e += 2) {
            a = fmaf(qf((v[i] >> (4 * e)) & 15u), x[e], a);
            b = fmaf(qf((v[i] >> (4 * e + 4)) & 15u), x[e + 1], b);
          }
          acc += a + b;
        } else {
          fold ^= v[i];
        }
      }
    }
  };
  Group ring[D];
#pragma unroll
  for (int j = 0; j < D - 1; ++j)
    if (j < n) issue(ring[j], j);
  for (int k0 = 0; k0 < n; k0 += D) {
#pragma unroll
    for (int j = 0; j < D; ++j) {
      const int k = k0 + j;
      if (k >= n) break;
      if (k + D - 1 < n) issue(ring[(j + D - 1) % D], k + D - 1);
      consume(ring[j]);
    }
  }
  if (lane == 0) out[blockIdx.x * kWarps + warp] = acc + float(fold & 1u);
}

template <int D, bool MATH>
double gbps(const uint4* m, int rows, int blocks, float* out, cudaStream_t s) {
  const int per_block = (rows + blocks - 1) / blocks;
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  std::vector<float> ms;
  for (int r = 0; r < 11; ++r) {
    CHECK(cudaEventRecord(a, s));
    stream_kernel<D, MATH><<<blocks, kThreads, 0, s>>>(m, rows, per_block, out);
    CHECK(cudaEventRecord(b, s));
    CHECK(cudaEventSynchronize(b));
    float t = 0;
    CHECK(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  CHECK(cudaGetLastError());
  std::nth_element(ms.begin(), ms.begin() + 5, ms.end());
  return double(rows) * kCols / 2 / (ms[5] * 1e-3) / 1e9;
}

template <int D>
void row(const uint4* big, int big_rows, const uint4* small, int small_rows, int blocks, float* out, cudaStream_t s) {
  std::printf("%d groups in flight per warp (%d KB per SM): loads %.0f GB/s, loads + fp32 math %.0f GB/s, "
              "loads from L2 %.0f GB/s\n",
              D, 2 * kWarps * D * 32 * kRt * 16 / 1024, gbps<D, false>(big, big_rows, blocks, out, s),
              gbps<D, true>(big, big_rows, blocks, out, s), gbps<D, false>(small, small_rows, blocks, out, s));
}

int main() {
  cudaDeviceProp p{};
  CHECK(cudaGetDeviceProperties(&p, 0));
  const int blocks = 2 * p.multiProcessorCount;
  const int big_rows = 248320, small_rows = 16384;  // 254 MB; 16 MB stays in L2
  const size_t big_bytes = size_t(big_rows) * kCols / 2;
  uint4* big = nullptr;
  float* out = nullptr;
  void* copy = nullptr;
  CHECK(cudaMalloc(&big, big_bytes));
  CHECK(cudaMalloc(&copy, big_bytes));
  CHECK(cudaMalloc(&out, size_t(blocks) * kWarps * sizeof(float)));
  CHECK(cudaMemset(big, 0x5A, big_bytes));
  cudaStream_t s;
  CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  CHECK(cudaMemcpyAsync(copy, big, big_bytes, cudaMemcpyDeviceToDevice, s));
  CHECK(cudaEventRecord(a, s));
  CHECK(cudaMemcpyAsync(copy, big, big_bytes, cudaMemcpyDeviceToDevice, s));
  CHECK(cudaEventRecord(b, s));
  CHECK(cudaEventSynchronize(b));
  float t = 0;
  CHECK(cudaEventElapsedTime(&t, a, b));
  std::printf("%s: device copy %.0f GB/s (read + write); %d blocks of %d threads\n", p.name,
              2.0 * double(big_bytes) / (t * 1e-3) / 1e9, blocks, kThreads);
  // 4 groups hold 64 registers of loads: the most that fits beside the rest at 128 per thread
  row<1>(big, big_rows, big, small_rows, blocks, out, s);
  row<2>(big, big_rows, big, small_rows, blocks, out, s);
  row<3>(big, big_rows, big, small_rows, blocks, out, s);
  row<4>(big, big_rows, big, small_rows, blocks, out, s);
  return 0;
}
