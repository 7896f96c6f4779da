// Helpers of the standalone CUDA benchmarks: CHECK(call), their error check (print the call and
// the error, exit 1), and now(), the device's %globaltimer (ns; 32 ns steps on an H200).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

__device__ __forceinline__ uint64_t now() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

#define CHECK(call)                                                            \
  do {                                                                         \
    const cudaError_t err = (call);                                            \
    if (err != cudaSuccess) {                                                  \
      std::fprintf(stderr, "%s failed: %s\n", #call, cudaGetErrorString(err)); \
      std::exit(1);                                                            \
    }                                                                          \
  } while (0)
