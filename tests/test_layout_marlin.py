"""marlin_int4_v1: permutation tables, closed-form index, exact round trips, chunked packing, error bound.

What can go wrong: a permutation that differs from vLLM/IST Marlin (the GPU kernel then reads garbage
that still "looks" like int4), the single-group scale permutation used in the wrong case (it depends on
the whole K, not on a chunk), scales rounded to fp16 after the codes were computed, scales that clip.
"""

from __future__ import annotations

import numpy as np
import pytest

from ktpack.layouts import ids, marlin
from ktpack.layouts.errors import LayoutError

RNG = np.random.default_rng(4321)


def _step_by_step_pack(q: np.ndarray) -> np.ndarray:
    """formats.md §1.2 steps 2-4, written loop by loop (independent of marlin.pack_codes)."""
    k, n = q.shape
    rows = np.zeros((k // 16, n * 16), dtype=np.int64)
    for kk in range(k):
        for nn in range(n):
            rows[kk // 16, (nn // 16) * 256 + (kk % 16) * 16 + nn % 16] = q[kk, nn]
    perm = marlin.WEIGHT_PERM
    for r in range(k // 16):
        for c0 in range(0, n * 16, 1024):
            rows[r, c0 : c0 + 1024] = rows[r, c0 : c0 + 1024][perm]
    out = np.zeros((k // 16, 2 * n), dtype=np.uint32)
    for i in range(8):
        out |= (rows[:, i::8].astype(np.uint32) & 0xF) << np.uint32(4 * i)
    return out.view(np.int32)


def test_perm_tables() -> None:
    first = [0, 128, 8, 136, 16, 144, 24, 152, 256, 384, 264, 392, 272, 400, 280, 408]
    assert marlin.WEIGHT_PERM[:16].tolist() == first
    assert sorted(marlin.WEIGHT_PERM.tolist()) == list(range(1024))
    for i in range(8):
        for j in range(8):
            assert marlin.SCALE_PERM[8 * i + j] == i + 8 * j
    for i in range(4):
        for t, d in enumerate((0, 1, 8, 9, 16, 17, 24, 25)):
            assert marlin.SCALE_PERM_SINGLE[8 * i + t] == 2 * i + d


def test_closed_form_index_matches_construction() -> None:
    k, n = 256, 192
    q = RNG.integers(0, 16, size=(k, n)).astype(np.uint8)
    packed = marlin.pack_codes(q)
    assert packed.dtype == np.int32 and packed.shape == (k // 16, 2 * n)
    assert np.array_equal(packed, _step_by_step_pack(q))
    kk, nn = np.meshgrid(np.arange(k), np.arange(n), indexing="ij")
    row, col, nib = marlin.marlin_index(kk, nn)
    got = (packed.view(np.uint32)[row, col] >> (4 * nib).astype(np.uint32)) & 0xF
    assert np.array_equal(got, q)
    # Every (row, col, nibble) slot is used exactly once.
    slots = (row * (2 * n) + col) * 8 + nib
    assert np.unique(slots).size == k * n


@pytest.mark.parametrize("g", [32, 64, 128, -1])
def test_roundtrip_bitwise(g: int) -> None:
    shape = (3, 192, 256)
    w = RNG.standard_normal(shape).astype(np.float32)
    qw, s = marlin.pack(w, g)
    gg = 256 if g == -1 else g
    assert qw.shape == (3, 16, 384) and qw.dtype == np.int32
    assert s.shape == (3, 256 // gg, 192) and s.dtype == np.float16
    q, s0 = marlin.quantize(w, g)
    q2, s2 = marlin.unpack(qw, s, shape, g)
    assert np.array_equal(q2, q) and q2.dtype == np.uint8
    assert np.array_equal(s2.view(np.uint16), s0.view(np.uint16))
    assert np.array_equal(marlin.unpack_codes(marlin.pack_codes(q)), q)
    qw2, sp2 = marlin.pack_quantized(q, s0, g)
    assert np.array_equal(qw2, qw) and np.array_equal(sp2.view(np.uint16), s.view(np.uint16))
    # fp32 reconstruction is exactly dequant(quant(w)).
    deq = marlin.dequantize(qw, s, shape, g)
    assert deq.shape == shape and deq.dtype == np.float32
    assert np.array_equal(deq, marlin.dequantize_unpacked(q, s0, gg))


def test_scale_permutation_choice() -> None:
    w = RNG.standard_normal((128, 128)).astype(np.float32)  # K == g: one group, per-channel
    _, s = marlin.pack(w, 128)
    _, s0 = marlin.quantize(w, 128)
    assert np.array_equal(s, s0.reshape(-1, 32)[:, marlin.SCALE_PERM_SINGLE].reshape(1, 128))
    w = RNG.standard_normal((128, 256)).astype(np.float32)  # grouped
    _, s = marlin.pack(w, 128)
    _, s0 = marlin.quantize(w, 128)
    assert np.array_equal(s, s0.reshape(-1, 64)[:, marlin.SCALE_PERM].reshape(2, 128))


def test_chunked_packing_matches_whole() -> None:
    n, k, g = 128, 512, 128
    w = RNG.standard_normal((n, k)).astype(np.float32)
    qw, s = marlin.pack(w, g)
    parts = [marlin.pack(w[:, k0 : k0 + 128], g, k_total=k) for k0 in range(0, k, 128)]
    assert np.array_equal(np.concatenate([p[0] for p in parts]), qw)
    assert np.array_equal(np.concatenate([p[1] for p in parts]), s)
    two = [marlin.pack(w[:, :256], g, k_total=k), marlin.pack(w[:, 256:], g, k_total=k)]
    assert np.array_equal(np.concatenate([p[0] for p in two]), qw)
    q_chunk, s_chunk = marlin.unpack(two[1][0], two[1][1], (n, 256), g, k_total=k)
    q_all, s_all = marlin.unpack(qw, s, (n, k), g)
    assert np.array_equal(q_chunk, q_all[256:]) and np.array_equal(s_chunk, s_all[2:])
    # A 128-wide chunk of a K=128 matrix is the whole matrix (single-group permutation) ...
    single = marlin.pack(w[:, :128], g, k_total=128)[1]
    assert np.array_equal(single, marlin.pack(w[:, :128], g)[1])
    # ... while the same chunk of a K=512 matrix uses the grouped one.
    assert not np.array_equal(single, parts[0][1])
    with pytest.raises(LayoutError, match="chunk"):
        marlin.pack(w[:, :192], 128, k_total=k)
    with pytest.raises(LayoutError, match="chunk"):
        marlin.pack(w, 128, k_total=256)


def test_quantize_matches_vllm_rule() -> None:
    w = RNG.standard_normal((2, 64, 256)).astype(np.float32) * np.float32(0.02)
    q, s = marlin.quantize(w, 128)
    b = np.swapaxes(w, -1, -2).reshape(2, 2, 128, 64)
    ref_s = np.maximum(np.abs(b.max(axis=2)) / np.float32(7), np.abs(b.min(axis=2)) / np.float32(8))
    ref_s = ref_s.astype(np.float16)
    ref_q = np.clip(np.rint(b / ref_s.astype(np.float32)[:, :, None, :]), -8, 7) + 8
    assert np.array_equal(s, ref_s)
    assert np.array_equal(q, ref_q.reshape(2, 256, 64).astype(np.uint8))


def _adversarial(g: int) -> np.ndarray:
    n, k = 64, 256
    w = RNG.standard_normal((7, n, k)).astype(np.float32)
    w[0, :4] = 0  # all-zero groups
    w[0, 4:8, :g] = 0
    w[1, np.arange(n), RNG.integers(0, k, n)] = 5e4  # one huge outlier per row (scale ~7e3, fp16 ok)
    w[2] *= np.float32(1e-40)  # f32 denormals: fp16 scale underflows, must be bumped
    w[3] = -np.abs(w[3])
    w[3, :, ::g] = -8.0  # max at the -8 end
    w[3, :, 1::g] = 7.0
    w[4] = 0.37  # constant groups
    w[5] *= np.float32(3e-6)  # fp16-subnormal scales (< 2^-14)
    w[6] = np.float32(2.0**-24) * RNG.integers(-9, 11, size=(n, k)).astype(np.float32)
    w[6, :, ::g] = np.float32(2.0**-24) * 10  # 10/7 rounds to 1 fp16 step: 10 > 7.5 would clip
    return w


@pytest.mark.parametrize("g", [32, 64, 128, -1])
def test_error_bound(g: int) -> None:
    for w in (RNG.standard_normal((2, 128, 256)).astype(np.float32), _adversarial(g)):
        qw, s = marlin.pack(w, g)
        deq = marlin.dequantize(qw, s, w.shape, g)
        bound = marlin.error_bound(w, g)
        assert bound.shape == w.shape and bound.dtype == np.float32
        err = np.abs(deq.astype(np.float64) - w.astype(np.float64))
        assert (err <= bound).all(), float(np.max(err - bound))


def test_zero_groups_exact_and_scale_positive() -> None:
    w = _adversarial(128)
    q, s = marlin.quantize(w, 128)
    assert (s.astype(np.float32) > 0).all() and np.isfinite(s).all()
    assert (q[0][:, :4] == 8).all()


def test_rejects_fp16_scale_overflow_and_non_finite() -> None:
    w = np.zeros((64, 128), np.float32)
    w[0, 0] = 7 * 65504 * 1.01
    with pytest.raises(LayoutError, match="fp16 scale"):
        marlin.pack(w)
    w[0, 0] = 7 * 65504 * 0.999
    marlin.pack(w)
    w[0, 0] = np.nan
    with pytest.raises(LayoutError, match="finite"):
        marlin.pack(w)


@pytest.mark.parametrize(
    ("shape", "g", "needle"),
    [
        ((96, 256), 128, "N must be"),
        ((64, 192), 64, "K must be a positive multiple of 128"),
        ((64, 384), 256, "group_size"),
        ((64, 384), 16, "group_size"),
        ((128,), 128, "at least 2 dims"),
    ],
)
def test_rejects_shapes(shape: tuple[int, ...], g: int, needle: str) -> None:
    reason = marlin.supports(shape, g)
    assert reason is not None and needle in reason
    with pytest.raises(LayoutError, match=needle):
        marlin.pack(np.zeros(shape, np.float32), g)


def test_supports_deepseek_shapes() -> None:
    assert marlin.LAYOUT_ID == ids.MARLIN_INT4
    for n, k in [(1536, 7168), (24576, 1536), (576, 7168), (32768, 512), (7168, 16384), (129280, 7168)]:
        assert marlin.supports((n, k)) is None
    assert marlin.supports((64, 384), 128) is None and marlin.supports((64, 384), -1) is None


def test_unpack_checks_shapes() -> None:
    w = RNG.standard_normal((64, 256)).astype(np.float32)
    qw, s = marlin.pack(w)
    with pytest.raises(LayoutError, match="expected"):
        marlin.unpack(qw, s, (128, 256))
    with pytest.raises(LayoutError, match="float16"):
        marlin.unpack(qw, s.astype(np.float32), (64, 256))
