#include "cpu/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <exception>
#include <memory>

#include "slattn/sla.h"

namespace slattn::cpu {

struct ThreadPool::Job {
  int64_t count = 0;
  const std::function<void(int64_t)>* task = nullptr;
  std::atomic<int64_t> next{0};
  std::mutex error_mutex;
  std::exception_ptr error;
};

ThreadPool::ThreadPool(int threads) {
  for (int i = 1; i < std::max(threads, 1); ++i) workers_.emplace_back([this] { worker_loop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  for (auto& worker : workers_) worker.join();
}

void ThreadPool::run_job(Job& job) {
  for (int64_t i = job.next.fetch_add(1); i < job.count; i = job.next.fetch_add(1)) {
    try {
      (*job.task)(i);
    } catch (...) {
      std::lock_guard lock(job.error_mutex);
      if (!job.error) job.error = std::current_exception();
      job.next.store(job.count);  // stop handing out work
    }
  }
}

void ThreadPool::worker_loop() {
  uint64_t seen = 0;
  for (;;) {
    Job* job = nullptr;
    {
      std::unique_lock lock(mutex_);
      wake_.wait(lock, [&] { return stopping_ || generation_ != seen; });
      if (stopping_) return;
      seen = generation_;
      job = job_;
      if (job == nullptr) continue;  // woke after the job was already finished
      ++busy_workers_;
    }
    run_job(*job);
    {
      std::lock_guard lock(mutex_);
      --busy_workers_;
    }
    done_.notify_all();
  }
}

void ThreadPool::parallel_for(int64_t count, const std::function<void(int64_t)>& task) {
  if (count <= 0) return;
  Job job;
  job.count = count;
  job.task = &task;
  const bool fan_out = count > 1 && !workers_.empty();
  // One job at a time: a second caller waits until the pool is free.
  std::unique_lock run_lock(run_mutex_, std::defer_lock);
  if (fan_out) {
    run_lock.lock();
    {
      std::lock_guard lock(mutex_);
      job_ = &job;
      ++generation_;
    }
    wake_.notify_all();
  }
  run_job(job);
  if (fan_out) {
    std::unique_lock lock(mutex_);
    // Workers that woke for this generation must leave run_job before `job` dies.
    done_.wait(lock, [&] { return busy_workers_ == 0 && job.next.load() >= job.count; });
    job_ = nullptr;
  }
  if (job.error) std::rethrow_exception(job.error);
}

namespace {
std::mutex pool_mutex;
std::shared_ptr<ThreadPool> pool;
int requested_threads = 0;

int hardware_threads() { return std::max(1u, std::thread::hardware_concurrency()); }
}  // namespace

std::shared_ptr<ThreadPool> default_pool() {
  std::lock_guard lock(pool_mutex);
  if (!pool) pool = std::make_shared<ThreadPool>(requested_threads > 0 ? requested_threads : hardware_threads());
  return pool;
}

}  // namespace slattn::cpu

namespace slattn {

void set_num_threads(int threads) {
  SLATTN_CHECK(threads >= 1, "num_threads must be >= 1, got ", threads);
  std::lock_guard lock(cpu::pool_mutex);
  cpu::requested_threads = threads;
  cpu::pool.reset();
}

int num_threads() { return cpu::default_pool()->size(); }

}  // namespace slattn
