#include "expert_store.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

namespace fm {

ExpertStore::ExpertStore(std::string path, const ExpertLayout& layout, int slots, int io_threads,
                         bool direct)
    : path_(std::move(path)), layout_(layout), slots_(size_t(slots)) {
  // O_DIRECT needs whole 4 KiB pages; buffered reads need only the block itself.
  read_bytes_ = direct ? layout_.block_stride : layout_.block_bytes;
  fd_ = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC | (direct ? O_DIRECT : 0));
  if (fd_ < 0)
    throw std::runtime_error(path_ + ": cannot open" + (direct ? " with O_DIRECT" : "") + ": " +
                             std::strerror(errno));
  struct stat st;
  if (!direct && ::fstat(fd_, &st) == 0 && st.st_size > 0) {
    void* m = ::mmap(nullptr, size_t(st.st_size), PROT_READ, MAP_SHARED, fd_, 0);
    if (m != MAP_FAILED) {
      map_ = static_cast<uint8_t*>(m);
      map_size_ = size_t(st.st_size);
      page_ = size_t(::sysconf(_SC_PAGESIZE));
    }
  }
  for (auto& s : slots_) {
    void* p = nullptr;
    if (posix_memalign(&p, 1 << 21, layout_.block_stride) != 0) throw std::bad_alloc();
    s.buffer = static_cast<uint8_t*>(p);
  }
  for (int i = 0; i < io_threads; ++i) threads_.emplace_back([this] { io_loop(); });
}

ExpertStore::~ExpertStore() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  job_ready_.notify_all();
  for (auto& t : threads_) t.join();
  for (auto& s : slots_) std::free(s.buffer);
  if (map_) ::munmap(map_, map_size_);
  if (fd_ >= 0) ::close(fd_);
}

void ExpertStore::start(int slot, int layer, int expert) {
  slots_[size_t(slot)].state.store(1);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    jobs_.push_back({slot, layer, expert});
  }
  job_ready_.notify_one();
}

const uint8_t* ExpertStore::wait(int slot) {
  Slot& s = slots_[size_t(slot)];
  if (s.state.load(std::memory_order_acquire) < 2) {
    std::unique_lock<std::mutex> lock(mutex_);
    slot_done_.wait(lock, [&] { return s.state.load() >= 2; });
  }
  if (s.state.load() == 3) {
    s.state.store(0);
    throw std::runtime_error(s.error);
  }
  s.state.store(0);
  return s.buffer;
}

void ExpertStore::drain() {
  std::unique_lock<std::mutex> lock(mutex_);
  for (Slot& s : slots_) {
    slot_done_.wait(lock, [&] { return s.state.load() != 1; });
    s.state.store(0);
  }
}

const uint8_t* ExpertStore::if_cached(int layer, int expert) {
  if (!map_) return nullptr;
  const uint64_t offset = (uint64_t(layer) * uint64_t(layout_.num_experts) + uint64_t(expert)) * layout_.block_stride;
  // a file cut short since it was mapped would fault on access: leave it to the read to report
  struct stat st;
  if (offset + read_bytes_ > map_size_ || ::fstat(fd_, &st) != 0 || uint64_t(st.st_size) < offset + read_bytes_)
    return nullptr;
  const uint64_t first = offset / page_ * page_;
  const size_t pages = size_t((offset + read_bytes_ - first + page_ - 1) / page_);
  thread_local std::vector<unsigned char> resident;
  resident.resize(pages);
  if (::mincore(map_ + first, pages * page_, resident.data()) != 0) return nullptr;
  for (unsigned char r : resident)
    if (!(r & 1)) return nullptr;
  bytes_read_.fetch_add(read_bytes_);
  blocks_read_.fetch_add(1);
  blocks_cached_.fetch_add(1);
  return map_ + offset;
}

void ExpertStore::io_loop() {
  for (;;) {
    Job job;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      job_ready_.wait(lock, [&] { return stop_ || !jobs_.empty(); });
      if (stop_) return;
      job = jobs_.front();
      jobs_.pop_front();
    }
    Slot& s = slots_[size_t(job.slot)];
    uint64_t block = uint64_t(job.layer) * uint64_t(layout_.num_experts) + uint64_t(job.expert);
    off_t offset = off_t(block * layout_.block_stride);
    uint64_t done = 0;
    std::string error;
    while (done < read_bytes_) {
      ssize_t n = ::pread(fd_, s.buffer + done, read_bytes_ - done, offset + off_t(done));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        error = path_ + ": reading expert block (layer " + std::to_string(job.layer) + ", expert " +
                std::to_string(job.expert) + ") failed: " +
                (n == 0 ? std::string("file too short") : std::strerror(errno));
        break;
      }
      done += uint64_t(n);
    }
    if (error.empty()) {
      bytes_read_.fetch_add(done);
      blocks_read_.fetch_add(1);
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      s.error = error;
      s.state.store(error.empty() ? 2 : 3, std::memory_order_release);
    }
    slot_done_.notify_all();
  }
}

}  // namespace fm
