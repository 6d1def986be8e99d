"""Read packed tensors back: bytes of a piece, values of a tensor (NUMA slices joined), checks.

Used by `kt-inspect` (--verify, --extract) and by tests; the runtime maps the same pieces.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from . import amx, ggml, ggml_lanes, marlin, plain
from . import ids as L
from .manifest import Manifest, Piece, TensorEntry

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I32": np.int32, "U8": np.uint8}


def piece_bytes(folder: Path, p: Piece) -> np.ndarray:
    """The bytes of one piece, as a read-only memory map (uint8, 1-D)."""
    if p.nbytes == 0:
        return np.zeros(0, np.uint8)
    return np.memmap(Path(folder) / p.file, dtype=np.uint8, mode="r", offset=p.offset, shape=(p.nbytes,))


def _slice_values(folder: Path, t: TensorEntry, pieces: list[Piece]) -> np.ndarray:
    shape = tuple(pieces[0].shape)
    if any(d == 0 for d in shape):
        return np.zeros(shape, np.float32)
    params = t.params
    if t.layout == L.PLAIN:
        return plain.unpack(piece_bytes(folder, pieces[0]), shape, params["dtype"])
    if t.layout == L.GGML_ROWS:
        raw = ggml.unpack(piece_bytes(folder, pieces[0]), shape, params["ggml_type"], params["rows"])
        return ggml.dequantize(raw, params["ggml_type"]).reshape(shape)
    if t.layout == L.GGML_LANES:
        raw = ggml_lanes.unpack(piece_bytes(folder, pieces[0]), shape, params["ggml_type"])
        return ggml.dequantize(raw, params["ggml_type"]).reshape(shape)
    if t.layout in (L.AMX_BF16, L.AMX_INT8, L.AMX_INT4):
        kind = {L.AMX_BF16: "bf16", L.AMX_INT8: "int8", L.AMX_INT4: "int4"}[t.layout]
        return amx.dequantize(kind, piece_bytes(folder, pieces[0]), shape, **params)
    if t.layout == L.MARLIN_INT4:
        by_part = {p.part: p for p in pieces}
        *lead, n, k = shape
        g = params["group_size"]
        qw = piece_bytes(folder, by_part["qweight"]).view(np.int32).reshape(*lead, k // 16, 2 * n)
        sc = piece_bytes(folder, by_part["scales"]).view(np.float16).reshape(*lead, k // g, n)
        return marlin.dequantize(qw, sc, shape, g)
    raise ValueError(f"tensor {t.name}: unknown layout {t.layout}")


def tensor_values(folder: Path | str, t: TensorEntry) -> np.ndarray:
    """Float32 values of a packed tensor in its logical (source) shape, NUMA slices joined."""
    folder = Path(folder)
    groups: dict[int | None, list[Piece]] = {}
    for p in t.pieces:
        groups.setdefault(p.node if t.split_axis is not None else None, []).append(p)
    if t.split_axis is None:
        return _slice_values(folder, t, t.pieces).reshape(t.shape)
    parts = [_slice_values(folder, t, groups[node]) for node in sorted(groups)]
    return np.concatenate(parts, axis=t.split_axis)


def _sha256_of(folder: Path, p: Piece) -> str:
    h = hashlib.sha256()
    with open(Path(folder) / p.file, "rb") as f:
        f.seek(p.offset)
        left = p.nbytes
        while left:
            b = f.read(min(left, 1 << 24))
            if not b:
                break
            h.update(b)
            left -= len(b)
    return h.hexdigest()


def verify(folder: Path | str, m: Manifest, checksums: bool = True) -> Iterator[str]:
    """Yield one line per problem, in manifest order (file sizes first, then checksums)."""
    folder = Path(folder)
    bad_files = set()
    for f in m.files:
        path = folder / f.path
        try:
            size = os.path.getsize(path)
        except OSError:
            bad_files.add(f.path)
            yield f"{f.path}: missing"
            continue
        if size != f.size:
            bad_files.add(f.path)
            yield f"{f.path}: {size} bytes, the manifest says {f.size}"
        elif checksums and f.sha256 and hashlib.sha256(path.read_bytes()).hexdigest() != f.sha256:
            yield f"{f.path}: checksum mismatch"
    if not checksums:
        return
    for t in m.tensors:
        for p in t.pieces:
            if p.file in bad_files:
                continue  # already reported by its size
            if p.sha256 and _sha256_of(folder, p) != p.sha256:
                where = f"node {p.node} " if p.node is not None else ""
                yield f"{p.file}: checksum mismatch in tensor {t.name} ({where}{p.part})"
