// Host-function doorbell for the CPU experts (see doorbell.h). Host code only; CUDA runtime headers only.
#include "doorbell.h"

#include <cuda_runtime.h>
#include <sched.h>
#include <time.h>

#include <map>
#include <memory>
#include <mutex>
#include <utility>

namespace ktpack {
namespace cuda {
namespace {

struct Cell {
  int64_t* flags;
  int64_t layer;
};

// Host nodes keep their argument pointer for the life of the graph: cells are never freed (one per
// (flags, layer), a few dozen per process). The wait node's argument is the flags pointer itself.
std::mutex g_mutex;
std::map<std::pair<int64_t*, int64_t>, std::unique_ptr<Cell>> g_cells;

Cell* cell_for(int64_t* flags, int64_t layer) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto& c = g_cells[{flags, layer}];
  if (!c) c.reset(new Cell{flags, layer});
  return c.get();
}

// The clock Python's time.monotonic_ns() reads on Linux, so the worker can subtract the two.
int64_t monotonic_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}

void CUDART_CB ring_start(void* arg) {
  const Cell* c = static_cast<const Cell*>(arg);
  int64_t* f = c->flags;
  if (__atomic_load_n(&f[kAbort], __ATOMIC_ACQUIRE) != 0) return;
  __atomic_store_n(&f[kLayer], c->layer, __ATOMIC_RELAXED);
  __atomic_store_n(&f[kStartNs], monotonic_ns(), __ATOMIC_RELAXED);
  const int64_t seq = __atomic_load_n(&f[kRequest], __ATOMIC_RELAXED) + 1;
  __atomic_store_n(&f[kRequest], seq, __ATOMIC_RELEASE);  // publishes [3], [4] and the staged inputs with it
}

void CUDART_CB ring_wait(void* arg) {
  int64_t* f = static_cast<int64_t*>(arg);
  const int64_t seq = __atomic_load_n(&f[kRequest], __ATOMIC_ACQUIRE);  // this stream's last request
  const int64_t t0 = monotonic_ns();
  for (unsigned spin = 0; __atomic_load_n(&f[kDone], __ATOMIC_ACQUIRE) < seq; ++spin) {
    if (__atomic_load_n(&f[kAbort], __ATOMIC_ACQUIRE) != 0) break;
    if (spin > 4096) sched_yield();  // host functions must not call CUDA; yielding is fine
  }
  __atomic_fetch_add(&f[kStallNs], monotonic_ns() - t0, __ATOMIC_RELAXED);
  __atomic_fetch_add(&f[kWaits], 1, __ATOMIC_RELAXED);
}

}  // namespace

cudaError_t doorbell_enqueue_start(int64_t* flags, int64_t layer, cudaStream_t stream) {
  if (flags == nullptr) return cudaErrorInvalidValue;
  return cudaLaunchHostFunc(stream, ring_start, cell_for(flags, layer));
}

cudaError_t doorbell_enqueue_wait(int64_t* flags, cudaStream_t stream) {
  if (flags == nullptr) return cudaErrorInvalidValue;
  return cudaLaunchHostFunc(stream, ring_wait, flags);
}

}  // namespace cuda
}  // namespace ktpack

extern "C" void ktpack_doorbell_start_now(int64_t* flags, int64_t layer) {
  ktpack::cuda::Cell c{flags, layer};
  ktpack::cuda::ring_start(&c);
}

extern "C" void ktpack_doorbell_wait_now(int64_t* flags) { ktpack::cuda::ring_wait(flags); }
