// How long a matvec block's q4 row loop takes by itself: the engine's rows_dot
// (csrc/cuda/kernels.cu) on blocks of in_proj's, out_proj's and the experts' down shape, the
// matrix in L2 (repeated launches over a matrix that fits it), at one and two blocks per SM. Each
// shape runs warm (the launch before ran the same code), cold (after a kernel of 256 KB of
// straight-line code, one warp per SM, which evicts the launch's code from the SM's instruction
// cache, as the other kernels of a decode layer do), cold with a dry pass (the block runs the
// same code once before, its rows dropped), after a kernel as long that loops over 2 KB of code
// (a control: it evicts nothing), and with the block's two halves of rows taken together as the
// two matrices of rows_dot<2>. Prints the median block's time from its start to x ready, and from
// x ready to its rows emitted (us, SM cycles, and the clock they imply); before that, the latency
// of one mma.sync and the prologue's own time (load_x_chunks: RMSNorm and q4 split), warm and cold.
// `row_loop SHAPE` runs one shape's cold pass at one block per SM alone (for a profiler).
// H200: bench/results/row_loop_h200.txt, docs/cuda.md ("What bounds the resident regime").
//   nvcc -O3 -std=c++17 -arch=sm_90 -Icsrc -Ibench bench/row_loop.cu -o /tmp/row_loop && /tmp/row_loop
#include "cuda/kernels.cu"
#include "cuda_check.cuh"
#include "fma_code.cuh"

#include <algorithm>
#include <string>
#include <vector>

namespace fm::cuda {
namespace {

// kPair: the block's two halves of rows as the two matrices of rows_dot<2> (one x fragment for
// both); kDry: the block's work twice from one copy of the code (a loop), the first pass's rows
// dropped and the second timed. CH: x chunks per thread (x_chunks), as the engine's kernels.
template <bool kPair, bool kDry, int CH>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    loop_kernel(DevMat m, const float* x, int rows_per_block, float* out, long long* t) {
  extern __shared__ float4 smem4[];
  const uint64_t g_start = ::now();
  const int r0 = int(blockIdx.x) * rows_per_block, r1 = min(m.rows, r0 + rows_per_block);
  VecSmem vs;
  vec_smem_floats(m.cols, &vs, reinterpret_cast<float*>(smem4));
  PrologueArgs pro;
  pro.src = x;
  long long c0 = 0;
  uint64_t g0 = 0;
  if constexpr (kPair) {
    const int half = (r1 - r0) / 2;
    DevMat m2[2] = {m, m};
    m2[1].data = m.data + size_t(half) * (m.cols / 2);
    m2[1].scales = m.scales + 2 * half;  // the pairs' words of row r + half
    rows_dot<2, 4>(
        m2, r0, r0 + half, vs,
        [&] {
          load_x_chunks<CH>(pro, m.cols, vs, true);
          c0 = clock64(), g0 = ::now();
        },
        [&](int r, float a, float b) { out[r] = a, out[r + half] = b; });
  } else {
#pragma unroll 1
    for (int pass = kDry ? 0 : 1; pass < 2; ++pass) {
      rows_dot<1, 4>(
          &m, r0, r1, vs,
          [&] {
            load_x_chunks<CH>(pro, m.cols, vs, true);
            if (pass) c0 = clock64(), g0 = ::now();
          },
          [&](int r, float v) {
            if (pass) out[r] = v;
          });
      __syncthreads();
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    t[3 * blockIdx.x] = clock64() - c0;
    t[3 * blockIdx.x + 1] = static_cast<long long>(::now() - g0);
    t[3 * blockIdx.x + 2] = static_cast<long long>(g0 - g_start);
  }
}

// The prologue alone: load_x_chunks with an RMSNorm and the q4 split. t: per block, its ns.
template <int CH>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    prologue_kernel(const float* x, const float* w, int cols, long long* t) {
  extern __shared__ float4 smem4[];
  VecSmem vs;
  vec_smem_floats(cols, &vs, reinterpret_cast<float*>(smem4));
  PrologueArgs p;
  p.kind = Prologue::Norm;
  p.eps = 1e-6f;
  p.src = x, p.w = w;
  __syncthreads();
  const uint64_t g0 = ::now();
  load_x_chunks<CH>(p, cols, vs, true);
  if (threadIdx.x == 0) t[blockIdx.x] = static_cast<long long>(::now() - g0);
}

// Medians over the blocks of 15 launches of the prologue, warm, then each after the code evictor.
void prologue(int cols, int sms) {
  const int blocks = 2 * sms;
  float* buf;
  CHECK(cudaMalloc(&buf, 2 * cols * sizeof(float)));
  std::vector<float> h(2 * cols);
  for (int i = 0; i < 2 * cols; ++i) h[i] = 0.01f * float((i * 37) % 101 - 50);
  CHECK(cudaMemcpy(buf, h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice));
  long long* t;
  CHECK(cudaMalloc(&t, blocks * sizeof(long long)));
  float* junk;
  CHECK(cudaMalloc(&junk, size_t(sms) * 32 * sizeof(float)));
  const size_t smem = matvec_smem_bytes(cols);
  auto k = x_chunks(cols) == 1 ? prologue_kernel<1> : prologue_kernel<2>;
  CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  std::vector<long long> ht(blocks);
  double med[2];
  for (int cold = 0; cold < 2; ++cold) {
    std::vector<double> us;
    for (int rep = 0; rep < 20; ++rep) {
      if (cold) fma_kernel<16384, false><<<sms, 32>>>(1.0001f, 0.5f, junk, nullptr);
      k<<<blocks, kThreads, smem>>>(buf, buf + cols, cols, t);
      CHECK(cudaGetLastError());
      CHECK(cudaDeviceSynchronize());
      if (rep < 5) continue;
      CHECK(cudaMemcpy(ht.data(), t, ht.size() * sizeof(long long), cudaMemcpyDeviceToHost));
      for (long long v : ht) us.push_back(v / 1e3);
    }
    std::sort(us.begin(), us.end());
    med[cold] = us[us.size() / 2];
  }
  std::printf("prologue (RMSNorm + q4 split) of %d columns, 2/SM: warm %.2f us, cold %.2f us (medians)\n", cols,
              med[0], med[1]);
  CHECK(cudaFree(buf));
  CHECK(cudaFree(t));
  CHECK(cudaFree(junk));
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

enum class Pass { Warm, Cold, ColdDry, Control, Paired };
const char* pass_name(Pass p) {
  switch (p) {
    case Pass::Warm: return "warm";
    case Pass::Cold: return "cold";
    case Pass::ColdDry: return "cold+dry";
    case Pass::Control: return "control";
    case Pass::Paired: return "paired";
  }
  return "";
}

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
  CHECK(cudaMalloc(&t, 3 * blocks * sizeof(long long)));
  float* junk;
  CHECK(cudaMalloc(&junk, size_t(blocks) * kThreads * sizeof(float)));
  const size_t smem = matvec_smem_bytes(s.cols);
  const bool one = x_chunks(s.cols) == 1;
  auto k = pass == Pass::Paired    ? (one ? loop_kernel<true, false, 1> : loop_kernel<true, false, 2>)
           : pass == Pass::ColdDry ? (one ? loop_kernel<false, true, 1> : loop_kernel<false, true, 2>)
                                   : (one ? loop_kernel<false, false, 1> : loop_kernel<false, false, 2>);
  CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  std::vector<long long> ht(3 * blocks);
  std::vector<double> us, cyc, pro;
  for (int rep = 0; rep < 20; ++rep) {  // the first launches pull the matrix into L2
    if (pass == Pass::Cold || pass == Pass::ColdDry)
      fma_kernel<16384, false><<<sms, 32>>>(1.0001f, 0.5f, junk, nullptr);  // evicts the code
    if (pass == Pass::Control) fma_kernel<16384, true><<<blocks, kThreads>>>(1.0001f, 0.5f, junk, nullptr);
    k<<<blocks, kThreads, smem>>>(m, x, s.rows_per_block, out, t);
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    if (rep < 5) continue;
    CHECK(cudaMemcpy(ht.data(), t, ht.size() * sizeof(long long), cudaMemcpyDeviceToHost));
    for (int b = 0; b < blocks; ++b)
      cyc.push_back(double(ht[3 * b])), us.push_back(ht[3 * b + 1] / 1e3), pro.push_back(ht[3 * b + 2] / 1e3);
  }
  std::sort(us.begin(), us.end());
  std::sort(cyc.begin(), cyc.end());
  std::sort(pro.begin(), pro.end());
  std::printf("%-9s %-8s %d/SM  %3d blocks x %3d rows: start -> x ready %.2f us; x ready -> rows emitted  "
              "median %.2f us (%.0f cycles, %.0f MHz), 90th %.2f us\n",
              s.name, pass_name(pass), blocks_per_sm, blocks, s.rows_per_block, pro[pro.size() / 2], us[us.size() / 2],
              cyc[cyc.size() / 2], cyc[cyc.size() / 2] / us[us.size() / 2], us[us.size() * 9 / 10]);
  CHECK(cudaFree(junk));
  CHECK(cudaFree(w));
  CHECK(cudaFree(x));
  CHECK(cudaFree(out));
  CHECK(cudaFree(t));
}

}  // namespace
}  // namespace fm::cuda

int main(int argc, char** argv) {
  using namespace fm::cuda;
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const Shape shapes[] = {{"in_proj", 2048, 64}, {"out_proj", 4096, 16}, {"down", 512, 96}};
  if (argc > 1) {
    for (const Shape& s : shapes)
      if (std::string(argv[1]) == s.name) run(s, Pass::Cold, 1, prop.multiProcessorCount);
    return 0;
  }
  std::printf("%s, %d SMs\n", prop.name, prop.multiProcessorCount);
  imma_latency();
  prologue(2048, prop.multiProcessorCount);
  prologue(4096, prop.multiProcessorCount);
  for (const Shape& s : shapes)
    for (int per_sm : {1, 2}) {
      for (Pass pass : {Pass::Warm, Pass::Cold, Pass::ColdDry, Pass::Control})
        run(s, pass, per_sm, prop.multiProcessorCount);
      if (s.rows_per_block % 32 == 0) run(s, Pass::Paired, per_sm, prop.multiProcessorCount);
    }
  return 0;
}
