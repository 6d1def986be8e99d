"""The CPU decode step in one native call per token (kernels/include/decode.h).

The torch model (runtime/model.py) stays the definition and runs prefill; for decode on the CPU, where
every weight is already a native-engine operation (a `--target cpu` pack), the per-layer Python and
torch glue between those operations cost more than the weights themselves (profile of a 6-layer bench
model: ~13 ms of glue per token against ~7 ms in the kernels). `NativeDecode` hands the same weight
operations, norms, router tensors and the same KV cache memory to the engine, which runs the whole step
(MLA in its absorbed form over the latent cache, router, routed + shared experts, head) with fixed
buffers. Its logits equal the torch model's up to float summation order (tests/test_cpu_decode.py).

`build(model, cache)` returns None where the step cannot be taken natively (a weight without a native
kernel, a GPU-side model, the sensitivity flags of runtime/moe.py); the torch forward is used there.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .cpu_ops import NativeExperts, NativeLinear, NativeMLP
from .model import _MLP, KV_CACHE_TYPES, DeepseekV3Model, KVCache
from .moe import MoE, Routing

_METHODS = {"noaux_tc": 0, "group_limited_greedy": 1, "greedy": 2}
_SCORING = {"sigmoid": 0, "softmax": 1}
# the cache element types the native step reads, by the name its configuration takes (kt-run's names)
_KV_NAMES = {dtype: name for name, dtype in KV_CACHE_TYPES.items()}
ENV = "KTPACK_NATIVE_DECODE"  # 0: decode through the torch model


def _f32(t: torch.Tensor | None) -> np.ndarray | None:
    if t is None:
        return None
    return np.ascontiguousarray(t.detach().to(torch.float32).cpu().numpy())


def _lin(w: object) -> object:
    if not isinstance(w, NativeLinear):
        raise _NotNative(f"{getattr(w, 'name', type(w).__name__)} is not a native linear")
    return w._op


def _mlp(m: object) -> object:
    if isinstance(m, NativeMLP):
        return m._op
    raise _NotNative("an MLP is not one native call" if isinstance(m, _MLP) else f"FFN {type(m).__name__}")


class _NotNative(Exception):
    pass


class NativeDecode:
    """`step(tok, pos) -> logits [vocab]` (a torch view of a fixed buffer, overwritten by the next step)."""

    def __init__(self, model: DeepseekV3Model, cache: KVCache) -> None:
        from .. import kernels

        cfg = model.config
        self.model = model
        self.cache = cache
        layers = []
        for i, b in enumerate(model.blocks):
            a = b.attn
            d: dict[str, object] = {
                "attn_norm": _f32(b.attn_norm),
                "ffn_norm": _f32(b.ffn_norm),
                "q_a_norm": _f32(a.q_a_norm),
                "kv_a_norm": _f32(a.kv_a_norm),
                "q_a": None if a.q_a is None else _lin(a.q_a),
                "q_b": _lin(a.q_b),
                "kv_a": _lin(a.kv_a),
                "k_b": _lin(a.k_b),
                "v_b": _lin(a.v_b),
                "o": _lin(a.o),
                "mlp": None,
                "router_w": None,
                "router_b": None,
                "experts": None,
                "shared": None,
            }
            if isinstance(b.ffn, MoE):
                r = b.ffn.router
                if r.scoring not in _SCORING or r.method not in _METHODS:
                    raise _NotNative(f"router {r.scoring}/{r.method}")
                if not isinstance(b.ffn.experts, NativeExperts):
                    raise _NotNative(f"layer {i}'s routed experts are not native")
                d["router_w"] = _f32(r.weight)
                d["router_b"] = _f32(r.bias)
                d["experts"] = b.ffn.experts._op
                d["shared"] = None if b.ffn.shared is None else _mlp(b.ffn.shared)
            else:
                d["mlp"] = _mlp(b.ffn)
            layers.append(d)
        r0 = next((b.ffn.router for b in model.blocks if isinstance(b.ffn, MoE)), None)
        conf = {
            "layers": cfg.num_hidden_layers,
            "hidden": cfg.hidden_size,
            "heads": cfg.num_attention_heads,
            "q_lora": cfg.q_lora_rank or 0,
            "kv_lora": cfg.kv_lora_rank,
            "nope": cfg.qk_nope_head_dim,
            "rope": cfg.qk_rope_head_dim,
            "vdim": cfg.v_head_dim,
            "vocab": cfg.vocab_size,
            "ctx": cache.ctx_size,
            "eps": float(cfg.rms_norm_eps),
            "attn_scale": float(model.blocks[0].attn.scale),
            "n_experts": r0.n_experts if r0 else 0,
            "topk": r0.k if r0 else 0,
            "n_group": r0.n_group if r0 else 1,
            "topk_group": r0.topk_group if r0 else 1,
            "scoring": _SCORING[r0.scoring] if r0 else 0,
            "method": _METHODS[r0.method] if r0 else 2,
            "norm_topk": bool(r0.norm) if r0 else False,
            "routed_scale": float(r0.scale) if r0 else 1.0,
        }
        self._cos, self._sin = _f32(cache.rope.cos), _f32(cache.rope.sin)
        # the cache tensors themselves (the torch prefill writes them, the step reads and extends them);
        # numpy has no bfloat16: a bf16 cache goes as its bits (int16 views of the same memory)
        conf["kv_cache"] = _KV_NAMES[cache.c_kv.dtype]
        if cache.c_kv.dtype == torch.bfloat16:
            c_kv, k_pe = cache.c_kv.view(torch.int16).numpy(), cache.k_pe.view(torch.int16).numpy()
        else:
            c_kv, k_pe = cache.c_kv.numpy(), cache.k_pe.numpy()
        kernels.ensure_engine()
        self._op = kernels._native.Decode(
            conf, layers, _f32(model.norm), _lin(model.head), c_kv, k_pe, self._cos, self._sin
        )
        self.logits = torch.empty(cfg.vocab_size, dtype=torch.float32)
        self._logits_np = self.logits.numpy()
        self._embed = self._native_embedding()

    def _native_embedding(self) -> object | None:
        """The token embedding as a native matrix the step reads its row from (forward_token), or None
        (then the pack's Python lookup feeds `forward`). Between two steps the interpreter's own data
        has left the caches (the step streams the weights through them): the Python lookup cost ~0.5 ms
        per token there (measured, bench model) against ~0.15 ms warm."""
        from .. import kernels
        from ..layouts import ids as L

        pack, name = self.model.pack, "token_embd.weight"
        if not pack.has(name) or name in pack._dense:
            return None
        t = pack.entry(name)
        if t.layout != L.GGML_ROWS or len(t.pieces) != 1 or kernels.native_format(t.layout, t.params) is None:
            return None
        spec = kernels.weight_spec(t.layout, t.params, tuple(int(d) for d in t.shape), pack.piece_bytes(t.pieces[0]))
        lin = kernels.Linear(spec)
        return lin if self._op.set_embedding(lin) else None

    def __call__(self, tok: int, pos: int) -> torch.Tensor:
        if self._embed is not None:
            self._op.forward_token(int(tok), pos, self._logits_np)
            return self.logits
        x = self.model.pack.embedding(torch.tensor([tok])).reshape(-1).contiguous().numpy()
        self._op.forward(x, pos, self._logits_np)
        return self.logits

    def greedy(self, tok: int, pos: int) -> int | None:
        """The step, then its argmax computed natively (torch.argmax's choice: the first on ties), or None
        where the embedding is not native (the caller samples from `__call__`'s logits then)."""
        if self._embed is None:
            return None
        return int(self._op.greedy_token(int(tok), pos, self._logits_np))

    def profile(self, reset: bool = False) -> dict:
        """Seconds per phase of the steps since the last reset (and "steps"): where decode time goes."""
        return self._op.profile(reset)

    def route(self, layer: int, f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The native router of `layer` on hidden state `f` (tests)."""
        return self._op.route(layer, np.ascontiguousarray(f, dtype=np.float32))


def build(model: DeepseekV3Model, cache: KVCache) -> NativeDecode | None:
    """The native decode step for this CPU model and cache, or None where it does not apply."""
    if os.environ.get(ENV, "1") == "0":
        return None
    if model.device.type != "cpu" or cache.c_kv.dtype not in _KV_NAMES:
        return None
    if cache.k_pe.dtype != cache.c_kv.dtype or not model.rope_interleaved:
        return None
    if model.flags != Routing() or not cache.c_kv.is_contiguous() or not cache.k_pe.is_contiguous():
        return None
    try:
        return NativeDecode(model, cache)
    except _NotNative:
        return None
