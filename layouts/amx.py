"""Pure-numpy reference for the AMX / AVX-512 tile layouts amx_bf16_v1, amx_int8_v1 and amx_int4_v1.

Normative text: SPEC_amx_marlin.md (to be merged into SPEC.md). In short, for one matrix ``W[N, K]``
(N output rows, K inputs):

* The weight bytes are 1 KiB blocks, each one AMX B tile (16 rows of 64 bytes) covering 16 output rows
  and ``KB`` inputs (KB = 32 bf16, 64 int8, 128 int4). Block ``(nt, kb)`` (n-tile ``nt = n // 16``,
  K-block ``kb = k // KB``) is stored at block index ``(nb * n_block) * KT + kb * T(nb) + ns`` where
  ``nb = nt // n_block``, ``ns = nt % n_block``, ``KT = K // KB`` and ``T(nb)`` is the number of
  n-tiles of N-block ``nb`` (``n_block``, or fewer for the last N-block).
* Inside a block (``c = n % 16``): bf16 byte ``r*64 + c*4 + t*2`` (``r = (k%32)//2``, ``t = k%2``);
  int8 byte ``r*64 + c*4 + t`` (``r = (k%64)//4``, ``t = k%4``) holding ``q + 128``; int4 byte
  ``r*64 + c*4 + t`` (``r = (k%64)//4``, ``t = k%4``) holding the code of ``k%128 < 64`` in the low
  nibble and of ``k%128 >= 64`` in the high nibble.
* Scales (int8, int4) are little-endian f32 right after the weight blocks of the matrix, padded to
  64 bytes. Matrices of a stacked tensor ``w[..., N, K]`` follow each other, ``nbytes(kind, (N, K))``
  bytes apart.

Every function here is vectorized (reshape / transpose), so a 2048 x 7168 expert packs in well under a
second on one core.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from . import ids
from .errors import LayoutError

Kind = Literal["bf16", "int8", "int4"]
KINDS: tuple[str, ...] = ("bf16", "int8", "int4")
LAYOUT_IDS: dict[str, str] = {"bf16": ids.AMX_BF16, "int8": ids.AMX_INT8, "int4": ids.AMX_INT4}
# K extent of one 1 KiB block, per kind.
K_PER_BLOCK: dict[str, int] = {kind: ids.AMX_K_PER_TILE[LAYOUT_IDS[kind]] for kind in KINDS}
INT4_GROUP_SIZES: tuple[int, ...] = (32, 64, 128)
DEFAULT_GROUP_SIZE = 128
# Scales start right after the weight blocks (always a multiple of 1 KiB); each matrix's bytes are padded
# to this, so the next matrix starts 64-byte (cache-line, zmm) aligned.
MATRIX_ALIGN = 64

TILE_N = ids.TILE_N
TILE_BYTES = ids.TILE_BYTES

# --------------------------------------------------------------------------------------------------
# Error bounds (elementwise |w - dequantize(pack(w))|), with derivations.
#
# Notation: u = 2^-24 (f32 unit roundoff), fl() = one f32 operation with round-to-nearest-even. For an
# f32 result r of a single operation, |fl(r) - r| <= u*|r| when |r| is in the normal range; results in
# the subnormal range are multiples of 2^-149, so they are off by at most 2^-150 (and exact when r is
# itself a multiple of 2^-149).
#
# bf16: ŵ = RNE of w to 8 significant bits. For 2^e <= |w| < 2^(e+1) (normal) the spacing is 2^(e-7),
#   so |w - ŵ| <= 2^(e-8) <= 2^-8 * |w|. (The unit roundoff of an 8-bit significand is 2^-8, not 2^-9:
#   w = 1 + 2^-8 is a tie that rounds to 1, an error of 2^-8 / (1 + 2^-8) relative.) bf16 has the f32
#   exponent range, so below 2^-126 the spacing is the bf16 subnormal step 2^-133: |w - ŵ| <= 2^-134.
#   Values with |w| >= BF16_ROUNDS_TO_INF round to +-inf (correct RNE overflow) and get an infinite
#   bound; NaN stays NaN (quiet bit set), inf stays inf; their bound is inf too.
#   The AMX/AVX-512 BF16 instructions treat bf16 subnormal inputs as zero (DAZ); that is kernel
#   behaviour, not part of the layout, and adds at most 2^-126 absolute for such weights.
BF16_REL_BOUND = 2.0**-8
BF16_ABS_BOUND = 2.0**-134
BF16_ROUNDS_TO_INF = float(np.array([0x7F7F8000], dtype=np.uint32).view(np.float32)[0])  # 3.3961776e38
#
# int8: s = the stored f32 row scale (rule in _int8_scales: s >= max|w_row| / 127.5 exactly, so no code
#   is ever clipped by more than half a step), x = fl(w / s), q = clip(rint(x), -127, 127),
#   ŵ = fl(q * s).
#   - |w/s| <= 127.5 and fl is monotone, so |x| <= 127.5 and clipping moves x by at most
#     |x - q| <= 0.5; without clipping rint gives |x - q| <= 0.5 as well.
#   - |w/s - x| <= u * |w/s| <= 127.5u when w/s is normal. When |w/s| < 2^-126, then q = 0 and the error
#     is |w| < 2^-126 * s, which is inside the bound below anyway.
#   - q*s: |q| <= 127 and s >= 2^-149 is a multiple of 2^-149, so |q*s| is either >= 2^-126 (normal,
#     relative error u) or a subnormal multiple of 2^-149 (exact): |fl(q*s) - q*s| <= 127u * s.
#   Sum: |w - ŵ| <= s*|w/s - q| + 127u*s <= s*(0.5 + 127.5u + 127u) < s*(0.5 + 2^-16)   (254.5 < 256).
INT8_BOUND_FACTOR = 0.5 + 2.0**-16
#
# int4: s = stored f32 group scale (rule in _int4_scales: max(w_g) <= 7.5 s and -min(w_g) <= 8.5 s
#   exactly), x = fl(w / s), q = clip(rint(x), -8, 7) + 8, ŵ = fl((q - 8) * s).
#   - x in [-8.5, 7.5] (monotone rounding), so |x - (q - 8)| <= 0.5 with or without clipping (rint(7.5)
#     = 8 is clipped to 7: off by exactly 0.5; rint(-8.5) = -8).
#   - |w/s - x| <= 8.5u (normal case; the subnormal case gives q - 8 = 0 and |w| < 2^-126 s).
#   - (q-8)*s: |q-8| <= 8, same argument as int8: error <= 8u*s.
#   Sum: |w - ŵ| <= s*(0.5 + 8.5u + 8u) < s*(0.5 + 2^-19)   (16.5 < 32).
INT4_BOUND_FACTOR = 0.5 + 2.0**-19

_F32_INF = np.float32(np.inf)


# --------------------------------------------------------------------------------------------------
# Parameter and shape checks


def _check_params(kind: str, n_block: int, group_size: int) -> str | None:
    if kind not in KINDS:
        return f"kind must be one of {KINDS}, got {kind!r}"
    if not isinstance(n_block, (int, np.integer)) or n_block < 1:
        return f"n_block must be a positive integer, got {n_block!r}"
    if kind == "int4" and group_size not in INT4_GROUP_SIZES:
        return f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size!r}"
    return None


def supports(
    kind: str, shape: tuple[int, ...], *, n_block: int = ids.AMX_N_BLOCK, group_size: int = DEFAULT_GROUP_SIZE
) -> str | None:
    """None when ``w[..., N, K]`` of this shape can be packed as ``kind``; otherwise the reason."""
    reason = _check_params(kind, n_block, group_size)
    if reason:
        return reason
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2:
        return f"weights must be [..., N, K] (at least 2 dims), got shape {shape}"
    if any(d < 0 for d in shape):
        return f"negative dimension in shape {shape}"
    n, k = shape[-2:]
    kb = K_PER_BLOCK[kind]
    if n == 0 or n % TILE_N:
        return f"N must be a positive multiple of {TILE_N} (tile rows), got N={n}"
    if k == 0 or k % kb:
        return f"K must be a positive multiple of {kb} (K per {LAYOUT_IDS[kind]} block), got K={k}"
    return None


def _require(kind: str, shape: tuple[int, ...], n_block: int, group_size: int) -> None:
    reason = supports(kind, shape, n_block=n_block, group_size=group_size)
    if reason:
        raise LayoutError(f"{LAYOUT_IDS.get(kind, 'amx')}: {reason}")


def _round_up(x: int, a: int) -> int:
    return -(-x // a) * a


def _matrix_bytes(kind: str, n: int, k: int, group_size: int) -> tuple[int, int, int]:
    """(weight bytes, scale bytes, total bytes incl. padding) of one N x K matrix."""
    weight = (n // TILE_N) * (k // K_PER_BLOCK[kind]) * TILE_BYTES
    if kind == "bf16":
        scale = 0
    elif kind == "int8":
        scale = 4 * n
    else:
        scale = 4 * n * (k // group_size)
    return weight, scale, weight + _round_up(scale, MATRIX_ALIGN)


def nbytes(
    kind: str, shape: tuple[int, ...], *, n_block: int = ids.AMX_N_BLOCK, group_size: int = DEFAULT_GROUP_SIZE
) -> int:
    """Bytes of ``pack(kind, w)`` for ``w`` of this shape (all leading matrices together)."""
    _require(kind, shape, n_block, group_size)
    n, k = int(shape[-2]), int(shape[-1])
    return int(np.prod(shape[:-2], dtype=np.int64)) * _matrix_bytes(kind, n, k, group_size)[2]


def block_index(nt: np.ndarray | int, kb: np.ndarray | int, n_tiles: int, k_blocks: int, n_block: int) -> np.ndarray:
    """Index (in 1 KiB units, within one matrix) of the block of n-tile ``nt`` and K-block ``kb``."""
    nb = np.asarray(nt) // n_block
    ns = np.asarray(nt) % n_block
    tiles_in_nb = np.minimum(n_block, n_tiles - nb * n_block)
    return nb * n_block * k_blocks + np.asarray(kb) * tiles_in_nb + ns


# --------------------------------------------------------------------------------------------------
# Block ordering: (E, NT, KT, B) per-tile payloads <-> (E, NT*KT*B) in N-block / K-block / n-tile order.


def _order_blocks(t: np.ndarray, n_block: int) -> np.ndarray:
    e, nt, kt, b = t.shape
    full = (nt // n_block) * n_block
    parts = []
    if full:
        body = t[:, :full].reshape(e, full // n_block, n_block, kt, b)
        parts.append(body.transpose(0, 1, 3, 2, 4).reshape(e, full * kt * b))
    if full < nt:
        parts.append(t[:, full:].transpose(0, 2, 1, 3).reshape(e, (nt - full) * kt * b))
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def _unorder_blocks(flat: np.ndarray, nt: int, kt: int, b: int, n_block: int) -> np.ndarray:
    e = flat.shape[0]
    full = (nt // n_block) * n_block
    parts = []
    if full:
        body = flat[:, : full * kt * b].reshape(e, full // n_block, kt, n_block, b)
        parts.append(body.transpose(0, 1, 3, 2, 4).reshape(e, full, kt, b))
    if full < nt:
        tail = flat[:, full * kt * b :].reshape(e, kt, nt - full, b)
        parts.append(tail.transpose(0, 2, 1, 3))
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


# --------------------------------------------------------------------------------------------------
# Quantizers (unpacked form)


def _as_matrices(w: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    w = np.asarray(w)
    if w.dtype != np.float32:
        w = w.astype(np.float32)
    return w.reshape((-1, *w.shape[-2:])), w.shape[:-2]


def bf16_bits(w: np.ndarray) -> np.ndarray:
    """f32 -> bf16 bit patterns (uint16), round to nearest even; NaN stays NaN (quiet bit set)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    u = w.view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit and truncating is RNE; it never wraps for non-NaN values.
    out = ((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(w)
    if nan.any():
        out[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return out


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) -> f32 values (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def _require_finite(kind: str, *extremes: np.ndarray) -> None:
    for x in extremes:
        if not np.isfinite(x).all():
            raise LayoutError(f"{LAYOUT_IDS[kind]}: weights must be finite (found inf or NaN)")


def _int8_scales(w: np.ndarray) -> np.ndarray:
    """Row scales of (E, N, K) f32 weights.

    s0 = fl(max|w_row| / 127). Where that would clip the largest value by more than half a step
    (max|w_row| > 127.5 * s0 exactly, which can only happen when s0 is subnormal or zero), s is the next
    f32 above s0 (then s >= max/127 exactly). All-zero rows get s = 1.
    """
    mx = w.max(axis=-1)
    mn = w.min(axis=-1)
    _require_finite("int8", mx, mn)
    m = np.maximum(mx, -mn)
    s = m / np.float32(127)
    bump = m.astype(np.float64) > 127.5 * s.astype(np.float64)
    s = np.where(bump, np.nextafter(s, _F32_INF), s)
    return np.where(m == 0, np.float32(1), s).astype(np.float32)


def _int4_scales(wg: np.ndarray) -> np.ndarray:
    """Group scales of (..., g) f32 groups: vLLM's symmetric uint4b8 rule in f32.

    s0 = max(fl(|max| / 7), fl(|min| / 8)). Where the codes would clip by more than half a step
    (max > 7.5 * s0 or -min > 8.5 * s0 exactly; only possible when s0 is subnormal or zero), s is the
    next f32 above s0. All-zero groups get s = 1.
    """
    mx = wg.max(axis=-1)
    mn = wg.min(axis=-1)
    _require_finite("int4", mx, mn)
    s = np.maximum(np.abs(mx) / np.float32(7), np.abs(mn) / np.float32(8))
    s64 = s.astype(np.float64)
    bump = (mx.astype(np.float64) > 7.5 * s64) | (-mn.astype(np.float64) > 8.5 * s64)
    s = np.where(bump, np.nextafter(s, _F32_INF), s)
    return np.where((mx == 0) & (mn == 0), np.float32(1), s).astype(np.float32)


def quantize(
    kind: str, w: np.ndarray, *, n_block: int = ids.AMX_N_BLOCK, group_size: int = DEFAULT_GROUP_SIZE
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Quantize ``w[..., N, K]`` to the unpacked form that ``unpack`` returns.

    bf16: f32 values rounded to bf16 (RNE). int8: ``(q int8 [..., N, K] in -127..127, s f32 [..., N])``
    with ``w ~ q * s``. int4: ``(q uint8 [..., N, K] in 0..15, s f32 [..., N, K // g])`` with
    ``w ~ (q - 8) * s[..., k // g]``.
    """
    w = np.asarray(w)
    _require(kind, w.shape, n_block, group_size)
    m, lead = _as_matrices(w)
    e, n, k = m.shape
    if kind == "bf16":
        return bf16_to_f32(bf16_bits(m)).reshape(w.shape)
    if kind == "int8":
        s = _int8_scales(m)
        x = m / s[..., None]
        np.rint(x, out=x)
        np.clip(x, np.float32(-127), np.float32(127), out=x)
        q = x.astype(np.int8)
        return q.reshape(w.shape), s.reshape((*lead, n))
    g = group_size
    wg = m.reshape(e, n, k // g, g)
    s = _int4_scales(wg)
    x = wg / s[..., None]
    np.rint(x, out=x)
    np.clip(x, np.float32(-8), np.float32(7), out=x)
    x += np.float32(8)
    q = x.astype(np.uint8)
    return q.reshape(w.shape), s.reshape((*lead, n, k // g))


# --------------------------------------------------------------------------------------------------
# Pack / unpack


def _f32_bytes(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype="<f4").view(np.uint8)


def _words_to_bytes(x: np.ndarray, dtype: str = "<u4") -> np.ndarray:
    """(E, words) -> (E, bytes). uint32 words that only carry bytes keep their memory order on any host;
    bf16 words ("<u2") are written little-endian."""
    x = np.ascontiguousarray(x)
    if dtype == "<u2":
        x = np.ascontiguousarray(x.view(np.uint16), dtype="<u2")
    return x.view(np.uint8).reshape(x.shape[0], -1)


def _assemble(weight: np.ndarray, scales: np.ndarray | None, total: int) -> np.ndarray:
    """(E, weight bytes) + optional (E, scale bytes) -> 1-D buffer of E * total bytes."""
    e, wb = weight.shape
    out = np.zeros((e, total), dtype=np.uint8)
    out[:, :wb] = weight
    if scales is not None:
        out[:, wb : wb + scales.shape[1]] = scales
    return out.reshape(-1)


def pack(
    kind: str, w: np.ndarray, *, n_block: int = ids.AMX_N_BLOCK, group_size: int = DEFAULT_GROUP_SIZE
) -> np.ndarray:
    """Quantize and pack ``w[..., N, K]`` (float) into the ``amx_<kind>_v1`` bytes (1-D uint8)."""
    w = np.asarray(w)
    _require(kind, w.shape, n_block, group_size)
    if kind == "bf16":  # skip the f32 round trip of quantize(): pack the bf16 bits directly
        return _pack_bf16_bits(bf16_bits(np.asarray(w, dtype=np.float32)), w.shape, n_block)
    qs = quantize(kind, w, n_block=n_block, group_size=group_size)
    return pack_quantized(kind, qs, w.shape, n_block=n_block, group_size=group_size)


def _pack_bf16_bits(bits: np.ndarray, shape: tuple[int, ...], n_block: int) -> np.ndarray:
    n, k = shape[-2:]
    e = int(np.prod(shape[:-2], dtype=np.int64))
    nt, kb = n // TILE_N, k // K_PER_BLOCK["bf16"]
    bits = np.ascontiguousarray(bits.reshape(e, n, k))
    # Move the (k even, k odd) pairs as one 32-bit word: (E, nt, c, kb, r) -> (E, nt, kb, r, c),
    # so uint16 element (r*16 + c)*2 + t, i.e. byte r*64 + c*4 + t*2, holds W[16nt + c, 32kb + 2r + t].
    pairs = bits.view(np.uint32).reshape(e, nt, 16, kb, 16)
    tiles = pairs.transpose(0, 1, 3, 4, 2).reshape(e, nt, kb, 256)
    return _words_to_bytes(_order_blocks(tiles, n_block), "<u2").reshape(-1)


def pack_quantized(
    kind: str,
    qs: np.ndarray | tuple[np.ndarray, np.ndarray],
    shape: tuple[int, ...],
    *,
    n_block: int = ids.AMX_N_BLOCK,
    group_size: int = DEFAULT_GROUP_SIZE,
) -> np.ndarray:
    """Pack an already quantized tensor (the form ``quantize``/``unpack`` use) into bytes."""
    shape = tuple(int(d) for d in shape)
    _require(kind, shape, n_block, group_size)
    n, k = shape[-2:]
    e = int(np.prod(shape[:-2], dtype=np.int64))
    nt, kb = n // TILE_N, k // K_PER_BLOCK[kind]
    total = _matrix_bytes(kind, n, k, group_size)[2]
    if kind == "bf16":
        return _pack_bf16_bits(bf16_bits(np.asarray(qs, dtype=np.float32)), shape, n_block)
    q, s = qs
    if kind == "int8":
        u = np.asarray(q, dtype=np.int8).reshape(e, n, k).view(np.uint8) ^ np.uint8(0x80)  # q + 128
        # 4 consecutive k (t = 0..3) move together as one 32-bit word: (E, nt, c, kb, r) -> (E, nt, kb, r, c).
        quads = np.ascontiguousarray(u).view(np.uint32).reshape(e, nt, 16, kb, 16)
        tiles = quads.transpose(0, 1, 3, 4, 2).reshape(e, nt, kb, 256)
        scales = _f32_bytes(np.asarray(s, dtype=np.float32).reshape(e, n)).reshape(e, 4 * n)
        return _assemble(_words_to_bytes(_order_blocks(tiles, n_block)), scales, total)
    g = group_size
    ng = 128 // g  # groups per 128-k block
    qb = np.asarray(q, dtype=np.uint8).reshape(e, n, kb, 2, 64)
    # Low nibble: k % 128 < 64; high nibble: the same position in the second half of the 128-k block.
    nib = np.ascontiguousarray(qb[:, :, :, 0] | (qb[:, :, :, 1] << np.uint8(4)))  # (E, N, kb, 64)
    quads = nib.view(np.uint32).reshape(e, nt, 16, kb, 16)
    tiles = quads.transpose(0, 1, 3, 4, 2).reshape(e, nt, kb, 256)
    # Scales of block (nt, kb): f32 index j*16 + c for group j of the block and row c of the tile.
    st = np.asarray(s, dtype=np.float32).reshape(e, nt, 16, kb, ng).transpose(0, 1, 3, 4, 2)
    scales = _f32_bytes(_order_blocks(st.reshape(e, nt, kb, ng * 16), n_block)).reshape(e, -1)
    return _assemble(_words_to_bytes(_order_blocks(tiles, n_block)), scales, total)


def _split(kind: str, buf: np.ndarray, shape: tuple[int, ...], n_block: int, group_size: int):
    shape = tuple(int(d) for d in shape)
    _require(kind, shape, n_block, group_size)
    buf = np.asarray(buf)
    if buf.dtype != np.uint8 or buf.ndim != 1:
        raise LayoutError(f"{LAYOUT_IDS[kind]}: packed buffer must be 1-D uint8, got {buf.dtype} {buf.shape}")
    n, k = shape[-2:]
    e = int(np.prod(shape[:-2], dtype=np.int64))
    wbytes, sbytes, total = _matrix_bytes(kind, n, k, group_size)
    if buf.size != e * total:
        raise LayoutError(f"{LAYOUT_IDS[kind]}: packed buffer has {buf.size} bytes, shape {shape} needs {e * total}")
    m = buf.reshape(e, total)
    return shape, e, n, k, m[:, :wbytes], m[:, wbytes : wbytes + sbytes]


def unpack(
    kind: str,
    buf: np.ndarray,
    shape: tuple[int, ...],
    *,
    n_block: int = ids.AMX_N_BLOCK,
    group_size: int = DEFAULT_GROUP_SIZE,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Inverse of ``pack``: the same form as ``quantize`` returns, bit for bit."""
    shape, e, n, k, wpart, spart = _split(kind, buf, shape, n_block, group_size)
    nt, kb = n // TILE_N, k // K_PER_BLOCK[kind]
    lead = shape[:-2]
    if kind == "bf16":
        words = np.ascontiguousarray(wpart).view("<u2")
        tiles = _unorder_blocks(words, nt, kb, 512, n_block).reshape(e, nt, kb, 16, 16, 2)
        bits = tiles.transpose(0, 1, 4, 2, 3, 5).reshape(shape)
        return bf16_to_f32(bits)
    tiles = _unorder_blocks(wpart, nt, kb, TILE_BYTES, n_block)
    if kind == "int8":
        u = tiles.reshape(e, nt, kb, 16, 16, 4).transpose(0, 1, 4, 2, 3, 5).reshape(shape)
        q = (u ^ np.uint8(0x80)).view(np.int8)
        s = np.ascontiguousarray(spart).view("<f4").astype(np.float32).reshape((*lead, n))
        return q, s
    g = group_size
    ng = 128 // g
    b = tiles.reshape(e, nt, kb, 16, 16, 4)
    halves = np.stack([b & np.uint8(0x0F), b >> np.uint8(4)], axis=3)  # (e, nt, kb, 2, r, c, t)
    q = halves.transpose(0, 1, 5, 2, 3, 4, 6).reshape(shape)
    sflat = np.ascontiguousarray(spart).view("<f4").astype(np.float32)
    st = _unorder_blocks(sflat, nt, kb, ng * 16, n_block).reshape(e, nt, kb, ng, 16)
    s = st.transpose(0, 1, 4, 2, 3).reshape((*lead, n, k // g))
    return q, s


def dequantize_unpacked(
    kind: str, qs: np.ndarray | tuple[np.ndarray, np.ndarray], group_size: int = DEFAULT_GROUP_SIZE
) -> np.ndarray:
    """f32 weights from the unpacked form: bf16 as is, int8 ``fl(q*s)``, int4 ``fl((q-8)*s)``."""
    if kind == "bf16":
        return np.asarray(qs, dtype=np.float32)
    q, s = qs
    if kind == "int8":
        return q.astype(np.float32) * s[..., None]
    sk = np.repeat(s, group_size, axis=-1)
    return (q.astype(np.float32) - np.float32(8)) * sk


def dequantize(
    kind: str,
    buf: np.ndarray,
    shape: tuple[int, ...],
    *,
    n_block: int = ids.AMX_N_BLOCK,
    group_size: int = DEFAULT_GROUP_SIZE,
) -> np.ndarray:
    """f32 ``[..., N, K]`` weights represented by a packed buffer."""
    qs = unpack(kind, buf, shape, n_block=n_block, group_size=group_size)
    return dequantize_unpacked(kind, qs, group_size)


def _round_up_f32(x: np.ndarray) -> np.ndarray:
    """f64 -> the smallest f32 >= x (so a bound never shrinks by the conversion)."""
    y = x.astype(np.float32)
    return np.where(y.astype(np.float64) < x, np.nextafter(y, _F32_INF), y).astype(np.float32)


def error_bound(
    kind: str, w: np.ndarray, *, n_block: int = ids.AMX_N_BLOCK, group_size: int = DEFAULT_GROUP_SIZE
) -> np.ndarray:
    """Elementwise bound on ``|w - dequantize(pack(w))|`` (f32, shape of ``w``); derivations above."""
    w = np.asarray(w, dtype=np.float32)
    _require(kind, w.shape, n_block, group_size)
    if kind == "bf16":
        a = np.abs(w.astype(np.float64))
        b = np.maximum(BF16_REL_BOUND * a, BF16_ABS_BOUND)
        b = np.where(np.isfinite(a) & (a < BF16_ROUNDS_TO_INF), b, np.inf)
        return _round_up_f32(b)
    q, s = quantize(kind, w, n_block=n_block, group_size=group_size)
    s64 = s.astype(np.float64)
    if kind == "int8":
        b = np.broadcast_to((INT8_BOUND_FACTOR * s64)[..., None], w.shape)
    else:
        b = np.repeat(INT4_BOUND_FACTOR * s64, group_size, axis=-1)
    return _round_up_f32(b)
