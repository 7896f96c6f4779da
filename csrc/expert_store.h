// Expert blocks on disk: each (layer, expert) is one contiguous block of experts.bin, fetched with
// one pread by a persistent pool of I/O threads into 4 KiB-aligned slot buffers. Reads go through
// the OS page cache by default; direct=true opens the file with O_DIRECT (blocks are 4 KiB aligned).
// Going through the page cache, a block whose pages are all in memory is used where it lies, from
// a read-only mapping of the file (no copy), instead of being read.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "model.h"

namespace fm {

class ExpertStore {
 public:
  ExpertStore(std::string path, const ExpertLayout& layout, int slots, int io_threads, bool direct);
  ~ExpertStore();
  ExpertStore(const ExpertStore&) = delete;
  ExpertStore& operator=(const ExpertStore&) = delete;

  int slots() const { return int(slots_.size()); }
  uint64_t block_bytes() const { return read_bytes_; }
  // The slot's buffer (block_stride bytes), e.g. to pin it for device copies.
  uint8_t* buffer(int slot) const { return slots_[size_t(slot)].buffer; }

  // Queues the read of block (layer, expert) into `slot`; returns at once.
  void start(int slot, int layer, int expert);
  // Blocks until `slot` holds its block; throws std::runtime_error naming the file on a failed read.
  const uint8_t* wait(int slot);
  // Waits out every queued read, failed or not, so all slots are idle (after an error).
  void drain();
  // The block in the page cache, mapped, when every page of it is in memory (mincore); else null
  // (and always with O_DIRECT). A block served this way counts as read.
  const uint8_t* if_cached(int layer, int expert);

  uint64_t bytes_read() const { return bytes_read_.load(); }
  uint64_t blocks_read() const { return blocks_read_.load(); }
  uint64_t blocks_cached() const { return blocks_cached_.load(); }

 private:
  struct Slot {
    uint8_t* buffer = nullptr;
    std::atomic<int> state{0};  // 0 idle, 1 queued, 2 ready, 3 failed
    std::string error;
  };
  struct Job {
    int slot, layer, expert;
  };
  void io_loop();

  std::string path_;
  ExpertLayout layout_;
  uint64_t read_bytes_;
  int fd_ = -1;
  uint8_t* map_ = nullptr;  // whole file, read-only; null with O_DIRECT
  size_t map_size_ = 0;
  size_t page_ = 4096;
  std::vector<Slot> slots_;
  std::vector<std::thread> threads_;
  std::mutex mutex_;
  std::condition_variable job_ready_, slot_done_;
  std::deque<Job> jobs_;
  bool stop_ = false;
  std::atomic<uint64_t> bytes_read_{0}, blocks_read_{0}, blocks_cached_{0};
};

}  // namespace fm
