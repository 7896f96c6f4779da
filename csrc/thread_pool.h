// Persistent worker threads for the compute kernels. The calling thread takes part, so a pool of
// n threads starts n-1 workers. Workers spin briefly between jobs (a token issues hundreds of
// short jobs) and then sleep.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace fm {

class ThreadPool {
 public:
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return int(workers_.size()) + 1; }

  // Calls fn(task) for every task in [0, tasks), spread over the pool; returns when all are done.
  void run(int tasks, const std::function<void(int)>& fn);

  // Splits [0, n) into at most size() ranges of at least min_chunk and calls fn(begin, end).
  template <class F>
  void parallel_for(int64_t n, int64_t min_chunk, F&& fn) {
    int64_t parts = std::min<int64_t>(size(), std::max<int64_t>(1, n / std::max<int64_t>(1, min_chunk)));
    if (parts <= 1) {
      fn(int64_t(0), n);
      return;
    }
    run(int(parts), [&](int p) { fn(n * p / parts, n * (p + 1) / parts); });
  }

 private:
  void worker_loop();
  void work_on_current_job();

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> next_task_{0};
  std::atomic<int> tasks_done_{0};
  int tasks_ = 0;
  const std::function<void(int)>* fn_ = nullptr;
  bool stop_ = false;
};

}  // namespace fm
