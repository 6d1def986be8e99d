"""The native CPU engine (ktpack.kernels) against references nobody wrote in C++.

Weights come packed by the layout modules (bytes exactly as kt-convert writes them); the references
are numpy/f64 on the values gguf-py (ggml) or layouts.amx (amx) dequantize to.

Tolerances, derived:
- Activation quantization (integer formats): per block, d = amax/127, q = rint(x·(127/amax)),
  x̂ = d·q, so |x - x̂| <= d·(1/2 + 4·127u) with u = 2^-24 (rounding of x·id, of id, of d and of d·q,
  each relative u on values up to 127 d): <= d·(1/2 + 2^-14); checked directly.
- The integer kernels multiply codes exactly, so y equals W·x̂ up to f32 accumulation: at most
  K·u·(|W| |x̂|) for K <= 512 terms plus one f32 scale product per block, i.e. < 4e-5 relative in the
  worst case, about 1e-7 typically; the test uses 1e-5 · (|W| |x̂|), which the typical case meets with
  a margin of 100x and a wrong code or scale anywhere breaks by orders of magnitude.
  Against the unquantized input: |y - W x| <= |W| |x - x̂| + 1e-5 (|W| |x|).
- Float formats: F32 weights take the f32 activations: |y - W x| <= 1e-5 · (|W| |x|). BF16 weights take
  the activations rounded to bf16, x̂ = bf16(x) (round to nearest even, 8-bit significand: |x - x̂| <=
  2^-8 |x|; quantize_act(x, BF16_ACT)), multiplied exactly in f32 (vdpbf16ps on AVX-512):
  |y - W x̂| <= 1e-5 · (|W| |x̂|), hence |y - W x| <= (2^-8 + 2e-5) · (|W| |x|).
Every output buffer is pre-filled with NaN, so a row a kernel skips fails the test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from ktpack import kernels as K
from ktpack.convert.synth.writer import random_blocks
from ktpack.kernels import _native
from ktpack.layouts import amx, ggml, ggml_lanes
from ktpack.runtime.cpu_ops import BF16_ACT, quantize_act


def _isa_params():
    out = []
    for name in K.ISAS:
        ok, why = K.supported(name)
        marks = [pytest.mark.amx] if name == "amx" else []
        if not ok:
            marks.append(pytest.mark.skip(reason=f"this CPU/OS cannot run {name}: {why}"))
        out.append(pytest.param(name, marks=marks, id=name))
    return out


ISA_PARAMS = _isa_params()


@pytest.fixture
def use_isa(request):
    """Select an ISA's kernels for one test, and restore the default after."""

    def select(name: str) -> None:
        _native.select_isa(name)

    yield select
    _native.select_isa(K.isa())


RNG = np.random.default_rng(20261125)


def ggml_weights(gtype: str, n: int, k: int, lead: tuple[int, ...] = ()):
    raw = random_blocks(RNG, (*lead, n, k), GGMLQuantizationType[gtype])
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(*lead, n, -1)
    packed = ggml.pack(raw, gtype, 8)
    w = ggml.dequantize(raw, gtype).reshape(*lead, n, k)
    return K.weight_spec("ggml_rows_v1", {"ggml_type": gtype, "rows": 8}, (*lead, n, k), packed), w


def lanes_weights(gtype: str, n: int, k: int, lead: tuple[int, ...] = ()):
    raw = random_blocks(RNG, (*lead, n, k), GGMLQuantizationType[gtype])
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(*lead, n, -1)
    packed = ggml_lanes.pack(raw, gtype)
    w = ggml.dequantize(raw, gtype).reshape(*lead, n, k)
    return K.weight_spec("ggml_lanes_v1", {"ggml_type": gtype, "rows": 16}, (*lead, n, k), packed), w


def amx_weights(kind: str, n: int, k: int, group: int = 128, lead: tuple[int, ...] = ()):
    w0 = RNG.standard_normal((*lead, n, k)).astype(np.float32) * 0.05
    packed = amx.pack(kind, w0, group_size=group)
    w = amx.dequantize(kind, packed, (*lead, n, k), group_size=group)
    return K.weight_spec(f"amx_{kind}_v1", {"n_block": 4, "group_size": group}, (*lead, n, k), packed), w


# (id, maker, integer?) with edge shapes: a short last row group (ggml N % 8 != 0), a partial last
# N-block (amx N = 48: 3 tiles of a 4-tile block), odd K for the float rows.
CASES = [
    ("Q8_0", lambda: ggml_weights("Q8_0", 13, 96), True),
    ("Q4_K", lambda: ggml_weights("Q4_K", 21, 512), True),
    ("Q5_K", lambda: ggml_weights("Q5_K", 16, 512), True),
    ("Q6_K", lambda: ggml_weights("Q6_K", 11, 512), True),
    ("Q4_0", lambda: ggml_weights("Q4_0", 9, 128), True),
    ("Q4_1", lambda: ggml_weights("Q4_1", 16, 64), True),
    ("Q5_0", lambda: ggml_weights("Q5_0", 24, 160), True),
    ("Q5_1", lambda: ggml_weights("Q5_1", 7, 96), True),
    ("BF16", lambda: ggml_weights("BF16", 19, 37), False),
    ("BF16_lone_group", lambda: ggml_weights("BF16", 27, 70), False),  # a pair of groups, one alone, 3 rows
    ("BF16_k512", lambda: ggml_weights("BF16", 48, 512), False),
    ("F32", lambda: ggml_weights("F32", 8, 33), False),
    ("lanes_Q4_K", lambda: lanes_weights("Q4_K", 48, 768), True),
    ("lanes_Q6_K", lambda: lanes_weights("Q6_K", 32, 512), True),
    ("lanes_Q8_0", lambda: lanes_weights("Q8_0", 32, 96), True),
    ("lanes_Q5_0", lambda: lanes_weights("Q5_0", 32, 128), True),  # stored and run as Q8_0 lane blocks
    ("lanes_Q4_0", lambda: lanes_weights("Q4_0", 16, 64), True),
    ("amx_int4_g32", lambda: amx_weights("int4", 48, 384, 32), True),
    ("amx_int4_g64", lambda: amx_weights("int4", 80, 256, 64), True),
    ("amx_int4_g128", lambda: amx_weights("int4", 16, 128, 128), True),
    ("amx_int8", lambda: amx_weights("int8", 48, 192), True),
    ("amx_bf16", lambda: amx_weights("bf16", 80, 96), False),
]


def _x(m: int, k: int) -> np.ndarray:
    # heavy-tailed activations (outliers, as real hidden states have)
    return (RNG.standard_normal((m, k)) * np.exp(RNG.standard_normal((m, k)))).astype(np.float32)


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("m", [1, 3, 17, 118])
def test_gemm_against_numpy(isa, case, m, use_isa):
    use_isa(isa)
    _, make, integer = case
    spec, w = make()
    n, k = w.shape
    x = _x(m, k)
    y = np.full((m, n), np.nan, np.float32)
    K.Linear(spec).forward(x, y)
    assert not np.isnan(y).any(), "some outputs were never written"
    w64 = w.astype(np.float64)
    absw = np.abs(w64)
    if integer:
        block = _native.act_block(spec[0], spec[7])
        xh = quantize_act(torch.from_numpy(x), block).double().numpy()
        err_q = np.abs(x - xh)
        d = np.repeat(np.abs(x).reshape(m, -1, block).max(-1) / 127, block, axis=-1)
        assert (err_q <= d * (0.5 + 2**-14)).all(), "activation quantization error exceeds d/2"
        exact = xh @ w64.T
        assert (np.abs(y - exact) <= 1e-5 * (np.abs(xh) @ absw.T) + 1e-30).all(), "kernel != W x̂"
        bound = np.abs(x - xh) @ absw.T + 1e-5 * (np.abs(x) @ absw.T)
    elif "BF16" in case[0].upper():  # activations rounded to bf16 (docstring)
        xh = quantize_act(torch.from_numpy(x), BF16_ACT).double().numpy()
        assert (np.abs(x - xh) <= 2.0**-8 * np.abs(x)).all()
        assert (np.abs(y - xh @ w64.T) <= 1e-5 * (np.abs(xh) @ absw.T) + 1e-30).all(), "kernel != W bf16(x)"
        bound = (2.0**-8 + 2e-5) * (np.abs(x) @ absw.T)
    else:
        bound = 1e-5 * (np.abs(x) @ absw.T)
    assert (np.abs(y - x.astype(np.float64) @ w64.T) <= bound + 1e-30).all()


@pytest.mark.skipif(not K.supported("avx512")[0], reason="the Q6_K GFNI unpack is an AVX-512 kernel")
def test_lanes_q6k_gfni_and_plain_unpack_agree(tmp_path):
    """The AVX-512 lanes Q6_K kernel unpacks with GFNI where the CPU has it, else with shifts and masks
    (KTPACK_GFNI=0 forces that; the kernel table is filled once per process, so each runs in its own):
    the same integer codes, so bit-identical outputs, decode and prefill."""
    code = (
        "import sys, numpy as np\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import test_kernels_native as t\n"
        "t._native.select_isa('avx512')\n"
        "spec, _ = t.lanes_weights('Q6_K', 48, 1024)\n"
        "for m in (1, 5):\n"
        "    y = np.full((m, 48), np.nan, np.float32)\n"
        "    t.K.Linear(spec).forward(t._x(m, 1024), y)\n"
        "    np.save(sys.argv[1] + f'-{m}.npy', y)\n"
    )
    for gfni in ("1", "0"):
        env = {**os.environ, "KTPACK_GFNI": gfni}
        r = subprocess.run([sys.executable, "-c", code, str(tmp_path / gfni)], env=env, capture_output=True, text=True,
                           timeout=120)  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
    for m in (1, 5):
        a, b = np.load(tmp_path / f"1-{m}.npy"), np.load(tmp_path / f"0-{m}.npy")
        assert not np.isnan(a).any() and np.array_equal(a, b)


@pytest.mark.parametrize("isa", ISA_PARAMS)
def test_quantize_is_the_reference_definition(isa, use_isa):
    use_isa(isa)
    x = _x(7, 512)
    x[0, :64] = 0.0  # an all-zero block
    for block in (16, 32, 64, 128, 256):
        q, d, s = _native.quantize(x, block)
        xh = (q.astype(np.float32).reshape(7, -1, block) * d[..., None]).reshape(7, 512)
        assert np.array_equal(xh, quantize_act(torch.from_numpy(x), block).numpy())
        assert np.array_equal(s, q.reshape(7, -1, 16).astype(np.int32).sum(-1))


def _bf16(x: np.ndarray) -> np.ndarray:
    """bf16 bits of x (round to nearest even, as torch)."""
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16).view(torch.int16).numpy()


def _widen_bf16(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.int32).astype(np.uint32) << 16).view(np.float32).astype(np.float64)


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("kv", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("heads,D,R,t0,t1", [(9, 512, 64, 3, 36), (8, 512, 64, 0, 37), (5, 48, 16, 1, 10)])
def test_decode_attention_kernels(isa, kv, heads, D, R, t0, t1, use_isa):
    """The decode attention kernels (scores over the latent cache and the latent sums) against float64 sums of
    the arithmetic they define: an f32 cache with f32 queries; an f16 cache widened exactly with f32 queries;
    a bf16 cache widened exactly with the queries and the weights p rounded to bf16 (vdpbf16ps's operands;
    their products are exact in f32). Bound: f32 summation, (terms + 16) 2^-24 sum |products|. Shapes: the
    AVX-512 blocks (D % 64 == 0) with a head count that leaves a remainder, an odd first row and an odd row
    count (the bf16 row pairs), and a shape only the generic loops take."""
    use_isa(isa)
    rng = np.random.default_rng(heads * 1000 + D)
    n = 40
    q = rng.standard_normal((heads, D)).astype(np.float32)
    qr = rng.standard_normal((heads, R)).astype(np.float32)
    c = rng.standard_normal((n, D)).astype(np.float32)
    kr = rng.standard_normal((n, R)).astype(np.float32)
    p = rng.uniform(0, 1, (heads, n)).astype(np.float32)
    if kv == "f32":
        cs, ks = c, kr
        c64, k64, q64, qr64, p64 = (a.astype(np.float64) for a in (c, kr, q, qr, p))
    elif kv == "f16":
        cs, ks = c.astype(np.float16), kr.astype(np.float16)
        c64, k64, q64, qr64, p64 = (a.astype(np.float64) for a in (cs, ks, q, qr, p))
    else:
        cs, ks = _bf16(c), _bf16(kr)
        c64, k64 = _widen_bf16(cs), _widen_bf16(ks)
        q64, qr64, p64 = (_widen_bf16(_bf16(a)) for a in (q, qr, p))
    scale = 0.125
    s, out = _native.attention(kv, q, qr, cs, ks, scale, t0, t1, p)
    rows = slice(t0, t1)
    want = (q64 @ c64[rows].T + qr64 @ k64[rows].T) * scale
    bound = (D + R + 16) * 2.0**-24 * (np.abs(q64) @ np.abs(c64[rows]).T + np.abs(qr64) @ np.abs(k64[rows]).T) * scale
    assert (np.abs(s[:, rows] - want) <= bound).all()
    assert not s[:, :t0].any() and not s[:, t1:].any()
    want_v = p64[:, rows] @ c64[rows]
    bound_v = (t1 - t0 + 16) * 2.0**-24 * (np.abs(p64[:, rows]) @ np.abs(c64[rows]))
    assert (np.abs(out - want_v) <= bound_v).all()
    if kv == "bf16":  # and the rounding is really there: unrounded queries give other scores
        exact = (q.astype(np.float64) @ c64[rows].T + qr.astype(np.float64) @ k64[rows].T) * scale
        assert np.abs(s[:, rows] - exact).max() > bound.max()


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("T,H,D,R,n,pos0", [(3, 13, 512, 64, 45, 40), (4, 16, 512, 64, 300, 250), (2, 2, 48, 16, 9, 9)])
def test_prefill_probs_bf16(isa, T, H, D, R, n, pos0, use_isa):
    """The prefill's attention probabilities over a bf16 cache (T query tokens x H heads at once, split over
    the pool's threads): row t*H+h sees the cache rows 0..pos0+t and is their softmax, 0 on the rows after.
    Scores: the bf16 decode kernel's arithmetic and bound b (test_decode_attention_kernels), so each visible
    probability is within a factor exp(+-2 max b) of softmax of the exact scores, times (1 + e): e covers the
    exponential (rel. 2e-7), the f32 rounding of s - max (2^-24 |s - max|) and the f32 sum and the 1/sum
    product ((n + 4) 2^-24). Cases: a head count that is not a multiple of the kernels' 4-head block, query
    rows whose visible range ends inside / beyond the cache (pos0 + t >= n), a shape only the generic loops
    take."""
    use_isa(isa)
    rng = np.random.default_rng(T * H + n)
    M = T * H
    q, qr = rng.standard_normal((M, D)).astype(np.float32), rng.standard_normal((M, R)).astype(np.float32)
    cs, ks = _bf16(rng.standard_normal((n, D))), _bf16(rng.standard_normal((n, R)))
    s = np.full((M, n), np.nan, np.float32)
    _native.prefill_probs(q, qr, cs, ks, 0.125, H, pos0, s)
    c64, k64 = _widen_bf16(cs), _widen_bf16(ks)
    q64, qr64 = _widen_bf16(_bf16(q)), _widen_bf16(_bf16(qr))
    exact = (q64 @ c64.T + qr64 @ k64.T) * 0.125
    bound = (D + R + 16) * 2.0**-24 * (np.abs(q64) @ np.abs(c64).T + np.abs(qr64) @ np.abs(k64).T) * 0.125
    for m in range(M):
        lim = min(n, pos0 + m // H + 1)
        assert (s[m, lim:] == 0).all(), "a hidden cache row got a probability"
        z = exact[m, :lim] - exact[m, :lim].max()
        want = np.exp(z) / np.exp(z).sum()
        e = 2e-7 + 2.0**-24 * np.abs(z).max() + (n + 4) * 2.0**-24
        rel = np.expm1(2 * bound[m, :lim].max() + 2 * e)
        assert (np.abs(s[m, :lim] - want) <= rel * want + 1e-37).all(), m
    with pytest.raises(ValueError, match="inconsistent shapes"):
        _native.prefill_probs(q, qr, cs, ks, 0.125, H, pos0, s[:, :-1].copy())
    with pytest.raises(ValueError, match="whole tokens"):
        _native.prefill_probs(q, qr, cs, ks, 0.125, H + 1, pos0, s)


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("T,H,n,V", [(5, 3, 37, 128), (4, 16, 300, 128), (3, 2, 9, 48)])
def test_prefill_values(isa, T, H, n, V, use_isa):
    """The prefill's attention values (per head, probabilities times that head's value rows; the heads split
    over the pool above a size) against float64: f32 sums, bound (n + 16) 2^-24 sum |products|. An odd query
    count (the kernels' 2-query block), a size split over the pool, and a width only the generic loops take."""
    use_isa(isa)
    rng = np.random.default_rng(T * H + n)
    p = rng.uniform(0, 1, (T, H, n)).astype(np.float32)
    v = rng.standard_normal((n, H, V)).astype(np.float32)
    out = np.full((T, H, V), np.nan, np.float32)
    _native.prefill_values(p, v, out)
    want = np.einsum("thn,nhv->thv", p.astype(np.float64), v.astype(np.float64))
    bound = (n + 16) * 2.0**-24 * np.einsum("thn,nhv->thv", np.abs(p).astype(np.float64), np.abs(v).astype(np.float64))
    assert (np.abs(out - want) <= bound).all()
    with pytest.raises(ValueError, match="inconsistent shapes"):
        _native.prefill_values(p, v[:-1].copy(), out)


@pytest.mark.parametrize("isa", ISA_PARAMS)
def test_stacked_linear_is_per_matrix(isa, use_isa):
    """A 3-D weight (attn_k_b / attn_v_b): x[T, M, K] -> y[T, M, N], matrix m for slot m."""
    use_isa(isa)
    spec, w = ggml_weights("Q8_0", 24, 64, lead=(5,))
    x = _x(3 * 5, 64).reshape(3, 5, 64)
    y = np.full((3, 5, 24), np.nan, np.float32)
    K.Linear(spec).forward(x, y)
    xh = quantize_act(torch.from_numpy(x), 32).double().numpy()
    want = np.einsum("tmk,mnk->tmn", xh, w.astype(np.float64))
    assert np.allclose(y, want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize(
    "fmt,n,k,lead",
    [("lanes_Q4_K", 1040, 512, ()), ("lanes_Q8_0", 160, 256, (7,)), ("Q6_K", 451, 768, ()), ("Q8_0", 61, 576, (9,))],
)
def test_one_token_contiguous_split(isa, fmt, n, k, lead, use_isa):
    """One token over >= 256 KiB of weights (these cases: 258-336 KiB) takes the decode split (each thread
    one contiguous range of the stacked matrices' row groups; a range may start or end inside a matrix):
    every output written, each slot by its own matrix."""
    use_isa(isa)
    make = lanes_weights if fmt.startswith("lanes_") else ggml_weights
    spec, w = make(fmt.removeprefix("lanes_"), n, k, lead=lead)
    m = int(np.prod(lead, dtype=np.int64))
    x = _x(max(m, 1), k).reshape(1, *lead, k)
    y = np.full((1, *lead, n), np.nan, np.float32)
    K.Linear(spec).forward(x, y)
    assert not np.isnan(y).any(), "some outputs were never written"
    block = _native.act_block(spec[0], spec[7])
    xh = quantize_act(torch.from_numpy(x), block).double().numpy()
    want = np.einsum("t...k,...nk->t...n", xh, w.astype(np.float64))
    scale = np.einsum("t...k,...nk->t...n", np.abs(xh), np.abs(w.astype(np.float64)))
    assert (np.abs(y - want) <= 1e-5 * scale + 1e-30).all()


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("gtype", ["Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16", "F32"])
def test_row_dequant_is_gguf_py(isa, gtype, use_isa):
    """The decode step's embedding row (Kernels::dequant_row) is gguf-py's dequantized row, bit for bit,
    in every row position of the interleaved groups (13 rows: a short last group of 5)."""
    use_isa(isa)
    k = {"Q8_0": 96, "Q4_0": 64, "Q4_1": 64, "Q5_0": 96, "Q5_1": 64, "BF16": 40, "F32": 24}.get(gtype, 512)
    spec, w = ggml_weights(gtype, 13, k)
    lin = K.Linear(spec)
    for r in range(13):
        assert np.array_equal(lin.row(r), w[r]), r
    with pytest.raises(IndexError):
        lin.row(13)


# ---------------------------------------------------------------------------- routed experts


def _experts_case(fmt: str, e: int, h: int, inter: int):
    """Full gate/up [E, I, H] and down [E, H, I] as (maker(lo, hi) -> slice specs, dequantized full)."""
    if fmt.startswith("amx"):
        kind, group = fmt.split("_")[1], 64
        full = {p: RNG.standard_normal((e, *s)).astype(np.float32) * 0.05 for p, s in
                (("gate", (inter, h)), ("up", (inter, h)), ("down", (h, inter)))}  # fmt: skip

        def piece(p, lo, hi):
            wf = full[p][:, lo:hi] if p != "down" else np.ascontiguousarray(full[p][:, :, lo:hi])
            packed = amx.pack(kind, wf, group_size=group)
            deq = amx.dequantize(kind, packed, wf.shape, group_size=group)
            return K.weight_spec(f"amx_{kind}_v1", {"n_block": 4, "group_size": group}, wf.shape, packed), deq
    else:
        gt = {"gate": fmt, "up": fmt, "down": "Q6_K" if fmt == "Q4_K" else fmt}
        bv = ggml.block_geometry(gt["down"])[0]
        raws = {}
        for p, s in (("gate", (inter, h)), ("up", (inter, h)), ("down", (h, inter))):
            r = random_blocks(RNG, (e, *s), GGMLQuantizationType[gt[p]])
            raws[p] = np.ascontiguousarray(r).view(np.uint8).reshape(e, s[0], -1)

        def piece(p, lo, hi):
            t = gt[p]
            if p == "down":
                bb = ggml.block_geometry(t)[1]
                raw = np.ascontiguousarray(raws[p][:, :, lo // bv * bb : hi // bv * bb])
                shape = (e, h, hi - lo)
            else:
                raw = np.ascontiguousarray(raws[p][:, lo:hi])
                shape = (e, hi - lo, h)
            deq = ggml.dequantize(raw, t).reshape(shape)
            return K.weight_spec("ggml_rows_v1", {"ggml_type": t, "rows": 8}, shape, ggml.pack(raw, t, 8)), deq

    return piece


def _experts_ref(x, idx, wts, gate, up, down, in_block, h_block):
    """Σ_j w_j · down_e(silu(gate_e x̂) ⊙ up_e x̂)^ in f64, with the engine's activation quantization."""
    xh = quantize_act(torch.from_numpy(x), in_block).double() if in_block else torch.from_numpy(x).double()
    out = torch.zeros_like(xh)
    g, u, d = (torch.from_numpy(a).double() for a in (gate, up, down))
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            hv = torch.nn.functional.silu(g[e] @ xh[t]) * (u[e] @ xh[t])
            if h_block:
                hv = quantize_act(hv.float()[None], h_block)[0].double()
            out[t] += float(wts[t, j]) * (d[e] @ hv)
    return out.numpy()


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("fmt", ["amx_int4", "amx_int8", "Q4_K", "Q8_0"])
@pytest.mark.parametrize("tokens", [1, 3, 17])
def test_experts_numa_slices(isa, fmt, tokens, use_isa):
    """1, 2, 4 and 8 NUMA slices (cut along the intermediate dimension at the layout's unit).

    Each result equals the f64 reference on its own weights and the engine's quantized activations
    within 2e-3 of max|y|: f32 sums, and h = silu(g)·u, computed here in f64 and there in f32 (exp
    within 2 ulp), is quantized again for down, so a code of h may round the other way (one flip moves
    one term by d_h·|w| ≈ 1e-4..1e-3 of max|y|); a wrong kernel is off by ~100%. Where slicing
    leaves the weights unchanged (ggml blocks, int4 groups never straddle a cut) the n-slice result
    equals the 1-slice one within 1e-5 of max|y|: only where the partial down-projections are summed
    changes. amx_int8 has one scale per row of down over the slice's K, so its slices are different
    weights and only the reference check applies."""
    use_isa(isa)
    e, h, inter, k = 8, 256, 2048, 4
    piece = _experts_case(fmt, e, h, inter)
    x = _x(tokens, h)
    idx = np.stack([RNG.choice(e, k, replace=False) for _ in range(tokens)]).astype(np.int64)
    wts = RNG.random((tokens, k)).astype(np.float32)
    results = {}
    for n_slices in (1, 2, 4, 8):
        bounds = np.linspace(0, inter, n_slices + 1).astype(int)
        slices, deq = [], []
        for s in range(n_slices):
            lo, hi = int(bounds[s]), int(bounds[s + 1])
            (gs, gd), (us, ud), (ds, dd) = piece("gate", lo, hi), piece("up", lo, hi), piece("down", lo, hi)
            slices.append((gs, us, ds, lo, hi, s))
            deq.append((gd, ud, dd))
        op = K.Experts(slices, e, h, inter)
        out = np.full((tokens, h), np.nan, np.float32)
        op.forward(x, idx, wts, out)
        assert not np.isnan(out).any()
        gate, up, down = (np.concatenate([d[i] for d in deq], axis=2 if i == 2 else 1) for i in range(3))
        in_block = _native.act_block(slices[0][0][0], 64)
        h_block = _native.act_block(slices[0][2][0], 64)
        want = _experts_ref(x, idx, wts, gate, up, down, in_block, h_block)
        assert np.abs(out - want).max() <= 2e-3 * np.abs(want).max(), n_slices
        results[n_slices] = out
    if fmt != "amx_int8":
        scale = np.abs(results[1]).max()
        for n_slices in (2, 4, 8):
            assert np.abs(results[n_slices] - results[1]).max() <= 1e-5 * scale, n_slices


def test_experts_reject_bad_index():
    spec_g, _ = amx_weights("int8", 64, 128, lead=(4,))
    spec_d, _ = amx_weights("int8", 128, 64, lead=(4,))
    op = K.Experts([(spec_g, spec_g, spec_d, 0, 64, 0)], 4, 128, 64)
    out = np.zeros((1, 128), np.float32)
    with pytest.raises(IndexError, match="expert index 7"):
        op.forward(np.zeros((1, 128), np.float32), np.array([[7]], np.int64), np.ones((1, 1), np.float32), out)


def test_bad_specs_are_refused():
    spec, _ = ggml_weights("Q4_K", 16, 256)
    short = (spec[0], spec[1][:-1], *spec[2:])
    with pytest.raises(ValueError, match="bytes"):
        K.Linear(short)
    with pytest.raises(ValueError, match="unknown weight format"):
        K.Linear(("ggml_q3_k", *spec[1:]))
    lin = K.Linear(spec)
    with pytest.raises(ValueError, match="float32"):
        lin.forward(np.zeros((1, 256), np.float64), np.zeros((1, 16), np.float32))


# ---------------------------------------------------------------------------- ISA forcing


@pytest.mark.parametrize("isa", ISA_PARAMS)
def test_forced_isa_runs_in_a_fresh_process(isa):
    """KTPACK_ISA=<isa> in a new process: selected, a Q4_K and an amx_int4 product run (no SIGILL)."""
    code = (
        "import numpy as np; from ktpack import kernels as K; from ktpack.layouts import amx;"
        "print(K.ensure_engine());"
        "w = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32);"
        "s = K.weight_spec('amx_int4_v1', {'n_block': 4, 'group_size': 128}, (64, 256), amx.pack('int4', w));"
        "y = np.zeros((2, 64), np.float32); K.Linear(s).forward(np.ones((2, 256), np.float32), y);"
        "print(float(y.sum()))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "KTPACK_ISA": isa}, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == isa


def test_unknown_or_unsupported_isa_is_refused():
    r = subprocess.run(
        [sys.executable, "-c", "from ktpack import kernels as K; K.ensure_engine()"],
        env={**os.environ, "KTPACK_ISA": "sse9"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and "KTPACK_ISA='sse9' is not one of ref, avx2, avx512, amx" in r.stderr
    missing = [name for name in K.ISAS if not K.supported(name)[0]]
    if not missing:
        pytest.skip("this machine runs every ISA: no unsupported one to force (the refusal path is shared)")
    r = subprocess.run(
        [sys.executable, "-c", "from ktpack import kernels as K; K.ensure_engine()"],
        env={**os.environ, "KTPACK_ISA": missing[0]},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and f"KTPACK_ISA={missing[0]} cannot run on this machine" in r.stderr
