// A persistent thread pool for the CPU engine.
//
// - One pool, created once: `threads` workers in all, the calling thread being one of them, so there
//   are never more busy threads than the threads asked for (default: the cores this process may use).
// - Idle workers sleep on a futex. After a job they spin for a short, bounded time (KTPACK_SPIN_US,
//   default 30 us, 0 disables) with `pause` before sleeping, which hides the wake-up latency between
//   the back-to-back jobs of one layer without burning a core while Python or torch runs.
// - Tasks are taken dynamically (an atomic counter per NUMA node): a thread drains its own node's
//   tasks first, then helps the others. On a one-node machine that is one shared counter.
// - The caller waits for the job's tasks to finish, not for the workers to check in: a worker still
//   asleep when the tasks ran out never delays the caller.
#pragma once
#include <atomic>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

namespace ktpack {

class ThreadPool {
 public:
  using Task = std::function<void(int64_t task, int thread)>;

  // threads >= 1; nodes >= 1 (threads are assigned to nodes round-robin and, when nodes > 1 and the
  // machine has that many NUMA nodes, pinned to that node's CPUs).
  ThreadPool(int threads, int nodes);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int threads() const { return n_threads_; }
  // How long idle threads spin before they sleep (and the caller before it sleeps on the job's end).
  void set_spin_us(int us) { spin_us_.store(us, std::memory_order_relaxed); }
  int spin_us() const { return spin_us_.load(std::memory_order_relaxed); }
  int nodes() const { return n_nodes_; }

  // Run tasks [0, n). `node_end[j]` (optional, size nodes()) ends node j's range: node j prefers
  // tasks [node_end[j-1], node_end[j]). Returns when every task has finished.
  void run(int64_t n, const Task& fn, const int64_t* node_end = nullptr);

 private:
  void worker(int id);
  void drain(int id, uint32_t gen);

  int n_threads_, n_nodes_;
  std::atomic<int> spin_us_{30};
  std::vector<std::thread> workers_;
  const Task* fn_ = nullptr;
  int64_t n_ = 0;
  // A node's task range of the current job, packed in one word so that taking a task is a single
  // compare-and-swap that also checks the job: generation (20 bits) | end (22) | next (22). A worker
  // that wakes late finds the range exhausted or of another job and takes nothing, so the caller
  // waits for the tasks, never for threads that were asleep (no scheduler-tick stalls).
  struct alignas(64) Counter {
    std::atomic<uint64_t> state{0};
  };
  std::vector<Counter> ranges_;
  uint32_t job_ = 0;
  alignas(64) std::atomic<uint32_t> gen_{0};   // futex word: the latest job's generation
  alignas(64) std::atomic<int64_t> done_{0};   // tasks finished in the current job
  alignas(64) std::atomic<uint32_t> fin_{0};   // futex word: the generation whose tasks all finished
  // Threads inside (or about to enter) a futex wait on gen_ / fin_: a wake-up is a system call (~1 us in
  // a VM, twice per job), made only when somebody sleeps. Each side stores its word, then loads the
  // other's (seq_cst), so a sleeper either sees the new value or is seen and woken.
  alignas(64) std::atomic<int> gen_sleepers_{0};
  alignas(64) std::atomic<int> fin_sleepers_{0};
  std::atomic<bool> stop_{false};
};

// NUMA nodes this machine has (sysfs; 1 when unknown).
int machine_nodes();
// Prefer node `node` for the pages of [addr, addr+len) (mbind MPOL_PREFERRED; pages already
// present stay where they are). A no-op returning 0 on a one-node machine; errno on failure.
int bind_to_node(const void* addr, size_t len, int node);

// The process-wide pool (created on first use with KTPACK_THREADS or the usable cores).
ThreadPool& pool();
// Replace the process-wide pool (threads <= 0: the default).
void set_pool(int threads, int nodes);

}  // namespace ktpack
