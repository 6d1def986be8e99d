"""`ggml_lanes_v1`: GGUF blocks (Q4_K, Q6_K, Q8_0; Q5_0, Q4_0 as Q8_0) re-arranged so one SIMD lane is one row.

`ggml_rows_v1` keeps each block's bytes as they are; a kernel then needs shuffles and horizontal
sums to use them. Here the same fields (codes, sub-block scales and mins, super-block f16 scales) of
16 rows and one 256-value super-block are stored side by side ("a lane block"), like an amx tile:
a 64-byte load holds 4 consecutive codes of each of the 16 rows, so `vpdpbusd` with the broadcast
activation dword gives 16 outputs at once, with no shuffles. Every field keeps its source bits, so
the layout is lossless: `unpack(pack(raw))` gives back the GGUF bytes. Normative text: SPEC.md §6.4.

Lane block of Q4_K (2368 bytes, rows c = 0..15 of the group, k = 0..255 of the super-block):
  0     codes: half h at 1024*h; byte r*64 + c*4 + t: low nibble = code of k = 128h + 4r + t,
        high nibble = code of k = 128h + 64 + 4r + t (r, t: 0..15, 0..3). This is amx_int4_v1's block.
  2048  scales: byte j*16 + c = 6-bit scale of sub-block j (k = 32j .. 32j+31)
  2176  mins: byte p*32 + c*2 + e = 6-bit min of sub-block 2p + e
  2304  d: f16 [16];  2336  dmin: f16 [16]
Lane block of Q6_K (3360 bytes):
  0     codes, 192 bytes per tile row r (0..15), so a kernel reads them in one sequential pass:
        r*192 + h*64 + c*4 + t (h = 0, 1): low 4 bits, as byte r*64 + c*4 + t of Q4_K's half h;
        r*192 + 128 + c*4 + t: high 2 bits, bits 2i..2i+1 = high bits of the code of k = 64i + 4r + t
  3072  scales: int8, byte j*16 + c = scale of sub-block j (k = 16j .. 16j+15)
  3328  d: f16 [16]
Lane block of Q8_0 (544 bytes, one 32-value block of 16 rows):
  0     codes: byte r*64 + c*4 + t (r = 0..7) = (code of k = 4r + t) XOR 0x80 (the unsigned q + 128)
  512   d: f16 [16]
Q5_0 and Q4_0 sources are stored as Q8_0 lane blocks: their value d*(q - 16), d*(q - 8) is the Q8_0
value d*q' with the int8 code q' = q - 16 (q - 8) and the same f16 d, so the recoding is exact both
ways (unpack gives back the Q5_0 / Q4_0 bytes) and one kernel serves the three types.
A matrix [N, K] (N % 16 == 0, K a multiple of the type's block: 256, or 32 for Q8_0) is its N/16 row
groups one after another, each its lane blocks in K order; a stack [..., N, K] is its matrices one
after another.
"""

from __future__ import annotations

import numpy as np

from .errors import LayoutError

LANES = 16
TYPES: tuple[str, ...] = ("Q4_K", "Q6_K", "Q8_0", "Q5_0", "Q4_0")
SOURCE_BLOCK_BYTES = {"Q4_K": 144, "Q6_K": 210, "Q8_0": 34, "Q5_0": 22, "Q4_0": 18}
LANE_BLOCK_BYTES = {"Q4_K": 2368, "Q6_K": 3360, "Q8_0": 544, "Q5_0": 544, "Q4_0": 544}
BLOCK_VALUES = {"Q4_K": 256, "Q6_K": 256, "Q8_0": 32, "Q5_0": 32, "Q4_0": 32}
AS_Q8_0 = {"Q5_0": 16, "Q4_0": 8}  # stored as Q8_0 lane blocks: code offset of the source type


def supports(shape: tuple[int, ...], ggml_type: str) -> str | None:
    """None when a tensor of this shape and type can be stored; otherwise the reason."""
    if ggml_type not in TYPES:
        return f"ggml_lanes_v1 stores {', '.join(TYPES)}, not {ggml_type}"
    if len(shape) < 2:
        return f"ggml_lanes_v1 stores matrices [..., N, K], got shape {tuple(shape)}"
    n, k = shape[-2:]
    qk = BLOCK_VALUES[ggml_type]
    if n <= 0 or n % LANES:
        return f"N must be a positive multiple of {LANES} (lanes), got N={n}"
    if k <= 0 or k % qk:
        return f"K must be a positive multiple of {qk} (the {ggml_type} block), got K={k}"
    return None


def _require(shape: tuple[int, ...], ggml_type: str) -> None:
    reason = supports(shape, ggml_type)
    if reason:
        raise LayoutError(reason)


def nbytes(shape: tuple[int, ...], ggml_type: str) -> int:
    _require(shape, ggml_type)
    m = int(np.prod(shape[:-1], dtype=np.int64))
    return m // LANES * (shape[-1] // BLOCK_VALUES[ggml_type]) * LANE_BLOCK_BYTES[ggml_type]


# --------------------------------------------------------------------------------------------------
# Fields of GGUF blocks and back. `blocks` is uint8 [..., bytes per block].


def _q4k_fields(blocks: np.ndarray) -> dict[str, np.ndarray]:
    s = blocks[..., 4:16].astype(np.uint8)
    sc = np.empty((*blocks.shape[:-1], 8), np.uint8)
    mn = np.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    mn[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    qs = blocks[..., 16:144].reshape(*blocks.shape[:-1], 4, 32)
    codes = np.stack([qs & 0xF, qs >> 4], axis=-2).reshape(*blocks.shape[:-1], 256)  # value 64j + 32e + l
    return {"d": blocks[..., 0:2], "dmin": blocks[..., 2:4], "sc": sc, "mn": mn, "codes": codes}


def _q4k_blocks(f: dict[str, np.ndarray]) -> np.ndarray:
    sc, mn, codes = f["sc"], f["mn"], f["codes"]
    lead = codes.shape[:-1]
    out = np.empty((*lead, 144), np.uint8)
    out[..., 0:2] = f["d"]
    out[..., 2:4] = f["dmin"]
    out[..., 4:8] = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
    out[..., 8:12] = (mn[..., :4] & 63) | ((mn[..., 4:] >> 4) << 6)
    out[..., 12:16] = (sc[..., 4:] & 0xF) | ((mn[..., 4:] & 0xF) << 4)
    c = codes.reshape(*lead, 4, 2, 32)
    out[..., 16:144] = (c[..., 0, :] | (c[..., 1, :] << 4)).reshape(*lead, 128)
    return out


def _q6k_fields(blocks: np.ndarray) -> dict[str, np.ndarray]:
    lead = blocks.shape[:-1]
    ql = blocks[..., 0:128].reshape(*lead, 2, 2, 32)  # [half][first/second 32 bytes][l]
    qh = blocks[..., 128:192].reshape(*lead, 2, 1, 32)
    lo = np.stack([ql[..., 0, :] & 0xF, ql[..., 1, :] & 0xF, ql[..., 0, :] >> 4, ql[..., 1, :] >> 4], axis=-2)
    hi = (qh >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 3  # [half][quarter][l]
    codes = (lo | (hi << 4)).reshape(*lead, 256)  # value 128h + 32i + l
    return {"codes": codes, "sc": blocks[..., 192:208], "d": blocks[..., 208:210]}


def _q6k_blocks(f: dict[str, np.ndarray]) -> np.ndarray:
    codes = f["codes"]
    lead = codes.shape[:-1]
    c = codes.reshape(*lead, 2, 4, 32)
    out = np.empty((*lead, 210), np.uint8)
    lo = c & 0xF
    ql = np.stack([lo[..., 0, :] | (lo[..., 2, :] << 4), lo[..., 1, :] | (lo[..., 3, :] << 4)], -2)
    out[..., 0:128] = ql.reshape(*lead, 128)
    h = c >> 4
    qh = h[..., 0, :] | (h[..., 1, :] << 2) | (h[..., 2, :] << 4) | (h[..., 3, :] << 6)
    out[..., 128:192] = qh.reshape(*lead, 64)
    out[..., 192:208] = f["sc"]
    out[..., 208:210] = f["d"]
    return out


def _legacy_to_q8_0(blocks: np.ndarray, ggml_type: str) -> np.ndarray:
    """Q5_0 / Q4_0 blocks [..., 22 or 18] -> the Q8_0 blocks [..., 34] of the same values."""
    lead = blocks.shape[:-1]
    qs = blocks[..., -16:]
    q = np.concatenate([qs & 0xF, qs >> 4], axis=-1).astype(np.int16)  # value j, j + 16
    if ggml_type == "Q5_0":
        qh = blocks[..., 2:6].copy().view("<u4")  # bit j: high bit of value j
        bits = (qh >> np.arange(32, dtype=np.uint32)) & 1
        q |= (bits << 4).astype(np.int16)
    out = np.empty((*lead, 34), np.uint8)
    out[..., 0:2] = blocks[..., 0:2]
    out[..., 2:34] = (q - AS_Q8_0[ggml_type]).astype(np.int8).view(np.uint8)
    return out


def _q8_0_to_legacy(blocks: np.ndarray, ggml_type: str) -> np.ndarray:
    """Inverse of _legacy_to_q8_0."""
    lead = blocks.shape[:-1]
    q = (blocks[..., 2:34].view(np.int8).astype(np.int16) + AS_Q8_0[ggml_type]).astype(np.uint8)
    out = np.empty((*lead, SOURCE_BLOCK_BYTES[ggml_type]), np.uint8)
    out[..., 0:2] = blocks[..., 0:2]
    out[..., -16:] = (q[..., :16] & 0xF) | ((q[..., 16:] & 0xF) << 4)
    if ggml_type == "Q5_0":
        bits = ((q >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
        out[..., 2:6] = np.bitwise_or.reduce(bits, axis=-1).astype("<u4")[..., None].view(np.uint8)
    return out


def _nibble_tiles(codes4: np.ndarray) -> np.ndarray:
    """4-bit codes [..., 16 rows, 256] -> [..., 2048] in the amx_int4 block order (two halves)."""
    lead = codes4.shape[:-2]
    c = codes4.reshape(*lead, LANES, 2, 2, 16, 4)  # [c][h][lo/hi][r][t]
    b = c[..., 0, :, :] | (c[..., 1, :, :] << 4)  # [c][h][r][t]
    nd = len(lead)
    return b.transpose(*range(nd), nd + 1, nd + 2, nd, nd + 3).reshape(*lead, 2048)  # [h][r][c][t]


def _nibble_codes(tiles: np.ndarray) -> np.ndarray:
    """Inverse of _nibble_tiles: [..., 2048] -> [..., 16 rows, 256]."""
    lead = tiles.shape[:-1]
    b = tiles.reshape(*lead, 2, 16, LANES, 4)  # [h][r][c][t]
    c = np.stack([b & 0xF, b >> 4], axis=-3)  # [h][r][lo/hi][c][t]
    nd = len(lead)
    return c.transpose(*range(nd), nd + 3, nd, nd + 2, nd + 1, nd + 4).reshape(*lead, LANES, 256)


def _blocks_to_lanes(blocks: np.ndarray, ggml_type: str) -> np.ndarray:
    """Source blocks [G, 16, nb, bytes] -> lane blocks [G, nb, lane bytes]."""
    g, _, nb, _ = blocks.shape
    bl = blocks.transpose(0, 2, 1, 3)  # [G, nb, 16, bytes]
    if ggml_type in AS_Q8_0:
        bl, ggml_type = _legacy_to_q8_0(bl, ggml_type), "Q8_0"
    out = np.empty((g, nb, LANE_BLOCK_BYTES[ggml_type]), np.uint8)
    if ggml_type == "Q8_0":
        codes = bl[..., 2:34].reshape(g, nb, LANES, 8, 4).transpose(0, 1, 3, 2, 4)  # [r][c][t]
        out[..., 0:512] = codes.reshape(g, nb, 512) ^ 0x80
        out[..., 512:544] = bl[..., 0:2].reshape(g, nb, 32)
    elif ggml_type == "Q4_K":
        f = _q4k_fields(bl)
        out[..., 0:2048] = _nibble_tiles(f["codes"])
        out[..., 2048:2176] = f["sc"].swapaxes(-1, -2).reshape(g, nb, 128)
        out[..., 2176:2304] = f["mn"].reshape(g, nb, LANES, 4, 2).transpose(0, 1, 3, 2, 4).reshape(g, nb, 128)
        out[..., 2304:2336] = f["d"].reshape(g, nb, 32)
        out[..., 2336:2368] = f["dmin"].reshape(g, nb, 32)
    else:
        f = _q6k_fields(bl)
        codes = f["codes"]
        lo = _nibble_tiles(codes & 0xF).reshape(g, nb, 2, 16, 64).swapaxes(2, 3)  # [r][h][64]
        hi = (codes >> 4).reshape(g, nb, LANES, 4, 16, 4)  # [c][i][r][t]
        packed = hi[..., 0, :, :] | (hi[..., 1, :, :] << 2) | (hi[..., 2, :, :] << 4) | (hi[..., 3, :, :] << 6)
        hb = packed.transpose(0, 1, 3, 2, 4).reshape(g, nb, 16, 1, 64)  # [r][c][t]
        out[..., 0:3072] = np.concatenate([lo, hb], axis=3).reshape(g, nb, 3072)
        out[..., 3072:3328] = f["sc"].swapaxes(-1, -2).reshape(g, nb, 256)
        out[..., 3328:3360] = f["d"].reshape(g, nb, 32)
    return out


def _lanes_to_blocks(lanes: np.ndarray, ggml_type: str) -> np.ndarray:
    """Inverse: lane blocks [G, nb, lane bytes] -> source blocks [G, 16, nb, bytes]."""
    g, nb, _ = lanes.shape
    if ggml_type in AS_Q8_0:
        q8 = _lanes_to_blocks(lanes, "Q8_0").transpose(0, 2, 1, 3)  # [G, nb, 16, 34]
        return _q8_0_to_legacy(q8, ggml_type).transpose(0, 2, 1, 3)
    if ggml_type == "Q8_0":
        blocks = np.empty((g, nb, LANES, 34), np.uint8)
        blocks[..., 0:2] = lanes[..., 512:544].reshape(g, nb, LANES, 2)
        codes = (lanes[..., 0:512] ^ 0x80).reshape(g, nb, 8, LANES, 4).transpose(0, 1, 3, 2, 4)
        blocks[..., 2:34] = codes.reshape(g, nb, LANES, 32)
    elif ggml_type == "Q4_K":
        f = {
            "codes": _nibble_codes(lanes[..., 0:2048]),
            "sc": lanes[..., 2048:2176].reshape(g, nb, 8, LANES).swapaxes(-1, -2),
            "mn": lanes[..., 2176:2304].reshape(g, nb, 4, LANES, 2).transpose(0, 1, 3, 2, 4).reshape(g, nb, LANES, 8),
            "d": lanes[..., 2304:2336].reshape(g, nb, LANES, 2),
            "dmin": lanes[..., 2336:2368].reshape(g, nb, LANES, 2),
        }
        blocks = _q4k_blocks(f)
    else:
        rows = lanes[..., 0:3072].reshape(g, nb, 16, 3, 64)
        lo = _nibble_codes(np.ascontiguousarray(rows[..., :2, :].swapaxes(2, 3)).reshape(g, nb, 2048))
        hb = rows[..., 2, :].reshape(g, nb, 16, LANES, 4)  # [r][c][t]
        hi = np.stack([(hb >> (2 * i)) & 3 for i in range(4)], axis=-3)  # [r][i][c][t]
        hi = hi.transpose(0, 1, 4, 3, 2, 5).reshape(g, nb, LANES, 256)  # [c][i][r][t]
        f = {
            "codes": lo | (hi << 4),
            "sc": lanes[..., 3072:3328].reshape(g, nb, 16, LANES).swapaxes(-1, -2),
            "d": lanes[..., 3328:3360].reshape(g, nb, LANES, 2),
        }
        blocks = _q6k_blocks(f)
    return blocks.transpose(0, 2, 1, 3)


def pack(raw: np.ndarray, ggml_type: str) -> np.ndarray:
    """Source bytes `raw[..., N, row_bytes]` (uint8) -> the packed 1-D byte stream."""
    raw = np.ascontiguousarray(raw).view(np.uint8)
    bb = SOURCE_BLOCK_BYTES.get(ggml_type)
    if bb is None or raw.ndim < 2 or raw.shape[-1] % bb:
        raise LayoutError(f"ggml_lanes_v1: rows of {raw.shape[-1:]} bytes are not whole {ggml_type} blocks")
    n, nb = raw.shape[-2], raw.shape[-1] // bb
    _require((n, nb * BLOCK_VALUES[ggml_type]), ggml_type)
    blocks = raw.reshape(-1, LANES, nb, bb)
    return _blocks_to_lanes(blocks, ggml_type).reshape(-1)


def unpack(buf: np.ndarray, shape: tuple[int, ...], ggml_type: str) -> np.ndarray:
    """Inverse of `pack`: the source bytes, uint8 of shape (*shape[:-1], row_bytes)."""
    want = nbytes(shape, ggml_type)
    buf = np.ascontiguousarray(buf).view(np.uint8).reshape(-1)
    if buf.size != want:
        raise LayoutError(f"packed buffer holds {buf.size} bytes, shape {tuple(shape)} needs {want}")
    nb = shape[-1] // BLOCK_VALUES[ggml_type]
    lanes = buf.reshape(-1, nb, LANE_BLOCK_BYTES[ggml_type])
    blocks = _lanes_to_blocks(lanes, ggml_type)
    return blocks.reshape(*shape[:-1], nb * SOURCE_BLOCK_BYTES[ggml_type])
