// Checks cpu::linear against a float64 reference on random q4, q8 and bf16 matrices for a batch of
// tokens; exits non-zero on a mismatch. Built for other architectures by tests/test_cross_arch.py.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cpu/kernels.h"

int main() {
  using namespace fm;
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  const int64_t rows = 37, cols = 256, n = 11;  // 11 tokens: tiles of 8, 2 and 1
  ThreadPool pool(2);
  cpu::LinearScratch scratch(n, cols);
  for (DType dtype : {DType::Q4, DType::Q8, DType::BF16}) {
    TensorInfo info;
    info.dtype = dtype;
    info.shape = {rows, cols};
    info.nbytes = tensor_nbytes(dtype, rows, cols);
    std::vector<uint8_t> buf(info.nbytes);
    for (auto& b : buf) b = uint8_t(rng());
    Matrix m = matrix_at(buf.data(), info);
    // bf16 values near +-1: exponent bits fixed, random mantissa and sign
    auto bf16 = [&](uint16_t sign) { return uint16_t(sign | 0x3f00 | (rng() & 0xff)); };
    if (dtype == DType::BF16) {
      for (int64_t i = 0; i < rows * cols; ++i) reinterpret_cast<uint16_t*>(buf.data())[i] = bf16(rng() & 0x8000);
    } else {
      for (int64_t i = 0; i < rows * cols / kGroupSize; ++i) {
        const_cast<uint16_t*>(m.scales)[i] = bf16(0);
        const_cast<uint16_t*>(m.biases)[i] = bf16(0x8000);
      }
    }
    std::vector<float> x(static_cast<size_t>(n * cols)), y(static_cast<size_t>(n * rows)), row(static_cast<size_t>(cols));
    for (auto& v : x) v = normal(rng);
    cpu::linear(m, x.data(), n, y.data(), scratch, pool);
    double worst = 0, scale = 0;
    for (int64_t r = 0; r < rows; ++r) {
      cpu::dequant_row(m, r, row.data());
      for (int64_t t = 0; t < n; ++t) {
        double want = 0;
        for (int64_t c = 0; c < cols; ++c) want += double(row[size_t(c)]) * x[size_t(t * cols + c)];
        worst = std::max(worst, std::fabs(want - y[size_t(t * rows + r)]));
        scale = std::max(scale, std::fabs(want));
      }
    }
    std::printf("%s %s relative error %.2e\n", cpu::simd_path(),
                dtype == DType::Q4 ? "q4" : dtype == DType::Q8 ? "q8" : "bf16", worst / scale);
    if (!(worst / scale < 2e-4)) return 1;
  }
  return 0;
}
