"""DeepSeek-V3 forward in torch (float32, CPU), as transformers' `DeepseekV3ForCausalLM` computes it.

One code path for prefill (T > 1) and decode (T = 1):

    h = x + Attn(RMSNorm_in(x));  y = h + FFN(RMSNorm_post(h))
    FFN = dense MLP for layers < first_k_dense_replace, else MoE (router, routed experts, shared)

Attention is MLA in the ABSORBED form (formats.md §5.2). The cache holds, per layer and
position, `c` (kv_lora_rank, after kv_a_layernorm) and `k_pe` (rope dim, after RoPE):

    q        = q_b(RMSNorm(q_a(x)))  (or attn_q(x) without q_lora)  -> [T, H, nope + rope]
    c, k_pe  = kv_a_mqa(x);  c = RMSNorm(c);  q_pe, k_pe = RoPE(q_pe), RoPE(k_pe)
    q_abs[h] = k_b[h] @ q_nope[h]                                     [T, H, kv_lora]
    score    = (q_abs · c_t + q_pe · k_pe_t) * scale,  causal, softmax over t (f32)
    lat[h]   = Σ_t p[h, t] c_t;   o[h] = v_b[h] @ lat[h];   out = o_proj(concat_h o[h])

`scale` is qk_head_dim^-0.5 · mscale², never based on kv_lora (rope.py).

Shapes on the hot path depend only on T and the attention window: with `static_kv=True` the
window is the whole cache (positions past the query are masked), so a decode step has fixed
shapes and no Python control flow besides the MoE expert dispatch; `forward_hidden` takes the
positions as a tensor, which is what runtime/graph.py's decode step (one CUDA Graph) replays.
By default the window is 0..start_pos+T-1, which is cheaper on the CPU and gives the same values.
The model runs on `self.device` (CPU unless runtime/gpu.py placed it); token embeddings are
always looked up on the CPU.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..layouts.config import ModelConfig
from .cpu_ops import CpuLinear, prefill_probs_bf16, prefill_values, stacked_as_one
from .moe import MoE, Router, Routing
from .rope import RopeTable, softmax_scale
from .weights import Pack, ask_huge_pages

Weight = CpuLinear | torch.Tensor


# Query tokens per attention block in a prefill, and the queries from which prefill applies v_b to the
# cache rows (see _Attention).
PREFILL_Q_BLOCK = 64
VALUES_FROM_ROWS_MIN = 32


def linear(w: Weight, x: torch.Tensor) -> torch.Tensor:
    """`x Wᵀ` for `W[N, K]`; for a stacked `W[M, N, K]`, `x[T, M, K] -> [T, M, N]` per matrix."""
    if isinstance(w, torch.Tensor):
        if w.dim() == 2:
            return F.linear(x, w)
        return torch.einsum("tmk,mnk->tmn", x, w)
    return w(x)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


HUGE_PAGE = 2 << 20


def zeros_huge(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of zeros in private anonymous memory, 2 MiB-aligned, that the kernel is asked to back
    with 2 MiB pages (MADV_HUGEPAGE; Linux with transparent huge pages in `madvise` or `always` mode).
    The KV cache lives here: a decode step reads every layer's cache rows right after streaming ~30 MB of
    weights, which evict the 4 KiB pages' TLB entries; measured on bench-Q4_K_M at 512 positions, the
    decode step's attention 1.06 -> 0.99 ms per token. Elsewhere (or below 2 MiB) plain torch.zeros."""
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(shape, dtype=dtype)
    m = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    ask_huge_pages(m)  # refused: 4 KiB pages, the same zeros
    base = torch.frombuffer(m, dtype=torch.uint8)  # holds the mapping; unmapped with the last view
    off = (-base.data_ptr()) % HUGE_PAGE
    return base[off : off + nbytes].view(dtype).view(shape)


# kt-run --kv-cache: the CPU KV cache's element types by name (the GPU path keeps its own)
KV_CACHE_TYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


class KVCache:
    """Static MLA cache for `ctx_size` positions, allocated once.

    c_kv [layers, ctx, kv_lora] (after kv_a_layernorm), k_pe [layers, ctx, rope] (after RoPE, in
    adjacent-pair order), and the RoPE cos/sin table for the same positions.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        ctx_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if ctx_size < 1:
            raise ValueError(f"ctx_size must be >= 1, got {ctx_size}")
        self.ctx_size = ctx_size
        n = cfg.num_hidden_layers
        if device is None or torch.device(device).type == "cpu":
            self.c_kv = zeros_huge((n, ctx_size, cfg.kv_lora_rank), dtype)
            self.k_pe = zeros_huge((n, ctx_size, cfg.qk_rope_head_dim), dtype)
        else:
            self.c_kv = torch.zeros(n, ctx_size, cfg.kv_lora_rank, dtype=dtype, device=device)
            self.k_pe = torch.zeros(n, ctx_size, cfg.qk_rope_head_dim, dtype=dtype, device=device)
        self.rope = RopeTable(cfg, ctx_size)
        self.positions = torch.arange(ctx_size, device=device)
        if device is not None:
            self.rope.cos, self.rope.sin = self.rope.cos.to(device), self.rope.sin.to(device)

    def reset(self) -> None:
        self.c_kv.zero_()
        self.k_pe.zero_()


class _Attention:
    def __init__(self, pack: Pack, layer: int, model: DeepseekV3Model) -> None:
        cfg = pack.config
        p = f"blk.{layer}."
        self.layer = layer
        self.model = model
        self.eps = cfg.rms_norm_eps
        self.h = cfg.num_attention_heads
        self.nope, self.rope_dim, self.v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora = cfg.kv_lora_rank
        if cfg.q_lora_rank is not None:
            self.q_a: Weight | None = pack.linear(p + "attn_q_a.weight")
            self.q_a_norm: torch.Tensor | None = pack.dense(p + "attn_q_a_norm.weight")
            self.q_b = pack.linear(p + "attn_q_b.weight")
        else:
            self.q_a, self.q_a_norm = None, None
            self.q_b = pack.linear(p + "attn_q.weight")
        self.kv_a = pack.linear(p + "attn_kv_a_mqa.weight")
        self.kv_a_norm = pack.dense(p + "attn_kv_a_norm.weight")
        self.k_b = pack.linear(p + "attn_k_b.weight")  # [H, kv_lora, nope]
        self.v_b = pack.linear(p + "attn_v_b.weight")  # [H, v, kv_lora]
        self.v_rows = stacked_as_one(self.v_b)  # [H*v, kv_lora] over the same bytes, or None
        self.o = pack.linear(p + "attn_output.weight")
        self.scale = softmax_scale(cfg)

    def __call__(self, x: torch.Tensor, pos: torch.Tensor, kv_len: int, cache: KVCache) -> torch.Tensor:
        t = x.shape[0]
        if self.q_a is not None:
            q = linear(self.q_b, rms_norm(linear(self.q_a, x), self.q_a_norm, self.eps))
        else:
            q = linear(self.q_b, x)
        q = q.view(t, self.h, self.nope + self.rope_dim)
        q_nope, q_pe = q[..., : self.nope], q[..., self.nope :]
        kv = linear(self.kv_a, x)
        c, k_pe = kv[:, : self.kv_lora], kv[:, self.kv_lora :]
        c = rms_norm(c, self.kv_a_norm, self.eps)
        inter = self.model.rope_interleaved
        q_pe = cache.rope.apply(q_pe, pos, inter)
        k_pe = cache.rope.apply(k_pe, pos, inter)
        cache.c_kv[self.layer].index_copy_(0, pos, c.to(cache.c_kv.dtype))
        cache.k_pe[self.layer].index_copy_(0, pos, k_pe.to(cache.k_pe.dtype))
        ck = cache.c_kv[self.layer, :kv_len].float()  # [n, kv_lora]
        kp = cache.k_pe[self.layer, :kv_len].float()  # [n, rope]
        q_abs = linear(self.k_b, q_nope.contiguous())  # [T, H, kv_lora]
        # Causal: a block of query tokens only reads the cache rows up to its last position (slot i holds
        # position i), which halves a long prompt's attention work; blocks also bound the score memory.
        # (A single block, e.g. a decode step, reads all kv_len rows: no host sync, CUDA-graph safe.)
        # Values: for a long block of queries, v_b applied once to every cached latent row (v [n, H, v]) and
        # the probabilities summed over 128-wide v rows, instead of over 512-wide latent rows and v_b applied
        # per query (same product, regrouped; ~4x fewer attention multiply-adds, measured -6% of a prefill).
        v = None
        native = ck.device.type == "cpu" and self.model.pack.engine == "native"
        if self.v_rows is not None and t >= VALUES_FROM_ROWS_MIN:
            v = linear(self.v_rows, ck).view(-1, self.h, self.v)
            out = q_abs.new_empty(t, self.h, self.v, dtype=torch.float32)
        else:
            out = q_abs.new_empty(t, self.h, self.kv_lora, dtype=torch.float32)
        blocks = t > PREFILL_Q_BLOCK
        if blocks:
            # Several blocks (a prefill): scores as two 2-D products into one buffer (latent, then rope part
            # accumulated, the softmax scale as their alpha), and the causal mask added only where it can
            # bite: keys from the block's first position on (earlier ones are visible to all its queries).
            qa, qp = q_abs.reshape(t * self.h, self.kv_lora).float(), q_pe.reshape(t * self.h, self.rope_dim).float()
            buf = qa.new_empty(PREFILL_Q_BLOCK * self.h * kv_len)
            # A bf16 cache on the native engine: the scores by the decode step's kernels (bf16 products, f32
            # sums; 1024 heads x 512 rows, 2 threads: 167 GMAC/s vs torch's f32 GEMM 95; q rounded to bf16 as
            # in every later decode step).
            native16 = native and cache.c_kv.dtype == torch.bfloat16
        for s in range(0, t, PREFILL_Q_BLOCK):
            e = min(t, s + PREFILL_Q_BLOCK)
            n = kv_len if not blocks else min(kv_len, int(pos[e - 1]) + 1)  # positions ascend
            if blocks:
                n0 = min(n, int(pos[s]))
                sc = buf[: (e - s) * self.h * n].view((e - s) * self.h, n)
                if native16 and int(pos[e - 1]) - int(pos[s]) == e - s - 1:
                    # scores, causal mask and softmax in one native pass (hidden rows not even scored); it
                    # takes the block's positions as pos[s], pos[s] + 1, ... (what forward passes)
                    c16, k16 = cache.c_kv[self.layer, :n], cache.k_pe[self.layer, :n]
                    rows = slice(s * self.h, e * self.h)
                    prefill_probs_bf16(qa[rows], qp[rows], c16, k16, self.scale, self.h, int(pos[s]), sc)
                    probs = sc.view(e - s, self.h, n)
                else:
                    torch.addmm(sc, qa[s * self.h : e * self.h], ck[:n].t(), beta=0, alpha=self.scale, out=sc)
                    sc = sc.addmm_(qp[s * self.h : e * self.h], kp[:n].t(), alpha=self.scale).view(e - s, self.h, n)
                    diag = torch.where(cache.positions[None, n0:n] <= pos[s:e, None], 0.0, float("-inf"))
                    sc[..., n0:n] += diag[:, None, :]
                    probs = torch.softmax(sc, dim=-1)
            else:
                sc = torch.einsum("thc,nc->thn", q_abs[s:e], ck[:n]) + torch.einsum("thr,nr->thn", q_pe[s:e], kp[:n])
                mask = torch.where(cache.positions[None, :n] <= pos[s:e, None], 0.0, float("-inf"))
                probs = torch.softmax(sc * self.scale + mask[:, None, :], dim=-1, dtype=torch.float32)
            if v is not None and native:
                prefill_values(probs, v[:n], out[s:e])
            elif v is not None:
                out[s:e] = torch.einsum("thn,nhv->thv", probs, v[:n])
            else:
                out[s:e] = torch.einsum("thn,nc->thc", probs, ck[:n])
        o = out if v is not None else linear(self.v_b, out)  # [T, H, v]
        return linear(self.o, o.reshape(t, self.h * self.v))


class _MLP:
    def __init__(self, gate: Weight, up: Weight, down: Weight) -> None:
        self.gate, self.up, self.down = gate, up, down

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.down, F.silu(linear(self.gate, x)) * linear(self.up, x))


def _mlp(gate: Weight, up: Weight, down: Weight) -> Callable[[torch.Tensor], torch.Tensor]:
    """One native call when the engine runs all three weights (and takes them together), else `_MLP`."""
    from .cpu_ops import NativeLinear, NativeMLP

    if all(isinstance(w, NativeLinear) and len(w.shape) == 2 for w in (gate, up, down)):
        try:
            return NativeMLP(gate, up, down)
        except ValueError:
            pass
    return _MLP(gate, up, down)


class _Block:
    def __init__(self, pack: Pack, layer: int, model: DeepseekV3Model) -> None:
        cfg = pack.config
        p = f"blk.{layer}."
        self.eps = cfg.rms_norm_eps
        self.attn_norm = pack.dense(p + "attn_norm.weight")
        self.ffn_norm = pack.dense(p + "ffn_norm.weight")
        self.attn = _Attention(pack, layer, model)
        self.ffn: Callable[[torch.Tensor], torch.Tensor]
        if cfg.is_moe_layer(layer):
            bias_name = p + "exp_probs_b.bias"
            bias = pack.dense(bias_name) if pack.has(bias_name) else None
            router = Router(cfg, pack.dense(p + "ffn_gate_inp.weight"), bias, model.flags)
            shared = None
            if cfg.n_shared_experts and pack.has(p + "ffn_gate_shexp.weight"):
                shared = _mlp(*(pack.linear(p + f"ffn_{n}_shexp.weight") for n in ("gate", "up", "down")))
            self.ffn = MoE(router, pack.experts(layer), shared, model.flags)
        else:
            self.ffn = _mlp(*(pack.linear(p + f"ffn_{n}.weight") for n in ("gate", "up", "down")))

    def __call__(self, x: torch.Tensor, pos: torch.Tensor, kv_len: int, cache: KVCache) -> torch.Tensor:
        h = x + self.attn(rms_norm(x, self.attn_norm, self.eps), pos, kv_len, cache)
        return h + self.ffn(rms_norm(h, self.ffn_norm, self.eps))


class DeepseekV3Model:
    """The whole model over a `Pack`. `forward(ids[T], start_pos, cache) -> logits [T, vocab]`.

    `flags` (a `moe.Routing`) and `rope_interleaved` deliberately break DeepSeek details for the
    sensitivity tests; leave them at their defaults.
    """

    def __init__(self, pack: Pack, static_kv: bool = False) -> None:
        self.pack = pack
        self.config = cfg = pack.config
        self.static_kv = static_kv
        self.device = torch.device("cpu")  # runtime/gpu.py's place_on_device changes it
        self.flags = Routing()
        self.rope_interleaved = True
        self.blocks = [_Block(pack, i, self) for i in range(cfg.num_hidden_layers)]
        self.norm = pack.dense("output_norm.weight")
        self.head: Weight = (
            pack.linear("output.weight") if pack.has("output.weight") else pack.dense("token_embd.weight")
        )

    def new_cache(self, ctx_size: int, dtype: torch.dtype = torch.float32) -> KVCache:
        return KVCache(self.config, ctx_size, dtype=dtype, device=self.device)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, start_pos: int, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """Logits [T, vocab] (f32) for `ids` at positions start_pos..start_pos+T-1, which are
        written into `cache`; attention is causal over positions 0..start_pos+T-1. With `last_only`,
        only the last position's logits [1, vocab] (the output head is the largest single matrix:
        prefill for generation needs one row of it, not T)."""
        ids = ids.reshape(-1)
        t = ids.shape[0]
        end = start_pos + t
        if start_pos < 0 or end > cache.ctx_size:
            raise ValueError(f"positions {start_pos}..{end - 1} do not fit the cache of {cache.ctx_size}")
        pos = cache.positions[start_pos:end]
        kv_len = cache.ctx_size if self.static_kv else end
        x = self.pack.embedding(ids.cpu()).to(self.device)
        return self.forward_hidden(x, pos, kv_len, cache, last_only)

    def forward_hidden(
        self, x: torch.Tensor, pos: torch.Tensor, kv_len: int, cache: KVCache, last_only: bool = False
    ) -> torch.Tensor:
        """Logits [T, vocab] (or [1, vocab] with `last_only`) for embedded tokens `x` [T, hidden] at
        positions `pos` [T] (a tensor on the model's device), attending over cache positions 0..kv_len-1
        (later ones masked). No bounds checks and no host synchronisation on a GPU (the decode step
        captures this)."""
        for b in self.blocks:
            x = b(x, pos, kv_len, cache)
        if last_only:
            x = x[-1:]
        return linear(self.head, rms_norm(x, self.norm, self.config.rms_norm_eps))

    __call__ = forward
