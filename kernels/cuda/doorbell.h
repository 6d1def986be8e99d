// The GPU side of the CPU-expert hand-off (runtime/doorbell.py is the CPU side).
//
// `flags` is a pinned host int64[kDoorbellFlags] shared with a CPU worker thread:
//   [0] request sequence number (written by the start node), [1] done sequence number (written by the worker),
//   [2] abort (nonzero: stop waiting), [3] the layer whose experts to run (written before [0]),
//   [4] CLOCK_MONOTONIC ns at which the start node published the request (the worker measures the hand-off
//   from it), [5] ns the wait nodes spent waiting, summed (the time the stream stood still on the CPU),
//   [6] wait nodes run, summed; [7] spare.
//
// A MoE layer's hand-off is two host functions on `stream` (host nodes when the stream is being captured into
// a CUDA Graph), so that the GPU work queued between them (the shared expert) runs while the CPU computes the
// routed experts:
//   doorbell_enqueue_start: publish `layer` and the time, increment [0], return at once;
//   doorbell_enqueue_wait:  spin until [1] catches up with [0] (or [2] is set), so the work queued after it
//                           (the copy of the experts' output back to the GPU) starts only once the CPU result
//                           is in the pinned output buffer.
// Sequence numbers are read at run time, so a graph replays them correctly any number of times. One stream
// owns a flags array: the wait node waits for the request number its stream's last start node published.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace ktpack {
namespace cuda {

constexpr int kDoorbellFlags = 8;
enum DoorbellFlag : int {
  kRequest = 0,
  kDone = 1,
  kAbort = 2,
  kLayer = 3,
  kStartNs = 4,
  kStallNs = 5,
  kWaits = 6,
};

cudaError_t doorbell_enqueue_start(int64_t* flags, int64_t layer, cudaStream_t stream);
cudaError_t doorbell_enqueue_wait(int64_t* flags, cudaStream_t stream);

}  // namespace cuda
}  // namespace ktpack

// The two host functions themselves, run now on the calling thread (no CUDA call): what the nodes of
// doorbell_enqueue_start / doorbell_enqueue_wait run when their stream reaches them. tests/test_decode_graph.py
// calls them through ctypes against the Python worker, so the compiled protocol is tested without a GPU.
extern "C" void ktpack_doorbell_start_now(int64_t* flags, int64_t layer);
extern "C" void ktpack_doorbell_wait_now(int64_t* flags);
