"""The CPU side of the runtime: linears and routed experts computed from packed bytes.

This module is the interface the native engine plugs into. Both classes take their weights as
the manifest entry plus the memory-mapped bytes of its pieces, and expose one call:

- `CpuLinear(x[T, K]) -> [T, N]` (3-D weights: `x[T, H, K] -> [T, H, N]`, one matrix per head);
- `CpuExperts(x[T, H], topk_idx[T, k], topk_w[T, k]) -> [T, H]`, the weighted sum of the selected
  experts, computed per NUMA slice and summed.

The implementations here are the *reference*: they dequantize the packed bytes with the layout
modules (`layouts.ggml`, `layouts.amx`, `layouts.plain`) at every call and keep nothing beyond
the call. A native implementation replaces them with the same constructor data and signatures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..layouts import amx, ggml, plain
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
    if layout in _AMX_KIND:
        return amx.dequantize(_AMX_KIND[layout], np.asarray(piece_bytes), shape, **params)
    raise ValueError(f"{entry.name}: layout {layout} has no CPU reference path")


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


class CpuLinear:
    """A packed weight `W[..., N, K]` on the CPU: `y = x Wᵀ` (per matrix for stacked weights).

    Reference implementation: dequantizes at each call (nothing cached), f32 arithmetic.
    """

    def __init__(self, entry: TensorEntry, data: np.ndarray) -> None:
        if entry.split_axis is not None and len(entry.pieces) > 1:
            raise ValueError(f"{entry.name}: a linear cut across NUMA nodes is not supported")
        self.entry = entry
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

    def __init__(self, layer: int, n_experts: int, slices: list[ExpertSlice]) -> None:
        self.layer = layer
        self.n_experts = n_experts
        self.slices = [s for s in slices if s.hi > s.lo]

    def __call__(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        flat = topk_idx.reshape(-1)
        experts = torch.unique(flat).tolist()  # data-dependent dispatch (the only one on the hot path)
        for e in experts:
            tok, pos = torch.where(topk_idx == e)
            xe = x[tok]
            acc = torch.zeros_like(xe)
            for s in self.slices:
                g = s.matrix("gate", e)
                u = s.matrix("up", e)
                d = s.matrix("down", e)
                h = F.silu(xe @ g.T) * (xe @ u.T)
                acc = acc + h @ d.T
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
