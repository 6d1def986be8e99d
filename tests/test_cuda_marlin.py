"""The Marlin int4 GEMM of kernels/cuda/: it compiles, it reads the layout right, and (on a GPU) it is accurate.

Three tiers, by what the machine has:
- nvcc: marlin_gemm.cu and doorbell.cu compile for sm_80, sm_89 and sm_90 with CUDA headers only (no torch),
  warnings as errors and no register spills; binding.cpp passes a syntax check against torch's headers.
- nvcc, no GPU: tests/cuda/marlin_emulate.cu runs the kernels' own layout helpers with the kernels' block,
  warp and lane decomposition on the host (mma and shuffles emulated), against layouts/marlin.py.
- a GPU: the real kernels against torch on the dequantized weights, every DeepSeek-V3 GPU-side shape, and
  inside a CUDA Graph.

Error bound (both the emulation and the GPU, elementwise; S[m, n] = Σ_k |x_mk|·|ŵ_nk| in float64):
    |y - x·ŵᵀ| <= (u_act + D·u_acc)·(1 + u_act)·S + u_out·(|x·ŵᵀ| + (u_act + D·u_acc)·(1 + u_act)·S) + tiny
- activation rounding: x (float32) is rounded once to fp16/bf16, |x̃ - x| <= u_act·|x| with u_act = 2^-11
  (fp16) or 2^-8 (bf16), so |x̃·ŵᵀ - x·ŵᵀ| <= u_act·S (the emulation starts from x̃: u_act = 0 there);
- products: (q - 8)·x̃ is a 4-bit integer times an 11- or 8-bit significand, exact in fp32; the fp16 scale is
  exact in fp32;
- fp32 accumulation: a product reaches the output through at most D roundings: < g additions inside its group
  partial (lane sums or the mma chain of g/16 steps, each counted as up to 16 additions, so 2g covers it), one
  multiply by the scale, < K/g additions over groups, and <= 80 more (4 shuffle/warp sums, up to 64 split-K
  partials and the mma accumulator). D = 2g + K/g + 80. With u_acc = 2^-23 (twice the round-to-nearest unit,
  so tensor-core truncation is covered as well) the first-order bound is D·u_acc·Σ|terms| <= D·u_acc·(1+u_act)·S;
- the output is rounded once to fp16/bf16: u_out = 2^-11 or 2^-8 relative, plus `tiny` = 2^-24 absolute
  for fp16 subnormal outputs. The emulation returns the fp32 sums: u_out = 0 there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from ktpack.layouts import marlin

ROOT = Path(__file__).resolve().parent.parent
CUDA_SRC = ROOT / "kernels" / "cuda"
EMULATOR_SRC = Path(__file__).resolve().parent / "cuda" / "marlin_emulate.cu"


def _nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and (Path(root) / "bin" / "nvcc").exists():
            return str(Path(root) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (no CUDA toolkit on this machine)")
HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU with a CUDA build of torch")

U_ACT = {"f16": 2.0**-11, "bf16": 2.0**-8}
U_ACC = 2.0**-23


def accumulation_depth(k: int, group: int) -> int:
    g = k if group == -1 else group
    return 2 * g + k // g + 80


def bound(ref: np.ndarray, s: np.ndarray, k: int, group: int, u_act: float, u_out: float, tiny: float) -> np.ndarray:
    """The module docstring's bound, elementwise (float64)."""
    acc = (u_act + accumulation_depth(k, group) * U_ACC) * (1 + u_act) * s
    return acc + u_out * (np.abs(ref) + acc) + tiny


# ------------------------------------------------------------------------------------------------ compile-only


# The flags torch.utils.cpp_extension adds for nvcc (torch 2.13: C++20, no implicit half/bf16 operators).
TORCH_NVCC_FLAGS = [
    "-std=c++20",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_89", "sm_90"])
def test_kernels_compile(arch, tmp_path):
    """Kernel sources build for each target with CUDA headers only (no torch), with the flags the extension
    build uses, warnings as errors and no register spills."""
    for src in ("marlin_gemm.cu", "doorbell.cu"):
        cmd = [NVCC, "-c", *TORCH_NVCC_FLAGS, "-O3", f"--gpu-architecture={arch}", "-Werror", "all-warnings",
               "-Xptxas", "-v,-warn-spills", "-o", str(tmp_path / (src + ".o")), str(CUDA_SRC / src)]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"
        spills = [int(b) for b in re.findall(r"(\d+) bytes spill stores", r.stdout + r.stderr)]
        assert not any(spills), f"{src} spills registers on {arch}:\n{r.stderr}"
        regs = sorted({int(n) for n in re.findall(r"Used (\d+) registers", r.stdout + r.stderr)})
        print(f"\n{src} {arch}: ok, registers per kernel instantiation {regs}")


def _torch_includes() -> list[str]:
    from torch.utils import cpp_extension

    return cpp_extension.include_paths()


@needs_nvcc
def test_binding_syntax(tmp_path):
    """binding.cpp against torch's C++ headers (C++20, as torch.utils.cpp_extension builds it).

    CPU wheels of torch ship the c10/cuda headers but not c10/cuda/impl/cuda_cmake_macros.h, which torch's
    CUDA build generates; an empty stand-in is enough for a syntax check."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), Path(NVCC).resolve().parent.parent]
    roots.append("/usr/local/cuda")
    incs = [Path(r) / "include" for r in roots if r and (Path(r) / "include" / "cuda_runtime_api.h").exists()]
    if not incs:
        pytest.skip(f"CUDA headers not found (nvcc is {NVCC}; set CUDA_HOME)")
    cuda_inc = incs[0]
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    inc = []
    for p in _torch_includes():
        inc += ["-isystem", p]
    inc += ["-isystem", str(tmp_path / "stub"), "-isystem", str(cuda_inc), "-I", str(CUDA_SRC)]
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", *inc, str(CUDA_SRC / "binding.cpp")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]


# ------------------------------------------------------------------------------------------------ host emulation


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Path:
    if NVCC is None:
        pytest.skip("nvcc not found (no CUDA toolkit on this machine)")
    exe = tmp_path_factory.mktemp("emu") / "marlin_emulate"
    cmd = [NVCC, "-std=c++17", "-O2", "-arch=sm_80", "-Werror", "all-warnings", "-I", str(CUDA_SRC),
           "-o", str(exe), str(EMULATOR_SRC)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return exe


def make_problem(rng, m: int, n: int, k: int, group: int, count: int, act: str):
    """Random codes and scales packed by layouts/marlin.py, activations rounded to `act`."""
    g = k if group == -1 else group
    q = rng.integers(0, 16, (count, k, n), dtype=np.uint8)
    s = (rng.uniform(0.5, 2.0, (count, k // g, n)) * rng.choice([1.0, -1.0], (count, k // g, n)) * 2.0**-6).astype(
        np.float16
    )
    qw, sc = marlin.pack_quantized(q, s, group)
    x = rng.standard_normal((m, count, k)).astype(np.float32)
    xt = torch.from_numpy(x).to(torch.float16 if act == "f16" else torch.bfloat16)
    w = marlin.dequantize(qw, sc, (count, n, k), group).astype(np.float64)  # [count, N, K]
    return qw, sc, x, xt, w


def emulate(exe: Path, tmp: Path, kernel: str, act: str, m, n, k, group, count, splits, mt, qw, sc, xt) -> np.ndarray:
    g = k if group == -1 else group
    qw.tofile(tmp / "qw.bin")
    sc.tofile(tmp / "sc.bin")
    xt.view(torch.int16).numpy().tofile(tmp / "x.bin")
    args = [kernel, act, m, n, k, g, count, splits, mt, tmp / "qw.bin", tmp / "sc.bin", tmp / "x.bin", tmp / "y.bin"]
    subprocess.run([str(exe), *map(str, args)], check=True)
    return np.fromfile(tmp / "y.bin", np.float32).reshape(m, count, n)


EMU_CASES = [
    # kernel, act, M, N, K, group, count, splits, MT (CUDA-core rows per block)
    ("simt", "f16", 1, 64, 128, 128, 1, 1, 1),  # K == g: the single-group scale permutation
    ("simt", "bf16", 5, 320, 256, 128, 1, 3, 8),  # N = 320 (not a multiple of 128), rows past M, split K
    ("simt", "f16", 3, 192, 512, 64, 2, 2, 4),  # group 64, a stack of 2 matrices
    ("simt", "bf16", 2, 128, 384, 32, 1, 5, 2),  # group 32, splits that cut groups
    ("simt", "f16", 4, 128, 384, -1, 1, 2, 4),  # per-channel (one group over K = 384)
    ("mma", "f16", 17, 320, 256, 128, 1, 1, 0),  # two m16 tiles, the second nearly empty
    ("mma", "bf16", 33, 128, 384, -1, 3, 2, 0),  # per-channel, a stack of 3
    ("mma", "f16", 1, 256, 512, 32, 1, 4, 0),
    ("mma", "bf16", 16, 576, 1024, 128, 1, 3, 0),  # kv_a_mqa's N
]


@needs_nvcc
@pytest.mark.parametrize("case", EMU_CASES, ids=["-".join(map(str, c[:8])) for c in EMU_CASES])
def test_emulated_kernel_matches_dequantized(emulator, tmp_path, case):
    kernel, act, m, n, k, group, count, splits, mt = case
    rng = np.random.default_rng(zlib.crc32(repr(case).encode()))
    qw, sc, _, xt, w = make_problem(rng, m, n, k, group, count, act)
    y = emulate(emulator, tmp_path, kernel, act, m, n, k, group, count, splits, mt, qw, sc, xt)
    xr = xt.double().numpy()
    ref = np.einsum("mbk,bnk->mbn", xr, w)
    s = np.einsum("mbk,bnk->mbn", np.abs(xr), np.abs(w))
    b = bound(ref, s, k, group, u_act=0.0, u_out=0.0, tiny=0.0)
    err = np.abs(y - ref)
    assert (err <= b).all(), f"max err {err.max():.3g}, worst err/bound {(err / b).max():.3g}"
    print(f"\n{case}: max |err|/S = {(err / s).max():.2e} (bound factor {accumulation_depth(k, group) * U_ACC:.2e})")


@needs_nvcc
def test_emulation_catches_a_layout_mistake(emulator, tmp_path):
    """The bound is tight enough to see scales read through the wrong permutation (grouped vs single)."""
    m, n, k, group = 4, 128, 256, 128
    rng = np.random.default_rng(7)
    qw, sc, _, xt, w = make_problem(rng, m, n, k, group, 1, "f16")
    wrong = marlin.permute_scales(marlin.unpermute_scales(sc, single=False), single=True)
    y = emulate(emulator, tmp_path, "simt", "f16", m, n, k, group, 1, 1, 4, qw, wrong, xt)
    xr = xt.double().numpy()
    ref = np.einsum("mbk,bnk->mbn", xr, w)
    s = np.einsum("mbk,bnk->mbn", np.abs(xr), np.abs(w))
    assert (np.abs(y - ref) > bound(ref, s, k, group, 0.0, 0.0, 0.0)).any()


# ------------------------------------------------------------------------------------------------ on a GPU

# DeepSeek-V3 GPU-side linears (N, K), formats.md §1.4
DEEPSEEK_SHAPES = {
    "q_a": (1536, 7168),
    "q_b": (24576, 1536),
    "kv_a_mqa": (576, 7168),
    "kv_b": (32768, 512),
    "o_proj": (7168, 16384),
    "dense_gate_up": (18432, 7168),
    "dense_down": (7168, 18432),
    "shared_gate_up": (2048, 7168),
    "shared_down": (7168, 2048),
    "lm_head": (129280, 7168),
}
M_VALUES = (1, 16, 64, 512)


class _GpuRef:
    """x·ŵᵀ and S = |x|·|ŵ|ᵀ in float64 on the GPU for float32 x (before rounding) and ŵ float64 [N, K]."""

    def __init__(self, x: torch.Tensor, w: torch.Tensor, w_abs: torch.Tensor) -> None:
        self.x = x
        self.ref = x.double() @ w.T
        self.s = x.double().abs() @ w_abs.T

    def check(self, y: torch.Tensor, k: int, group: int, act: str, what: str) -> float:
        u = U_ACT[act]
        acc = (u + accumulation_depth(k, group) * U_ACC) * (1 + u) * self.s
        b = acc + u * (self.ref.abs() + acc) + (2.0**-24 if act == "f16" else 0.0)  # u_out = u_act
        err = (y.double() - self.ref).abs()
        worst = (err / b).max().item()
        assert worst <= 1.0, f"{what}: max |err| {err.max().item():.3g}, worst err/bound {worst:.3g}"
        return worst


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", list(DEEPSEEK_SHAPES))
def test_marlin_gemm_deepseek_shapes(name):
    from ktpack.runtime import cuda_ops

    n, k = DEEPSEEK_SHAPES[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    q = rng.integers(0, 16, (k, n), dtype=np.uint8)
    s = (rng.uniform(0.5, 2.0, (k // 128, n)) * 2.0**-6).astype(np.float16)
    qw, sc = marlin.pack_quantized(q, s, 128)
    w = torch.from_numpy(marlin.dequantize(qw, sc, (n, k), 128)).cuda().double()  # [N, K]
    w_abs = w.abs()
    del q
    qw_d, sc_d = torch.from_numpy(qw).cuda(), torch.from_numpy(sc).cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    worst = 0.0
    for m in M_VALUES:
        r = _GpuRef(torch.randn(m, k, device="cuda", generator=gen), w, w_abs)
        for act, dt in (("f16", torch.float16), ("bf16", torch.bfloat16)):
            for kernel in ("auto", "simt", "mma"):
                y = cuda_ops.marlin_gemm(r.x.to(dt), qw_d, sc_d, 128, kernel=kernel)
                assert y.dtype == dt and y.shape == (m, n)
                worst = max(worst, r.check(y, k, 128, act, f"{name} M={m} {act} {kernel}"))
    print(f"\n{name} (N={n}, K={k}): worst err/bound {worst:.3g}")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("n,k", [(512, 128), (128, 512)], ids=["k_b", "v_b"])
def test_marlin_gemm_stacked_heads(n, k):
    """The per-head attn_k_b [128, 512, 128] / attn_v_b [128, 128, 512] stacks: x [T, H, K] -> [T, H, N]."""
    from ktpack.runtime import cuda_ops

    heads = 128
    rng = np.random.default_rng(n)
    q = rng.integers(0, 16, (heads, k, n), dtype=np.uint8)
    s = (rng.uniform(0.5, 2.0, (heads, k // 128, n)) * 2.0**-6).astype(np.float16)
    qw, sc = marlin.pack_quantized(q, s, 128)
    w = torch.from_numpy(marlin.dequantize(qw, sc, (heads, n, k), 128)).cuda().double()
    qw_d, sc_d = torch.from_numpy(qw).cuda(), torch.from_numpy(sc).cuda()
    for t in (1, 16, 64):
        x = torch.randn(t, heads, k, device="cuda")
        refs = {h: _GpuRef(x[:, h], w[h], w[h].abs()) for h in range(0, heads, 31)}
        for act, dt in (("f16", torch.float16), ("bf16", torch.bfloat16)):
            for kernel in ("auto", "simt", "mma"):
                y = cuda_ops.marlin_gemm(x.to(dt), qw_d, sc_d, 128, kernel=kernel)
                assert y.shape == (t, heads, n)
                for h, r in refs.items():
                    r.check(y[:, h], k, 128, act, f"head {h} T={t} {act} {kernel}")


@pytest.mark.gpu
@needs_gpu
def test_marlin_gemm_in_cuda_graph():
    """A captured GEMM (split-K workspace included) replays on new inputs exactly as the eager call computes."""
    from ktpack.runtime import cuda_ops

    n, k = 576, 7168  # few columns: the plan splits K
    rng = np.random.default_rng(3)
    qw, sc = marlin.pack(rng.standard_normal((n, k)).astype(np.float32), 128)
    qw_d, sc_d = torch.from_numpy(qw).cuda(), torch.from_numpy(sc).cuda()
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    cuda_ops.marlin_gemm(x, qw_d, sc_d, 128)  # build + warm up
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = cuda_ops.marlin_gemm(x, qw_d, sc_d, 128)
    for i in range(5):
        x.copy_(torch.randn(1, k, device="cuda", dtype=torch.bfloat16))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, cuda_ops.marlin_gemm(x, qw_d, sc_d, 128)), f"replay {i}"


def test_marlin_args_are_checked_before_the_op():
    """cuda_ops.check_marlin_args (run before every GPU call; CPU tensors suffice to test it)."""
    from ktpack.runtime.cuda_ops import check_marlin_args

    qw = torch.zeros(8, 128, dtype=torch.int32)  # K = 128, N = 64
    sc = torch.ones(1, 64, dtype=torch.float16)
    x = torch.zeros(1, 128, dtype=torch.float16)
    check_marlin_args(x, qw, sc, 128)
    check_marlin_args(x.bfloat16(), qw, sc, -1)
    check_marlin_args(
        torch.zeros(3, 2, 128, dtype=torch.float16), qw[None].repeat(2, 1, 1), sc[None].repeat(2, 1, 1), 128
    )
    bad = [
        ((x.float(), qw, sc, 128), "float16 or bfloat16, got torch.float32"),
        ((x, qw.long(), sc, 128), "qweight must be int32"),
        ((x, qw, sc.float(), 128), "scales float16"),
        ((x, qw[0], sc[0], 128), r"qweight must be \[K/16, 2N\]"),
        ((x, qw, sc[:, :32], 128), r"scales must be \[1, 64\] .* got \[1, 32\]"),
        ((x, qw, sc.repeat(2, 1), 128), r"scales must be \[1, 64\] .* got \[2, 64\]"),
        ((x, qw, torch.ones(64, 2, dtype=torch.float16).T, 128), "must be contiguous"),
        ((torch.zeros(1, 256, dtype=torch.float16), qw, sc, 128), "x has 256 inputs but qweight holds K = 128"),
        ((x, qw, sc, 100), "group_size 100 does not divide K = 128"),
        ((x, qw[None].repeat(2, 1, 1), sc[None], 128), "different matrix counts"),
        ((x, qw[None].repeat(2, 1, 1), sc[None].repeat(2, 1, 1), 128), r"needs x \[T, 2, K\], got \[1, 128\]"),
    ]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            check_marlin_args(*args)


@pytest.mark.gpu
@needs_gpu
def test_marlin_gemm_rejects_bad_input():
    from ktpack.runtime import cuda_ops

    qw = torch.zeros(8, 128, dtype=torch.int32, device="cuda")  # K = 128, N = 64
    sc = torch.ones(1, 64, dtype=torch.float16, device="cuda")
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        cuda_ops.marlin_gemm(torch.zeros(1, 128, device="cuda"), qw, sc, 128)
    with pytest.raises(ValueError, match="inputs but qweight holds K = 128"):
        cuda_ops.marlin_gemm(torch.zeros(1, 256, device="cuda", dtype=torch.float16), qw, sc, 128)
    with pytest.raises(ValueError, match="scales must be"):
        cuda_ops.marlin_gemm(torch.zeros(1, 128, device="cuda", dtype=torch.float16), qw, sc[:, :32], 128)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):  # the op's own check, first in binding.cpp
        torch.ops.ktpack_cuda.marlin_gemm(torch.zeros(1, 128, device="cuda"), qw, sc, 128, 0)


def test_cuda_ops_explains_when_unavailable():
    """Importing never needs CUDA; load() names the missing piece where the machine has none."""
    from ktpack.runtime import cuda_ops

    why = cuda_ops.why_unavailable()
    if why is None:
        pytest.skip("this machine can build the CUDA kernels")
    with pytest.raises(cuda_ops.CudaUnavailable, match="unavailable: "):
        cuda_ops.load()


# ------------------------------------------------------------------------------------------------ bench_marlin.py

BENCH_MARLIN = ROOT / "scripts" / "bench_marlin.py"


@pytest.fixture(scope="module")
def bench_marlin():
    """scripts/bench_marlin.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_marlin", BENCH_MARLIN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_marlin_without_cuda_exits_2(tmp_path):
    """With CUDA hidden the benchmark names what is missing on one line and exits 2, writing nothing."""
    out = tmp_path / "marlin.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, str(BENCH_MARLIN), "--json", str(out)], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stdout == "", r.stderr
    (line,) = r.stderr.splitlines()
    assert line.startswith("bench_marlin: CUDA unavailable: ")
    assert "CPU-only build" in line or "no CUDA device is visible" in line, line
    assert not out.exists()


def test_bench_marlin_shapes_and_bound_are_the_tests(bench_marlin):
    """The benchmark's shape list and accuracy bound are this file's (it may not import tests/)."""
    b = bench_marlin
    assert {name: (n, k) for name, (c, n, k) in b.SHAPES.items() if c == 1} == DEEPSEEK_SHAPES
    assert {name: (c, n, k) for name, (c, n, k) in b.SHAPES.items() if c > 1} == {
        "attn_k_b": (128, 512, 128),  # test_marlin_gemm_stacked_heads
        "attn_v_b": (128, 128, 512),
    }
    assert b.M_VALUES == M_VALUES and b.check_heads(128) == list(range(0, 128, 31))
    assert b.U_ACT == {"fp16": U_ACT["f16"], "bf16": U_ACT["bf16"]} and b.U_ACC == U_ACC
    rng = np.random.default_rng(5)
    ref = rng.standard_normal((4, 64)) * 10
    s = np.abs(ref) + rng.uniform(0, 5, (4, 64))
    for k, group in [(7168, 128), (512, -1), (18432, 64), (128, 32)]:
        assert b.accumulation_depth(k, group) == accumulation_depth(k, group)
        for u, tiny in [(U_ACT["f16"], 2.0**-24), (U_ACT["bf16"], 0.0)]:
            assert np.array_equal(b.bound(ref, s, k, group, u, u, tiny), bound(ref, s, k, group, u, u, tiny))


def test_bench_marlin_arithmetic(bench_marlin):
    """Bytes, GB/s, TFLOP/s, speedup and copy share on q_a (N 1536, K 7168, group 128) at M = 16."""
    b = bench_marlin
    _, n, k = b.SHAPES["q_a"]
    qweight, scales = (k // 16) * (2 * n) * 4, (k // 128) * n * 2  # int32 [448, 3072], fp16 [56, 1536]
    assert b.marlin_bytes(n, k, 128) == qweight + scales == 5_505_024 + 172_032
    assert b.marlin_bytes(n, k, -1) == 5_505_024 + n * 2
    assert b.dense_bytes(n, k) == 1536 * 7168 * 2 == 22_020_096
    assert b.gemm_flops(16, n, k) == 352_321_536
    assert b.marlin_bytes(128, 512, 128, count=128) == 128 * (32 * 256 * 4 + 4 * 128 * 2)
    f = b.figures(5_677_056, 352_321_536, 10e-6, 40e-6, 4000.0)
    assert f["us"] == pytest.approx(10.0) and f["gb_s"] == pytest.approx(567.7056)
    assert f["tflop_s"] == pytest.approx(35.2321536) and f["speedup"] == pytest.approx(4.0)
    assert f["copy_frac"] == pytest.approx(567.7056 / 4000)
    assert b.copy_gb_s(1 << 30, 0.5e-3) == pytest.approx(2 * 2**30 / 0.5e-3 / 1e9)
    row = dict(f, label=b.shape_label("q_a", 1, n, k), m=16, dtype="bf16", kernel="mma", err_bound=0.25)
    head, line = b.table([row]).splitlines()
    assert head.split() == ["shape", "M", "dtype", "kernel", "us", "GB/s", "TFLOP/s", "speedup", "%copy", "err/bound"]
    assert line.split() == ["q_a", "1536x7168", "16", "bf16", "mma", "10.0", "568", "35.23", "4.00", "14.2", "0.250"]
    assert b.format_row(dict(row, err_bound=None)).split()[-1] == "-"
    # weights rotated past 3x the L2 (50 MiB), batches of whole rounds about 200 us long
    assert b.rotation(5_677_056, 50 << 20) == 28 and b.rotation(463_000_000, 50 << 20) == 1
    assert b.rotation(1 << 20, 50 << 20) == 64 and b.rotation(1 << 20, 0) == 1
    assert b.batch_calls(28, 5e-6) == 28 and b.batch_calls(1, 5e-6) == 40 and b.batch_calls(3, 1e-3) == 3
    cols = b.check_columns(129280, 4096)
    assert len(cols) == 4096 and cols[0] == 0 and cols[-1] == 129279 and (np.diff(cols) > 0).all()
    assert b.check_columns(7168, 0) is None and b.check_columns(576, 4096) is None


PACK_CASES = [(1, 192, 256, 64), (2, 128, 384, -1), (1, 320, 256, 128), (3, 64, 128, 32)]  # count, N, K, group


@pytest.mark.parametrize("count,n,k,group", PACK_CASES)
def test_bench_marlin_packs_like_layouts(bench_marlin, count, n, k, group):
    """The benchmark packs on the GPU with a torch port of layouts/marlin.py (here on the CPU, in N-chunks):
    equal bit for bit; its dense weights equal layouts/marlin.py's dequantize exactly in bf16 and fp16."""
    b = bench_marlin
    q, s = b.random_weights(count, n, k, group, torch.Generator().manual_seed(count * n + k))
    qw, sc = b.pack_on_device(q, s, group, chunk_elems=64 * k * count)  # one 64-column block per chunk
    want_qw, want_sc = marlin.pack_quantized(q.numpy(), s.numpy(), group)
    assert qw.dtype == torch.int32 and np.array_equal(qw.numpy(), want_qw)
    assert sc.dtype == torch.float16 and np.array_equal(sc.numpy(), want_sc)
    w = torch.from_numpy(marlin.dequantize(want_qw, want_sc, (count, n, k), group))
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        assert torch.equal(b.dequantize_on_device(q, s, group, dt, chunk_elems=5 * k * count).float(), w)
    cols = np.array([0, 5, n - 1])
    assert torch.equal(b.dequantize_on_device(q, s, group, torch.float32, cols), w[..., cols, :])


def test_bench_marlin_dry_run_on_the_cpu(tmp_path):
    """The measuring code on the CPU with layouts/marlin.py's dequantize standing in for the kernel: one row per
    GEMM, each within the bound, JSON with every figure."""
    out = tmp_path / "marlin.json"
    cmd = [sys.executable, str(BENCH_MARLIN), "--device", "cpu", "--shapes", "attn_v_b", "kv_a_mqa", "--m", "1", "16",
           "--reps", "2", "--warmup", "0", "--copy-mib", "16", "--check-cols", "256", "--json", str(out)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[1].split()[:4] == ["shape", "M", "dtype", "kernel"] and lines[-1].startswith("every Marlin result")
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert len(rows) == len(lines) - 3 == 2 * 2 * 2 * 4 and doc["failures"] == [] and doc["copy_gb_s"] > 0
    for row in rows:
        assert row["kernel"] in ("dense", "auto", "simt", "mma") and row["mode"] == "cpu" and len(row["times_us"]) == 2
        assert 0 < row["err_bound"] <= 1 and row["us"] > 0 and row["gb_s"] > 0
    assert {(r["shape"], r["m"], r["dtype"]) for r in rows} == {
        (s, m, d) for s in ("attn_v_b", "kv_a_mqa") for m in (1, 16) for d in ("bf16", "fp16")
    }


@pytest.mark.gpu
@needs_gpu
def test_bench_marlin_on_gpu(tmp_path):
    """scripts/bench_marlin.py on a few shapes: CUDA-graph batches, every kernel within the bound."""
    out = tmp_path / "marlin.json"
    cmd = [sys.executable, str(BENCH_MARLIN), "--shapes", "kv_a_mqa", "attn_k_b", "o_proj", "--m", "1", "64",
           "--reps", "3", "--warmup", "1", "--copy-mib", "512", "--json", str(out)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    print("\n" + r.stdout)
    doc = json.loads(out.read_text())
    assert len(doc["rows"]) == 3 * 2 * 2 * 4 and doc["failures"] == [] and doc["copy_gb_s"] > 0
    for row in doc["rows"]:
        assert row["mode"] == "graph" and row["us"] > 0 and row["err_bound"] is not None
        assert row["copies"] == 64 or row["copies"] * row["weight_bytes"] >= 3 * doc["l2_bytes"]
        if row["kernel"] != "dense":
            assert row["err_bound"] <= 1
