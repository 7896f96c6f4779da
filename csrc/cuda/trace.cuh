// In-graph timeline of one decode token, for developer builds (cmake -DFLASHMOE_CUDA_TRACE=ON):
// thread 0 of every block of the per-token kernels records %globaltimer (ns, 32 ns steps on an
// H200) at its start, at its marks and at its end. Without the option every call below compiles
// to nothing. The engine arms it for one token (FLASHMOE_CUDA_TRACE=<file>, engine.cu) and
// bench/trace_summary.py reads the file.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace fm::cuda::trace {

enum Mark { kStart, kWaited, kLoaded, kNormed, kReady, kEnd, kMarks };
enum Kernel { kMatvec, kGateUp, kDown, kDeltaNet, kEmbed, kQkPrep, kAttnPartial, kAttnCombine };

// One block of one launch; launches follow in the order of their start times.
struct Record {
  uint64_t t[kMarks];  // 0 where the block did not pass a mark
  uint32_t kernel, blocks, block, sm;
};

#ifdef FM_CUDA_TRACE
// One copy per translation unit: only kernels.cu's is armed.
static __device__ Record* g_records = nullptr;
static __device__ uint32_t g_count = 0, g_capacity = 0;

__device__ __forceinline__ uint64_t now() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ uint64_t* block_marks() {
  __shared__ uint64_t t[kMarks];
  return t;
}
__device__ __forceinline__ void begin() {
  if (!g_records || threadIdx.x != 0) return;
  uint64_t* t = block_marks();
  for (int i = 0; i < kMarks; ++i) t[i] = 0;
  t[kStart] = now();
}
__device__ __forceinline__ void mark(Mark m) {
  if (g_records && threadIdx.x == 0) block_marks()[m] = now();
}
__device__ __forceinline__ void end(Kernel k) {
  if (!g_records || threadIdx.x != 0) return;
  uint64_t* t = block_marks();
  t[kEnd] = now();
  const uint32_t i = atomicAdd(&g_count, 1u);
  if (i >= g_capacity) return;
  Record& r = g_records[i];
  for (int j = 0; j < kMarks; ++j) r.t[j] = t[j];
  uint32_t sm;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
  r.kernel = k;
  r.blocks = gridDim.x * gridDim.y;
  r.block = blockIdx.x + blockIdx.y * gridDim.x;
  r.sm = sm;
}
#else
__device__ __forceinline__ void begin() {}
__device__ __forceinline__ void mark(Mark) {}
__device__ __forceinline__ void end(Kernel) {}
#endif

// Host: whether this build records; arm(buf, n) starts recording into n records of device memory
// (nullptr stops it); count() is how many blocks recorded since (may exceed n: the rest dropped).
bool enabled();
void arm(Record* records, uint32_t capacity);
uint32_t count();

}  // namespace fm::cuda::trace
