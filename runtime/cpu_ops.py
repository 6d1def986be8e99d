"""The CPU side of the runtime: linears and routed experts computed from packed bytes.

This module is the interface the native engine plugs into. Both classes take their weights as
the manifest entry plus the memory-mapped bytes of its pieces, and expose one call:

- `CpuLinear(x[T, K]) -> [T, N]` (3-D weights: `x[T, H, K] -> [T, H, N]`, one matrix per head);
- `CpuExperts(x[T, H], topk_idx[T, k], topk_w[T, k]) -> [T, H]`, the weighted sum of the selected
  experts, computed per NUMA slice and summed.

Two implementations share these signatures:

- the *reference* (`CpuLinear`, `CpuExperts`): dequantize the packed bytes with the layout modules
  (`layouts.ggml`, `layouts.amx`, `layouts.plain`) at every call, f32 torch arithmetic, nothing kept
  beyond the call — the oracle;
- the *native engine* (`NativeLinear`, `NativeExperts`, ktpack.kernels): kernels over the packed
  bytes as they lie in the memory map, int8-quantized activations for the integer formats, a
  persistent thread pool. `make_linear` / `make_experts` pick it by default wherever it has a kernel
  for the layout; `KTPACK_ENGINE=ref` (or `engine="ref"`) forces the reference.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..layouts import amx, ggml, ggml_lanes, plain
from ..layouts import ids as L
from ..layouts.manifest import TensorEntry

_AMX_KIND = {L.AMX_BF16: "bf16", L.AMX_INT8: "int8", L.AMX_INT4: "int4"}


def _n_matrices(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape[:-2]:
        n *= d
    return n


def dequant_matrix(
    entry: TensorEntry, piece_bytes: np.ndarray, shape: tuple[int, ...] | list[int], index: int | None = None
) -> np.ndarray:
    """Float32 values of one matrix of a packed single-part piece.

    `piece_bytes` holds a piece of logical shape `shape` (`[..., N, K]`, the piece's own shape: a
    NUMA slice has its slice shape). With `index` = None the whole piece is returned in `shape`;
    otherwise matrix `index` (leading axes flattened in C order) as `[N, K]`. Every CPU layout
    stores the matrices of a stack one after another in equal byte counts, so matrix `i` is bytes
    `i * m .. (i + 1) * m` with `m = nbytes // n_matrices`.
    """
    shape = tuple(int(d) for d in shape)
    if index is not None:
        if len(shape) < 3:
            raise ValueError(f"{entry.name}: matrix index {index} of a {len(shape)}-D tensor")
        n_mat = _n_matrices(shape)
        if not 0 <= index < n_mat:
            raise IndexError(f"{entry.name}: matrix {index} of {n_mat}")
        per = piece_bytes.size // n_mat
        piece_bytes = piece_bytes[index * per : (index + 1) * per]
        shape = shape[-2:]
    if any(d == 0 for d in shape):
        return np.zeros(shape, np.float32)
    layout, params = entry.layout, entry.params
    if layout == L.PLAIN:
        return plain.unpack(piece_bytes, shape, params["dtype"])
    if layout == L.GGML_ROWS:
        raw = ggml.unpack(piece_bytes, shape, params["ggml_type"], params["rows"])
        return ggml.dequantize(raw, params["ggml_type"]).reshape(shape)
    if layout == L.GGML_LANES:
        raw = ggml_lanes.unpack(piece_bytes, shape, params["ggml_type"])
        return ggml.dequantize(raw, params["ggml_type"]).reshape(shape)
    if layout in _AMX_KIND:
        return amx.dequantize(_AMX_KIND[layout], np.asarray(piece_bytes), shape, **params)
    raise ValueError(f"{entry.name}: layout {layout} has no CPU reference path")


BF16_ACT = -1  # act_block's answer for BF16 weights: activations rounded to bf16, not block-quantized


def act_block(entry: TensorEntry) -> int | None:
    """Values per activation scale the native engine uses for this weight; BF16_ACT for BF16 weights (the
    engine multiplies them with the activations rounded to bf16); None: f32 activations (F32 weights)."""
    layout, params = entry.layout, entry.params
    if layout == L.AMX_BF16 or (layout == L.GGML_ROWS and params.get("ggml_type") == "BF16"):
        return BF16_ACT
    if layout == L.GGML_LANES:
        return ggml_lanes.BLOCK_VALUES[params["ggml_type"]]
    if layout == L.GGML_ROWS:
        return {"Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}.get(
            params.get("ggml_type", "")
        )
    if layout == L.AMX_INT8:
        return 64
    if layout == L.AMX_INT4:
        return int(params.get("group_size", 128))
    return None


def quantize_act(x: torch.Tensor, block: int) -> torch.Tensor:
    """The values the native engine's integer kernels see instead of `x` (its exact definition):
    per block of `block` values along the last axis, d = amax / 127 and q = round-half-even(x · 127 /
    amax) (f32 arithmetic), clipped to ±127; returns d · q. |x - d q| <= d / 2 (up to f32 rounding).
    block = BF16_ACT: x rounded to bf16 (nearest even; |x - bf16(x)| <= 2^-8 |x|), what its BF16
    kernels multiply (as llama.cpp's BF16 dot and AMX-BF16 do)."""
    if block == BF16_ACT:
        return x.detach().to(torch.float32).to(torch.bfloat16).to(torch.float32)
    xb = x.detach().to(torch.float32).reshape(*x.shape[:-1], x.shape[-1] // block, block)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    q = torch.round(xb * inv).clamp_(-127, 127)
    return (q * (amax / 127.0)).reshape(x.shape)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


class CpuLinear:
    """A packed weight `W[..., N, K]` on the CPU: `y = x Wᵀ` (per matrix for stacked weights).

    Reference implementation: dequantizes at each call (nothing cached), f32 arithmetic.
    """

    def __init__(self, entry: TensorEntry, data: np.ndarray, act_quant: bool = False) -> None:
        if entry.split_axis is not None and len(entry.pieces) > 1:
            raise ValueError(f"{entry.name}: a linear cut across NUMA nodes is not supported")
        self.entry = entry
        # act_quant: quantize the input as the native engine does first (the "ref-actq" oracle)
        self.act_block = act_block(entry) if act_quant else None
        self.data = data  # the piece's bytes (read-only memory map)
        self.shape = tuple(int(d) for d in entry.shape)

    @property
    def name(self) -> str:
        return self.entry.name

    def weight(self) -> torch.Tensor:
        """The whole weight, float32, logical shape (dequantized now)."""
        return _t(dequant_matrix(self.entry, self.data, self.shape))

    def matrix(self, i: int) -> torch.Tensor:
        """Matrix `i` of a stacked (3-D) weight as float32 `[N, K]`."""
        return _t(dequant_matrix(self.entry, self.data, self.shape, i))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_block:
            x = quantize_act(x, self.act_block)
        if len(self.shape) == 2:
            return x @ self.weight().T
        # stacked: x [T, M, K] with M = number of matrices -> [T, M, N]
        w = self.weight().reshape(-1, self.shape[-2], self.shape[-1])
        return torch.einsum("tmk,mnk->tmn", x, w)


@dataclass
class ExpertSlice:
    """One NUMA node's slice of a layer's routed experts.

    gate/up hold rows lo:hi of every expert (`[E, hi-lo, H]`), down the columns lo:hi (`[E, H,
    hi-lo]`); a slice computes a partial down-projection, and the partials of all nodes are summed.
    """

    node: int
    lo: int
    hi: int
    gate: tuple[TensorEntry, np.ndarray, tuple[int, ...]]
    up: tuple[TensorEntry, np.ndarray, tuple[int, ...]]
    down: tuple[TensorEntry, np.ndarray, tuple[int, ...]]

    def matrix(self, which: str, e: int) -> torch.Tensor:
        entry, data, shape = getattr(self, which)
        return _t(dequant_matrix(entry, data, shape, e))


class CpuExperts:
    """The routed experts of one layer, possibly cut in NUMA slices (see `ExpertSlice`).

    `__call__(x [T, H], topk_idx [T, k] int64, topk_w [T, k] f32) -> [T, H]` =
    Σ_k w·down(silu(gate x) ⊙ up x). Reference implementation: per slice, per selected expert,
    dequantize that expert's matrices only, compute, and add the weighted partial.
    """

    def __init__(self, layer: int, n_experts: int, slices: list[ExpertSlice], act_quant: bool = False) -> None:
        self.layer = layer
        self.n_experts = n_experts
        self.slices = [s for s in slices if s.hi > s.lo]
        # act_quant: inputs of gate/up and of down quantized as the native engine does ("ref-actq")
        self.in_block = act_block(self.slices[0].gate[0]) if act_quant and self.slices else None
        self.h_block = act_block(self.slices[0].down[0]) if act_quant and self.slices else None

    def __call__(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        flat = topk_idx.reshape(-1)
        experts = torch.unique(flat).tolist()  # data-dependent dispatch (the only one on the hot path)
        for e in experts:
            tok, pos = torch.where(topk_idx == e)
            xe = x[tok]
            if self.in_block:
                xe = quantize_act(xe, self.in_block)
            acc = torch.zeros_like(xe)
            hs = [
                F.silu(xe @ s.matrix("gate", e).T) * (xe @ s.matrix("up", e).T) for s in self.slices
            ]  # the slices' columns of h, in order
            if self.h_block:  # quantized over the whole row, as the engine does (slice starts are block-aligned)
                h_all = quantize_act(torch.cat(hs, dim=-1), self.h_block)
                hs = list(torch.split(h_all, [s.hi - s.lo for s in self.slices], dim=-1))
            for s, h in zip(self.slices, hs, strict=True):
                acc = acc + h @ s.matrix("down", e).T
            out.index_add_(0, tok, acc * topk_w[tok, pos, None])
        return out


class DenseExperts:
    """Routed experts held as dense float32 tensors (experts a rules file placed GPU side)."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        self.gate, self.up, self.down = gate, up, down

    def __call__(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in torch.unique(topk_idx.reshape(-1)).tolist():
            tok, pos = torch.where(topk_idx == e)
            xe = x[tok]
            h = F.silu(xe @ self.gate[e].T) * (xe @ self.up[e].T)
            out.index_add_(0, tok, (h @ self.down[e].T) * topk_w[tok, pos, None])
        return out


# ---------------------------------------------------------------------------------------------------
# Native engine


# native: the C++ engine; ref: the f32 torch reference; ref-actq: the reference with the input of
# every integer-format weight quantized exactly as the engine does (the engine's own oracle).
ENGINES = ("native", "ref", "ref-actq")


def engine_choice(engine: str | None = None) -> str:
    """The CPU engine to use: `engine`, else KTPACK_ENGINE, else native."""
    e = engine or os.environ.get("KTPACK_ENGINE") or "native"
    if e not in ENGINES:
        raise ValueError(f"CPU engine {e!r} is not one of {', '.join(ENGINES)}")
    return e


def _native_spec(entry: TensorEntry, data: np.ndarray, shape: tuple[int, ...]) -> tuple | None:
    from .. import kernels

    if kernels.native_format(entry.layout, entry.params) is None:
        return None
    return kernels.weight_spec(entry.layout, entry.params, shape, data)


class NativeLinear(CpuLinear):
    """`CpuLinear` computed by the native engine (same constructor data, same call)."""

    def __init__(self, entry: TensorEntry, data: np.ndarray, spec: tuple) -> None:
        super().__init__(entry, data)
        from .. import kernels

        kernels.ensure_engine()
        self._op = kernels.Linear(spec)
        self._n = self.shape[-2]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to(torch.float32).contiguous()
        out = torch.empty((*x.shape[:-1], self._n), dtype=torch.float32)
        self._op.forward(x.numpy(), out.numpy())
        return out


def prefill_probs_bf16(
    q: torch.Tensor,
    qr: torch.Tensor,
    c: torch.Tensor,
    kr: torch.Tensor,
    scale: float,
    heads: int,
    pos0: int,
    out: torch.Tensor,
) -> None:
    """Attention probabilities over a bf16 cache's rows by the native decode kernels: the scores
    `scale * (q[m] · c[t] + qr[m] · kr[t])` (q rounded to bf16 as the decode step does, f32 sums) and each
    row's causal softmax, in parallel over the M query heads. Row m is head m % heads of the query at
    position pos0 + m // heads, which sees cache rows 0..pos0 + m // heads (only those scores are computed);
    `out[m]` holds its probabilities there and 0 after (what a -inf mask and a softmax give)."""
    from .. import kernels

    kernels.ensure_engine()
    kernels._native.prefill_probs(
        q.contiguous().numpy(), qr.contiguous().numpy(), c.view(torch.int16).numpy(), kr.view(torch.int16).numpy(),
        scale, heads, pos0, out.numpy(),
    )  # fmt: skip


def prefill_values(p: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> None:
    """`out[t, h] = sum_j p[t, h, j] v[j, h]` (p [T, H, n], v [n, H, V], out [T, H, V], f32, out contiguous and
    written in place) by the native engine, heads split over its pool (torch runs one thread beside it)."""
    from .. import kernels

    kernels.ensure_engine()
    kernels._native.prefill_values(p.contiguous().numpy(), v.contiguous().numpy(), out.numpy())


def stacked_as_one(w: object) -> CpuLinear | None:
    """A stacked CPU weight `[M, N, K]` as the one matrix `[M*N, K]` over the same mapped bytes, where the
    layout stores a stack as the concatenation of its matrices' row groups (ggml_lanes_v1 always;
    ggml_rows_v1 when N is a multiple of its group; amx_bf16_v1 when N is a multiple of its N-block of
    16 * n_block rows: no scales between matrices, and matrix m's N-blocks are then the flat matrix's
    N-blocks m * N / (16 * n_block) onwards), else None; native stays native and the reference
    engines keep their activation rounding, so every engine regroups alike. Prefill uses it to apply
    attn_v_b to every cached latent row at once: y[:, m*N:(m+1)*N] = x W_m^T."""
    if not isinstance(w, CpuLinear) or len(w.shape) != 3 or w.entry.split_axis is not None:
        return None
    m, n, k = w.shape
    e = w.entry
    rows = int(e.params.get("rows", 0) or 0)
    n_block = int(e.params.get("n_block", 0) or 0)
    if not (
        e.layout == L.GGML_LANES
        or (e.layout == L.GGML_ROWS and rows and n % rows == 0)
        or (e.layout == L.AMX_BF16 and n_block and n % (L.TILE_N * n_block) == 0)
    ):
        return None
    flat = dataclasses.replace(e, shape=[m * n, k])
    if isinstance(w, NativeLinear):
        from .. import kernels

        return NativeLinear(flat, w.data, kernels.weight_spec(e.layout, e.params, (m * n, k), w.data))
    return CpuLinear(flat, w.data, act_quant=w.act_block is not None)


class NativeMLP:
    """`down(silu(gate x) * up x)` for three native linears in one engine call (a dense FFN or a
    shared expert): the experts operation with a single expert that every token uses at weight 1."""

    def __init__(self, gate: NativeLinear, up: NativeLinear, down: NativeLinear) -> None:
        from .. import kernels

        self.gate, self.up, self.down = gate, up, down
        self.hidden = int(gate.shape[-1])
        inter = int(gate.shape[-2])
        specs = [_native_spec(x.entry, x.data, x.shape) for x in (gate, up, down)]
        self._op = kernels.Experts([(*specs, 0, inter, 0)], 1, self.hidden, inter)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to(torch.float32).contiguous()
        t = x.shape[0]
        out = torch.empty_like(x)
        self._op.forward(x.numpy(), np.zeros((t, 1), np.int64), np.ones((t, 1), np.float32), out.numpy())
        return out


class NativeExperts:
    """`CpuExperts` computed by the native engine: all NUMA slices in one call, partials summed."""

    def __init__(self, layer: int, n_experts: int, slices: list[ExpertSlice], specs: list[tuple]) -> None:
        from .. import kernels

        kernels.ensure_engine()
        self.layer = layer
        self.n_experts = n_experts
        self.slices = slices
        gate = slices[0].gate[0]
        self.hidden = int(gate.shape[-1])
        inter = int(gate.shape[-2])
        self._op = kernels.Experts(specs, n_experts, self.hidden, inter)

    def __call__(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        x = x.detach().to(torch.float32).contiguous()
        out = torch.empty_like(x)
        self._op.forward(
            x.numpy(),
            topk_idx.to(torch.int64).contiguous().numpy(),
            topk_w.detach().to(torch.float32).contiguous().numpy(),
            out.numpy(),
        )
        return out


def make_linear(entry: TensorEntry, data: np.ndarray, engine: str | None = None) -> CpuLinear:
    """The CPU linear for a packed weight: native where the engine has a kernel for its layout."""
    e = engine_choice(engine)
    if e == "native":
        spec = _native_spec(entry, data, tuple(int(d) for d in entry.shape))
        if spec is not None:
            return NativeLinear(entry, data, spec)
    quantized = e == "ref-actq" and _native_spec(entry, data, tuple(entry.shape)) is not None
    return CpuLinear(entry, data, act_quant=quantized)


def make_experts(
    layer: int, n_experts: int, slices: list[ExpertSlice], engine: str | None = None
) -> CpuExperts | NativeExperts:
    """A layer's routed experts: native where the engine has kernels for all three layouts."""
    live = [s for s in slices if s.hi > s.lo]
    e = engine_choice(engine)
    if e == "ref-actq":
        return CpuExperts(layer, n_experts, slices, act_quant=True)
    if e == "native" and live:
        specs = []
        for s in live:
            parts = [_native_spec(e, d, shape) for e, d, shape in (s.gate, s.up, s.down)]
            if any(p is None for p in parts):
                break
            specs.append((*parts, s.lo, s.hi, s.node))
        else:
            try:
                return NativeExperts(layer, n_experts, live, specs)
            except ValueError:
                pass  # a combination the engine does not take (e.g. gate and up in different formats)
    return CpuExperts(layer, n_experts, slices)
