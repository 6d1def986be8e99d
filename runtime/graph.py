"""The decode step with fixed addresses: one CUDA Graph per step on a GPU, the same step run eagerly on a CPU.

    step = DecodeStep(model, cache)          # model = DeepseekV3Model(pack, static_kv=True)
    logits = step(token, pos)                # [1, vocab] on the model's device; a fixed tensor, overwritten

What makes the step capturable:
- fixed-address inputs: the embedded token goes into `step.x` [1, hidden] (the embedding lookup stays on the
  CPU, outside the graph) and its position into `step.pos` [1];
- the static KV cache (`static_kv=True`: attention spans the whole cache with later positions masked, so no
  shape depends on the position) written in place with `index_copy_` at `pos`;
- preallocated outputs: `step.logits` [1, vocab];
- the routed experts, which run on the CPU, reached through one `Doorbell` (runtime/doorbell.py): stage the
  inputs in pinned buffers, a start host node rings the `ExpertWorker` thread, the shared expert's kernels run
  on the GPU meanwhile, a wait host node holds the stream until the worker is done, copy the output back.

Per MoE layer the step runs `OverlappedMoE` in place of `MoE.__call__`: router, stage + start, shared expert,
wait + copy back, `routed + shared` (the sum `MoE` computes, in the same order, so the values are the same).
On a CPU the shared expert then runs in the calling thread while the worker thread runs the routed experts,
unless both would use the native engine's thread pool (one job at a time): then the shared expert waits.

On a CUDA device (graph=True) the first call runs the step once on a side stream (warm-up: kernels built,
memory pools filled), captures it into a `torch.cuda.CUDAGraph`, and every call replays the graph. With
graph=False, or on a CPU, `__call__` runs the same `_body` eagerly, so the CPU tests exercise the code the
graph is captured from (buffers, doorbell, worker) and must match `model.forward` bit for bit.

On a GPU, read `logits` only after synchronising the stream (a `.cpu()` or `.item()` does): while a replay
runs, the wait node waits for the worker thread, which needs the GIL, and torch releases it while it waits.

Only the decode step (T = 1) is captured. Prefill (Engine._prefill: `model.forward` over chunks of
--prefill-chunk tokens) runs eagerly outside the graph: its token count changes with the prompt, it is one call per
chunk rather than per token (launch overhead is small against a chunk's GEMMs), and its routed experts take
the direct path (runtime/gpu.py's HostExperts: copy to the CPU, call, copy back) instead of the one-token
doorbell. Prefill writes the same static cache the graph then reads, at fixed addresses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .doorbell import Doorbell, DoorbellError, ExpertWorker, HandoffStats, StagedExperts
from .model import DeepseekV3Model, KVCache
from .moe import MoE


def cpu_experts(experts):
    """The CPU experts behind a device wrapper (runtime/gpu.py's HostExperts), or `experts` itself."""
    return getattr(experts, "inner", experts)


def uses_native_pool(fn: object) -> bool:
    """Whether calling `fn` (a shared expert) runs jobs on the native engine's thread pool, which takes one
    job at a time: such a call must not overlap the experts worker's."""
    from .cpu_ops import NativeLinear, NativeMLP

    if isinstance(fn, NativeMLP | NativeLinear):
        return True
    return any(isinstance(getattr(fn, a, None), NativeLinear) for a in ("gate", "up", "down"))


class OverlappedMoE:
    """`moe(x)` for one token with the routed experts behind the doorbell, the shared expert between the start
    and the wait (see the module docstring). `overlap=False` runs the shared expert after the wait."""

    def __init__(self, moe: MoE, staged: StagedExperts, overlap: bool = True) -> None:
        self.moe = moe
        self.staged = staged
        self.overlap = overlap

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.moe
        idx, w = m.router(x)
        self.staged.start(x, idx, w)  # the CPU's routed experts start here
        shared = m.shared if m.shared is not None and not m.flags.drop_shared else None
        s = shared(x) if shared is not None and self.overlap else None  # runs meanwhile
        out = self.staged.finish(x.device)
        if shared is not None and s is None:
            s = shared(x)
        return out if s is None else out + s


class DecodeStep:
    """One decode step (T = 1) of `model` over `cache`, with fixed-address buffers (see the module docstring)."""

    def __init__(self, model: DeepseekV3Model, cache: KVCache, graph: bool = True) -> None:
        if not model.static_kv:
            raise ValueError("the decode step needs a model built with static_kv=True (fixed attention shapes)")
        device = cache.c_kv.device
        if device != model.device:
            raise ValueError(f"the cache is on {device} but the model on {model.device}")
        cfg = model.config
        self.model = model
        self.cache = cache
        self.device = device
        self.use_graph = graph and device.type == "cuda"
        self.x = torch.zeros(1, cfg.hidden_size, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.logits = torch.zeros(1, cfg.vocab_size, device=device)
        self.moes = {i: b.ffn for i, b in enumerate(model.blocks) if isinstance(b.ffn, MoE)}
        self.doorbell = Doorbell(cfg.hidden_size, cfg.num_experts_per_tok, tokens=1, pin=device.type == "cuda")
        self.worker = ExpertWorker(self.doorbell, {i: cpu_experts(m.experts) for i, m in self.moes.items()})
        self.overlapped = {
            i: OverlappedMoE(
                m, StagedExperts(self.doorbell, i), overlap=device.type == "cuda" or not uses_native_pool(m.shared)
            )
            for i, m in self.moes.items()
        }
        self.graph: torch.cuda.CUDAGraph | None = None

    @property
    def handoffs(self) -> HandoffStats:
        """The hand-offs the worker served so far (a copy; subtract two to measure a stretch of steps)."""
        return self.worker.stats.copy()

    @torch.inference_mode()
    def __call__(self, token: int, pos: int) -> torch.Tensor:
        """Logits [1, vocab] of `token` at position `pos` (written into the cache); the returned tensor is
        `self.logits`, overwritten by the next call."""
        if not 0 <= pos < self.cache.ctx_size:
            raise ValueError(f"position {pos} does not fit the cache of {self.cache.ctx_size}")
        self.x.copy_(self.model.pack.embedding(torch.tensor([token])))
        self.pos.fill_(pos)
        if self.use_graph:
            if self.graph is None:
                self._capture()
            self.graph.replay()
        else:
            self._body()
        if self.doorbell.error is not None:  # the worker failed (a GPU host node cannot raise)
            raise DoorbellError(f"the experts worker failed: {self.doorbell.error!r}")
        return self.logits

    def _body(self) -> None:
        with self._staged_experts():
            logits = self.model.forward_hidden(self.x, self.pos, self.cache.ctx_size, self.cache)
        self.logits.copy_(logits)

    @contextlib.contextmanager
    def _staged_experts(self) -> Iterator[None]:
        blocks = self.model.blocks
        try:
            for i, o in self.overlapped.items():
                blocks[i].ffn = o
            yield
        finally:
            for i, m in self.moes.items():
                blocks[i].ffn = m

    def _capture(self) -> None:
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._body()  # warm-up: the same step (its cache write is rewritten identically by the replay)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the experts worker thread may touch CUDA-adjacent state (pinned buffers) meanwhile
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._body()
        self.graph = graph

    def close(self) -> None:
        self.worker.close()
        self.graph = None
