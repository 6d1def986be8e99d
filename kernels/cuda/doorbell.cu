// Host-function doorbell for the CPU experts (see doorbell.h). Host code only; CUDA runtime headers only.
#include "doorbell.h"

#include <cuda_runtime.h>
#include <sched.h>

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
// (flags, layer), a few dozen per process).
std::mutex g_mutex;
std::map<std::pair<int64_t*, int64_t>, std::unique_ptr<Cell>> g_cells;

Cell* cell_for(int64_t* flags, int64_t layer) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto& c = g_cells[{flags, layer}];
  if (!c) c.reset(new Cell{flags, layer});
  return c.get();
}

void CUDART_CB ring_and_wait(void* arg) {
  const Cell* c = static_cast<const Cell*>(arg);
  int64_t* f = c->flags;
  if (__atomic_load_n(&f[2], __ATOMIC_ACQUIRE) != 0) return;
  __atomic_store_n(&f[3], c->layer, __ATOMIC_RELAXED);
  const int64_t seq = __atomic_load_n(&f[0], __ATOMIC_RELAXED) + 1;
  __atomic_store_n(&f[0], seq, __ATOMIC_RELEASE);  // publishes [3] and the staged inputs with it
  for (unsigned spin = 0; __atomic_load_n(&f[1], __ATOMIC_ACQUIRE) < seq; ++spin) {
    if (__atomic_load_n(&f[2], __ATOMIC_ACQUIRE) != 0) return;
    if (spin > 4096) sched_yield();  // host functions must not call CUDA; yielding is fine
  }
}

}  // namespace

cudaError_t doorbell_enqueue(int64_t* flags, int64_t layer, cudaStream_t stream) {
  if (flags == nullptr) return cudaErrorInvalidValue;
  return cudaLaunchHostFunc(stream, ring_and_wait, cell_for(flags, layer));
}

}  // namespace cuda
}  // namespace ktpack
