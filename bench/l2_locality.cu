// Whether it matters which SM pulled a weight slice into L2 (it does not: docs/cuda.md,
// bench/results/l2_locality_h200.txt). The decode launches read weights that were prefetched into
// L2 (by an earlier launch's blocks when this was written; now by the reading block itself), and a
// block of the reading launch may sit on any SM. An H100/H200 L2 is two partitions, each caching for the
// SMs wired to it, so a slice pulled in from one SM may be a far hit for another. Here every block
// of the decode path's grid (two blocks of 256 threads per SM) first reads slice b of a 16 MB
// q4-shaped matrix (placing it in L2 from its SM), then, in the next launch, block b reads slice
// (b + shift) twice with the matvec access pattern (16-byte streaming loads, one 16-byte chunk per
// lane), timing each pass on thread 0's %globaltimer:
//   - first pass: the slice was pulled into L2 by block b + shift, on another SM when shift > 0;
//   - second pass: this block's own SM has just read it.
// Per-block GB/s (median over blocks, median over launches) of each pass, for several shifts.
//   nvcc -O3 -std=c++17 -arch=sm_90 -Icsrc bench/l2_locality.cu -o /tmp/l2_locality && /tmp/l2_locality
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "cuda/device_util.cuh"
#include "cuda_check.cuh"

using fm::cuda::load_stream;

constexpr int kThreads = 256, kWarps = kThreads / 32;
constexpr int kRowBytes = 1024;  // a 2048-column q4 row
constexpr int kRepeats = 21;

// Warp w reads rows w, w + 8, ... of the block's slice, 4 loads of 16 bytes per lane in flight.
__device__ __forceinline__ uint32_t read_slice(const uint4* m, int r0, int r1) {
  const int warp = int(threadIdx.x) >> 5, lane = int(threadIdx.x) & 31;
  constexpr int chunks = kRowBytes / 16;
  uint32_t acc = 0;
  for (int r = r0 + warp; r < r1; r += kWarps) {
    uint4 w[chunks / 32];
#pragma unroll
    for (int u = 0; u < chunks / 32; ++u) w[u] = load_stream(m + size_t(r) * chunks + lane + 32 * u);
#pragma unroll
    for (int u = 0; u < chunks / 32; ++u) acc ^= w[u].x ^ w[u].y ^ w[u].z ^ w[u].w;
  }
  return acc;
}

__global__ void __launch_bounds__(kThreads, 2) two_pass_kernel(const uint4* m, int rows_per_block, int shift,
                                                              uint32_t* sink, uint64_t* ns) {
  const int r0 = int((blockIdx.x + shift) % gridDim.x) * rows_per_block, r1 = r0 + rows_per_block;
  __syncthreads();
  const uint64_t t0 = now();
  uint32_t acc = read_slice(m, r0, r1);
  __syncthreads();
  const uint64_t t1 = now();
  acc ^= read_slice(m, r0, r1);
  __syncthreads();
  const uint64_t t2 = now();
  if (threadIdx.x == 0) ns[2 * blockIdx.x] = t1 - t0, ns[2 * blockIdx.x + 1] = t2 - t1;
  if (acc == 0x12345678u) sink[0] = acc;
}

int main() {
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const int blocks = 2 * prop.multiProcessorCount;
  const int rows_per_block = 16 * 1024 * 1024 / kRowBytes / blocks;
  const size_t bytes = size_t(blocks) * rows_per_block * kRowBytes;
  uint4* m;
  uint32_t* sink;
  uint64_t* ns;
  CHECK(cudaMalloc(&m, bytes));
  CHECK(cudaMalloc(&sink, sizeof(uint32_t)));
  CHECK(cudaMalloc(&ns, 2 * blocks * sizeof(uint64_t)));
  CHECK(cudaMemset(m, 1, bytes));
  // the ceiling: a device copy of 1 GB
  const size_t copy_bytes = size_t(1) << 30;
  void *a, *b;
  CHECK(cudaMalloc(&a, copy_bytes));
  CHECK(cudaMalloc(&b, copy_bytes));
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  CHECK(cudaMemcpy(b, a, copy_bytes, cudaMemcpyDeviceToDevice));
  CHECK(cudaEventRecord(e0));
  for (int i = 0; i < 5; ++i) CHECK(cudaMemcpy(b, a, copy_bytes, cudaMemcpyDeviceToDevice));
  CHECK(cudaEventRecord(e1));
  CHECK(cudaEventSynchronize(e1));
  float ms = 0;
  CHECK(cudaEventElapsedTime(&ms, e0, e1));
  std::printf("%s, %d SMs: device copy %.0f GB/s (read + write); %d blocks of %d threads, %.1f MB, %d KB per block\n",
              prop.name, prop.multiProcessorCount, 2.0 * 5 * copy_bytes / (ms * 1e-3) / 1e9, blocks, kThreads,
              bytes / 1e6, rows_per_block * kRowBytes / 1024);
  std::vector<uint64_t> h(static_cast<size_t>(2 * blocks));
  const double slice = double(rows_per_block) * kRowBytes;
  for (int shift : {0, 1, 2, 33, 66, 132, 199}) {
    std::vector<double> first, second;
    for (int r = 0; r < kRepeats; ++r) {
      two_pass_kernel<<<blocks, kThreads>>>(m, rows_per_block, 0, sink, ns);  // block b places slice b
      two_pass_kernel<<<blocks, kThreads>>>(m, rows_per_block, shift, sink, ns);
      CHECK(cudaGetLastError());
      CHECK(cudaMemcpy(h.data(), ns, h.size() * sizeof(uint64_t), cudaMemcpyDeviceToHost));
      std::vector<double> p1, p2;
      for (int i = 0; i < blocks; ++i) p1.push_back(double(h[2 * i])), p2.push_back(double(h[2 * i + 1]));
      std::sort(p1.begin(), p1.end());
      std::sort(p2.begin(), p2.end());
      first.push_back(p1[p1.size() / 2]);
      second.push_back(p2[p2.size() / 2]);
    }
    std::sort(first.begin(), first.end());
    std::sort(second.begin(), second.end());
    const double t1 = first[first.size() / 2], t2 = second[second.size() / 2];
    std::printf("shift %3d: first pass %5.0f ns per block (%5.0f GB/s over the grid), second pass %5.0f ns (%5.0f GB/s)\n",
                shift, t1, slice / t1 * blocks, t2, slice / t2 * blocks);
  }
  CHECK(cudaFree(m));
  CHECK(cudaFree(sink));
  CHECK(cudaFree(ns));
  CHECK(cudaFree(a));
  CHECK(cudaFree(b));
  return 0;
}
