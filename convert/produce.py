"""Turn one planned tensor into its packed bytes, chunk by chunk (bounded memory).

`produce(pt)` yields `Chunk(piece, data, at)`s. Chunks with `at` None come in order: the
concatenated chunks of a piece are exactly its bytes. A chunk with `at` set belongs at that byte
offset of its piece: a piece is made of in-order chunks or of placed ones, never both, and its
placed chunks cover it exactly once. Chunks are cut so that at most about CHUNK_VALUES source values
are dequantized at once, whatever the size of the model, and no chunk grows with the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from ktpack.layouts import amx, ggml, ggml_lanes, marlin, plain
from ktpack.layouts import ids as L

from .plan import PlannedTensor

CHUNK_VALUES = 1 << 19  # 512 Ki values = 2 MiB of float32 per chunk


class Chunk(NamedTuple):
    """Bytes of piece `piece` of a tensor: the next ones (`at` None) or those at byte `at` of the piece."""

    piece: int
    data: memoryview
    at: int | None = None


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


def produce(pt: PlannedTensor) -> Iterator[Chunk]:
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
            if layout in (L.GGML_ROWS, L.GGML_LANES):
                yield from (Chunk(base, b) for b in _ggml_chunks(pt, idx, params))
            elif layout == L.PLAIN:
                yield from (Chunk(base, b) for b in _plain_chunks(pt, idx, params))
            elif layout in (L.AMX_BF16, L.AMX_INT8, L.AMX_INT4):
                yield from (Chunk(base, b) for b in _amx_chunks(pt, idx, params))
            elif layout == L.MARLIN_INT4:
                yield from _marlin_chunks(pt, idx, params, base, 0 if lead is None else lead)
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
    lanes = pt.entry.layout == L.GGML_LANES
    for lo, hi in _row_chunks(raw.shape[-2], raw.shape[-1], rows):
        if lanes:  # row chunks are whole lane blocks (multiples of 16 rows)
            yield memoryview(ggml_lanes.pack(raw[..., lo:hi, :], params["ggml_type"]))
        else:
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


def _marlin_chunks(pt: PlannedTensor, idx: tuple, params: dict, base: int, lead: int) -> Iterator[Chunk]:
    """Marlin's packed rows (qweight [K/16, 2N], scales [K/g, N]) follow K, so a matrix is streamed
    in K chunks (of a multiple of the group, of the source's block and of 16 inputs).

    A K chunk of a tall matrix is quantized in N slices of a multiple of 64 columns, which give the
    same columns of qweight and scales (SPEC.md, marlin_int4_v1), gathered in batches of about
    CHUNK_VALUES * 4 bytes of qweight. When a batch does not span all N (the output head: N =
    129280, a K chunk of 256 for Q4_K would be 16.5 MB of qweight), its rows are placed at their
    offsets in the pieces (`Chunk.at`) instead of being gathered into rows of all N: memory does
    not depend on N."""
    g = params["group_size"]
    n, k = pt.src.shape[-2], pt.src.shape[-1]
    gk = k if g == -1 else g  # inputs per scale row
    unit = math.lcm(g, pt.src.block_k, 16)
    step = max(unit, (CHUNK_VALUES // n) // unit * unit)
    n_step = max(64, CHUNK_VALUES // step // 64 * 64)  # columns quantized at once
    n_batch = max(n_step, CHUNK_VALUES * 4 // (step // 16 * 8) // n_step * n_step)  # columns gathered
    placed = n_batch < n
    q_row, s_row = 2 * n * 4, n * 2  # bytes of one qweight row (16 inputs) and of one scale row, all N
    q_lead, s_lead = lead * (k // 16) * q_row, lead * (k // gk) * s_row  # this matrix in a stacked tensor
    for k0 in range(0, k, step):
        k1 = min(k, k0 + step)
        for b0 in range(0, n, n_batch):
            b1 = min(n, b0 + n_batch)
            qw = np.empty(((k1 - k0) // 16, 2 * (b1 - b0)), np.int32)
            sc = np.empty(((k1 - k0) // gk, b1 - b0), np.float16)
            for n0 in range(b0, b1, n_step):
                n1 = min(b1, n0 + n_step)
                w = pt.src.values((*idx[:-2], _compose(idx[-2], n0, n1), slice(k0, k1)))
                qw[:, 2 * (n0 - b0) : 2 * (n1 - b0)], sc[:, n0 - b0 : n1 - b0] = marlin.pack(w, g, k_total=k)
                del w
            if not placed:
                yield Chunk(base, memoryview(qw).cast("B"))
                yield Chunk(base + 1, memoryview(sc).cast("B"))
                continue
            for r in range(qw.shape[0]):
                yield Chunk(base, memoryview(qw[r]).cast("B"), q_lead + (k0 // 16 + r) * q_row + 2 * b0 * 4)
            for r in range(sc.shape[0]):
                yield Chunk(base + 1, memoryview(sc[r]).cast("B"), s_lead + (k0 // gk + r) * s_row + b0 * 2)
