// One thread that runs posted tasks in order: the expert server's control
// thread (LoadSlots / UnloadSlots), which may block on checkpoint reads and on
// the compute worker, so that gRPC reactions never do.
#ifndef DMOE_EXPERT_SERVICE_INTERNAL_TASK_THREAD_H_
#define DMOE_EXPERT_SERVICE_INTERNAL_TASK_THREAD_H_

#include <deque>
#include <functional>
#include <thread>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace dmoe::expert::internal {

class TaskThread {
 public:
  TaskThread() : thread_([this] { Loop(); }) {}
  ~TaskThread() { Stop(); }
  TaskThread(const TaskThread&) = delete;
  TaskThread& operator=(const TaskThread&) = delete;

  // Thread-safe. After Stop the task runs inline on the caller's thread.
  void Post(std::function<void()> task) {
    {
      absl::MutexLock lock(&mu_);
      if (!stop_) {
        tasks_.push_back(std::move(task));
        return;
      }
    }
    task();
  }

  // Runs the tasks already posted, then joins. Idempotent.
  void Stop() {
    {
      absl::MutexLock lock(&mu_);
      if (stop_) return;
      stop_ = true;
    }
    if (thread_.joinable()) thread_.join();
  }

 private:
  void Loop() {
    for (;;) {
      std::function<void()> task;
      {
        absl::MutexLock lock(&mu_);
        mu_.Await(absl::Condition(
            +[](TaskThread* t)
                 ABSL_EXCLUSIVE_LOCKS_REQUIRED(t->mu_) { return t->stop_ || !t->tasks_.empty(); },
            this));
        if (tasks_.empty()) return;
        task = std::move(tasks_.front());
        tasks_.pop_front();
      }
      task();
    }
  }

  absl::Mutex mu_;
  std::deque<std::function<void()>> tasks_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;  // last: starts after the members above exist
};

}  // namespace dmoe::expert::internal

#endif  // DMOE_EXPERT_SERVICE_INTERNAL_TASK_THREAD_H_
