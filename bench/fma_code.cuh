// The standalone benchmarks' instruction-fetch probe: K independent FFMAs in 8 chains (one warp
// per scheduler can issue every cycle), as one unrolled straight line of K instructions (16 bytes
// each) or as a loop over a 128-instruction body (2 KB). cycles (may be null): each warp's SM
// cycles for them. bench/icache_fetch.cu times it; bench/row_loop.cu runs the straight line of
// 16384 (256 KB) to evict a launch's code, and the loop as a control that evicts none.
#pragma once
#include "cuda_check.cuh"

template <int K, bool kLoop>
__global__ void fma_kernel(float b, float c, float* out, long long* cycles) {
  float a[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) a[j] = float(threadIdx.x + j);
  __syncthreads();
  const long long c0 = clock64();
  if constexpr (kLoop) {
#pragma unroll 1
    for (int i = 0; i < K / 128; ++i)
#pragma unroll
      for (int r = 0; r < 16; ++r)
#pragma unroll
        for (int j = 0; j < 8; ++j) a[j] = fmaf(a[j], b, c);
  } else {
#pragma unroll
    for (int r = 0; r < K / 8; ++r)
#pragma unroll
      for (int j = 0; j < 8; ++j) a[j] = fmaf(a[j], b, c);
  }
  const long long c1 = clock64();
  float s = 0.0f;
#pragma unroll
  for (int j = 0; j < 8; ++j) s += a[j];
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;
  if (cycles && (threadIdx.x & 31) == 0) cycles[blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32] = c1 - c0;
}
