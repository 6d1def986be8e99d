#include "thread_pool.h"

#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <stdexcept>
#include <string>

namespace ktpack {
namespace {

void futex_wait(std::atomic<uint32_t>* addr, uint32_t expected) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), FUTEX_WAIT_PRIVATE, expected, nullptr, nullptr, 0);
}

void futex_wake_all(std::atomic<uint32_t>* addr) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr, nullptr, 0);
}

inline void cpu_relax() { __builtin_ia32_pause(); }

int env_int(const char* name, int dflt) {
  const char* v = std::getenv(name);
  if (!v || !*v) return dflt;
  return std::atoi(v);
}

// CPUs of NUMA node `node` from sysfs ("0-3,8-11"), or empty when unknown.
std::vector<int> node_cpus(int node) {
  std::ifstream f("/sys/devices/system/node/node" + std::to_string(node) + "/cpulist");
  std::string s;
  std::vector<int> cpus;
  if (!std::getline(f, s)) return cpus;
  size_t i = 0;
  while (i < s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    const std::string part = s.substr(i, j - i);
    const size_t dash = part.find('-');
    const int a = std::atoi(part.c_str());
    const int b = dash == std::string::npos ? a : std::atoi(part.c_str() + dash + 1);
    for (int c = a; c <= b; ++c) cpus.push_back(c);
    i = j + 1;
  }
  return cpus;
}

void pin_to_node(int node) {
  const std::vector<int> cpus = node_cpus(node);
  if (cpus.empty()) return;
  cpu_set_t set;
  CPU_ZERO(&set);
  for (int c : cpus) CPU_SET(c, &set);
  sched_setaffinity(0, sizeof(set), &set);  // best effort: a refused pin leaves the thread unpinned
}

bool machine_has_nodes(int nodes) { return !node_cpus(nodes - 1).empty(); }

}  // namespace

int machine_nodes() {
  int n = 0;
  while (!node_cpus(n).empty()) ++n;
  return n < 1 ? 1 : n;
}

int bind_to_node(const void* addr, size_t len, int node) {
  if (node < 0 || node >= 64 || machine_nodes() < 2) return 0;  // nothing to do on one node
  const uintptr_t page = 4096;
  const uintptr_t a = reinterpret_cast<uintptr_t>(addr) & ~(page - 1);
  const size_t l = len + (reinterpret_cast<uintptr_t>(addr) - a);
  unsigned long mask = 1ul << node;
  constexpr int kMpolPreferred = 1;
  if (syscall(SYS_mbind, a, l, kMpolPreferred, &mask, 64, 0) != 0) return errno;
  return 0;
}

ThreadPool::ThreadPool(int threads, int nodes)
    : n_threads_(threads < 1 ? 1 : threads), n_nodes_(nodes < 1 ? 1 : nodes), ranges_(n_nodes_) {
  spin_us_.store(env_int("KTPACK_SPIN_US", 30), std::memory_order_relaxed);
  const bool pin = n_nodes_ > 1 && machine_has_nodes(n_nodes_);
  for (int i = 1; i < n_threads_; ++i)
    workers_.emplace_back([this, i, pin] {
      if (pin) pin_to_node(i % n_nodes_);
      worker(i);
    });
}

ThreadPool::~ThreadPool() {
  stop_.store(true);
  gen_.fetch_add(1);
  futex_wake_all(&gen_);
  for (auto& t : workers_) t.join();
}

namespace {
constexpr uint64_t kIdxMask = (1ull << 22) - 1;
inline uint64_t pack_state(uint32_t gen, int64_t end, int64_t next) {
  return (uint64_t(gen & 0xFFFFF) << 44) | (uint64_t(end) << 22) | uint64_t(next);
}
}  // namespace

void ThreadPool::drain(int id, uint32_t gen) {
  const int home = id % n_nodes_;
  const uint64_t want = gen & 0xFFFFF;
  for (int j = 0; j < n_nodes_; ++j) {
    Counter& c = ranges_[(home + j) % n_nodes_];
    uint64_t v = c.state.load(std::memory_order_acquire);
    for (;;) {
      if ((v >> 44) != want) break;
      const uint64_t next = v & kIdxMask, end = (v >> 22) & kIdxMask;
      if (next >= end) break;
      if (!c.state.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
      (*fn_)(int64_t(next), id);
      if (done_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {
        fin_.store(gen, std::memory_order_seq_cst);
        if (fin_sleepers_.load(std::memory_order_seq_cst) > 0) futex_wake_all(&fin_);
      }
      v = c.state.load(std::memory_order_acquire);
    }
  }
}

void ThreadPool::worker(int id) {
  uint32_t seen = 0;  // gen_ starts at 0 and a job may be posted before this thread first runs
  for (;;) {
    // Wait for a new job: spin a little, then sleep.
    const auto t0 = std::chrono::steady_clock::now();
    uint32_t g;
    while ((g = gen_.load(std::memory_order_acquire)) == seen) {
      const int spin = spin_us();
      if (spin <= 0 || std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(spin)) {
        gen_sleepers_.fetch_add(1, std::memory_order_seq_cst);
        if (gen_.load(std::memory_order_seq_cst) == seen) futex_wait(&gen_, seen);
        gen_sleepers_.fetch_sub(1, std::memory_order_relaxed);
      } else {
        for (int i = 0; i < 8; ++i) cpu_relax();
      }
    }
    seen = g;
    if (stop_.load()) return;
    drain(id, g);
  }
}

void ThreadPool::run(int64_t n, const Task& fn, const int64_t* node_end) {
  if (n <= 0) return;
  if (n_threads_ == 1 || n == 1) {
    for (int64_t t = 0; t < n; ++t) fn(t, 0);
    return;
  }
  if (n > int64_t(kIdxMask)) throw std::length_error("thread pool: too many tasks in one job");
  const uint32_t gen = ++job_ == 0 ? ++job_ : job_;  // never 0 (a worker's initial "seen")
  fn_ = &fn;
  n_ = n;
  done_.store(0, std::memory_order_relaxed);
  int64_t begin = 0;
  for (int j = 0; j < n_nodes_; ++j) {
    int64_t end = node_end ? node_end[j] : (j == n_nodes_ - 1 ? n : 0);
    if (j == n_nodes_ - 1) end = n;
    end = end < begin ? begin : (end > n ? n : end);
    ranges_[j].state.store(pack_state(gen, end, begin), std::memory_order_release);
    begin = end;
  }
  gen_.store(gen, std::memory_order_seq_cst);
  if (gen_sleepers_.load(std::memory_order_seq_cst) > 0) futex_wake_all(&gen_);
  drain(0, gen);
  const auto t0 = std::chrono::steady_clock::now();
  while (fin_.load(std::memory_order_acquire) != gen) {
    const uint32_t f = fin_.load(std::memory_order_acquire);
    if (f == gen) break;
    if (std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(std::max(spin_us(), 0))) {
      fin_sleepers_.fetch_add(1, std::memory_order_seq_cst);
      if (fin_.load(std::memory_order_seq_cst) == f) futex_wait(&fin_, f);
      fin_sleepers_.fetch_sub(1, std::memory_order_relaxed);
    } else {
      for (int i = 0; i < 8; ++i) cpu_relax();
    }
  }
  fn_ = nullptr;
}

namespace {
std::unique_ptr<ThreadPool>& pool_slot() {
  static std::unique_ptr<ThreadPool> p;
  return p;
}

int default_threads() {
  const int env = env_int("KTPACK_THREADS", 0);
  if (env > 0) return env;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return CPU_COUNT(&set);
  const unsigned hc = std::thread::hardware_concurrency();
  return hc ? int(hc) : 1;
}
}  // namespace

ThreadPool& pool() {
  auto& p = pool_slot();
  if (!p) p = std::make_unique<ThreadPool>(default_threads(), 1);
  return *p;
}

void set_pool(int threads, int nodes) {
  auto& p = pool_slot();
  p.reset();
  p = std::make_unique<ThreadPool>(threads > 0 ? threads : default_threads(), nodes);
}

}  // namespace ktpack
