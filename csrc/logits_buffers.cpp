// Heap-allocated logits buffers (the CPU engine's; the CUDA engine lends pinned ones).
#include <cstddef>
#include <memory>

#include "engine.h"

namespace fm {
namespace {

class HeapLogitsBuffers final : public LogitsBuffers {
 public:
  explicit HeapLogitsBuffers(size_t n) : n_(n) {}
  float* acquire() override { return new float[n_]; }
  void release(float* p) noexcept override { delete[] p; }

 private:
  size_t n_;
};

}  // namespace

std::shared_ptr<LogitsBuffers> make_heap_logits_buffers(size_t n) { return std::make_shared<HeapLogitsBuffers>(n); }

}  // namespace fm
