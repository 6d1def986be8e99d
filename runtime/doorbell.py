"""The CPU-expert hand-off of the decode step ("doorbell"): fixed-address staging buffers and a flag protocol.

The GPU decode step (one CUDA Graph, runtime/graph.py) reaches each MoE layer's routed experts like this:

    GPU stream   copy x, topk ids, topk weights into the pinned staging buffers (fixed addresses)
                 start node (kernels/cuda/doorbell.cu): flags[LAYER] = layer; flags[START_NS] = now;
                                                         flags[REQUEST] += 1; return
                 the shared expert's kernels (GPU)          <- overlaps the CPU's routed experts
                 wait node: spin until flags[DONE] == flags[REQUEST] (or ABORT); add the wait to STALL_NS
                 copy the pinned output buffer back to the GPU
    CPU worker   (ExpertWorker) waits for flags[REQUEST] to change, runs experts[flags[LAYER]] on the staged
                 inputs, writes the result into the fixed output buffer, then sets flags[DONE]

Two nodes rather than one that starts and waits: with one, the stream stands still for the whole CPU call and
the shared expert runs only after it; with the wait node after the shared expert, the GPU's share of the layer
hides under the CPU's. `Doorbell.ring_start()` / `ring_wait()` are those nodes in Python (`ring()` is both):
without a GPU the same worker, buffers and flags run the same protocol, which is what the CPU tests check
(and they run the compiled nodes' host functions through ctypes as well). A Python ring also wakes the worker
at once (a condition variable); a GPU host node cannot, so the worker polls the flags every `poll_s` as well.

Flags are one int64[N_FLAGS] (pinned when a GPU will write them): REQUEST and DONE sequence numbers, ABORT (set
when the worker failed or closed, so no one waits forever), LAYER, START_NS (CLOCK_MONOTONIC ns of the latest
request, the clock of time.monotonic_ns), STALL_NS and WAITS (what the wait nodes spent waiting, and how many
ran). x86 keeps stores in order, so the inputs written before REQUEST (and the output before DONE) are visible
to whoever sees the new number.

The worker measures each hand-off (`HandoffStats`): from the start node's request to the worker's done
(`handoff_ns`), split into the worker's pick-up latency and its experts call; scripts/bench_gpu.py reports
them per token next to the stream's stall.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import torch

REQUEST, DONE, ABORT, LAYER, START_NS, STALL_NS, WAITS = range(7)
N_FLAGS = 8  # kernels/cuda/doorbell.h kDoorbellFlags (the last one is spare)

ExpertsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class DoorbellError(RuntimeError):
    """The experts worker failed or was closed while a step waited on it."""


@dataclass
class HandoffStats:
    """Sums over the hand-offs a worker served (nanoseconds, CLOCK_MONOTONIC)."""

    requests: int = 0
    handoff_ns: int = 0  # the start node's request -> the worker's done
    pickup_ns: int = 0  # the request -> the worker saw it (polling / wake-up latency)
    compute_ns: int = 0  # the worker saw it -> done (the experts call and the copy into `out`)

    def minus(self, before: HandoffStats) -> HandoffStats:
        return HandoffStats(*(a - b for a, b in zip(asdict(self).values(), asdict(before).values(), strict=True)))

    def copy(self) -> HandoffStats:
        return HandoffStats(**asdict(self))


class Doorbell:
    """Staging buffers `x` [tokens, hidden] f32, `ids` [tokens, topk] int64, `w` [tokens, topk] f32, `out`
    [tokens, hidden] f32 and `flags` int64[N_FLAGS], allocated once (pinned with `pin=True`) and never moved."""

    def __init__(self, hidden: int, topk: int, tokens: int = 1, pin: bool = False) -> None:
        def alloc(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, pin_memory=pin)

        self.tokens = tokens
        self.x = alloc((tokens, hidden), torch.float32)
        self.ids = alloc((tokens, topk), torch.int64)
        self.w = alloc((tokens, topk), torch.float32)
        self.out = alloc((tokens, hidden), torch.float32)
        self.flags = alloc((N_FLAGS,), torch.int64)
        self._f = self.flags.numpy()  # a view: reads and writes go to the shared memory
        self._cv = threading.Condition()
        self.error: BaseException | None = None

    # ---------------------------------------------------------------- the producer (the GPU's host nodes)

    def ring_start(self, layer: int) -> None:
        """Ask for `layer`'s experts on the staged inputs; returns at once (the start node)."""
        f = self._f
        if f[ABORT]:
            raise self._failure()
        with self._cv:
            f[LAYER] = layer
            f[START_NS] = time.monotonic_ns()
            f[REQUEST] = int(f[REQUEST]) + 1
            self._cv.notify_all()

    def ring_wait(self, timeout: float | None = None) -> None:
        """Wait until `out` holds the result of the latest request (the wait node)."""
        f = self._f
        seq = int(f[REQUEST])
        t0 = time.monotonic_ns()
        with self._cv:
            done = self._cv.wait_for(lambda: f[DONE] >= seq or f[ABORT], timeout)
        f[STALL_NS] += time.monotonic_ns() - t0
        f[WAITS] += 1
        if f[ABORT]:
            raise self._failure()
        if not done:
            raise DoorbellError(f"the experts worker did not answer layer {int(f[LAYER])} within {timeout} s")

    def ring(self, layer: int, timeout: float | None = None) -> None:
        """`ring_start` then `ring_wait`: nothing overlaps the CPU call."""
        self.ring_start(layer)
        self.ring_wait(timeout)

    def stall(self) -> tuple[int, int]:
        """(ns the wait nodes spent waiting, wait nodes run), summed since the doorbell was made."""
        return int(self._f[STALL_NS]), int(self._f[WAITS])

    def _failure(self) -> DoorbellError:
        why = f": {self.error!r}" if self.error is not None else " (closed)"
        return DoorbellError(f"the experts worker stopped{why}")

    # ---------------------------------------------------------------- the consumer (ExpertWorker)

    def wait_request(self, last: int, poll_s: float, stop: threading.Event) -> int | None:
        """The next request number after `last`, or None once `stop` is set."""
        f = self._f
        while True:
            with self._cv:
                seq = int(f[REQUEST])
                if seq != last:
                    return seq
                if stop.is_set():
                    return None
                self._cv.wait(poll_s)

    def complete(self, seq: int) -> None:
        with self._cv:
            self._f[DONE] = seq
            self._cv.notify_all()

    def abort(self, error: BaseException | None = None) -> None:
        with self._cv:
            if error is not None and self.error is None:
                self.error = error
            self._f[ABORT] = 1
            self._cv.notify_all()


class ExpertWorker:
    """A thread serving a `Doorbell`: `experts[layer](x, ids, w)` on the staged inputs, into `out`.

    An exception in the experts aborts the doorbell (a waiting step raises `DoorbellError` with it on the CPU;
    the GPU host node returns, and the step's owner checks `doorbell.error`). `close()` stops the thread.
    `stats` sums the hand-offs served (updated before DONE is set, so a finished step sees its own).
    """

    def __init__(self, doorbell: Doorbell, experts: Mapping[int, ExpertsFn], poll_s: float = 20e-6) -> None:
        self.doorbell = doorbell
        self.experts = dict(experts)
        self.poll_s = poll_s
        self.stats = HandoffStats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ktpack-experts", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        db = self.doorbell
        st = self.stats
        last = int(db._f[REQUEST])
        while True:
            seq = db.wait_request(last, self.poll_s, self._stop)
            if seq is None:
                return
            seen = time.monotonic_ns()
            last = seq
            try:
                with torch.inference_mode():
                    start = int(db._f[START_NS])
                    layer = int(db._f[LAYER])
                    fn = self.experts.get(layer)
                    if fn is None:
                        raise KeyError(f"no routed experts registered for layer {layer}")
                    db.out.copy_(fn(db.x, db.ids, db.w))
            except BaseException as e:  # noqa: BLE001  (handed to the waiting step)
                db.abort(e)
                return
            done = time.monotonic_ns()
            st.requests += 1
            st.handoff_ns += done - start
            st.pickup_ns += seen - start
            st.compute_ns += done - seen
            db.complete(seq)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._stop.set()
        self.doorbell.abort()
        with self.doorbell._cv:
            self.doorbell._cv.notify_all()
        self._thread.join()


class StagedExperts:
    """Stands in for layer `layer`'s routed experts inside the decode step, in two halves:

    `start(x, ids, w)`: stage the inputs in the doorbell's fixed buffers and ring the start node (a host node on
    a CUDA stream, `Doorbell.ring_start` on the CPU); `finish(device)`: the wait node, then a copy of `out` on
    `device` (a new tensor: the next layer reuses the buffer). Work issued between the two overlaps the CPU's
    experts. Calling the object does both at once."""

    def __init__(self, doorbell: Doorbell, layer: int) -> None:
        self.doorbell = doorbell
        self.layer = layer

    def start(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> None:
        db = self.doorbell
        if x.shape[0] != db.tokens:
            raise ValueError(f"the doorbell stages {db.tokens} token(s), got {x.shape[0]}")
        db.x.copy_(x, non_blocking=True)
        db.ids.copy_(topk_idx, non_blocking=True)
        db.w.copy_(topk_w, non_blocking=True)
        if x.is_cuda:
            from . import cuda_ops

            cuda_ops.doorbell_start(db.flags, self.layer)
        else:
            db.ring_start(self.layer)

    def finish(self, device: torch.device) -> torch.Tensor:
        db = self.doorbell
        if device.type == "cuda":
            from . import cuda_ops

            cuda_ops.doorbell_wait(db.flags)
        else:
            db.ring_wait()
        return db.out.to(device, non_blocking=True, copy=True)

    def __call__(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        self.start(x, topk_idx, topk_w)
        return self.finish(x.device)
