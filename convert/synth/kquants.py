"""Reference numpy quantizers for the GGUF k-quants Q4_K, Q5_K and Q6_K.

gguf-py 0.19.0 can dequantize k-quants but cannot produce them.  These quantizers write the raw
blocks exactly as ggml stores them (see formats.md §3.2).  They are meant for synthetic test
models: simple, vectorized and with a provable error bound, not llama.cpp's importance-weighted
search.

Scheme (Q4_K / Q5_K, 8 sub-blocks of 32 values, ``L`` = 15 or 31 levels):

* per sub-block ``j``: ``lo_j = min(min(x), 0)``, ``R_j = max(x) - lo_j``, ideal step
  ``s_j = R_j / L`` and ideal offset ``mn_j = -lo_j >= 0``;
* super-block scales ``d >= max_j s_j / 63`` and ``dmin >= max_j mn_j / 63`` rounded *up* to f16;
* sub-scales ``sc_j = ceil(s_j / d)`` (so the effective step ``d*sc_j >= s_j`` and no value above
  the range is ever clipped) and ``m_j = round(mn_j / dmin)``;
* ``q = clip(round((x + dmin*m_j) / (d*sc_j)), 0, L)``.

Q6_K (16 sub-blocks of 16, symmetric): ``s_j = max|x| / 31``, ``d >= max_j s_j / 127`` rounded up to
f16, ``sc_j = ceil(s_j / d)`` (int8, 0..127), ``q = clip(round(x / (d*sc_j)), -32, 31)``.
"""

from __future__ import annotations

import gguf
import numpy as np

QK_K = 256
Q4_K_BYTES = 144
Q5_K_BYTES = 176
Q6_K_BYTES = 210

_F16_MAX = float(np.finfo(np.float16).max)


def _f16_at_least(v: np.ndarray) -> np.ndarray:
    """Smallest float16 values >= v (v >= 0, f32), saturating at the f16 maximum."""
    v = np.minimum(v, _F16_MAX)
    h = v.astype(np.float16)
    low = h.astype(np.float32) < v
    if np.any(low):
        h = np.where(low, np.nextafter(h, np.float16(np.inf)), h)
    return h


def _blocks(x: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0 or x.shape[-1] % QK_K != 0:
        raise ValueError(f"k-quants need the last dimension to be a multiple of {QK_K}, got {x.shape}")
    lead = x.shape[:-1]
    return x.reshape(-1, QK_K), lead


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), 0).astype(np.float32)


def _pack_scales_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Pack 8 six-bit scales and 8 six-bit mins per block into the 12-byte Q4_K/Q5_K field."""
    n = sc.shape[0]
    out = np.empty((n, 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 15) | ((m[:, 4:8] & 15) << 4)
    return out


def _quantize_asym(xb: np.ndarray, levels: int) -> tuple[np.ndarray, ...]:
    """Shared Q4_K/Q5_K step: returns (d f16, dmin f16, sc u8 [n,8], m u8 [n,8], q u8 [n,256])."""
    n = xb.shape[0]
    sub = xb.reshape(n, 8, 32)
    lo = np.minimum(sub.min(axis=-1), 0.0)
    hi = sub.max(axis=-1)
    step = (hi - lo) / np.float32(levels)
    mn = -lo
    d = _f16_at_least(step.max(axis=-1) / np.float32(63))
    dmin = _f16_at_least(mn.max(axis=-1) / np.float32(63))
    d32 = d.astype(np.float32)[:, None]
    dmin32 = dmin.astype(np.float32)[:, None]
    sc = np.clip(np.ceil(_safe_div(step, d32)), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(_safe_div(mn, dmin32)), 0, 63).astype(np.uint8)
    s_eff = d32 * sc.astype(np.float32)
    m_eff = dmin32 * m.astype(np.float32)
    q = np.rint(_safe_div(sub + m_eff[..., None], s_eff[..., None]))
    q = np.clip(q, 0, levels).astype(np.uint8).reshape(n, QK_K)
    return d, dmin, sc, m, q


def _pack_low_nibbles(q: np.ndarray) -> np.ndarray:
    """qs[32c + l] = q[64c + l] | q[64c + 32 + l] << 4  (c = 0..3)."""
    n = q.shape[0]
    q4 = (q & 15).reshape(n, 4, 2, 32)
    return (q4[:, :, 0, :] | (q4[:, :, 1, :] << 4)).reshape(n, 128)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """float32 [..., K] -> uint8 [..., K/256*144] raw Q4_K blocks."""
    xb, lead = _blocks(x)
    n = xb.shape[0]
    d, dmin, sc, m, q = _quantize_asym(xb, 15)
    out = np.empty((n, Q4_K_BYTES), dtype=np.uint8)
    out[:, 0:2] = d.reshape(n, 1).view(np.uint8)
    out[:, 2:4] = dmin.reshape(n, 1).view(np.uint8)
    out[:, 4:16] = _pack_scales_k4(sc, m)
    out[:, 16:144] = _pack_low_nibbles(q)
    return out.reshape(*lead, -1)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    """float32 [..., K] -> uint8 [..., K/256*176] raw Q5_K blocks."""
    xb, lead = _blocks(x)
    n = xb.shape[0]
    d, dmin, sc, m, q = _quantize_asym(xb, 31)
    out = np.empty((n, Q5_K_BYTES), dtype=np.uint8)
    out[:, 0:2] = d.reshape(n, 1).view(np.uint8)
    out[:, 2:4] = dmin.reshape(n, 1).view(np.uint8)
    out[:, 4:16] = _pack_scales_k4(sc, m)
    # qh[l] bit b = fifth bit of value 32*b + l
    hbits = (q >> 4).reshape(n, 8, 32)
    shifts = np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    out[:, 16:48] = np.bitwise_or.reduce(hbits << shifts, axis=1)
    out[:, 48:176] = _pack_low_nibbles(q)
    return out.reshape(*lead, -1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """float32 [..., K] -> uint8 [..., K/256*210] raw Q6_K blocks."""
    xb, lead = _blocks(x)
    n = xb.shape[0]
    sub = xb.reshape(n, 16, 16)
    step = np.abs(sub).max(axis=-1) / np.float32(31)
    d = _f16_at_least(step.max(axis=-1) / np.float32(127))
    d32 = d.astype(np.float32)[:, None]
    sc = np.clip(np.ceil(_safe_div(step, d32)), 0, 127).astype(np.int8)
    s_eff = d32 * sc.astype(np.float32)
    q = np.clip(np.rint(_safe_div(sub, s_eff[..., None])), -32, 31)
    u = (q + 32).astype(np.uint8).reshape(n, 2, 4, 32)  # value i = 128h + 32s + l
    low = u & 15
    high = u >> 4
    out = np.empty((n, Q6_K_BYTES), dtype=np.uint8)
    # ql[64h + 32(s%2) + l] holds s//2 nibble
    ql = low[:, :, 0:2, :] | (low[:, :, 2:4, :] << 4)  # [n, h, s%2, l]
    out[:, 0:128] = ql.reshape(n, 128)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    out[:, 128:192] = qh.reshape(n, 64)
    out[:, 192:208] = sc.view(np.uint8)
    out[:, 208:210] = d.reshape(n, 1).view(np.uint8)
    return out.reshape(*lead, -1)


_KQUANTS = {
    gguf.GGMLQuantizationType.Q4_K: quantize_q4_k,
    gguf.GGMLQuantizationType.Q5_K: quantize_q5_k,
    gguf.GGMLQuantizationType.Q6_K: quantize_q6_k,
}


def quantize(x: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """Quantize float data along its last axis to ``qtype``'s raw GGUF representation.

    K-quants use the quantizers above, everything else gguf.quants.quantize (F32, F16, BF16,
    Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, ...).  F32/F16 come back in their element dtype, the rest as
    uint8 bytes of shape ``[..., K / block * type_size]``.
    """
    qtype = gguf.GGMLQuantizationType(qtype)
    fn = _KQUANTS.get(qtype)
    if fn is not None:
        return fn(x)
    return gguf.quants.quantize(np.asarray(x, dtype=np.float32), qtype)


def can_quantize(ne0: int, qtype: gguf.GGMLQuantizationType) -> bool:
    """True if a row of ``ne0`` values fits whole blocks of ``qtype``."""
    block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
    return ne0 % block == 0


# ---------------------------------------------------------------------------------------------
# Small independent dequantizers (used by the tests to prove the layout; not performance code).


def _unpack_scales_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = s.astype(np.int32)
    sc = np.empty((s.shape[0], 8), dtype=np.int32)
    m = np.empty_like(sc)
    sc[:, :4] = s[:, 0:4] & 63
    m[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)
    m[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, m


def dequantize_k(raw: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """Decode raw Q4_K/Q5_K/Q6_K blocks [..., nbytes] to float32 [..., K], written from formats.md."""
    qtype = gguf.GGMLQuantizationType(qtype)
    nbytes = {
        gguf.GGMLQuantizationType.Q4_K: Q4_K_BYTES,
        gguf.GGMLQuantizationType.Q5_K: Q5_K_BYTES,
        gguf.GGMLQuantizationType.Q6_K: Q6_K_BYTES,
    }[qtype]
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    lead = raw.shape[:-1]
    b = raw.reshape(-1, nbytes)
    i = np.arange(QK_K)
    if qtype == gguf.GGMLQuantizationType.Q6_K:
        ql, qh = b[:, 0:128].astype(np.int32), b[:, 128:192].astype(np.int32)
        scales = b[:, 192:208].copy().view(np.int8).astype(np.float32)
        d = b[:, 208:210].copy().view(np.float16).astype(np.float32)
        h, w = i // 128, i % 128
        s, lane = w // 32, w % 32
        low4 = (ql[:, 64 * h + 32 * (s % 2) + lane] >> (4 * (s // 2))) & 15
        high2 = (qh[:, 32 * h + lane] >> (2 * s)) & 3
        q = ((low4 | (high2 << 4)) - 32).astype(np.float32)
        out = (d * scales[:, i // 16]) * q
    else:
        d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
        dmin = b[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, m = _unpack_scales_k4(b[:, 4:16])
        qs = b[:, -128:].astype(np.int32)
        c, lane, h = i // 64, i % 32, (i % 64) // 32
        q = (qs[:, 32 * c + lane] >> (4 * h)) & 15
        if qtype == gguf.GGMLQuantizationType.Q5_K:
            qh = b[:, 16:48].astype(np.int32)
            q = q | (((qh[:, lane] >> (i // 32)) & 1) << 4)
        j = i // 32
        scale = d * sc[:, j].astype(np.float32)
        offset = dmin * m[:, j].astype(np.float32)
        out = scale * q.astype(np.float32) - offset
    return out.astype(np.float32).reshape(*lead, -1)
