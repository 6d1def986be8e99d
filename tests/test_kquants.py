"""Reference k-quant quantizers: round trip through gguf's dequantizers within a derived bound."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from ktpack.convert.synth.kquants import (
    Q4_K_BYTES,
    Q5_K_BYTES,
    Q6_K_BYTES,
    dequantize_k,
    quantize,
)

T = gguf.GGMLQuantizationType

# Error bound (per value, in terms of the *input* data only).
#
# Q4_K / Q5_K, L = 15 / 31 levels, sub-block j of 32 values with lo_j = min(min x, 0),
# R_j = max x - lo_j, ideal step s_j = R_j / L, ideal offset mn_j = -lo_j:
#   d >= max_j s_j / 63 is the smallest f16 >= that value, so d <= max_j s_j / 63 * (1 + 2^-10)
#   (+ 2^-24, the f16 subnormal step, when it underflows); same for dmin with mn_j.
#   sc_j = ceil(s_j / d) => s_eff = d*sc_j in [s_j, s_j + d): a value inside [lo_j, max x] is never
#   clipped at the top by more than the offset's rounding, dmin/2, and m_j = round(mn_j / dmin)
#   moves the offset by <= dmin/2 so the bottom is clipped by at most dmin/2 too.  Unclipped values
#   are off by <= s_eff / 2.  Hence
#       |x - x_hat| <= max((s_j + d) / 2, dmin / 2).
# Q6_K, 16 sub-blocks of 16, s_j = max|x| / 31, d <= max_j s_j / 127 * (1 + 2^-10) (+ 2^-24),
#   sc_j = ceil(s_j / d) <= 127, |x| / s_eff <= 31 so q never clips:
#       |x - x_hat| <= (s_j + d) / 2.
# Both are then padded by F32_SLACK relative to the block's largest magnitude for f32 arithmetic.
F16_ROUND_UP = 1.0 + 2.0**-10
F16_SUBNORMAL = 2.0**-24
F32_SLACK = 4e-6

# RMS error / RMS of data on N(0, 1), measured at 0.0794 / 0.0388 / 0.0196 for this scheme
# (uniform rounding alone gives E[R_32] / (L * sqrt(12)) ~ 0.079, 0.038 and E[max|x|_16] / (31 sqrt 12)
# ~ 0.018); asserted with ~7% headroom.
RMS_LIMIT = {T.Q4_K: 0.085, T.Q5_K: 0.042, T.Q6_K: 0.021}

BYTES = {T.Q4_K: Q4_K_BYTES, T.Q5_K: Q5_K_BYTES, T.Q6_K: Q6_K_BYTES}
KQ = [T.Q4_K, T.Q5_K, T.Q6_K]


def error_bound(x: np.ndarray, qtype: T) -> np.ndarray:
    """Per-value bound on |x - dequantize(quantize(x))| (same shape as x), derived above."""
    b = x.reshape(-1, 256).astype(np.float64)
    slack = F32_SLACK * np.abs(b).max(axis=1, keepdims=True) + 1e-30
    if qtype == T.Q6_K:
        sub = b.reshape(-1, 16, 16)
        s = np.abs(sub).max(axis=-1) / 31
        d = s.max(axis=-1, keepdims=True) / 127 * F16_ROUND_UP + F16_SUBNORMAL
        bound = (s + d) / 2
        return (np.repeat(bound, 16, axis=1) + slack).reshape(x.shape)
    levels = 15 if qtype == T.Q4_K else 31
    sub = b.reshape(-1, 8, 32)
    lo = np.minimum(sub.min(axis=-1), 0)
    s = (sub.max(axis=-1) - lo) / levels
    d = s.max(axis=-1, keepdims=True) / 63 * F16_ROUND_UP + F16_SUBNORMAL
    dmin = (-lo).max(axis=-1, keepdims=True) / 63 * F16_ROUND_UP + F16_SUBNORMAL
    bound = np.maximum((s + d) / 2, dmin / 2)
    return (np.repeat(bound, 32, axis=1) + slack).reshape(x.shape)


def _cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    normal = rng.standard_normal((64, 512)).astype(np.float32)
    outlier = rng.standard_normal((32, 512)).astype(np.float32)
    pos = rng.integers(0, 256, size=(32, 2))
    for r in range(32):
        for blk in range(2):
            outlier[r, blk * 256 + pos[r, blk]] = 50.0 * (1 if (r + blk) % 2 else -1)
    const = np.repeat(rng.standard_normal((16, 1)).astype(np.float32) * 3, 256, axis=1)
    const[0] = 0.0
    const[1] = 1.0
    const[2] = -1.0
    mixed = rng.standard_normal((8, 256)).astype(np.float32)
    mixed[:, :128] *= 1e-3  # sub-blocks of very different scale in one super-block
    return {
        "normal": normal,
        "zeros": np.zeros((4, 512), dtype=np.float32),
        "constant": const,
        "outlier": outlier,
        "tiny": (rng.standard_normal((8, 256)) * 1e-6).astype(np.float32),
        "denormal_scale": (rng.standard_normal((8, 256)) * 1e-9).astype(np.float32),
        "large": (rng.standard_normal((8, 512)) * 1e4).astype(np.float32),
        "positive": np.abs(rng.standard_normal((8, 256))).astype(np.float32) + 2.0,
        "negative": -np.abs(rng.standard_normal((8, 256))).astype(np.float32) - 2.0,
        "mixed_scale": mixed,
    }


CASES = _cases()


@pytest.mark.parametrize("qtype", KQ, ids=lambda t: t.name)
@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_within_bound(qtype: T, case: str) -> None:
    x = CASES[case]
    raw = quantize(x, qtype)
    assert raw.dtype == np.uint8
    assert raw.shape == (*x.shape[:-1], x.shape[-1] // 256 * BYTES[qtype])
    y = gguf.quants.dequantize(raw, qtype)
    assert y.shape == x.shape
    err = np.abs(y.astype(np.float64) - x)
    bound = error_bound(x, qtype)
    worst = np.argmax(err - bound)
    assert np.all(err <= bound), f"{case}: err {err.flat[worst]:.3g} > bound {bound.flat[worst]:.3g} at {worst}"
    if case == "zeros":
        assert np.all(y == 0)


@pytest.mark.parametrize("qtype", KQ, ids=lambda t: t.name)
def test_rms_error_on_normal_data(qtype: T) -> None:
    x = np.random.default_rng(7).standard_normal((256, 1024)).astype(np.float32)
    y = gguf.quants.dequantize(quantize(x, qtype), qtype)
    rel = np.sqrt(np.mean((y - x) ** 2)) / np.sqrt(np.mean(x**2))
    assert rel < RMS_LIMIT[qtype], rel


@pytest.mark.parametrize("qtype", KQ, ids=lambda t: t.name)
@pytest.mark.parametrize("case", ["normal", "outlier", "tiny", "mixed_scale"])
def test_own_decoder_matches_gguf_bit_for_bit(qtype: T, case: str) -> None:
    raw = quantize(CASES[case], qtype)
    ours = dequantize_k(raw, qtype)
    ref = gguf.quants.dequantize(raw, qtype)
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("qtype", KQ, ids=lambda t: t.name)
def test_random_blocks_decode_identically(qtype: T) -> None:
    """Arbitrary bytes (all bit patterns of the packed fields) decode the same in both decoders."""
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, size=(64, BYTES[qtype]), dtype=np.uint8)
    # keep the f16 scale fields finite and small
    d = (rng.random((64, 2)) * 0.1).astype(np.float16).view(np.uint8)
    if qtype == T.Q6_K:
        raw[:, 208:210] = d[:, 0:2]
    else:
        raw[:, 0:4] = d
    np.testing.assert_array_equal(
        dequantize_k(raw, qtype).view(np.uint32), gguf.quants.dequantize(raw, qtype).view(np.uint32)
    )


@pytest.mark.parametrize(
    "qtype", [T.F32, T.F16, T.BF16, T.Q4_0, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q6_K], ids=lambda t: t.name
)
def test_dispatcher(qtype: T) -> None:
    x = np.random.default_rng(5).standard_normal((4, 256)).astype(np.float32)
    y = gguf.quants.dequantize(quantize(x, qtype), qtype).reshape(x.shape)
    assert np.max(np.abs(y - x)) < 0.5


def test_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        quantize(np.zeros((2, 128), dtype=np.float32), T.Q4_K)


def test_speed_smoke() -> None:
    """>= ~10 M values/s on one core (checked loosely: the machine is shared)."""
    import time

    x = np.random.default_rng(0).standard_normal((1024, 2048)).astype(np.float32)
    for qtype in KQ:
        t0 = time.perf_counter()
        quantize(x, qtype)
        rate = x.size / (time.perf_counter() - t0)
        assert rate > 3e6, (qtype.name, rate)
