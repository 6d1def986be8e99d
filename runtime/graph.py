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
  inputs in pinned buffers, a host node rings the `ExpertWorker` thread and waits, copy the output back.

On a CUDA device (graph=True) the first call runs the step once on a side stream (warm-up: kernels built,
memory pools filled), captures it into a `torch.cuda.CUDAGraph`, and every call replays the graph. With
graph=False, or on a CPU, `__call__` runs the same `_body` eagerly, so the CPU tests exercise the code the
graph is captured from (buffers, doorbell, worker) and must match `model.forward` bit for bit.

On a GPU, read `logits` only after synchronising the stream (a `.cpu()` or `.item()` does): while a replay
runs, the host node waits for the worker thread, which needs the GIL, and torch releases it while it waits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .doorbell import Doorbell, DoorbellError, ExpertWorker, StagedExperts
from .model import DeepseekV3Model, KVCache
from .moe import MoE


def cpu_experts(experts):
    """The CPU experts behind a device wrapper (runtime/gpu.py's HostExperts), or `experts` itself."""
    return getattr(experts, "inner", experts)


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
        self.staged = {i: StagedExperts(self.doorbell, i) for i in self.moes}
        self.graph: torch.cuda.CUDAGraph | None = None

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
        saved = {i: m.experts for i, m in self.moes.items()}
        try:
            for i, m in self.moes.items():
                m.experts = self.staged[i]
            yield
        finally:
            for i, m in self.moes.items():
                m.experts = saved[i]

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
