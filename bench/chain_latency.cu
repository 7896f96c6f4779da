// What one dependency costs on this GPU when there is no work in it. A token of resident decode
// is a chain of about 300 dependent launches (csrc/cuda/engine.cu); this measures the floor of
// such a chain with the decode path's grid (two blocks of 256 threads per SM):
//   - N launches in a CUDA graph, each block reading what another block wrote one launch back,
//     with and without programmatic dependent launch (PDL), where blocks of the next launch may
//     (light) or may not (full: the two blocks fill the SM's shared memory, as the decode kernels
//     fill its register file) start beside the current ones;
//   - N grid barriers inside one persistent kernel (red.release arrival, ld.acquire polling).
//   nvcc -O3 -std=c++17 -arch=sm_90 bench/chain_latency.cu -o /tmp/chain_latency && /tmp/chain_latency
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda_check.cuh"

constexpr int kThreads = 256;
constexpr int kSteps = 300;   // dependencies per timed chain, about one token's
constexpr int kRepeats = 21;  // timed chains; the median is reported

__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Block b of step s reads buf[s % 2][b + 1] (another block's, one step back) and writes
// buf[(s + 1) % 2][b]: every step depends on the whole previous one.
__device__ __forceinline__ void hop(int* buf, int step) {
  if (threadIdx.x == 0) {
    const int n = int(gridDim.x), b = int(blockIdx.x);
    const int v = __ldcg(buf + (step & 1) * n + (b + 1) % n);
    buf[((step + 1) & 1) * n + b] = v + 1;
  }
}

__global__ void __launch_bounds__(kThreads, 2) step_kernel(int* buf, int step) {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
  hop(buf, step);
}

__global__ void __launch_bounds__(kThreads, 2) barrier_kernel(int* buf, unsigned* count, int steps) {
  for (int s = 0; s < steps; ++s) {
    hop(buf, s);
    __syncthreads();
    if (threadIdx.x == 0) {
      asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(count) : "memory");
      const unsigned target = unsigned(s + 1) * gridDim.x;
      while (int(ld_acquire(count) - target) < 0) {
      }
    }
    __syncthreads();
  }
}

// Median microseconds per step of `run` (which queues one chain of kSteps on the stream).
template <class Run>
double us_per_step(cudaStream_t s, Run&& run) {
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  run();  // warm-up
  std::vector<float> ms;
  for (int r = 0; r < kRepeats; ++r) {
    CHECK(cudaEventRecord(a, s));
    run();
    CHECK(cudaEventRecord(b, s));
    CHECK(cudaEventSynchronize(b));
    float t = 0;
    CHECK(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  CHECK(cudaEventDestroy(a));
  CHECK(cudaEventDestroy(b));
  std::nth_element(ms.begin(), ms.begin() + kRepeats / 2, ms.end());
  return 1e3 * ms[kRepeats / 2] / kSteps;
}

int main() {
  cudaDeviceProp p{};
  CHECK(cudaGetDeviceProperties(&p, 0));
  const int blocks = 2 * p.multiProcessorCount;
  // shared memory that leaves room for exactly two blocks per SM
  const int full_smem = int(p.sharedMemPerMultiprocessor / 2 - p.reservedSharedMemPerBlock);
  CHECK(cudaFuncSetAttribute(step_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, full_smem));
  int per_sm = 0;
  CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, step_kernel, kThreads, full_smem));
  std::printf("%s, %d SMs, %d blocks of %d threads; full: %d B of shared memory per block, %d blocks per SM\n",
              p.name, p.multiProcessorCount, blocks, kThreads, full_smem, per_sm);

  int* buf = nullptr;
  unsigned* count = nullptr;
  CHECK(cudaMalloc(&buf, 2 * blocks * sizeof(int)));
  CHECK(cudaMalloc(&count, sizeof(unsigned)));
  CHECK(cudaMemset(buf, 0, 2 * blocks * sizeof(int)));
  cudaStream_t s;
  CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));

  for (const bool pdl : {true, false})
    for (const bool full : {false, true}) {
      cudaLaunchAttribute attr;
      attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attr.val.programmaticStreamSerializationAllowed = 1;
      cudaLaunchConfig_t cfg = {};
      cfg.gridDim = dim3(unsigned(blocks));
      cfg.blockDim = dim3(kThreads);
      cfg.dynamicSmemBytes = full ? size_t(full_smem) : 0;
      cfg.stream = s;
      cfg.attrs = &attr;
      cfg.numAttrs = pdl ? 1 : 0;
      cudaGraph_t graph;
      cudaGraphExec_t exec;
      CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
      for (int i = 0; i < kSteps; ++i) CHECK(cudaLaunchKernelEx(&cfg, step_kernel, buf, i));
      CHECK(cudaStreamEndCapture(s, &graph));
      CHECK(cudaGraphInstantiate(&exec, graph, 0));
      const double us = us_per_step(s, [&] { CHECK(cudaGraphLaunch(exec, s)); });
      std::printf("graph of %d dependent launches, %s, %s: %.2f us per launch\n", kSteps, pdl ? "PDL" : "no PDL",
                  full ? "full SMs" : "light", us);
      CHECK(cudaGraphExecDestroy(exec));
      CHECK(cudaGraphDestroy(graph));
    }

  int steps = kSteps;
  void* args[] = {&buf, &count, &steps};
  const double us = us_per_step(s, [&] {
    CHECK(cudaMemsetAsync(count, 0, sizeof(unsigned), s));
    CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(barrier_kernel), dim3(unsigned(blocks)), dim3(kThreads),
                                      args, 0, s));
  });
  std::printf("persistent kernel, %d grid barriers: %.2f us per barrier\n", kSteps, us);
  CHECK(cudaGetLastError());
  return 0;
}
