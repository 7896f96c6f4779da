// What instruction fetch costs: the same independent FFMAs (8 chains, so that one warp per
// scheduler can issue every cycle) as one unrolled straight line of K instructions (16 bytes each)
// or as a loop over a 128-instruction body; the straight line warm (the launch before ran it) for
// growing K, which finds the instruction cache's size, and after a straight line of 16384 (256
// KB), which evicts it: what a launch whose code is cold pays. The decode kernels run 18-35 KB of
// straight-line code each, once or twice per block (bench/code_footprint.py). Prints the median
// warp's SM cycles per instruction, or per launch.
// H200: bench/results/icache_fetch_h200.txt, docs/cuda.md ("What bounds the resident regime").
//   nvcc -O3 -std=c++17 -arch=sm_90 -Ibench bench/icache_fetch.cu -o /tmp/icache_fetch && /tmp/icache_fetch
#include <algorithm>
#include <vector>

#include "cuda_check.cuh"
#include "fma_code.cuh"

template <int K, bool kLoop>
void run(int sms, int threads) {
  const int blocks = sms, warps = blocks * threads / 32;
  float* out;
  long long* cyc;
  CHECK(cudaMalloc(&out, size_t(blocks) * threads * sizeof(float)));
  CHECK(cudaMalloc(&cyc, size_t(warps) * sizeof(long long)));
  std::vector<long long> h(warps);
  std::vector<double> per;
  for (int rep = 0; rep < 10; ++rep) {
    fma_kernel<K, kLoop><<<blocks, threads>>>(1.0001f, 0.5f, out, cyc);
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    if (rep < 3) continue;
    CHECK(cudaMemcpy(h.data(), cyc, h.size() * sizeof(long long), cudaMemcpyDeviceToHost));
    for (long long v : h) per.push_back(double(v) / K);
  }
  std::sort(per.begin(), per.end());
  std::printf("%5d FFMAs (%3d KB of code) %-8s %d warp/scheduler: %.2f cycles per instruction per warp (median)\n",
              K, kLoop ? 2 : K / 64, kLoop ? "looped" : "straight", threads / 128, per[per.size() / 2]);
  CHECK(cudaFree(out));
  CHECK(cudaFree(cyc));
}

// The straight line of K after itself (its code cached) and after a straight line of 16384
// (256 KB of code, which evicts it): what a launch whose code is cold pays.
template <int K>
void run_cold(int sms, int threads) {
  const int warps = sms * threads / 32;
  float* out;
  long long *cyc, *junk;
  CHECK(cudaMalloc(&out, size_t(sms) * threads * sizeof(float)));
  CHECK(cudaMalloc(&cyc, size_t(warps) * sizeof(long long)));
  CHECK(cudaMalloc(&junk, size_t(warps) * sizeof(long long)));
  std::vector<long long> h(warps);
  std::vector<double> warm, cold;
  for (int rep = 0; rep < 10; ++rep) {
    fma_kernel<K, false><<<sms, threads>>>(1.0001f, 0.5f, out, cyc);
    fma_kernel<K, false><<<sms, threads>>>(1.0001f, 0.5f, out, cyc);
    CHECK(cudaDeviceSynchronize());
    CHECK(cudaMemcpy(h.data(), cyc, h.size() * sizeof(long long), cudaMemcpyDeviceToHost));
    for (long long v : h) warm.push_back(double(v));
    fma_kernel<16384, false><<<sms, threads>>>(1.0001f, 0.5f, out, junk);
    fma_kernel<K, false><<<sms, threads>>>(1.0001f, 0.5f, out, cyc);
    CHECK(cudaDeviceSynchronize());
    CHECK(cudaMemcpy(h.data(), cyc, h.size() * sizeof(long long), cudaMemcpyDeviceToHost));
    for (long long v : h) cold.push_back(double(v));
  }
  std::sort(warm.begin(), warm.end());
  std::sort(cold.begin(), cold.end());
  std::printf("%5d FFMAs straight %d warps/scheduler: warm %.0f cycles, after 256 KB of other code %.0f (medians)\n", K,
              threads / 128, warm[warm.size() / 2], cold[cold.size() / 2]);
  CHECK(cudaFree(out));
  CHECK(cudaFree(cyc));
  CHECK(cudaFree(junk));
}

int main() {
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const int sms = prop.multiProcessorCount;
  std::printf("%s, %d SMs\n", prop.name, sms);
  run<1024, false>(sms, 128);
  run<2048, false>(sms, 128);
  run<3072, false>(sms, 128);
  run<4096, false>(sms, 128);
  run<8192, false>(sms, 128);
  run<8192, true>(sms, 128);
  for (int threads : {128, 256, 512}) {
    run_cold<1024>(sms, threads);
    run_cold<2048>(sms, threads);
  }
  return 0;
}
