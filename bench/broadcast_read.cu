// What a matvec prologue's input read costs when every block of a launch reads the same vector.
// Each decode launch (csrc/cuda/kernels.cu, load_x_chunks) has all of its 128-264 blocks read one
// activation vector of 8-16 KB from L2 at the same moment, so each of the vector's lines is
// asked for by every block. This times that read (thread 0's %globaltimer from before its loads
// to after the block's barrier that follows them, median and slowest block) with the decode
// path's grid (two blocks of 256 threads per SM, each thread 8 floats), the blocks spread over
// R copies of the vector (block b reads copy b % R): R = 1 is the decode kernels' case, R =
// blocks is no sharing at all. The vector is written by the kernel before (in L2, not in L1).
//   nvcc -O3 -std=c++17 -arch=sm_90 bench/broadcast_read.cu -o /tmp/broadcast_read && /tmp/broadcast_read
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "cuda_check.cuh"

constexpr int kThreads = 256;
constexpr int kRepeats = 31;  // timed launches per case; medians are reported

__global__ void write_kernel(float* v, size_t n, float value) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    v[i] = value + float(i % 7);
}

// cols floats per copy; each thread reads 8 of them (cols <= 8 * kThreads * 2).
__global__ void __launch_bounds__(kThreads, 2) read_kernel(const float* v, int cols, int copies, float* sink,
                                                          uint64_t* ns) {
  const uint64_t t0 = now();
  const float4* src = reinterpret_cast<const float4*>(v + size_t(blockIdx.x % copies) * cols);
  float s = 0.0f;
  for (int c = int(threadIdx.x); c < cols / 8; c += kThreads) {
    const float4 a = src[2 * c], b = src[2 * c + 1];
    s += a.x + a.y + a.z + a.w + b.x + b.y + b.z + b.w;
  }
  __shared__ float red[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    ns[blockIdx.x] = now() - t0;
    float t = 0.0f;
    for (int w = 0; w < kThreads / 32; ++w) t += red[w];
    sink[blockIdx.x] = t;
  }
}

int main() {
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const int blocks = 2 * prop.multiProcessorCount;
  std::printf("%s, %d SMs, %d blocks of %d threads, times from before a block's loads to after its barrier\n",
              prop.name, prop.multiProcessorCount, blocks, kThreads);
  const int max_cols = 4096;
  float *v, *sink;
  uint64_t* ns;
  CHECK(cudaMalloc(&v, size_t(blocks) * max_cols * sizeof(float)));
  CHECK(cudaMalloc(&sink, blocks * sizeof(float)));
  CHECK(cudaMalloc(&ns, blocks * sizeof(uint64_t)));
  std::vector<uint64_t> h(static_cast<size_t>(blocks));
  for (int cols : {2048, 4096}) {
    for (int copies : {1, 2, 4, 8, 16, 64, blocks}) {
      std::vector<double> med, worst;
      for (int r = 0; r < kRepeats; ++r) {
        write_kernel<<<264, 256>>>(v, size_t(copies) * cols, float(r));
        read_kernel<<<blocks, kThreads>>>(v, cols, copies, sink, ns);
        CHECK(cudaGetLastError());
        CHECK(cudaMemcpy(h.data(), ns, blocks * sizeof(uint64_t), cudaMemcpyDeviceToHost));
        std::sort(h.begin(), h.end());
        med.push_back(double(h[h.size() / 2]));
        worst.push_back(double(h.back()));
      }
      std::sort(med.begin(), med.end());
      std::sort(worst.begin(), worst.end());
      std::printf("%5d floats, %3d copies: block median %6.0f ns, slowest block %6.0f ns\n", cols, copies,
                  med[med.size() / 2], worst[worst.size() / 2]);
    }
  }
  CHECK(cudaFree(v));
  CHECK(cudaFree(sink));
  CHECK(cudaFree(ns));
  return 0;
}
