// The GPU side of the CPU-expert hand-off (runtime/doorbell.py is the CPU side).
//
// `flags` is a pinned host int64[4] shared with a CPU worker thread:
//   [0] request sequence number (written here), [1] done sequence number (written by the worker),
//   [2] abort (nonzero: stop waiting), [3] the layer whose experts to run (written here before [0]).
// doorbell_enqueue puts one host function on `stream` (a host node when the stream is being captured into a
// CUDA Graph): when the stream reaches it, it publishes `layer`, increments [0] and spins until [1] catches up
// (or [2] is set), so the work queued after it (the copy of the experts' output back to the GPU) starts only
// once the CPU result is in the pinned output buffer. The sequence number is read at run time, so a graph
// replays it correctly any number of times.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace ktpack {
namespace cuda {

cudaError_t doorbell_enqueue(int64_t* flags, int64_t layer, cudaStream_t stream);

}  // namespace cuda
}  // namespace ktpack
