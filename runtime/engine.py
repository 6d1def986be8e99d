"""The engine: a packed model, a KV cache allocated once, chunked prefill, the decode loop.

This is the small Python API the CLI (and later the server) calls:

    eng = Engine("packed/", ctx_size=4096)
    logits = eng.score(ids)                                  # [n, vocab] float32, teacher-forced
    out = eng.generate(ids, SamplingParams(temperature=0), max_new_tokens=64, on_text=print)

Device: the CPU unless `device` (or KTPACK_DEVICE) says "cuda": then the GPU-side weights go to the GPU
(runtime/gpu.py; Marlin GEMMs), the routed experts stay on the CPU, and each decode step replays one CUDA
Graph (runtime/graph.py), or runs the same step eagerly with graph=False (kt-run --no-graph).
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .chat import ChatTokenizer, StreamDecoder
from .model import KV_CACHE_TYPES
from .sampling import Sampler, SamplingParams


def _has_f16c() -> bool:
    from .. import kernels

    return bool(kernels._native.cpu_features().get("f16c"))


class EngineError(ValueError):
    """A request the engine cannot serve (too long for the context, ids outside the vocabulary...)."""


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Stats:
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    generated_tokens: int = 0
    decode_s: float = 0.0
    peak_rss_mb: float = 0.0
    # seconds per phase of the native CPU decode step (runtime/cpu_decode.py), when it ran
    decode_profile: dict | None = None

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        # the first generated token comes from prefill; decode steps make the others
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s else 0.0

    def line(self) -> str:
        return (
            f"prompt {self.prompt_tokens} tokens, prefill {self.prefill_tok_s:.1f} tok/s; "
            f"generated {self.generated_tokens} tokens, decode {self.decode_tok_s:.2f} tok/s; "
            f"peak RSS {self.peak_rss_mb:.0f} MB"
        )

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "prefill_s": self.prefill_s,
            "prefill_tok_s": self.prefill_tok_s,
            "generated_tokens": self.generated_tokens,
            "decode_s": self.decode_s,
            "decode_tok_s": self.decode_tok_s,
            "peak_rss_mb": self.peak_rss_mb,
            "decode_profile": self.decode_profile,
        }


@dataclass
class Generation:
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # "stop" (EOS or a stop string) or "length"
    stats: Stats = field(default_factory=Stats)


class Engine:
    def __init__(
        self,
        folder: Path | str,
        ctx_size: int = 4096,
        prefill_chunk: int = 256,
        verify: bool = False,
        engine: str | None = None,
        device: str | None = None,
        graph: bool = True,
        gpu_mem: float | None = None,
        kv_cache: str = "f32",
    ):
        from .model import DeepseekV3Model
        from .weights import load_pack

        self.folder = Path(folder)
        self.device = torch.device(device or os.environ.get("KTPACK_DEVICE") or "cpu")
        if ctx_size < 1 and not (ctx_size == 0 and self.device.type == "cuda"):
            raise EngineError(f"--ctx-size must be >= 1 (0: the most the GPU fits, GPU runs only), got {ctx_size}")
        self.pack = load_pack(self.folder, verify=verify, engine=engine)
        self.config = self.pack.config
        self._step = None  # the decode step: runtime/graph.py (GPU) or runtime/cpu_decode.py (CPU)
        self.gpu_budget = None  # GPU runs: what runtime/gpu.py's place_for_run measured and chose
        if self.device.type == "cuda":
            from .gpu import place_for_run
            from .graph import DecodeStep

            # weights checked against the free memory (and gpu_mem), placed, the KV cache sized from what is left
            self.model = DeepseekV3Model(self.pack, static_kv=True)
            self.gpu_budget = place_for_run(self.model, self.device, ctx_size, max(1, prefill_chunk), gpu_mem)
            ctx_size = self.gpu_budget.kv.ctx_size
            self.cache = self.model.new_cache(ctx_size)
            self._step = DecodeStep(self.model, self.cache, graph=graph)
        else:
            from . import cpu_decode

            if kv_cache not in KV_CACHE_TYPES:
                raise EngineError(f"--kv-cache must be one of {', '.join(KV_CACHE_TYPES)}, got {kv_cache!r}")
            if kv_cache == "f16" and not _has_f16c():
                raise EngineError("--kv-cache f16 needs a CPU with F16C (every AVX2 one); use f32")
            self.model = DeepseekV3Model(self.pack)
            self.cache = self.model.new_cache(ctx_size, KV_CACHE_TYPES[kv_cache])
            self._step = cpu_decode.build(self.model, self.cache)  # None: decode through the torch model
        self.ctx_size = ctx_size
        self.prefill_chunk = max(1, prefill_chunk)
        self._tok: ChatTokenizer | None = None

    def settle_torch_threads(self) -> None:
        """For a process that runs this one engine (kt-run, kt-serve). On the CPU with the native engine, the
        engine's pool does the products and torch only the prefill's glue (softmax, masks, norms), so torch
        keeps one thread: its own workers only competed with the pool's for the cores (prefill 512 on 2
        cores: bench-Q4_K_M 651 -> 725 tok/s, bench-Q8_0 610 -> 725, torch 2 -> 1 thread, in-process A/B).
        KTPACK_TORCH_THREADS sets another count."""
        if self.device.type != "cpu" or self.pack.engine != "native":
            return
        want = os.environ.get("KTPACK_TORCH_THREADS", "1")
        if not want.isdigit() or int(want) < 1:
            raise EngineError(f"KTPACK_TORCH_THREADS must be a positive integer, got {want!r}")
        torch.set_num_threads(int(want))
        if "KTPACK_SPIN_US" not in os.environ:
            # With torch on one core, the pool's idle threads may wait through the prefill's torch glue
            # between two native ops (0.3-0.6 ms) instead of sleeping: waking them cost more (prefill 512,
            # bench-Q4_K_M, 30 -> 1000 us: 621-684 -> 685-724 tok/s, alternating processes).
            from .. import kernels

            kernels.ensure_engine()
            kernels._native.set_spin_us(1000)

    @property
    def tokenizer(self) -> ChatTokenizer:
        if self._tok is None:
            self._tok = ChatTokenizer.from_folder(self.folder)
        return self._tok

    def check_ids(self, ids: Sequence[int], what: str = "prompt") -> None:
        if len(ids) == 0:
            raise EngineError(f"the {what} is empty")
        if len(ids) > self.ctx_size:
            raise EngineError(f"the {what} has {len(ids)} tokens, more than --ctx-size {self.ctx_size}")
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            top = self.config.vocab_size - 1
            raise EngineError(f"the {what} holds ids outside the vocabulary (0..{top}): {bad[:5]}")

    @torch.inference_mode()
    def _prefill(self, ids: Sequence[int], all_logits: bool) -> torch.Tensor:
        out = []
        t = torch.tensor(list(ids), dtype=torch.long)
        for s in range(0, len(ids), self.prefill_chunk):
            logits = self.model.forward(t[s : s + self.prefill_chunk], s, self.cache, last_only=not all_logits)
            out.append((logits if all_logits else logits[-1:]).cpu())
        return torch.cat(out) if all_logits else out[-1][-1]

    def score(self, ids: Sequence[int]) -> np.ndarray:
        """Float32 logits [n, vocab] of every position of `ids` (teacher-forced)."""
        self.check_ids(ids, "sequence")
        return self._prefill(ids, all_logits=True).float().numpy()

    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        max_new_tokens: int = 256,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        on_text: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Generation:
        self.check_ids(prompt_ids)
        if max_new_tokens < 0:
            raise EngineError(f"max new tokens must be >= 0, got {max_new_tokens}")
        sampler = Sampler(params or SamplingParams())
        gen = Generation(prompt_ids=list(prompt_ids))
        st = gen.stats
        st.prompt_tokens = len(prompt_ids)
        eos = None if ignore_eos else self._eos_id()
        decoder = StreamDecoder(self.tokenizer, skip={eos} if eos is not None else set()) if self._has_tok() else None
        history = torch.tensor(list(prompt_ids), dtype=torch.long)
        t0 = time.perf_counter()
        logits = self._prefill(prompt_ids, all_logits=False)
        st.prefill_s = time.perf_counter() - t0
        pos = len(prompt_ids)
        t1 = time.perf_counter()
        text_at_stop: str | None = None
        stops = [s for s in stop if s]
        emitted = 0  # characters of decoder.sent already passed to on_text

        def emit(upto: int) -> None:
            nonlocal emitted
            if upto > emitted and on_text:
                on_text(decoder.sent[emitted:upto])
            emitted = max(emitted, upto)

        # greedy with no penalty on the native CPU step: the step returns the argmax itself (no tensor work
        # between two steps; the interpreter's data is cold there, measured ~0.3 ms/token of Python)
        fast = sampler.greedy and hasattr(self._step, "greedy")
        next_tok: int | None = None
        while len(gen.output_ids) < max_new_tokens:
            tok = next_tok if next_tok is not None else sampler(logits, history)
            gen.output_ids.append(tok)
            if not fast:
                history = torch.cat([history, torch.tensor([tok])])
            if tok == eos:
                gen.finish_reason = "stop"
                break
            if decoder is not None:
                delta = decoder.push(tok)
                if delta:
                    cut = _stop_cut(decoder.sent, stops, len(decoder.sent) - len(delta))
                    if cut is not None:
                        emit(cut)
                        text_at_stop = decoder.sent[:cut]
                        gen.finish_reason = "stop"
                        break
                    # text that may be the start of a stop string waits for the next tokens
                    emit(len(decoder.sent) - _stop_prefix_len(decoder.sent, stops))
            if len(gen.output_ids) >= max_new_tokens or pos >= self.ctx_size or (should_stop and should_stop()):
                break
            next_tok = self._step.greedy(tok, pos) if fast else None
            if next_tok is None:
                logits = self._decode(tok, pos)
            pos += 1
        st.decode_s = time.perf_counter() - t1
        if hasattr(self._step, "profile"):
            st.decode_profile = self._step.profile(reset=True)
        st.generated_tokens = len(gen.output_ids)
        st.peak_rss_mb = peak_rss_mb()
        if decoder is not None:
            if text_at_stop is None:
                emit(len(decoder.sent))  # no stop string came: what was held back is text
            gen.text = decoder.sent if text_at_stop is None else text_at_stop
        return gen

    def _decode(self, tok: int, pos: int) -> torch.Tensor:
        """Logits [vocab] (CPU) of one token at `pos`: the GPU decode step, or the model's forward."""
        if self._step is not None:
            return self._step(tok, pos).reshape(-1, self.config.vocab_size)[-1].cpu().clone()
        return self.model.forward(torch.tensor([tok]), pos, self.cache)[-1]

    def _has_tok(self) -> bool:
        return (self.folder / "tokenizer.json").exists()

    def _eos_id(self) -> int | None:
        if self.config.eos_token_id is not None:
            return int(self.config.eos_token_id)
        return self.tokenizer.eos_id if self._has_tok() else None


def _stop_cut(text: str, stops: Sequence[str], new_from: int) -> int | None:
    """Index where the first stop string that ends in the new text starts, or None."""
    best = None
    for s in stops:
        if not s:
            continue
        i = text.find(s, max(0, new_from - len(s) + 1))
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that a stop string starts with (held back when streaming)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
