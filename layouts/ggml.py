"""`ggml_rows_v1`: GGUF quant blocks kept bit-exact, a few rows interleaved block by block.

A matrix of `N` rows, each a sequence of `nb` quant blocks of `bb` bytes (the GGUF row), is cut
into groups of `rows` consecutive rows (the last group may be shorter). Inside a group the
blocks are written block index first:

    group g, block b, row r  ->  group_start(g) + (b * rows_g + r) * bb

so a kernel that produces `rows` outputs at once reads one contiguous stream. Leading
dimensions (experts, heads) are packed one matrix after another. Lossless: `unpack` gives back
the source bytes exactly. Non-block types (F32, F16, BF16) are treated as blocks of one value.
"""

from __future__ import annotations

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import LayoutError
from .ids import GGML_ROWS_PER_GROUP

# Types whose blocks this layout stores. Every type gguf-py can dequantize is taken: the
# interleave is type-agnostic, and the runtime's reference path dequantizes with gguf-py.
# (Which of them have fast native kernels is the engine's business, not the format's.)
SUPPORTED_TYPES: frozenset[str] = frozenset(
    {
        "F32", "F16", "BF16",
        "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
        "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS",
        "TQ1_0", "TQ2_0", "MXFP4",
    }
)  # fmt: skip


# Types whose values can be read (gguf-py has a dequantizer), so an amx layout can re-quantize them.
DEQUANTIZABLE: frozenset[str] = SUPPORTED_TYPES | {"NVFP4"}


def block_geometry(ggml_type: str) -> tuple[int, int]:
    """(values per block, bytes per block) of a ggml type."""
    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]]
    except KeyError:
        raise LayoutError(f"unknown ggml type {ggml_type!r}") from None


def supports(shape: tuple[int, ...], ggml_type: str) -> str | None:
    if ggml_type not in SUPPORTED_TYPES:
        return f"ggml type {ggml_type} is not stored by {__name__.rsplit('.', 1)[-1]}"
    if len(shape) < 1:
        return "scalars are not stored in the ggml layout"
    bv, _ = block_geometry(ggml_type)
    if shape[-1] % bv:
        return f"row length {shape[-1]} is not a multiple of the {ggml_type} block ({bv})"
    return None


def row_bytes(ggml_type: str, k: int) -> int:
    bv, bb = block_geometry(ggml_type)
    if k % bv:
        raise LayoutError(f"row length {k} is not a multiple of the {ggml_type} block ({bv})")
    return k // bv * bb


def nbytes(shape: tuple[int, ...], ggml_type: str) -> int:
    n = 1
    for d in shape[:-1]:
        n *= d
    return n * row_bytes(ggml_type, shape[-1])


def _interleave(m: np.ndarray, rows: int, bb: int, inverse: bool) -> np.ndarray:
    """Interleave (or de-interleave) one batch of matrices m[B, N, row_bytes] (uint8)."""
    b, n, rb = m.shape
    nb = rb // bb
    out = np.empty_like(m)
    full = n // rows * rows
    for lo, hi, r in ((0, full, rows), (full, n, n - full)):
        if hi <= lo:
            continue
        g = (hi - lo) // r
        if not inverse:  # [B, G, r, nb, bb] -> [B, G, nb, r, bb]
            src = m[:, lo:hi].reshape(b, g, r, nb, bb)
            out[:, lo:hi] = src.transpose(0, 1, 3, 2, 4).reshape(b, hi - lo, rb)
        else:  # stored [B, G, nb, r, bb] -> [B, G, r, nb, bb]
            src = m[:, lo:hi].reshape(b, g, nb, r, bb)
            out[:, lo:hi] = src.transpose(0, 1, 3, 2, 4).reshape(b, hi - lo, rb)
    return out


def _as_batches(raw: np.ndarray, ggml_type: str) -> tuple[np.ndarray, int]:
    _, bb = block_geometry(ggml_type)
    raw = np.ascontiguousarray(raw).view(np.uint8)
    if raw.ndim == 1:
        raw = raw.reshape(1, -1)
    rb = raw.shape[-1]
    if rb % bb:
        raise LayoutError(f"row of {rb} bytes is not a whole number of {ggml_type} blocks ({bb} B)")
    n = raw.shape[-2]
    return raw.reshape(-1, n, rb), bb


def pack(raw: np.ndarray, ggml_type: str, rows: int = GGML_ROWS_PER_GROUP) -> np.ndarray:
    """Interleave source bytes `raw[..., N, row_bytes]` (uint8, or the element dtype for
    F32/F16/BF16 rows viewed as bytes) into the 1-D packed byte stream."""
    if rows < 1:
        raise LayoutError(f"rows per group must be >= 1, got {rows}")
    m, bb = _as_batches(raw, ggml_type)
    return _interleave(m, rows, bb, inverse=False).reshape(-1)


def unpack(buf: np.ndarray, shape: tuple[int, ...], ggml_type: str, rows: int = GGML_ROWS_PER_GROUP) -> np.ndarray:
    """Inverse of `pack`: the source bytes, uint8 of shape (*shape[:-1], row_bytes)."""
    rb = row_bytes(ggml_type, shape[-1])
    lead = tuple(shape[:-1]) or (1,)
    buf = np.ascontiguousarray(buf).view(np.uint8).reshape(-1)
    want = int(np.prod(lead)) * rb
    if buf.size != want:
        raise LayoutError(f"packed buffer holds {buf.size} bytes, shape {tuple(shape)} needs {want}")
    m = buf.reshape(-1, lead[-1], rb)
    _, bb = block_geometry(ggml_type)
    out = _interleave(m, rows, bb, inverse=True)
    return out.reshape(*shape[:-1], rb) if len(shape) > 1 else out.reshape(rb)


def gather_rows(
    buf: np.ndarray, shape: tuple[int, int], ggml_type: str, idx: np.ndarray, rows: int = GGML_ROWS_PER_GROUP
) -> np.ndarray:
    """Source bytes of rows `idx` of one packed matrix `[N, K]`: `unpack(buf, shape, ...)[idx]`, reading
    only those rows' blocks (an embedding lookup touches a few rows of a large matrix)."""
    n, k = shape
    rb = row_bytes(ggml_type, k)
    _, bb = block_geometry(ggml_type)
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"row {int(idx.max() if idx.max() >= n else idx.min())} outside 0..{n - 1}")
    full = n // rows * rows
    lo = idx // rows * rows
    r = np.where(lo < full, rows, n - full)  # rows in the group: the last one may be short
    nb = rb // bb
    # block b of row i of a group of r rows starting at row lo: byte lo * rb + (b * r + i) * bb (see pack)
    off = (lo * rb)[:, None] + (np.arange(nb)[None, :] * r[:, None] + (idx - lo)[:, None]) * bb
    flat = np.asarray(buf).view(np.uint8).reshape(-1)
    return flat[off[:, :, None] + np.arange(bb)].reshape(idx.size, rb)


def dequantize(raw: np.ndarray, ggml_type: str) -> np.ndarray:
    """Float32 values of source bytes `raw[..., row_bytes]` (gguf-py's reference dequantizer)."""
    from gguf.quants import dequantize as gg_dequantize

    qt = GGMLQuantizationType[ggml_type]
    raw = np.ascontiguousarray(raw).view(np.uint8)
    if qt == GGMLQuantizationType.F32:
        return raw.view(np.float32).copy()
    if qt == GGMLQuantizationType.F16:
        return raw.view(np.float16).astype(np.float32)
    if qt == GGMLQuantizationType.BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return gg_dequantize(raw, qt).astype(np.float32, copy=False)
