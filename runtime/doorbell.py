"""The CPU-expert hand-off of the decode step ("doorbell"): fixed-address staging buffers and a flag protocol.

The GPU decode step (one CUDA Graph, runtime/graph.py) reaches each MoE layer's routed experts like this:

    GPU stream   copy x, topk ids, topk weights into the pinned staging buffers (fixed addresses)
                 host node (kernels/cuda/doorbell.cu): flags[LAYER] = layer; flags[REQUEST] += 1;
                                                        spin until flags[DONE] == flags[REQUEST] (or ABORT)
                 copy the pinned output buffer back to the GPU
    CPU worker   (ExpertWorker) waits for flags[REQUEST] to change, runs experts[flags[LAYER]] on the staged
                 inputs, writes the result into the fixed output buffer, then sets flags[DONE]

`Doorbell.ring()` is that host node in Python: without a GPU the same worker, buffers and flags run the same
protocol, which is what the CPU tests check. A Python ring also wakes the worker at once (a condition
variable); a GPU host node cannot, so the worker polls the flags every `poll_s` as well.

Flags are one int64[4] (pinned when a GPU will write them): REQUEST and DONE sequence numbers, ABORT (set when
the worker failed or closed, so no one waits forever), LAYER. x86 keeps stores in order, so the inputs written
before REQUEST (and the output before DONE) are visible to whoever sees the new number.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

import torch

REQUEST, DONE, ABORT, LAYER = range(4)

ExpertsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class DoorbellError(RuntimeError):
    """The experts worker failed or was closed while a step waited on it."""


class Doorbell:
    """Staging buffers `x` [tokens, hidden] f32, `ids` [tokens, topk] int64, `w` [tokens, topk] f32, `out`
    [tokens, hidden] f32 and `flags` int64[4], allocated once (pinned with `pin=True`) and never moved."""

    def __init__(self, hidden: int, topk: int, tokens: int = 1, pin: bool = False) -> None:
        def alloc(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, pin_memory=pin)

        self.tokens = tokens
        self.x = alloc((tokens, hidden), torch.float32)
        self.ids = alloc((tokens, topk), torch.int64)
        self.w = alloc((tokens, topk), torch.float32)
        self.out = alloc((tokens, hidden), torch.float32)
        self.flags = alloc((4,), torch.int64)
        self._f = self.flags.numpy()  # a view: reads and writes go to the shared memory
        self._cv = threading.Condition()
        self.error: BaseException | None = None

    # ---------------------------------------------------------------- the producer (the GPU's host node)

    def ring(self, layer: int, timeout: float | None = None) -> None:
        """Ask for `layer`'s experts on the staged inputs and wait until `out` holds the result."""
        f = self._f
        if f[ABORT]:
            raise self._failure()
        with self._cv:
            f[LAYER] = layer
            seq = int(f[REQUEST]) + 1
            f[REQUEST] = seq
            self._cv.notify_all()
            done = self._cv.wait_for(lambda: f[DONE] >= seq or f[ABORT], timeout)
        if f[ABORT]:
            raise self._failure()
        if not done:
            raise DoorbellError(f"the experts worker did not answer layer {layer} within {timeout} s")

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
    """

    def __init__(self, doorbell: Doorbell, experts: Mapping[int, ExpertsFn], poll_s: float = 20e-6) -> None:
        self.doorbell = doorbell
        self.experts = dict(experts)
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ktpack-experts", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        db = self.doorbell
        last = int(db._f[REQUEST])
        while True:
            seq = db.wait_request(last, self.poll_s, self._stop)
            if seq is None:
                return
            last = seq
            try:
                with torch.inference_mode():
                    layer = int(db._f[LAYER])
                    fn = self.experts.get(layer)
                    if fn is None:
                        raise KeyError(f"no routed experts registered for layer {layer}")
                    db.out.copy_(fn(db.x, db.ids, db.w))
            except BaseException as e:  # noqa: BLE001  (handed to the waiting step)
                db.abort(e)
                return
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
    """Stands in for layer `layer`'s routed experts inside the decode step: stage the inputs in the doorbell's
    fixed buffers, ring (a host node on a CUDA stream, `Doorbell.ring` on the CPU), return a copy of `out` on
    the inputs' device (a new tensor: the next layer reuses the buffer)."""

    def __init__(self, doorbell: Doorbell, layer: int) -> None:
        self.doorbell = doorbell
        self.layer = layer

    def __call__(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        db = self.doorbell
        if x.shape[0] != db.tokens:
            raise ValueError(f"the doorbell stages {db.tokens} token(s), got {x.shape[0]}")
        db.x.copy_(x, non_blocking=True)
        db.ids.copy_(topk_idx, non_blocking=True)
        db.w.copy_(topk_w, non_blocking=True)
        if x.is_cuda:
            from . import cuda_ops

            cuda_ops.doorbell_ring(db.flags, self.layer)
        else:
            db.ring(self.layer)
        return db.out.to(x.device, non_blocking=True, copy=True)
