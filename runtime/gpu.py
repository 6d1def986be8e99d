"""Put a DeepseekV3Model on a CUDA device: Marlin weights as packed, driven by the Marlin GEMM kernel.

`place_on_device(model, "cuda")` walks the model once:
- every marlin_int4_v1 weight (2-D, or a stack such as the per-head attn_k_b / attn_v_b) becomes a
  `MarlinLinear` over the pack's qweight / scales bytes, read from the pack's files and copied to the GPU as
  stored (no repacking); it casts its input to `act_dtype` (bf16 by default), runs
  `cuda_ops.marlin_gemm` and returns float32, so the rest of the model keeps its float32 arithmetic;
- every other GPU-side tensor (norms, router, bias, bf16/f32 linears, tensors derived at load) moves as it is;
- routed experts stay on the CPU behind `HostExperts`, which moves their inputs and output across (the eager
  path: prefill); the decode step (runtime/graph.py) reaches the same CPU experts through the doorbell.
The embedding stays on the CPU (DeepseekV3Model.forward looks tokens up there and moves the rows).

A pack converted with --target cpu holds CPU linears, which have no GPU path: refused with the tensor's name.

Memory (`place_for_run`, what Engine/kt-run call on a GPU). A run's GPU memory is the weights, the static MLA
cache and the activations; all three are known before anything is allocated, so a run that cannot fit is
refused with one line of numbers instead of a CUDA out-of-memory error halfway through loading or prefill:
- weights: `device_bytes(model)`, exactly what `place_on_device` will allocate (Marlin tensors as stored, other
  tensors as float32; the manifest records the pack's GPU-side bytes as stored, which differs where bf16
  tensors are held as float32 and the embedding stays on the CPU). Checked against the free memory measured
  with `torch.cuda.mem_get_info` at start (and kt-run's --gpu-mem limit) before the weights are placed;
- KV cache: measured again after placing, the free memory (or what is left of --gpu-mem) sizes the context
  with `size_kv_cache`, a pure function: per position, layers x (kv_lora + rope) x 4 bytes of float32 cache
  plus the RoPE row, plus the prefill attention workspace, which also grows with the context because the
  static-cache forward attends over every position: ATTN_LIVE float32 [chunk, heads, ctx] tensors. A
  requested --ctx-size that does not fit is refused with the largest that does; --ctx-size 0 takes the largest
  (capped at the model's max_position_embeddings);
- reserve (`activation_reserve`): RESERVE_FIXED for the CUDA graph's pool, the decode step's buffers, cuBLAS
  and split-K workspaces and allocator slack, plus the prefill chunk's activations that do not grow with the
  context (logits [chunk, vocab], q/q_abs/lat per head, MLP intermediates, hidden-sized temporaries).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..layouts import ids as L
from ..layouts.config import ModelConfig
from ..layouts.manifest import Piece, TensorEntry
from . import cuda_ops
from .cpu_ops import CpuLinear
from .model import DeepseekV3Model
from .moe import MoE
from .weights import Pack

GIB = 1 << 30
KV_DTYPE_BYTES = 4  # KVCache's dtype (model.new_cache: float32)
ATTN_LIVE = 4  # [chunk, heads, ctx] float32 tensors alive at a prefill chunk's softmax: 3, + 1 for the allocator
RESERVE_FIXED = 768 << 20  # graph pool, decode-step buffers, cuBLAS / split-K workspaces, allocator slack


class MarlinLinear:
    """`y = x · Wᵀ` for a marlin_int4_v1 weight `W[..., N, K]` held on the GPU as packed."""

    def __init__(
        self, name: str, qweight: torch.Tensor, scales: torch.Tensor, shape: tuple[int, ...], group_size: int,
        act_dtype: torch.dtype = torch.bfloat16,
    ) -> None:  # fmt: skip
        self.name = name
        self.qweight = qweight
        self.scales = scales
        self.shape = shape
        self.group_size = group_size
        self.act_dtype = act_dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = cuda_ops.marlin_gemm(x.to(self.act_dtype), self.qweight, self.scales, self.group_size)
        return y.float()


class HostExperts:
    """A layer's CPU routed experts called with device tensors: inputs to the CPU, the output back."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __call__(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        out = self.inner(x.float().cpu(), topk_idx.cpu(), topk_w.float().cpu())
        return out.to(x.device)


def _read(pack: Pack, p: Piece) -> np.ndarray:
    with open(pack.folder / p.file, "rb") as f:
        f.seek(p.offset)
        buf = f.read(p.nbytes)
    if len(buf) != p.nbytes:
        raise OSError(f"{pack.folder / p.file}: short read of {p.key or p.part}")
    return np.frombuffer(buf, np.uint8)


def marlin_linear(pack: Pack, name: str, device: torch.device, act_dtype: torch.dtype) -> MarlinLinear:
    """The pack's marlin_int4_v1 tensor `name` on `device`, as stored (layouts/SPEC.md)."""
    t = pack.entry(name)
    shape = tuple(int(d) for d in t.shape)
    *lead, n, k = shape
    group = int(t.params["group_size"])
    gk = k if group == -1 else group
    parts = {p.part: p for p in t.pieces}
    qw = _read(pack, parts["qweight"]).view(np.int32).reshape(*lead, k // 16, 2 * n)
    sc = _read(pack, parts["scales"]).view(np.float16).reshape(*lead, k // gk, n)
    qweight = torch.from_numpy(qw.copy()).to(device)
    scales = torch.from_numpy(sc.copy()).to(device)
    return MarlinLinear(name, qweight, scales, shape, group, act_dtype)


def _marlin_entries(pack: Pack) -> dict[int, TensorEntry]:
    """The GPU-side marlin_int4_v1 entries, keyed by the id of the dense tensor the model holds for them."""
    out: dict[int, TensorEntry] = {}
    for name, t in pack.entries.items():
        if name.endswith(".attn_kv_b.weight"):
            continue  # split at load into dense attn_k_b / attn_v_b (weights.py), which move as tensors
        if t.layout == L.MARLIN_INT4 and t.placement != "cpu":
            out[id(pack.linear(name))] = t
    return out


def _device_tensors(model: DeepseekV3Model) -> Iterator[tuple[object, str, torch.Tensor]]:
    """Every (owner, attribute, tensor) that goes to the device; raises on a CPU linear (a --target cpu pack)."""

    def attrs(obj: object, skip: tuple[str, ...] = ()) -> Iterator[tuple[object, str, torch.Tensor]]:
        for key, v in list(vars(obj).items()):
            if key in skip:
                continue
            if isinstance(v, torch.Tensor):
                yield obj, key, v
            elif isinstance(v, CpuLinear):
                raise ValueError(
                    f"{v.name} is a CPU linear ({v.entry.layout}): the GPU path needs a pack converted with "
                    "--target gpu"
                )

    yield from attrs(model)
    for block in model.blocks:
        yield from attrs(block, skip=("attn", "ffn"))
        yield from attrs(block.attn, skip=("model",))
        ffn = block.ffn
        if isinstance(ffn, MoE):
            yield from attrs(ffn.router)
            if ffn.shared is not None:
                yield from attrs(ffn.shared)
        else:
            yield from attrs(ffn)


def device_bytes(model: DeepseekV3Model) -> int:
    """Bytes `place_on_device` allocates on the device for `model`'s weights (each tensor once)."""
    marlin = _marlin_entries(model.pack)
    seen: set[int] = set()
    total = 0
    for _, _, v in _device_tensors(model):
        if id(v) in seen:
            continue
        seen.add(id(v))
        total += marlin[id(v)].nbytes() if id(v) in marlin else v.numel() * v.element_size()
    return total


def recorded_gpu_bytes(pack: Pack) -> int:
    """The pack's GPU-side bytes as the manifest records them (stored sizes)."""
    return sum(t.nbytes() for t in pack.manifest.tensors if t.placement == "gpu")


def place_on_device(
    model: DeepseekV3Model, device: torch.device | str = "cuda", act_dtype: torch.dtype = torch.bfloat16
) -> DeepseekV3Model:
    """Move `model` to `device` in place (see the module docstring); returns it."""
    device = torch.device(device)
    if device.type == "cuda":
        cuda_ops.load()  # a clear error now rather than at the first GEMM
        if device.index is None:  # "cuda" -> "cuda:N", the device its tensors (and caches) report
            device = torch.device("cuda", torch.cuda.current_device())
    pack = model.pack
    marlin = _marlin_entries(pack)
    moves = list(_device_tensors(model))  # all checked before anything is allocated
    moved: dict[int, MarlinLinear | torch.Tensor] = {}  # a tensor held twice goes once
    for obj, key, v in moves:
        if id(v) not in moved:
            t = marlin.get(id(v))
            moved[id(v)] = marlin_linear(pack, t.name, device, act_dtype) if t is not None else v.to(device)
        setattr(obj, key, moved[id(v)])
    for block in model.blocks:
        if isinstance(block.ffn, MoE):
            block.ffn.experts = HostExperts(block.ffn.experts)
    model.device = device
    return model


# ------------------------------------------------------------------------------------------------ memory


class GpuMemoryError(ValueError):
    """The weights or the KV cache do not fit the GPU memory; the message is one line with the numbers."""


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def kv_cache_bytes_per_position(cfg: ModelConfig, dtype_bytes: int = KV_DTYPE_BYTES) -> int:
    """Device bytes of one KVCache position: c_kv and k_pe of every layer, the RoPE cos/sin row, the position."""
    cache = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype_bytes
    return cache + cfg.qk_rope_head_dim * 4 + 8


def prefill_bytes_per_position(cfg: ModelConfig, prefill_chunk: int) -> int:
    """Prefill attention workspace per cache position: ATTN_LIVE float32 scores [chunk, heads, ctx]."""
    return ATTN_LIVE * prefill_chunk * cfg.num_attention_heads * 4


def activation_reserve(cfg: ModelConfig, prefill_chunk: int) -> int:
    """GPU bytes kept for everything but the weights, the cache and the attention scores (module docstring)."""
    h = cfg.num_attention_heads
    ffn = max(cfg.intermediate_size, cfg.moe_intermediate_size * max(1, cfg.n_shared_experts or 0))
    per_token = 4 * (
        cfg.vocab_size  # logits
        + 2 * h * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)  # q and its rotated part
        + 3 * h * cfg.kv_lora_rank  # q_abs, lat and a temporary
        + h * cfg.v_head_dim  # o
        + 3 * ffn  # gate, up, their product
        + 8 * cfg.hidden_size  # residual stream, norms, outputs, bf16 copies
    )
    return RESERVE_FIXED + prefill_chunk * per_token


@dataclass(frozen=True)
class KvSizing:
    """The context `size_kv_cache` chose, and the figures it chose it from (bytes)."""

    ctx_size: int
    max_ctx: int  # the largest context that fits (before the max_position_embeddings cap)
    available: int  # free GPU memory for the cache, the prefill workspace and the reserve
    reserve: int
    cache_per_position: int
    prefill_per_position: int
    prefill_chunk: int

    @property
    def per_position(self) -> int:
        return self.cache_per_position + self.prefill_per_position

    @property
    def cache_bytes(self) -> int:
        return self.ctx_size * self.cache_per_position

    @property
    def prefill_bytes(self) -> int:
        return self.ctx_size * self.prefill_per_position


def size_kv_cache(
    available: int, cfg: ModelConfig, ctx_size: int, prefill_chunk: int, dtype_bytes: int = KV_DTYPE_BYTES
) -> KvSizing:
    """The context for a run with `available` bytes of GPU memory left after the weights.

    `ctx_size` > 0 is checked (GpuMemoryError naming the largest that fits when it does not); 0 asks for the
    largest that fits, at most cfg.max_position_embeddings. A pure function of its arguments."""
    if ctx_size < 0:
        raise ValueError(f"--ctx-size must be >= 0 on a GPU (0: the largest that fits), got {ctx_size}")
    if prefill_chunk < 1:
        raise ValueError(f"--prefill-chunk must be >= 1, got {prefill_chunk}")
    chunk = prefill_chunk if ctx_size == 0 else min(prefill_chunk, ctx_size)  # a prompt is at most ctx tokens
    cache_pp = kv_cache_bytes_per_position(cfg, dtype_bytes)
    prefill_pp = prefill_bytes_per_position(cfg, chunk)
    reserve = activation_reserve(cfg, chunk)
    per = cache_pp + prefill_pp
    max_ctx = max(0, (available - reserve) // per)
    what = (
        f"{_gib(available)} left after the weights, less {_gib(reserve)} kept for activations and the CUDA graph, "
        f"leaves room for {max_ctx:,} positions of {per:,} B (KV cache {cfg.num_hidden_layers} layers x "
        f"({cfg.kv_lora_rank} + {cfg.qk_rope_head_dim}) x {dtype_bytes} B + RoPE row = {cache_pp:,} B; prefill "
        f"attention {ATTN_LIVE} x {chunk} tokens x {cfg.num_attention_heads} heads x 4 B = {prefill_pp:,} B)"
    )
    if ctx_size == 0:
        ctx = min(max_ctx, cfg.max_position_embeddings)
        if ctx < 1:
            raise GpuMemoryError(f"no room for a KV cache on the GPU: {what}")
    elif ctx_size > max_ctx:
        hint = f"use --ctx-size {max_ctx} or less (0: the most that fits)" if max_ctx else "free GPU memory"
        raise GpuMemoryError(
            f"--ctx-size {ctx_size:,} does not fit the GPU: {what}; {hint}, or a smaller --prefill-chunk"
        )
    else:
        ctx = ctx_size
    return KvSizing(ctx, max_ctx, available, reserve, cache_pp, prefill_pp, chunk)


@dataclass(frozen=True)
class GpuBudget:
    """What `place_for_run` measured and decided (bytes)."""

    device: str
    total: int  # the device's memory
    free_at_start: int  # mem_get_info before the weights
    free_after_weights: int
    weights: int  # device_bytes(model)
    recorded: int  # the manifest's GPU-side bytes
    limit: int | None  # kt-run --gpu-mem
    kv: KvSizing

    def line(self) -> str:
        kv = self.kv
        cap = f", --gpu-mem {_gib(self.limit)}" if self.limit is not None else ""
        return (
            f"{self.device}: weights {_gib(self.weights)}, KV cache {kv.ctx_size:,} positions {_gib(kv.cache_bytes)} "
            f"(+ prefill attention {_gib(kv.prefill_bytes)}, reserve {_gib(kv.reserve)}); {_gib(self.free_at_start)} "
            f"free of {_gib(self.total)} at start{cap}; the most that fits: --ctx-size {kv.max_ctx:,}"
        )

    def as_dict(self) -> dict:
        return asdict(self) | {"kv_cache_bytes": self.kv.cache_bytes, "prefill_attention_bytes": self.kv.prefill_bytes}


def place_for_run(
    model: DeepseekV3Model,
    device: torch.device | str,
    ctx_size: int,
    prefill_chunk: int,
    gpu_mem: float | None = None,
    mem_info: Callable[[], tuple[int, int]] | None = None,
    act_dtype: torch.dtype = torch.bfloat16,
) -> GpuBudget:
    """Check that `model`'s weights fit, place them (`place_on_device`), size the KV cache from the memory left.

    `gpu_mem`: the most GiB of GPU memory the run may take (weights, cache and reserve), on top of what is free.
    `mem_info`: () -> (free, total) bytes, torch.cuda.mem_get_info(device) by default (tests pass their own).
    Raises GpuMemoryError (one line with the numbers) before placing anything when the weights, or the
    requested context with them, cannot fit; the returned budget's `kv.ctx_size` is the context to allocate."""
    device = torch.device(device)
    if gpu_mem is not None and gpu_mem <= 0:
        raise ValueError(f"--gpu-mem must be > 0 GiB, got {gpu_mem:g}")
    if device.type == "cuda":
        cuda_ops.load()  # builds the kernels and creates the CUDA context: both take memory before we measure
    if mem_info is None:

        def mem_info() -> tuple[int, int]:
            return torch.cuda.mem_get_info(device)

    cfg = model.config
    free0, total = (int(v) for v in mem_info())
    limit = None if gpu_mem is None else int(gpu_mem * GIB)
    cap = free0 if limit is None else min(free0, limit)
    weights = device_bytes(model)  # raises for a --target cpu pack
    recorded = recorded_gpu_bytes(model.pack)
    chunk = prefill_chunk if ctx_size == 0 else min(prefill_chunk, max(ctx_size, 1))
    reserve = activation_reserve(cfg, chunk)
    if weights + reserve > cap:
        planned = model.pack.manifest.options.get("gpu_mem")
        planned = f", planned for kt-convert --gpu-mem {planned:g} GiB" if planned else ""
        binding = (
            f"kt-run --gpu-mem is {gpu_mem:g} GiB"
            if limit is not None and limit < free0
            else f"{device} has {_gib(free0)} free of {_gib(total)}"
        )
        raise GpuMemoryError(
            f"the pack's GPU side does not fit: its weights take {_gib(weights)} on the device (the manifest "
            f"records {_gib(recorded)} as stored{planned}) and {_gib(reserve)} is kept for activations and the "
            f"CUDA graph, {_gib(weights + reserve)} before any KV cache, but {binding}"
        )
    size_kv_cache(cap - weights, cfg, ctx_size, prefill_chunk)  # the requested context, checked before placing
    place_on_device(model, device, act_dtype)
    free1 = int(mem_info()[0])
    used = max(free0 - free1, 0)  # the weights as allocated (rounding included)
    available = free1 if limit is None else min(free1, limit - used)
    kv = size_kv_cache(available, cfg, ctx_size, prefill_chunk)
    return GpuBudget(str(device), total, free0, free1, weights, recorded, limit, kv)
