// How long a matvec block's q4 row loop takes by itself, once its x is ready: the engine's
// rows_dot (csrc/cuda/kernels.cu) on blocks of in_proj's, out_proj's and the experts' down shape,
// the matrix in L2 (repeated launches over a matrix that fits it), at one and two blocks per SM;
// also a second pass in the same block (its instructions cached) and the block's two halves of
// rows taken together as the two matrices of rows_dot<2>. Prints the median block's time (us, SM
// cycles, and the clock they imply) from x ready to its rows emitted; before that, the latency of
// one mma.sync and the prologue's own time (load_x: RMSNorm and q4 split, run twice).
// H200: bench/results/row_loop_h200.txt, docs/cuda.md ("What bounds the resident regime").
//   nvcc -O3 -std=c++17 -arch=sm_90 -Icsrc -Ibench bench/row_loop.cu -o /tmp/row_loop && /tmp/row_loop
#include "cuda/kernels.cu"
#include "cuda_check.cuh"

#include <algorithm>
#include <vector>

namespace fm::cuda {
namespace {

// kPair: the block's two halves of rows as the two matrices of rows_dot<2> (one x fragment for
// both); kTwice: the rows once untimed, then timed (the second pass finds its instructions cached).
template <bool kPair, bool kTwice>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    loop_kernel(DevMat m, const float* x, int rows_per_block, float* out, long long* t) {
  extern __shared__ float4 smem4[];
  const int r0 = int(blockIdx.x) * rows_per_block, r1 = min(m.rows, r0 + rows_per_block);
  VecSmem vs;
  vec_smem_floats(m.cols, &vs, reinterpret_cast<float*>(smem4));
  PrologueArgs pro;
  pro.src = x;
  long long c0 = 0;
  uint64_t g0 = 0;
  auto ready = [&] {
    load_x(pro, m.cols, vs, true);
    c0 = clock64();
    g0 = ::now();
  };
  if constexpr (kPair) {
    const int half = (r1 - r0) / 2;
    DevMat m2[2] = {m, m};
    m2[1].data = m.data + size_t(half) * (m.cols / 2);
    m2[1].scales = m.scales + 2 * half;  // the pairs' words of row r + half
    rows_dot<2>(m2, r0, r0 + half, vs, ready, [&](int r, float a, float b) { out[r] = a, out[r + half] = b; });
  } else {
    if constexpr (kTwice) {
      rows_dot<1>(&m, r0, r1, vs, [&] { load_x(pro, m.cols, vs, true); }, [&](int r, float v) { out[r] = v; });
      __syncthreads();
    }
    rows_dot<1>(&m, r0, r1, vs, ready, [&](int r, float v) { out[r] = v; });
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    t[2 * blockIdx.x] = clock64() - c0;
    t[2 * blockIdx.x + 1] = static_cast<long long>(::now() - g0);
  }
}

// The prologue alone: load_x with an RMSNorm and the q4 split, twice in a row on two different
// vectors (both in L2), so that the second finds its instructions cached. t: per block, the
// first's and the second's ns.
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    prologue_kernel(const float* x1, const float* x2, const float* w1, const float* w2, int cols, long long* t) {
  extern __shared__ float4 smem4[];
  VecSmem vs;
  vec_smem_floats(cols, &vs, reinterpret_cast<float*>(smem4));
  PrologueArgs p1, p2;
  p1.kind = p2.kind = Prologue::Norm;
  p1.eps = p2.eps = 1e-6f;
  p1.src = x1, p1.w = w1, p2.src = x2, p2.w = w2;
  __syncthreads();
  const uint64_t g0 = ::now();
  load_x(p1, cols, vs, true);
  const uint64_t g1 = ::now();
  load_x(p2, cols, vs, true);
  const uint64_t g2 = ::now();
  if (threadIdx.x == 0) {
    t[2 * blockIdx.x] = static_cast<long long>(g1 - g0);
    t[2 * blockIdx.x + 1] = static_cast<long long>(g2 - g1);
  }
}

void prologue(int cols, int sms) {
  const int blocks = 2 * sms;
  float* buf;
  CHECK(cudaMalloc(&buf, 4 * cols * sizeof(float)));
  std::vector<float> h(4 * cols);
  for (int i = 0; i < 4 * cols; ++i) h[i] = 0.01f * float((i * 37) % 101 - 50);
  CHECK(cudaMemcpy(buf, h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice));
  long long* t;
  CHECK(cudaMalloc(&t, 2 * blocks * sizeof(long long)));
  const size_t smem = matvec_smem_bytes(cols);
  CHECK(cudaFuncSetAttribute(prologue_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  std::vector<long long> ht(2 * blocks);
  std::vector<double> first, second;
  for (int rep = 0; rep < 20; ++rep) {
    prologue_kernel<<<blocks, kThreads, smem>>>(buf, buf + cols, buf + 2 * cols, buf + 3 * cols, cols, t);
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    if (rep < 5) continue;
    CHECK(cudaMemcpy(ht.data(), t, ht.size() * sizeof(long long), cudaMemcpyDeviceToHost));
    for (int b = 0; b < blocks; ++b) first.push_back(ht[2 * b] / 1e3), second.push_back(ht[2 * b + 1] / 1e3);
  }
  std::sort(first.begin(), first.end());
  std::sort(second.begin(), second.end());
  std::printf("prologue (RMSNorm + q4 split) of %d columns, 2/SM: first %.2f us, second %.2f us (medians)\n", cols,
              first[first.size() / 2], second[second.size() / 2]);
  CHECK(cudaFree(buf));
  CHECK(cudaFree(t));
}

// One warp: n rounds of 4 mma.sync m16n8k32 (u8 x s8), each on the previous one's result (kDep)
// or on 4 accumulators of their own.
template <bool kDep>
__global__ void imma_kernel(int n, int* out, long long* cycles) {
  int d[4][4] = {};
  const uint32_t a = threadIdx.x * 0x01010101u, b = threadIdx.x;
  const long long c0 = clock64();
  for (int i = 0; i < n; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) mma_u8s8(d[kDep ? 0 : j], a, a + j, a, a, b, b + i);
  const long long c1 = clock64();
  int s = 0;
  for (int j = 0; j < 4; ++j) s += d[j][0] + d[j][1] + d[j][2] + d[j][3];
  out[threadIdx.x] = s;
  if (threadIdx.x == 0) *cycles = c1 - c0;
}

void imma_latency() {
  int* out;
  long long *c, h[2];
  CHECK(cudaMalloc(&out, 32 * sizeof(int)));
  CHECK(cudaMalloc(&c, 2 * sizeof(long long)));
  const int n = 4096;
  for (int rep = 0; rep < 2; ++rep) {
    imma_kernel<true><<<1, 32>>>(n, out, c);
    imma_kernel<false><<<1, 32>>>(n, out, c + 1);
    CHECK(cudaDeviceSynchronize());
  }
  CHECK(cudaMemcpy(h, c, sizeof(h), cudaMemcpyDeviceToHost));
  std::printf("mma.sync m16n8k32 u8.s8, one warp: %.1f cycles each, dependent; %.1f, 4 independent chains\n",
              double(h[0]) / (4.0 * n), double(h[1]) / (4.0 * n));
  CHECK(cudaFree(out));
  CHECK(cudaFree(c));
}

struct Shape {
  const char* name;
  int cols, rows_per_block;
};

enum class Pass { Single, Second, Paired };

// A matrix of rows_per_block x blocks rows in L2, the blocks all resident at blocks_per_sm per SM.
void run(const Shape& s, Pass pass, int blocks_per_sm, int sms) {
  const int blocks = sms * blocks_per_sm, rows = s.rows_per_block * blocks;
  const size_t data = size_t(rows) * s.cols / 2, pairs = size_t(rows) * (s.cols / 64) * 4;
  uint8_t* w;
  CHECK(cudaMalloc(&w, data + pairs));
  std::vector<uint8_t> host(data + pairs);
  for (size_t i = 0; i < host.size(); ++i) host[i] = uint8_t(i * 2654435761u >> 13);
  uint16_t* hp = reinterpret_cast<uint16_t*>(host.data() + data);  // (scale, bias): small bf16s
  for (size_t i = 0; i < pairs / 2; ++i) hp[i] = uint16_t(0x3c00 + (i % 64));
  CHECK(cudaMemcpy(w, host.data(), host.size(), cudaMemcpyHostToDevice));
  DevMat m;
  m.data = w;
  m.scales = reinterpret_cast<const uint16_t*>(w + data);
  m.rows = rows;
  m.cols = s.cols;
  m.bits = 4;
  float *x, *out;
  CHECK(cudaMalloc(&x, s.cols * sizeof(float)));
  CHECK(cudaMalloc(&out, rows * sizeof(float)));
  std::vector<float> hx(s.cols);
  for (int i = 0; i < s.cols; ++i) hx[i] = 0.01f * float((i * 37) % 101 - 50);
  CHECK(cudaMemcpy(x, hx.data(), s.cols * sizeof(float), cudaMemcpyHostToDevice));
  long long* t;
  CHECK(cudaMalloc(&t, 2 * blocks * sizeof(long long)));
  const size_t smem = matvec_smem_bytes(s.cols);
  auto k = pass == Pass::Paired ? loop_kernel<true, false> : pass == Pass::Second ? loop_kernel<false, true>
                                                                                   : loop_kernel<false, false>;
  CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  std::vector<long long> ht(2 * blocks);
  std::vector<double> us, cyc;
  for (int rep = 0; rep < 20; ++rep) {  // the first launches pull the matrix into L2
    k<<<blocks, kThreads, smem>>>(m, x, s.rows_per_block, out, t);
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    if (rep < 5) continue;
    CHECK(cudaMemcpy(ht.data(), t, ht.size() * sizeof(long long), cudaMemcpyDeviceToHost));
    for (int b = 0; b < blocks; ++b) cyc.push_back(double(ht[2 * b])), us.push_back(ht[2 * b + 1] / 1e3);
  }
  std::sort(us.begin(), us.end());
  std::sort(cyc.begin(), cyc.end());
  const char* name = pass == Pass::Paired ? "paired" : pass == Pass::Second ? "2nd pass" : "single";
  std::printf("%-9s %-8s %d/SM  %3d blocks x %3d rows: x ready -> rows emitted  "
              "median %.2f us (%.0f cycles, %.0f MHz), 90th %.2f us\n",
              s.name, name, blocks_per_sm, blocks, s.rows_per_block, us[us.size() / 2], cyc[cyc.size() / 2],
              cyc[cyc.size() / 2] / us[us.size() / 2], us[us.size() * 9 / 10]);
  CHECK(cudaFree(w));
  CHECK(cudaFree(x));
  CHECK(cudaFree(out));
  CHECK(cudaFree(t));
}

}  // namespace
}  // namespace fm::cuda

int main() {
  using namespace fm::cuda;
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s, %d SMs\n", prop.name, prop.multiProcessorCount);
  imma_latency();
  prologue(2048, prop.multiProcessorCount);
  prologue(4096, prop.multiProcessorCount);
  const Shape shapes[] = {{"in_proj", 2048, 64}, {"out_proj", 4096, 16}, {"down", 512, 96}};
  for (const Shape& s : shapes)
    for (int per_sm : {1, 2}) {
      run(s, Pass::Single, per_sm, prop.multiProcessorCount);
      run(s, Pass::Second, per_sm, prop.multiProcessorCount);
      if (s.rows_per_block % 32 == 0) run(s, Pass::Paired, per_sm, prop.multiProcessorCount);
    }
  return 0;
}
