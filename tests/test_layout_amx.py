"""amx_bf16_v1 / amx_int8_v1 / amx_int4_v1: exact round trips, byte geometry, error bounds, kernel emulation.

What can go wrong: a transposed tile (bytes of the right values in the wrong place), a block order that
is only right when N is a multiple of 16 * n_block, scales read for the wrong rows, bf16 truncation
instead of RNE, scales that clip outliers (error above s/2), and a layout a VNNI kernel cannot consume.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from ktpack.layouts import amx, ids
from ktpack.layouts.errors import LayoutError

RNG = np.random.default_rng(1234)


def _params(kind: str) -> list[tuple[int, int]]:
    gs = amx.INT4_GROUP_SIZES if kind == "int4" else (128,)
    return [(nb, g) for nb in (1, 2, 4) for g in gs]


def _same(a: np.ndarray | tuple, b: np.ndarray | tuple) -> bool:
    """Bitwise equality of the unpacked forms (NaN-safe: compares bit patterns)."""
    if isinstance(a, tuple):
        return all(_same(x, y) for x, y in zip(a, b, strict=True))
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


# Shapes: leading dims, N with a tail N-block for n_block 2 and 4 (N/16 = 5), a single tile.
SHAPES = [(3, 80, 256), (16, 128), (2, 1, 48, 384)]


@pytest.mark.parametrize("kind", amx.KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_roundtrip_exact(kind: str, shape: tuple[int, ...]) -> None:
    w = RNG.standard_normal(shape).astype(np.float32)
    for nb, g in _params(kind):
        buf = amx.pack(kind, w, n_block=nb, group_size=g)
        assert buf.dtype == np.uint8 and buf.ndim == 1
        assert buf.size == amx.nbytes(kind, shape, n_block=nb, group_size=g)
        un = amx.unpack(kind, buf, shape, n_block=nb, group_size=g)
        assert _same(un, amx.quantize(kind, w, n_block=nb, group_size=g)), (nb, g)
        assert np.array_equal(amx.pack_quantized(kind, un, shape, n_block=nb, group_size=g), buf)


@pytest.mark.parametrize("kind", amx.KINDS)
def test_matrices_are_independent(kind: str) -> None:
    w = RNG.standard_normal((3, 48, 256)).astype(np.float32)
    per = amx.nbytes(kind, w.shape[1:])
    buf = amx.pack(kind, w)
    assert per % amx.MATRIX_ALIGN == 0
    for i in range(3):
        assert np.array_equal(buf[i * per : (i + 1) * per], amx.pack(kind, w[i]))


def _offsets(kind: str, n: int, k: int, n_block: int) -> np.ndarray:
    """Byte offset of element (n, k) within one matrix, written from the spec (formats.md §2.4)."""
    kb_size = amx.K_PER_BLOCK[kind]
    nn, kk = np.meshgrid(np.arange(n), np.arange(k), indexing="ij")
    nt, c = nn // 16, nn % 16
    kb = kk // kb_size
    n_tiles, k_blocks = n // 16, k // kb_size
    nb, ns = nt // n_block, nt % n_block
    tiles_in_nb = np.minimum(n_block, n_tiles - nb * n_block)
    block = (nb * n_block) * k_blocks + kb * tiles_in_nb + ns
    if kind == "bf16":
        inner = ((kk % 32) // 2) * 64 + c * 4 + (kk % 2) * 2
    else:
        inner = ((kk % 64) // 4) * 64 + c * 4 + kk % 4
    return block * 1024 + inner


@pytest.mark.parametrize("n_block", [1, 2, 4])
def test_geometry_bf16(n_block: int) -> None:
    n, k = 80, 96
    w = RNG.standard_normal((n, k)).astype(np.float32)
    buf = amx.pack("bf16", w, n_block=n_block)
    off = _offsets("bf16", n, k, n_block)
    bits = w.astype(ml_dtypes.bfloat16).view(np.uint16)
    got = buf[off].astype(np.uint16) | (buf[off + 1].astype(np.uint16) << 8)
    assert np.array_equal(got, bits)


@pytest.mark.parametrize("n_block", [1, 2, 4])
def test_geometry_int8(n_block: int) -> None:
    n, k = 80, 192
    q = RNG.integers(-127, 128, size=(n, k))
    q[:, 5] = 127  # row max 127 * 2^e -> s = 2^e exactly, codes = q
    e = RNG.integers(-20, 20, size=n)
    w = (q * np.exp2(e)[:, None]).astype(np.float32)
    buf = amx.pack("int8", w, n_block=n_block)
    off = _offsets("int8", n, k, n_block)
    assert np.array_equal(buf[off].astype(np.int64), q + 128)
    wbytes = (n // 16) * (k // 64) * 1024
    scales = buf[wbytes : wbytes + 4 * n].view("<f4")
    assert np.array_equal(scales, np.exp2(e).astype(np.float32))
    assert buf.size == wbytes + 4 * n  # 4N is a multiple of 64: no padding


@pytest.mark.parametrize("n_block", [1, 2, 4])
@pytest.mark.parametrize("g", amx.INT4_GROUP_SIZES)
def test_geometry_int4(n_block: int, g: int) -> None:
    n, k = 80, 256
    ng = k // g
    v = RNG.integers(-8, 8, size=(n, ng, g))
    v[:, :, 3] = -8  # the -8 end sets s = 2^e exactly, codes = v + 8
    e = RNG.integers(-20, 20, size=(n, ng))
    w = (v * np.exp2(e)[:, :, None]).reshape(n, k).astype(np.float32)
    q = (v + 8).reshape(n, k)
    buf = amx.pack("int4", w, n_block=n_block, group_size=g)
    kk = np.arange(k)[None, :]
    # Both halves of a 128-k block share a byte: position from k % 64, nibble from (k % 128) // 64.
    off = _offsets("int4", n, k, n_block)
    nib = (buf[off] >> (4 * ((kk % 128) // 64))) & 0xF
    assert np.array_equal(nib.astype(np.int64), q)
    # Scales: same block order, 16 * (128 / g) f32 per block, index j * 16 + c.
    wbytes = (n // 16) * (k // 128) * 1024
    nn = np.arange(n)[:, None]
    grp = np.arange(ng)[None, :]
    nt, c = nn // 16, nn % 16
    kb, j = grp // (128 // g), grp % (128 // g)
    nb, ns = nt // n_block, nt % n_block
    blk = nb * n_block * (k // 128) + kb * np.minimum(n_block, n // 16 - nb * n_block) + ns
    sidx = (blk * (128 // g) + j) * 16 + c
    scales = buf[wbytes:].view("<f4")
    assert scales.size == n * ng
    assert np.array_equal(scales[sidx], np.exp2(e).astype(np.float32))


def test_block_index_matches_spec_formula() -> None:
    # offset = ((nb * (K/KB) + kb) * NB + ns) * 1024 for full N-blocks (formats.md §2.4).
    nt = np.arange(8)[:, None]
    kb = np.arange(5)[None, :]
    got = amx.block_index(nt, kb, 8, 5, 4)
    assert np.array_equal(got, ((nt // 4 * 5 + kb) * 4 + nt % 4))
    # Tail N-block (10 tiles, n_block 4: tiles 8, 9 form a block of 2).
    assert amx.block_index(9, 3, 10, 5, 4) == 8 * 5 + 3 * 2 + 1


# --------------------------------------------------------------------------------------------------
# bf16 rounding


def test_bf16_is_rne_and_keeps_specials() -> None:
    bits = RNG.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    special = np.array(
        [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFF800001, 0x7F7FFFFF, 0x7F7F8000,
         0x7F7F7FFF, 0x3F808000, 0x3F818000, 0x00000001, 0x00008000, 0x00018000, 0x007FFFFF],
        dtype=np.uint32,
    )  # fmt: skip
    w = np.concatenate([bits, special]).view(np.float32)
    got = amx.bf16_bits(w)
    with np.errstate(invalid="ignore", over="ignore"):
        want = w.astype(ml_dtypes.bfloat16).view(np.uint16)
    nan = np.isnan(w)
    assert np.array_equal(got[~nan], want[~nan])
    assert np.isnan(amx.bf16_to_f32(got[nan])).all()
    assert np.array_equal(got[nan] >> 15, want[nan] >> 15)  # sign kept


# --------------------------------------------------------------------------------------------------
# Error bounds


def _adversarial(kind: str, n: int = 32, k: int = 256, g: int = 128) -> np.ndarray:
    w = RNG.standard_normal((8, n, k)).astype(np.float32)
    w[0, :4] = 0  # all-zero rows (and groups)
    w[0, 4:8, :g] = 0  # all-zero groups in otherwise normal rows
    w[1, np.arange(n), RNG.integers(0, k, n)] = 1e4  # one huge outlier per row
    w[1, :, ::g] *= 300  # ... and per group
    w[2] *= np.float32(1e-40)  # denormals
    w[2, :8] = np.float32(1e-44) * RNG.integers(-3, 4, size=(8, k))  # the smallest subnormals
    w[3] = -np.abs(w[3])
    w[3, :, ::g] = -8.0  # mixed signs with the max at the -8 end
    w[3, :, 1::g] = 7.0
    w[4] = 0.37  # constant groups
    w[4, :8] = -0.37
    w[5] *= np.float32(3e37)  # large
    w[6, :, :] = np.float32(1e-30) * np.sign(w[6])  # tiny normal, +-constant
    w[7, :16] = np.float32(2.0**-149)  # max/127 and max/7 underflow to 0: the scale must not be 0
    # Subnormal scales where round-to-nearest of max/127 (max/7) would clip codes: the scale is bumped.
    tiny = np.float32(2.0**-149)
    w[7, 16:24] = tiny * RNG.integers(-10, 179, size=(8, k)).astype(np.float32)
    w[7, 16:24, ::g] = tiny * 178  # 178/127 = 1.4 rounds to 1 step: 178 codes > 127.5
    w[7, 24:32] = tiny * RNG.integers(-9, 11, size=(8, k)).astype(np.float32)
    w[7, 24:32, ::g] = tiny * 10  # 10/7 = 1.43 rounds to 1 step: 10 > 7.5
    return w


@pytest.mark.parametrize("kind", amx.KINDS)
def test_error_bound(kind: str) -> None:
    for nb, g in _params(kind):
        for w in (RNG.standard_normal((2, 48, 256)).astype(np.float32), _adversarial(kind, g=g)):
            buf = amx.pack(kind, w, n_block=nb, group_size=g)
            deq = amx.dequantize(kind, buf, w.shape, n_block=nb, group_size=g)
            bound = amx.error_bound(kind, w, n_block=nb, group_size=g)
            assert bound.shape == w.shape and bound.dtype == np.float32
            err = np.abs(deq.astype(np.float64) - w.astype(np.float64))
            assert np.isfinite(deq).all()
            assert (err <= bound).all(), (nb, g, float(np.max(err - bound)))


def test_bf16_bound_tight_cases() -> None:
    w = np.array([1 + 2**-8, 3.0e38, 3.4e38, -3.39e38, 1e-40, -1e-45, np.inf, np.nan], dtype=np.float32)
    w = np.tile(w, (16, 4))  # [16, 32]
    b = amx.error_bound("bf16", w)
    deq = amx.dequantize("bf16", amx.pack("bf16", w), w.shape)
    fin = np.isfinite(deq) & np.isfinite(w)
    assert (np.abs(deq[fin].astype(np.float64) - w[fin]) <= b[fin]).all()
    assert np.isinf(b[~fin]).all()
    assert np.array_equal(np.isnan(deq), np.isnan(w))
    assert amx.error_bound("bf16", np.full((16, 32), 1 + 2**-8, np.float32))[0, 0] >= 2**-8 / (1 + 2**-8)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_scales_never_clip_and_zero_exact(kind: str) -> None:
    w = _adversarial(kind)
    q, s = amx.quantize(kind, w)
    deq = amx.dequantize_unpacked(kind, (q, s))
    assert np.array_equal(deq[0, :4], np.zeros_like(deq[0, :4]))
    assert (s > 0).all() and np.isfinite(s).all()
    if kind == "int8":
        assert q.min() >= -127
    # Mixed-sign groups with max at the -8 end use the whole range.
    if kind == "int4":
        assert (q[3] == 0).any() and (q[3] == 15).any()


# --------------------------------------------------------------------------------------------------
# Emulated VNNI kernels: walk the packed bytes the way vpdpbusd / TDPBSUD would.


def _emulate_int8(buf: np.ndarray, n: int, k: int, x: np.ndarray, n_block: int) -> tuple[np.ndarray, ...]:
    """Integer dot products from amx_int8_v1 bytes: u8 weights x s8 activations, minus 128 * sum(x)."""
    n_tiles, k_blocks = n // 16, k // 64
    acc = np.zeros(n, dtype=np.int64)
    for nb in range(-(-n_tiles // n_block)):
        tiles = min(n_block, n_tiles - nb * n_block)
        for kb in range(k_blocks):
            xs = x[kb * 64 : kb * 64 + 64].reshape(16, 4)  # broadcast 4 bytes per 64-byte row
            for ns in range(tiles):
                off = ((nb * n_block) * k_blocks + kb * tiles + ns) * 1024
                t = buf[off : off + 1024].reshape(16, 16, 4).astype(np.int64)  # rows r, columns c, t
                nt = nb * n_block + ns
                acc[nt * 16 : nt * 16 + 16] += np.einsum("rct,rt->c", t, xs)
    acc -= 128 * int(x.sum())
    scales = buf[n_tiles * k_blocks * 1024 :][: 4 * n].view("<f4")
    return acc, scales


def test_emulated_int8_dot() -> None:
    n, k, n_block = 80, 256, 4
    w = RNG.standard_normal((n, k)).astype(np.float32)
    x = RNG.integers(-128, 128, size=k)
    buf = amx.pack("int8", w, n_block=n_block)
    acc, scales = _emulate_int8(buf, n, k, x, n_block)
    q, s = amx.quantize("int8", w)
    assert np.array_equal(acc, q.astype(np.int64) @ x)  # exact, integer
    assert np.abs(acc).max() < 2**31  # fits the int32 accumulator
    ref = (q.astype(np.float64) * s.astype(np.float64)[:, None]) @ x  # = s * sum(q x), exact in f64
    assert np.array_equal(scales.astype(np.float64) * acc, ref)


@pytest.mark.parametrize("g", amx.INT4_GROUP_SIZES)
def test_emulated_int4_dot(g: int) -> None:
    n, k, n_block = 48, 256, 2
    w = RNG.standard_normal((n, k)).astype(np.float32)
    x = RNG.integers(-128, 128, size=k)
    buf = amx.pack("int4", w, n_block=n_block, group_size=g)
    n_tiles, k_blocks, ng = n // 16, k // 128, 128 // g
    sbuf = buf[n_tiles * k_blocks * 1024 :].view("<f4")
    acc = np.zeros((n, k // g), dtype=np.int64)  # per-group int32 results
    y = np.zeros(n, dtype=np.float64)
    for nb in range(-(-n_tiles // n_block)):
        tiles = min(n_block, n_tiles - nb * n_block)
        for kb in range(k_blocks):
            for ns in range(tiles):
                blk = (nb * n_block) * k_blocks + kb * tiles + ns
                raw = buf[blk * 1024 : blk * 1024 + 1024].reshape(16, 16, 4)
                nt = nb * n_block + ns
                for half, tile in enumerate((raw & 0x0F, raw >> 4)):  # two VNNI-4 tiles, no shuffles
                    k0 = kb * 128 + half * 64
                    xs = x[k0 : k0 + 64].reshape(16, 4)
                    rows_per_group = g // 4
                    for r0 in range(0, 16, min(16, rows_per_group)):
                        r1 = r0 + min(16, rows_per_group)
                        grp = (k0 + 4 * r0) // g
                        part = np.einsum("rct,rt->c", tile[r0:r1].astype(np.int64), xs[r0:r1])
                        acc[nt * 16 : nt * 16 + 16, grp] += part
                # Flush once per 128-k block: per group, subtract 8 * sum(x_group), scale by s[c, group].
                for j in range(ng):
                    grp = kb * ng + j
                    corr = acc[nt * 16 : nt * 16 + 16, grp] - 8 * int(x[grp * g : grp * g + g].sum())
                    acc[nt * 16 : nt * 16 + 16, grp] = corr
                    s = sbuf[(blk * ng + j) * 16 : (blk * ng + j) * 16 + 16].astype(np.float64)
                    y[nt * 16 : nt * 16 + 16] += s * corr
    q, s = amx.quantize("int4", w, group_size=g)
    qc = q.astype(np.int64).reshape(n, k // g, g) - 8
    want = np.einsum("ngk,gk->ng", qc, x.reshape(k // g, g))
    assert np.array_equal(acc, want)  # exact integer per-group sums sum((q - 8) x)
    assert np.abs(acc).max() < 2**31
    ref = (s.astype(np.float64) * want).sum(axis=1)
    assert np.allclose(y, ref, rtol=1e-12, atol=0)
    deq = amx.dequantize("int4", buf, (n, k), n_block=n_block, group_size=g)
    assert np.allclose(y, deq.astype(np.float64) @ x, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Rejections


@pytest.mark.parametrize(
    ("kind", "shape", "kw", "needle"),
    [
        ("bf16", (40, 64), {}, "N must be"),
        ("bf16", (32, 48), {}, "K must be"),
        ("int8", (32, 96), {}, "K must be"),
        ("int4", (32, 192), {}, "K must be"),
        ("int4", (32, 128), {"group_size": 16}, "group_size"),
        ("int4", (32, 128), {"group_size": 256}, "group_size"),
        ("int8", (32, 128), {"n_block": 0}, "n_block"),
        ("fp8", (32, 128), {}, "kind"),
        ("int8", (128,), {}, "at least 2 dims"),
    ],
)
def test_rejects(kind: str, shape: tuple[int, ...], kw: dict, needle: str) -> None:
    reason = amx.supports(kind, shape, **kw)
    assert reason is not None and needle in reason
    with pytest.raises(LayoutError, match=needle):
        amx.pack(kind, np.zeros(shape, np.float32), **kw)
    with pytest.raises(LayoutError):
        amx.nbytes(kind, shape, **kw)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_rejects_non_finite_and_bad_buffer(kind: str) -> None:
    w = np.zeros((16, 128), np.float32)
    w[3, 7] = np.inf
    with pytest.raises(LayoutError, match="finite"):
        amx.pack(kind, w)
    buf = amx.pack(kind, np.ones((16, 128), np.float32))
    with pytest.raises(LayoutError, match="bytes"):
        amx.unpack(kind, buf[:-64], (16, 128))
    with pytest.raises(LayoutError):
        amx.unpack(kind, buf.view(np.int8), (16, 128))


def test_ids_and_deepseek_shapes() -> None:
    assert amx.LAYOUT_IDS == {"bf16": ids.AMX_BF16, "int8": ids.AMX_INT8, "int4": ids.AMX_INT4}
    for shape in ((256, 2048, 7168), (256, 7168, 2048)):
        for kind in amx.KINDS:
            assert amx.supports(kind, shape) is None
    assert amx.nbytes("int4", (2048, 7168)) == 2048 * 7168 // 2 + 2048 * 56 * 4


def test_scale_rule_is_plain_formula_on_normal_data() -> None:
    w = RNG.standard_normal((64, 512)).astype(np.float32)
    _, s8 = amx.quantize("int8", w)
    assert np.array_equal(s8, np.abs(w).max(axis=1) / np.float32(127))
    for g in amx.INT4_GROUP_SIZES:
        _, s4 = amx.quantize("int4", w, group_size=g)
        wg = w.reshape(64, -1, g)
        want = np.maximum(np.abs(wg.max(-1)) / np.float32(7), np.abs(wg.min(-1)) / np.float32(8))
        assert np.array_equal(s4, want)
