// A small persistent thread pool for the CPU path: parallel_for over
// independent (batch, head) tasks. The first exception thrown by a task is
// rethrown on the calling thread after every task has stopped.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace slattn::cpu {

class ThreadPool {
 public:
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }  // the caller works too

  // Runs task(i) for i in [0, count). Blocks until all are done.
  void parallel_for(int64_t count, const std::function<void(int64_t)>& task);

 private:
  struct Job;
  void worker_loop();
  static void run_job(Job& job);

  std::vector<std::thread> workers_;
  std::mutex run_mutex_;  // one parallel_for at a time
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  Job* job_ = nullptr;
  uint64_t generation_ = 0;
  int busy_workers_ = 0;
  bool stopping_ = false;
};

// The process-wide pool used by the CPU path. Callers hold the returned
// pointer for the duration of their work, so set_num_threads() may replace the
// pool at any time without pulling it from under a running call.
std::shared_ptr<ThreadPool> default_pool();

}  // namespace slattn::cpu
