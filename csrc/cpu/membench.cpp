#include "cpu/membench.h"

#include <atomic>
#include <cstring>

namespace fm::cpu {

uint64_t stream_read(const uint8_t* buf, size_t n, ThreadPool& pool) {
  std::atomic<uint64_t> total{0};
  const int64_t words = int64_t(n / 8);
  pool.parallel_for(words, 1 << 16, [&](int64_t w0, int64_t w1) {
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    const uint64_t* p = reinterpret_cast<const uint64_t*>(buf);
    int64_t w = w0;
    for (; w + 4 <= w1; w += 4) {
      uint64_t v[4];
      std::memcpy(v, p + w, 32);
      s0 += v[0], s1 += v[1], s2 += v[2], s3 += v[3];
    }
    for (; w < w1; ++w) s0 += p[w];
    total.fetch_add(s0 + s1 + s2 + s3);
  });
  return total.load();
}

void stream_copy(uint8_t* dst, const uint8_t* src, size_t n, ThreadPool& pool) {
  pool.parallel_for(int64_t(n), 1 << 20, [&](int64_t b0, int64_t b1) {
    std::memcpy(dst + b0, src + b0, size_t(b1 - b0));
  });
}

}  // namespace fm::cpu
