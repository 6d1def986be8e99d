"""Pure-numpy reference for the GPU layout marlin_int4_v1 (Marlin / vLLM gptq_marlin, uint4b8).

Normative text: SPEC_amx_marlin.md (to be merged into SPEC.md); facts: shared/reference/formats.md §1.
For a linear weight ``W[N, K]`` (N outputs, K inputs) Marlin multiplies by ``B = W.T`` (``[K, N]``):

* codes ``q[k, n]`` in 0..15, value ``(q - 8) * s[k // g, n]`` (uint4b8, symmetric, no zero point);
* ``qweight int32[K/16, 2N]``: 16x16 tiling, the 1024-entry in-chunk permutation, 8 nibbles per int32
  (closed form: ``marlin_index``);
* ``scales fp16[K/g, N]``, each row permuted in chunks of 64 (``SCALE_PERM``) when ``g < K`` and in
  chunks of 32 (``SCALE_PERM_SINGLE``) when there is a single group (``g == K``, per-channel).

A caller may pack a K-chunk of a larger matrix (``k_total``): packed rows depend only on their own 16 k,
and scale rows only on their own group, so the chunk's result is exactly rows ``k0/16 ..`` of
``qweight`` and ``k0/g ..`` of ``scales`` of the full tensor, except that the choice between the two
scale permutations depends on ``k_total``.
"""

from __future__ import annotations

import numpy as np

from . import ids
from .errors import LayoutError

LAYOUT_ID = ids.MARLIN_INT4
GROUP_SIZES: tuple[int, ...] = (32, 64, 128, -1)  # -1: one group over all of K (per-channel)
DEFAULT_GROUP_SIZE = ids.MARLIN_GROUP
MIN_THREAD_N = 64  # vLLM GPTQ_MARLIN_MIN_THREAD_N
MIN_THREAD_K = 128  # vLLM GPTQ_MARLIN_MIN_THREAD_K
F16_MAX = 65504.0

# Error bound (elementwise |w - dequantize(pack(w))|), derivation:
#   s = stored fp16 scale (exact in f32), x = fl32(w / s), q = clip(rint(x), -8, 7) + 8,
#   ŵ = (q - 8) * s, exact in f32 ((q - 8) has 4 bits, s has 11 significant bits, and s >= 2^-24 so
#   the product is a multiple of 2^-24 far above the f32 subnormal range).
#   The scale rule (see _scales) guarantees max(w_g) <= 7.5 s and -min(w_g) <= 8.5 s exactly, so by
#   monotone rounding x lies in [-8.5, 7.5] and |x - (q - 8)| <= 0.5 whether or not it was clipped.
#   |w/s - x| <= u|w/s| <= 8.5u with u = 2^-24 when w/s is a normal f32; when it is not (|w/s| < 2^-126)
#   q - 8 = 0 and |w| < 2^-126 s. Total: |w - ŵ| <= s (0.5 + 8.5u) < s (0.5 + 2^-20).
#   For a group whose scale is a normal fp16 (no bump), s <= (1 + 2^-11) max(|max|/7, |min|/8), so the
#   error is also <= (0.5 + 2^-20)(1 + 2^-11) / 7 * max|w_g| (< 0.0715 max|w_g|).
MARLIN_BOUND_FACTOR = 0.5 + 2.0**-20


# --------------------------------------------------------------------------------------------------
# Permutation tables (formats.md §1.2, §1.3)


def _weight_perm() -> np.ndarray:
    """The 1024-entry permutation applied inside each 16x64 chunk: ``out[j] = in[perm[j]]``."""
    perm: list[int] = []
    for lane in range(32):
        col = lane // 4
        base = []
        for block in (0, 1):
            k0 = 2 * (lane % 4)
            for row in (k0, k0 + 1, k0 + 8, k0 + 9):
                base.append(16 * row + col + 8 * block)
        for j in range(4):
            perm.extend(p + 256 * j for p in base)
    interleave = np.array([0, 2, 4, 6, 1, 3, 5, 7])
    return np.array(perm, dtype=np.int64).reshape(-1, 8)[:, interleave].reshape(-1)


WEIGHT_PERM = _weight_perm()
WEIGHT_PERM_INV = np.argsort(WEIGHT_PERM)
# Grouped scales: 8x8 transpose within each 64 columns, out[8i + j] = in[i + 8j].
SCALE_PERM = np.array([i + 8 * j for i in range(8) for j in range(8)], dtype=np.int64)
# One group (per-channel): out[8i + t] = in[2i + (0, 1, 8, 9, 16, 17, 24, 25)[t]] within each 32 columns.
SCALE_PERM_SINGLE = np.array([2 * i + d for i in range(4) for d in (0, 1, 8, 9, 16, 17, 24, 25)], dtype=np.int64)
SCALE_PERM_INV = np.argsort(SCALE_PERM)
SCALE_PERM_SINGLE_INV = np.argsort(SCALE_PERM_SINGLE)


def marlin_index(k: np.ndarray | int, n: np.ndarray | int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where ``q[k, n]`` lives in ``qweight``: (row, int32 column, nibble) — formats.md §1.2 closed form."""
    k = np.asarray(k)
    n = np.asarray(n)
    row = k // 16
    k_in, n_in = k % 16, n % 16
    j = (n // 16) % 4
    c64 = n // 64
    lane = 4 * (n_in % 8) + (k_in % 8) // 2
    col32 = c64 * 128 + lane * 4 + j
    nibble = 4 * (k_in % 2) + 2 * (n_in // 8) + k_in // 8
    return row, col32, nibble


# --------------------------------------------------------------------------------------------------
# Shape rules


def _resolve_group(group_size: int, k_total: int) -> int:
    return k_total if group_size == -1 else group_size


def supports(shape: tuple[int, ...], group_size: int = DEFAULT_GROUP_SIZE) -> str | None:
    """None when ``W[..., N, K]`` of this shape can be packed; otherwise the reason (vLLM gptq_marlin)."""
    shape = tuple(int(d) for d in shape)
    if group_size not in GROUP_SIZES:
        return f"group_size must be one of {GROUP_SIZES}, got {group_size!r}"
    if len(shape) < 2:
        return f"weights must be [..., N, K] (at least 2 dims), got shape {shape}"
    n, k = shape[-2:]
    if n <= 0 or n % MIN_THREAD_N:
        return f"N must be a positive multiple of {MIN_THREAD_N}, got N={n}"
    if k <= 0 or k % MIN_THREAD_K:
        return f"K must be a positive multiple of {MIN_THREAD_K}, got K={k}"
    g = _resolve_group(group_size, k)
    if k % g:
        return f"K must be a multiple of group_size {g}, got K={k}"
    return None


def _check_chunk(shape: tuple[int, ...], group_size: int, k_total: int | None) -> tuple[int, bool]:
    """Validate a (possibly chunked) shape; returns (group size, single-group scale permutation?)."""
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2:
        raise LayoutError(f"{LAYOUT_ID}: weights must be [..., N, K] (at least 2 dims), got shape {shape}")
    n, k = shape[-2:]
    kt = k if k_total is None else int(k_total)
    reason = supports((n, kt), group_size)
    if reason:
        raise LayoutError(f"{LAYOUT_ID}: {reason}")
    g = _resolve_group(group_size, kt)
    if k <= 0 or k > kt or k % g:
        raise LayoutError(
            f"{LAYOUT_ID}: a K-chunk must be a positive multiple of group_size {g} and at most k_total={kt}, got K={k}"
        )
    return g, g == kt


# --------------------------------------------------------------------------------------------------
# Quantization (unpacked form)


def _scales(bg: np.ndarray) -> np.ndarray:
    """fp16 scales of f32 groups ``bg[..., G, g, N]`` -> ``[..., G, N]``.

    vLLM's symmetric rule s = fp16(max(|max| / 7, |min| / 8)) (the quotients in f32, then RNE to fp16).
    Only where that would clip a code by more than half a step (max > 7.5 s or -min > 8.5 s exactly,
    which needs an fp16-subnormal or zero s) is s the next fp16 above it. All-zero groups get s = 1.
    """
    mx = bg.max(axis=-2)
    mn = bg.min(axis=-2)
    if not (np.isfinite(mx).all() and np.isfinite(mn).all()):
        raise LayoutError(f"{LAYOUT_ID}: weights must be finite (found inf or NaN)")
    r = np.maximum(np.abs(mx) / np.float32(7), np.abs(mn) / np.float32(8))
    with np.errstate(over="ignore"):
        s = r.astype(np.float16)
    s64 = s.astype(np.float64)
    bump = (mx.astype(np.float64) > 7.5 * s64) | (-mn.astype(np.float64) > 8.5 * s64)
    s = np.where(bump, np.nextafter(s, np.float16(np.inf)), s)
    s = np.where((mx == 0) & (mn == 0), np.float16(1), s).astype(np.float16)
    if not np.isfinite(s).all():
        worst = float(np.max(np.maximum(mx, -mn)))
        raise LayoutError(
            f"{LAYOUT_ID}: a group's fp16 scale overflows (max|w| = {worst:.6g}; the scale "
            f"max(|max|/7, |min|/8) must stay <= {F16_MAX})"
        )
    return s


def quantize(w: np.ndarray, group_size: int = DEFAULT_GROUP_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """``W[..., N, K]`` -> ``(q uint8 [..., K, N] in 0..15, s fp16 [..., K/g, N])``.

    ``q = clip(rint(B / f32(s)), -8, 7) + 8`` with ``B = f32(W).T`` and the fp16-rounded scale.
    ``group_size=-1`` means one group over all of K.
    """
    w = np.asarray(w)
    if w.ndim < 2:
        raise LayoutError(f"{LAYOUT_ID}: weights must be [..., N, K] (at least 2 dims), got shape {w.shape}")
    n, k = w.shape[-2:]
    g = _resolve_group(group_size, k)
    if g <= 0 or k <= 0 or k % g:
        raise LayoutError(f"{LAYOUT_ID}: K={k} must be a positive multiple of group_size {group_size}")
    b = np.swapaxes(np.asarray(w, dtype=np.float32), -1, -2)  # [..., K, N]
    bg = b.reshape((*w.shape[:-2], k // g, g, n))
    s = _scales(bg)
    x = bg / s.astype(np.float32)[..., None, :]
    np.rint(x, out=x)
    np.clip(x, np.float32(-8), np.float32(7), out=x)
    x += np.float32(8)
    q = x.astype(np.uint8).reshape((*w.shape[:-2], k, n))
    return q, s


def dequantize_unpacked(q: np.ndarray, s: np.ndarray, group_size: int = DEFAULT_GROUP_SIZE) -> np.ndarray:
    """``(q [..., K, N], s [..., K/g, N])`` -> f32 ``W_hat[..., N, K] = (q - 8) * f32(s)`` (exact)."""
    k = q.shape[-2]
    g = _resolve_group(group_size, k)
    sk = np.repeat(np.asarray(s, dtype=np.float32), g, axis=-2)
    b = (np.asarray(q, dtype=np.float32) - np.float32(8)) * sk
    return np.swapaxes(b, -1, -2)


# --------------------------------------------------------------------------------------------------
# Pack / unpack


def permute_scales(s: np.ndarray, single: bool) -> np.ndarray:
    """Apply the Marlin scale permutation along N (``single``: the one-group / per-channel case)."""
    perm = SCALE_PERM_SINGLE if single else SCALE_PERM
    s = np.asarray(s, dtype=np.float16)
    return s.reshape(-1, perm.size)[:, perm].reshape(s.shape)


def unpermute_scales(s: np.ndarray, single: bool) -> np.ndarray:
    inv = SCALE_PERM_SINGLE_INV if single else SCALE_PERM_INV
    s = np.asarray(s, dtype=np.float16)
    return s.reshape(-1, inv.size)[:, inv].reshape(s.shape)


def pack_codes(q: np.ndarray) -> np.ndarray:
    """``q uint8 [..., K, N]`` (0..15) -> ``qweight int32 [..., K/16, 2N]`` (formats.md §1.2 steps 2-4)."""
    q = np.asarray(q, dtype=np.uint8)
    *lead, k, n = q.shape
    if k % 16 or n % 64:
        raise LayoutError(f"{LAYOUT_ID}: codes need K % 16 == 0 and N % 64 == 0, got K={k}, N={n}")
    # 16x16 tiling: row k//16, column (n//16)*256 + (k%16)*16 + n%16.
    t = q.reshape((*lead, k // 16, 16, n // 16, 16))
    t = np.swapaxes(t, -3, -2).reshape((*lead, k // 16, n // 64, 1024))
    t = t[..., WEIGHT_PERM].astype(np.uint32).reshape((*lead, k // 16, 2 * n, 8))
    shifts = np.arange(0, 32, 4, dtype=np.uint32)
    words = np.bitwise_or.reduce(t << shifts, axis=-1)
    return words.astype(np.uint32).view(np.int32)


def unpack_codes(qweight: np.ndarray) -> np.ndarray:
    """``qweight int32 [..., K/16, 2N]`` -> ``q uint8 [..., K, N]`` (formats.md §1.2 unpack)."""
    qw = np.asarray(qweight)
    if qw.dtype != np.int32:
        raise LayoutError(f"{LAYOUT_ID}: qweight must be int32, got {qw.dtype}")
    *lead, r, n2 = qw.shape
    n = n2 // 2
    if n2 % 128:
        raise LayoutError(f"{LAYOUT_ID}: qweight must have 2N columns with N % 64 == 0, got {n2}")
    shifts = np.arange(0, 32, 4, dtype=np.uint32)
    nib = ((qw.view(np.uint32)[..., None] >> shifts) & np.uint32(0xF)).astype(np.uint8)
    chunks = nib.reshape((*lead, r, n // 64, 1024))[..., WEIGHT_PERM_INV]
    t = chunks.reshape((*lead, r, n // 16, 16, 16))
    return np.swapaxes(t, -3, -2).reshape((*lead, r * 16, n))


def pack(
    w: np.ndarray, group_size: int = DEFAULT_GROUP_SIZE, k_total: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Quantize and pack ``W[..., N, K]`` -> ``(qweight int32 [..., K/16, 2N], scales fp16 [..., K/g, N])``.

    ``k_total``: when ``W`` holds inputs ``k0 .. k0+K`` of a matrix with ``k_total`` inputs (``k0`` and
    ``K`` multiples of the group size), the results are rows ``k0/16 ..`` of the full ``qweight`` and
    ``k0/g ..`` of the full ``scales``.
    """
    w = np.asarray(w)
    g, single = _check_chunk(w.shape, group_size, k_total)
    q, s = quantize(w, g)
    return pack_codes(q), permute_scales(s, single)


def pack_quantized(
    q: np.ndarray, s: np.ndarray, group_size: int = DEFAULT_GROUP_SIZE, k_total: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Pack codes ``q [..., K, N]`` and scales ``s [..., K/g, N]`` (the form ``quantize`` returns)."""
    q = np.asarray(q)
    *lead, k, n = q.shape
    g, single = _check_chunk((*lead, n, k), group_size, k_total)
    if tuple(np.shape(s)) != (*lead, k // g, n):
        raise LayoutError(f"{LAYOUT_ID}: scales must have shape {(*lead, k // g, n)}, got {np.shape(s)}")
    return pack_codes(q), permute_scales(s, single)


def unpack(
    qweight: np.ndarray,
    scales: np.ndarray,
    shape: tuple[int, ...],
    group_size: int = DEFAULT_GROUP_SIZE,
    k_total: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of ``pack``: ``(q uint8 [..., K, N], s fp16 [..., K/g, N])`` for ``W`` of ``shape``."""
    shape = tuple(int(d) for d in shape)
    g, single = _check_chunk(shape, group_size, k_total)
    *lead, n, k = shape
    want_q, want_s = (*lead, k // 16, 2 * n), (*lead, k // g, n)
    if tuple(np.shape(qweight)) != want_q or tuple(np.shape(scales)) != want_s:
        raise LayoutError(
            f"{LAYOUT_ID}: for W{shape} expected qweight {want_q} and scales {want_s}, "
            f"got {np.shape(qweight)} and {np.shape(scales)}"
        )
    if np.asarray(scales).dtype != np.float16:
        raise LayoutError(f"{LAYOUT_ID}: scales must be float16, got {np.asarray(scales).dtype}")
    return unpack_codes(qweight), unpermute_scales(scales, single)


def dequantize(
    qweight: np.ndarray,
    scales: np.ndarray,
    shape: tuple[int, ...],
    group_size: int = DEFAULT_GROUP_SIZE,
    k_total: int | None = None,
) -> np.ndarray:
    """f32 ``W_hat[..., N, K] = (q - 8) * f32(s)`` from the packed tensors."""
    q, s = unpack(qweight, scales, shape, group_size, k_total)
    g = _resolve_group(group_size, shape[-1] if k_total is None else k_total)
    return dequantize_unpacked(q, s, g)


def error_bound(w: np.ndarray, group_size: int = DEFAULT_GROUP_SIZE) -> np.ndarray:
    """Elementwise bound (f32, shape of ``w``) on ``|w - dequantize(pack(w))|``: ``s * (0.5 + 2^-20)``."""
    w = np.asarray(w, dtype=np.float32)
    _, s = quantize(w, group_size)
    g = _resolve_group(group_size, w.shape[-1])
    b = np.swapaxes(np.repeat(MARLIN_BOUND_FACTOR * s.astype(np.float64), g, axis=-2), -1, -2)
    y = b.astype(np.float32)
    return np.where(y.astype(np.float64) < b, np.nextafter(y, np.float32(np.inf)), y).astype(np.float32)
