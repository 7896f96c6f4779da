// XXH64 (seed 0 by default): the checksum of model files and expert blocks (docs/format.md).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace fm {

class Xxh64 {
 public:
  explicit Xxh64(uint64_t seed = 0);
  void update(const void* data, size_t len);
  uint64_t digest() const;

 private:
  uint64_t v_[4];
  uint64_t seed_;
  uint64_t total_ = 0;
  unsigned char buf_[32];
  size_t buffered_ = 0;
};

uint64_t xxh64(const void* data, size_t len, uint64_t seed = 0);

// Hashes `length` bytes of `path` from `offset`; throws std::runtime_error naming the file when it
// cannot be opened or ends early.
uint64_t xxh64_file(const std::string& path, uint64_t offset, uint64_t length);

}  // namespace fm
