"""`plain_v1`: a row-major little-endian array of f32, f16 or bf16 values.

bf16 is stored as the upper 16 bits of the f32 value after round-to-nearest-even (NaN kept a
quiet NaN). f32 is lossless; f16/bf16 from an f32 source are lossy by one rounding.
"""

from __future__ import annotations

import numpy as np

from .errors import LayoutError

DTYPES = {"f32": 4, "f16": 2, "bf16": 2}


def nbytes(shape: tuple[int, ...], dtype: str) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * DTYPES[dtype]


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round f32 to bf16 (nearest, ties to even) and return the 16-bit patterns."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, ((u >> 16) | 0x40).astype(np.uint16), rounded)


def bf16_bits_to_f32(b: np.ndarray) -> np.ndarray:
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def pack(x: np.ndarray, dtype: str) -> np.ndarray:
    """Values (any float array) -> packed bytes (1-D uint8)."""
    if dtype not in DTYPES:
        raise LayoutError(f"plain layout dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    x = np.asarray(x)
    if dtype == "f32":
        out = np.ascontiguousarray(x, dtype="<f4")
    elif dtype == "f16":
        with np.errstate(over="ignore"):  # values beyond f16 become inf, as a cast does
            out = np.ascontiguousarray(x, dtype="<f2")
    else:
        out = f32_to_bf16_bits(x.astype(np.float32, copy=False))
    return out.reshape(-1).view(np.uint8)


def unpack(buf: np.ndarray, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """Packed bytes -> f32 values of `shape`."""
    buf = np.ascontiguousarray(buf).view(np.uint8).reshape(-1)
    if buf.size != nbytes(shape, dtype):
        raise LayoutError(f"plain buffer holds {buf.size} bytes, shape {shape} {dtype} needs {nbytes(shape, dtype)}")
    if dtype == "f32":
        return buf.view("<f4").reshape(shape).copy()
    if dtype == "f16":
        return buf.view("<f2").astype(np.float32).reshape(shape)
    return bf16_bits_to_f32(buf.view("<u2")).reshape(shape)
