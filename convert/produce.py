"""Turn one planned tensor into its packed bytes, chunk by chunk (bounded memory).

`produce(pt)` yields `(piece_index, buffer)` in order for each piece; the concatenated chunks of a
piece are exactly its bytes. Chunks are cut so that at most about CHUNK_VALUES source values are
dequantized at once, whatever the size of the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from ktpack.layouts import amx, ggml, marlin, plain
from ktpack.layouts import ids as L

from .plan import PlannedTensor

CHUNK_VALUES = 1 << 19  # 512 Ki values = 2 MiB of float32 per chunk


def _row_chunks(n_rows: int, row_len: int, multiple: int) -> Iterator[tuple[int, int]]:
    step = max(multiple, (CHUNK_VALUES // max(row_len, 1)) // multiple * multiple)
    for lo in range(0, n_rows, step):
        yield lo, min(n_rows, lo + step)


def _slice_index(shape: tuple[int, ...], axis: int | None, lo: int, hi: int, lead: int | None) -> tuple:
    """numpy index (over logical axes) of one leading matrix `lead` restricted to [lo, hi) on `axis`."""
    idx: list[slice | int] = [slice(None)] * len(shape)
    if lead is not None:
        idx[0] = lead
    if axis is not None:
        idx[axis] = slice(lo, hi)
    return tuple(idx)


def _extent(s: slice | int | None, size: int) -> int:
    if isinstance(s, slice):
        start, stop, _ = s.indices(size)
        return stop - start
    return 1


def produce(pt: PlannedTensor) -> Iterator[tuple[int, memoryview]]:
    e = pt.entry
    shape = tuple(e.shape)
    layout, params = e.layout, e.params
    parts_per_slice = 2 if layout == L.MARLIN_INT4 else 1
    for si, (_node, axis, lo, hi) in enumerate(pt.slices):
        base = si * parts_per_slice
        if axis is not None and hi <= lo:
            continue  # an empty NUMA slice
        leads: list[int | None] = list(range(shape[0])) if len(shape) == 3 else [None]
        for lead in leads:
            idx = _slice_index(shape, axis, lo, hi, lead)
            if layout == L.GGML_ROWS:
                yield from ((base, b) for b in _ggml_chunks(pt, idx, params))
            elif layout == L.PLAIN:
                yield from ((base, b) for b in _plain_chunks(pt, idx, params))
            elif layout in (L.AMX_BF16, L.AMX_INT8, L.AMX_INT4):
                yield from ((base, b) for b in _amx_chunks(pt, idx, params))
            elif layout == L.MARLIN_INT4:
                yield from _marlin_chunks(pt, idx, params, base)
            else:
                raise AssertionError(layout)


def _amx_chunks(pt: PlannedTensor, idx: tuple, params: dict) -> Iterator[memoryview]:
    """One amx matrix = [weight tiles in N-block order | scales in the same order | pad to 64].

    Weight tiles of consecutive N-blocks are consecutive, and so are their scales, so a large
    matrix is quantized N-block chunk by chunk: tiles are written as they come, the scales (1/32 of
    the f32 size at most) are kept and written after the last chunk."""
    kind = {L.AMX_BF16: "bf16", L.AMX_INT8: "int8", L.AMX_INT4: "int4"}[pt.entry.layout]
    shape = pt.entry.shape
    n, k = _extent(idx[-2], shape[-2]), _extent(idx[-1], shape[-1])
    rows = L.TILE_N * params["n_block"]
    scales: list[bytes] = []
    for lo, hi in _row_chunks(n, k, rows):
        w = pt.src.values((*idx[:-2], _compose(idx[-2], lo, hi), idx[-1])).reshape(hi - lo, k)
        buf = amx.pack(kind, w, **params)
        wbytes = (hi - lo) // L.TILE_N * (k // L.AMX_K_PER_TILE[pt.entry.layout]) * L.TILE_BYTES
        yield memoryview(buf[:wbytes])
        if kind != "bf16":
            sbytes = 4 * (hi - lo) * (1 if kind == "int8" else k // params["group_size"])
            scales.append(buf[wbytes : wbytes + sbytes].tobytes())
    tail = b"".join(scales)
    pad = -len(tail) % amx.MATRIX_ALIGN
    if tail or pad:
        yield tail + b"\0" * pad


def _ggml_chunks(pt: PlannedTensor, idx: tuple, params: dict) -> Iterator[memoryview]:
    raw = pt.src.raw()[pt.src._raw_index(idx)]  # (..., rows, row_bytes): the source's own blocks
    if raw.ndim == 1:
        raw = raw.reshape(1, -1)
    rows = params["rows"]
    for lo, hi in _row_chunks(raw.shape[-2], raw.shape[-1], rows):
        yield memoryview(ggml.pack(raw[..., lo:hi, :], params["ggml_type"], rows))


def _plain_chunks(pt: PlannedTensor, idx: tuple, params: dict) -> Iterator[memoryview]:
    shape = pt.entry.shape
    if len(shape) <= 1:
        yield memoryview(plain.pack(pt.src.values(idx), params["dtype"]))
        return
    for lo, hi in _row_chunks(_extent(idx[-2], shape[-2]), _extent(idx[-1], shape[-1]), 1):
        yield memoryview(plain.pack(pt.src.values((*idx[:-2], _compose(idx[-2], lo, hi), idx[-1])), params["dtype"]))


def _compose(s: slice | int, lo: int, hi: int) -> slice:
    start = 0 if not isinstance(s, slice) or s.start is None else s.start
    return slice(start + lo, start + hi)


def _marlin_chunks(pt: PlannedTensor, idx: tuple, params: dict, base: int) -> Iterator[tuple[int, memoryview]]:
    """Marlin's packed rows (qweight [K/16, 2N], scales [K/g, N]) follow K, so a matrix is streamed
    in K chunks; each piece still receives its bytes in order. A K chunk of a very tall matrix (the
    output head: N = 129280) is quantized in N slices of a multiple of 64 columns, which give the
    same columns of qweight and scales (SPEC.md, marlin_int4_v1), so memory stays bounded."""
    g = params["group_size"]
    n, k = pt.src.shape[-2], pt.src.shape[-1]
    unit = math.lcm(g, pt.src.block_k, 16)
    step = max(unit, (CHUNK_VALUES // n) // unit * unit)
    for k0 in range(0, k, step):
        k1 = min(k, k0 + step)
        n_step = max(64, CHUNK_VALUES // (k1 - k0) // 64 * 64)
        if n_step >= n:
            w = pt.src.values((*idx[:-1], slice(k0, k1)))
            qw, sc = marlin.pack(w, g, k_total=k)
        else:
            qw = np.empty(((k1 - k0) // 16, 2 * n), np.int32)
            sc = np.empty(((k1 - k0) // (k if g == -1 else g), n), np.float16)
            for n0 in range(0, n, n_step):
                n1 = min(n, n0 + n_step)
                w = pt.src.values((*idx[:-2], _compose(idx[-2], n0, n1), slice(k0, k1)))
                qw[:, 2 * n0 : 2 * n1], sc[:, n0:n1] = marlin.pack(w, g, k_total=k)
        # qweight rows go out as small copies so that this chunk's array is freed before the next
        # one is made (a K chunk of the R1 head is 16.5 MB; the writer queue is bounded in bytes)
        rows = max(1, (1 << 20) // max(qw.shape[-1] * 4, 1))
        for r0 in range(0, qw.shape[-2], rows):
            yield base, memoryview(np.ascontiguousarray(qw[..., r0 : r0 + rows, :]).copy()).cast("B")
        yield base + 1, memoryview(np.ascontiguousarray(sc)).cast("B")
        del qw, sc, w
