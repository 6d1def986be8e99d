"""Lossless layouts: ggml rows and plain f32/bf16, and NUMA slicing.

What can go wrong: an interleave that is not a bijection (bytes lost or swapped between rows),
a tail group of rows handled differently from full groups, a NUMA cut that drops or repeats a
column. The bar is therefore byte equality, never a tolerance.
"""

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize as gg_dequantize

from ktpack.convert.synth import kquants
from ktpack.layouts import ggml, ggml_lanes, numa, plain
from ktpack.layouts.errors import LayoutError
from ktpack.layouts.ids import GGML_ROWS_PER_GROUP

TYPES = ["Q4_K", "Q5_K", "Q6_K", "Q8_0", "BF16", "F16", "F32"]


def _raw(qtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Source bytes of a tensor of `shape` in `qtype`, via the project's quantizer."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    from gguf.constants import GGMLQuantizationType

    raw = kquants.quantize(x, GGMLQuantizationType[qtype])
    return np.ascontiguousarray(raw).view(np.uint8).reshape(*shape[:-1], -1)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("n_rows", [1, 7, 8, 19, 64])
def test_ggml_roundtrip_bytes(qtype, n_rows):
    raw = _raw(qtype, (3, n_rows, 512), seed=n_rows)
    packed = ggml.pack(raw, qtype)
    assert packed.size == ggml.nbytes((3, n_rows, 512), qtype)
    back = ggml.unpack(packed, (3, n_rows, 512), qtype)
    assert back.dtype == np.uint8
    assert np.array_equal(back, raw.view(np.uint8).reshape(back.shape))


@pytest.mark.parametrize("rows", [1, 2, 4, 8, 16])
def test_ggml_interleave_geometry(rows):
    """Row r's block b of group g sits at group_start + (b * rows_g + r) * block_bytes."""
    bv, bb = ggml.block_geometry("Q8_0")
    n, nb = 2 * rows + 3, 5
    raw = np.zeros((n, nb * bb), np.uint8)
    for r in range(n):
        for b in range(nb):
            raw[r, b * bb : (b + 1) * bb] = (r * 16 + b) % 251
    packed = ggml.pack(raw, "Q8_0", rows)
    for r in range(n):
        g, rr = divmod(r, rows)
        rows_g = min(rows, n - g * rows)
        for b in range(nb):
            off = g * rows * nb * bb + (b * rows_g + rr) * bb
            assert packed[off] == (r * 16 + b) % 251


def test_ggml_stream_reads_rows_together():
    """With the default group, one block of each of 8 rows is one contiguous run."""
    bv, bb = ggml.block_geometry("Q4_K")
    raw = _raw("Q4_K", (16, 1024))
    packed = ggml.pack(raw, "Q4_K")
    first_run = packed[: GGML_ROWS_PER_GROUP * bb].reshape(GGML_ROWS_PER_GROUP, bb)
    assert np.array_equal(first_run, raw[:GGML_ROWS_PER_GROUP, :bb])


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q8_0"])
def test_ggml_dequantize_matches_gguf(qtype):
    from gguf.constants import GGMLQuantizationType

    raw = _raw(qtype, (5, 768))
    assert np.array_equal(ggml.dequantize(raw, qtype), gg_dequantize(raw, GGMLQuantizationType[qtype]))


def test_ggml_rejects_bad_rows():
    with pytest.raises(LayoutError, match="multiple of the Q4_K block"):
        ggml.row_bytes("Q4_K", 300)
    assert ggml.supports((4, 100), "Q8_0") is not None
    assert ggml.supports((4, 256), "Q8_K") is not None  # Q8_K is an activation type


@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16"])
def test_plain_roundtrip(dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((7, 33)).astype(np.float32)
    x[0, :4] = [0.0, -0.0, 1e-40, 3.0e38]
    back = plain.unpack(plain.pack(x, dtype), x.shape, dtype)
    if dtype == "f32":
        assert np.array_equal(back.view(np.uint32), x.view(np.uint32))
    else:  # exact for values already representable: packing twice changes nothing
        again = plain.unpack(plain.pack(back, dtype), x.shape, dtype)
        assert np.array_equal(again.view(np.uint32), back.view(np.uint32))


def test_bf16_rounding_is_nearest_even():
    import torch

    rng = np.random.default_rng(2)
    x = (rng.standard_normal(10000) * 10.0 ** rng.integers(-30, 30, 10000)).astype(np.float32)
    x[:3] = [np.nan, np.inf, -np.inf]
    ours = plain.f32_to_bf16_bits(x)
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    finite = np.isfinite(x)
    assert np.array_equal(ours[finite], ref[finite])
    assert np.isnan(plain.bf16_bits_to_f32(ours[:1]))[0]
    assert np.array_equal(plain.bf16_bits_to_f32(ours[1:3]), x[1:3])


@pytest.mark.parametrize("nodes", range(1, 9))
@pytest.mark.parametrize("size,unit", [(2048, 256), (256, 256), (512, 32), (100, 16), (7, 1)])
def test_numa_bounds_cover_once(nodes, size, unit):
    b = numa.split_bounds(size, nodes, unit)
    assert len(b) == nodes and b[0][0] == 0 and b[-1][1] == size
    for (lo, hi), (lo2, _) in zip(b, b[1:], strict=False):
        assert hi == lo2 and lo <= hi
    for lo, _ in b:
        assert lo % unit == 0
    sizes = [hi - lo for lo, hi in b if hi - lo]
    assert max(sizes) - min(sizes) <= unit  # as even as the unit allows (tail aside)


@pytest.mark.parametrize("nodes", range(1, 9))
@pytest.mark.parametrize("qtype", TYPES)
def test_numa_slices_join_to_source_bytes(nodes, qtype):
    """Expert gate/up cut along rows, down along K at block boundaries: the joined slices give back the
    unsplit tensor byte for byte, through pack/unpack of each slice."""
    e, i, h = 2, 2048, 512
    bv, bb = ggml.block_geometry(qtype)
    up = _raw(qtype, (e, i, h), seed=3)
    down = _raw(qtype, (e, h, i), seed=4)
    unit = numa.common_unit(16, bv)
    bounds = numa.split_bounds(i, nodes, unit)
    up_parts, down_parts = [], []
    for lo, hi in bounds:
        s = up[:, lo:hi]
        up_parts.append(ggml.unpack(ggml.pack(s, qtype), (e, hi - lo, h), qtype))
        d = down[:, :, lo // bv * bb : hi // bv * bb]
        down_parts.append(ggml.unpack(ggml.pack(d, qtype), (e, h, hi - lo), qtype) if hi > lo else d)
    assert np.array_equal(np.concatenate(up_parts, axis=1), up.view(np.uint8).reshape(e, i, -1))
    assert np.array_equal(np.concatenate(down_parts, axis=2), down.view(np.uint8).reshape(e, h, -1))


def test_numa_rejects_bad_counts():
    with pytest.raises(ValueError, match="1..8"):
        numa.split_bounds(2048, 9, 256)
    with pytest.raises(ValueError, match="1..8"):
        numa.split_bounds(2048, 0, 256)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q8_0", "BF16"])
def test_gather_rows_is_unpack_then_index(qtype):
    """The embedding's row lookup reads the same bytes as unpacking the whole matrix, tail group included."""
    n, k = 3 * GGML_ROWS_PER_GROUP + 5, 512
    raw = _raw(qtype, (n, k), seed=2)
    packed = ggml.pack(raw, qtype)
    idx = np.array([0, n - 1, 7, GGML_ROWS_PER_GROUP, n - 5, 7, 3 * GGML_ROWS_PER_GROUP - 1])
    full = ggml.unpack(packed, (n, k), qtype)
    assert np.array_equal(ggml.gather_rows(packed, (n, k), qtype, idx), full[idx])
    with pytest.raises(IndexError, match="outside"):
        ggml.gather_rows(packed, (n, k), qtype, np.array([n]))


# ---------------------------------------------------------------------------- ggml_lanes_v1


@pytest.mark.parametrize("qtype", ggml_lanes.TYPES)
@pytest.mark.parametrize("random_bytes", [False, True], ids=["quantized", "any-bytes"])
def test_lanes_roundtrip_bytes(qtype, random_bytes):
    """Every bit of every source block comes back (any bytes: the fields' encodings are bijections)."""
    shape = (2, 48, 768)
    if random_bytes:
        bb = ggml.block_geometry(qtype)[1]
        nb = shape[-1] // ggml_lanes.BLOCK_VALUES[qtype]
        raw = np.random.default_rng(3).integers(0, 256, (2, 48, nb * bb), dtype=np.uint8)
    else:
        raw = _raw(qtype, shape, seed=5)
    packed = ggml_lanes.pack(raw, qtype)
    blocks = 2 * 3 * (768 // ggml_lanes.BLOCK_VALUES[qtype])  # matrices x row groups x blocks per row
    assert packed.size == ggml_lanes.nbytes(shape, qtype) == blocks * ggml_lanes.LANE_BLOCK_BYTES[qtype]
    assert np.array_equal(ggml_lanes.unpack(packed, shape, qtype), raw.reshape(2, 48, -1))


@pytest.mark.parametrize("qtype", ggml_lanes.TYPES)
def test_lanes_geometry_matches_spec(qtype):
    """Codes and scales sit where SPEC.md §6.4 says, checked against gguf-py's dequantized values."""
    n, k = 32, 512
    raw = _raw(qtype, (n, k), seed=11)
    w = gg_dequantize(raw, GGMLQuantizationType[qtype]).reshape(n, k)
    lanes = ggml_lanes.pack(raw, qtype).reshape(n // 16, k // 256, -1)  # [group][super-block][bytes]
    lanes_q8 = lanes.reshape(n // 16, k // 32, -1)  # Q8_0: lane blocks of 32 values
    rng = np.random.default_rng(0)
    for row, col in zip(rng.integers(0, n, 40), rng.integers(0, k, 40), strict=True):
        blk, c, kk = lanes[row // 16, col // 256], row % 16, col % 256
        r, t = (kk % 64) // 4, kk % 4
        if ggml_lanes.BLOCK_VALUES[qtype] == 32:  # Q8_0, and Q5_0 / Q4_0 stored as Q8_0 (codes q - 16, q - 8)
            kk = col % 32
            blk = lanes_q8[row // 16, col // 32]
            code = int(blk[(kk // 4) * 64 + c * 4 + kk % 4]) - 128  # stored q + 128
            want = float(blk[512 + 2 * c : 514 + 2 * c].view(np.float16)[0]) * code
        elif qtype == "Q4_K":
            byte = blk[1024 * (kk // 128) + r * 64 + c * 4 + t]
            code = (byte >> 4) if kk % 128 >= 64 else (byte & 0xF)
            j = kk // 32
            sc, mn = blk[2048 + 16 * j + c], blk[2176 + (j // 2) * 32 + c * 2 + j % 2]
            d = float(blk[2304 + 2 * c : 2306 + 2 * c].view(np.float16)[0])
            dmin = float(blk[2336 + 2 * c : 2338 + 2 * c].view(np.float16)[0])
            want = np.float32(d * sc) * code - np.float32(dmin * mn)
        else:
            lo = blk[r * 192 + 64 * (kk // 128) + c * 4 + t]
            lo = (lo >> 4) if kk % 128 >= 64 else (lo & 0xF)
            hi = (blk[r * 192 + 128 + c * 4 + t] >> (2 * (kk // 64))) & 3
            sc = blk[3072 + 16 * (kk // 16) + c : 3073 + 16 * (kk // 16) + c].view(np.int8)[0]
            d = float(blk[3328 + 2 * c : 3330 + 2 * c].view(np.float16)[0])
            want = d * float(sc) * float((lo | hi << 4) - 32)
        assert np.isclose(w[row, col], want, rtol=1e-6, atol=0), (row, col)


@pytest.mark.parametrize("qtype", sorted(ggml_lanes.AS_Q8_0))
def test_lanes_legacy_types_are_their_q8_0_values(qtype):
    """Q5_0 / Q4_0 stored as Q8_0 lane blocks: gguf-py dequantizes the recoded Q8_0 blocks to exactly
    the source's values, and the lane bytes equal those of packing that Q8_0 source directly."""
    raw = _raw(qtype, (32, 256), seed=7)
    bb = ggml.block_geometry(qtype)[1]
    q8 = ggml_lanes._legacy_to_q8_0(raw.reshape(32, 8, bb), qtype)  # [rows][blocks][34]
    want = gg_dequantize(raw, GGMLQuantizationType[qtype])
    got = gg_dequantize(q8.reshape(32, -1), GGMLQuantizationType.Q8_0)
    assert np.array_equal(got, want)
    assert np.array_equal(ggml_lanes.pack(raw, qtype), ggml_lanes.pack(q8.reshape(32, -1), "Q8_0"))


def test_lanes_refuses_what_it_cannot_store():
    assert "multiple of 16" in ggml_lanes.supports((24, 256), "Q4_K")
    assert "multiple of 256" in ggml_lanes.supports((16, 384), "Q6_K")
    assert "multiple of 32" in ggml_lanes.supports((16, 48), "Q8_0")
    assert "not Q5_K" in ggml_lanes.supports((16, 256), "Q5_K")
    assert "not Q5_1" in ggml_lanes.supports((16, 256), "Q5_1")  # a min per block: not a Q8_0 value
    with pytest.raises(LayoutError, match="needs"):
        ggml_lanes.unpack(np.zeros(10, np.uint8), (16, 256), "Q4_K")
