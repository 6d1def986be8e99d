#!/usr/bin/env python3
"""Speed of the W4A16 Marlin GEMM (kernels/cuda) against a dense GEMM on the same weights, on a GPU.

For every DeepSeek-V3 GPU-side linear (the shapes tests/test_cuda_marlin.py runs: the ten 2-D linears and the
per-head attn_k_b / attn_v_b stacks), M in {1, 16, 64, 512} rows and bf16 and fp16 activations, it times
`torch.ops.ktpack_cuda.marlin_gemm` with each kernel the op offers (simt, mma) and auto, and a dense torch
GEMM (F.linear; a batched matmul for the stacks) in the activation dtype on the dequantized weight of the
same shape, and prints one row per GEMM:

- us: the median over --reps of a timed batch (CUDA events around a CUDA graph of `calls` GEMMs; --no-graph:
  the same calls launched eagerly) divided by `calls`, after --warmup batches. The batch rotates over
  `copies` copies of the weights (together >= 3x the L2 cache), so each GEMM reads its weights from device
  memory, as the decode step does with each layer's weights;
- GB/s: the weight bytes one GEMM reads / time (Marlin: packed qweight + fp16 scales; dense: N*K*2 bytes);
- TFLOP/s: 2*M*N*K (times the stack's count) / time;
- speedup: the dense GEMM's time / this GEMM's time (the dense row is 1);
- %copy: GB/s as a share of the device's copy bandwidth, measured here with a large device-to-device copy
  (bytes read + bytes written / time);
- err/bound: the worst |y - x*W^T| / bound over the checked outputs, against the exact product in float64 of
  the float32 activations and the dequantized weight, with the bound of tests/test_cuda_marlin.py
  (activation and output rounding, fp32 accumulation depth 2g + K/g + 80). A Marlin row above 1 is a failure
  (exit code 1). The weights are random codes with 5-bit scales, so the dequantized weight is exact in bf16
  and fp16 and the dense GEMM multiplies the very same weight; its row shows its own err/bound for
  comparison. --check-cols limits the columns checked per matrix (evenly spaced 64-column blocks).

The packed tensors are made on the GPU by a torch port of layouts/marlin.py's pack (`pack_on_device`;
the CPU tests hold it equal to layouts/marlin.py bit for bit). --json writes every figure. Without CUDA (no
device, a CPU-only torch, no nvcc or ninja) it says what is missing on one line and exits with code 2.

    python scripts/bench_marlin.py --json marlin.json
    python scripts/bench_marlin.py --shapes q_a lm_head --m 1 16 --dtypes bf16
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np

from ktpack.layouts import marlin
from ktpack.runtime import cuda_ops

# ------------------------------------------------------------------------------------------------ shapes

# DeepSeek-V3 GPU-side Marlin linears: name -> (count, N, K); count > 1 is a stack x [M, count, K] -> [M, count, N]
# (formats.md §1.4; the shapes of tests/test_cuda_marlin.py's GPU tests)
SHAPES: dict[str, tuple[int, int, int]] = {
    "q_a": (1, 1536, 7168),
    "q_b": (1, 24576, 1536),
    "kv_a_mqa": (1, 576, 7168),
    "kv_b": (1, 32768, 512),
    "o_proj": (1, 7168, 16384),
    "dense_gate_up": (1, 18432, 7168),
    "dense_down": (1, 7168, 18432),
    "shared_gate_up": (1, 2048, 7168),
    "shared_down": (1, 7168, 2048),
    "lm_head": (1, 129280, 7168),
    "attn_k_b": (128, 512, 128),
    "attn_v_b": (128, 128, 512),
}
M_VALUES = (1, 16, 64, 512)
DTYPES = ("bf16", "fp16")

# ------------------------------------------------------------------------------------------------ arithmetic


def resolve_group(group_size: int, k: int) -> int:
    return k if group_size == -1 else group_size


def marlin_bytes(n: int, k: int, group_size: int = marlin.DEFAULT_GROUP_SIZE, count: int = 1) -> int:
    """Bytes of the packed weight one GEMM reads: qweight int32 [K/16, 2N] + scales fp16 [K/g, N], per matrix."""
    g = resolve_group(group_size, k)
    return count * ((k // 16) * (2 * n) * 4 + (k // g) * n * 2)


def dense_bytes(n: int, k: int, count: int = 1, itemsize: int = 2) -> int:
    """Bytes of the dense bf16/fp16 weight [count, N, K]."""
    return count * n * k * itemsize


def gemm_flops(m: int, n: int, k: int, count: int = 1) -> int:
    return 2 * m * n * k * count


def copy_gb_s(nbytes: int, seconds: float) -> float:
    """A device-to-device copy of nbytes reads and writes nbytes: GB/s counts both."""
    return 2 * nbytes / seconds / 1e9


def figures(weight_bytes: int, flops: int, seconds: float, dense_seconds: float, copy_gbps: float) -> dict:
    """The table's figures for one GEMM taking `seconds` (dense_seconds: the dense GEMM's time on the shape)."""
    gbps = weight_bytes / seconds / 1e9
    return {
        "us": seconds * 1e6,
        "gb_s": gbps,
        "tflop_s": flops / seconds / 1e12,
        "speedup": dense_seconds / seconds,
        "copy_frac": gbps / copy_gbps,
    }


def rotation(weight_bytes: int, l2_bytes: int, max_copies: int = 64) -> int:
    """Copies of the weights to rotate over, together >= 3x the L2 cache (at most max_copies), so that each GEMM
    reads its weights from device memory, as the decode step does with each layer's weights."""
    return min(max_copies, max(1, math.ceil(3 * l2_bytes / weight_bytes)))


def batch_calls(copies: int, est_seconds: float, target_seconds: float = 200e-6, max_calls: int = 64) -> int:
    """GEMMs per timed batch: a whole number of rounds over the copies, about target_seconds long (by a first
    call's time) where max_calls allows, at least one round."""
    want = min(max_calls, math.ceil(target_seconds / max(est_seconds, 1e-9)))
    return copies * max(1, want // copies)


def check_columns(n: int, limit: int) -> np.ndarray | None:
    """Output columns to check: None for all (limit <= 0 or n <= limit), else about `limit` columns as evenly
    spaced 64-column blocks, the first and last included."""
    if limit <= 0 or n <= limit:
        return None
    blocks = n // 64
    take = max(2, limit // 64)
    picked = np.unique(np.linspace(0, blocks - 1, take).round().astype(np.int64))
    return (picked[:, None] * 64 + np.arange(64)).reshape(-1)


def check_heads(count: int) -> list[int]:
    """The matrices of a stack that are checked (as tests/test_cuda_marlin.py's stacked-heads test: every 31st)."""
    return list(range(0, count, 31))


# The accuracy bound of tests/test_cuda_marlin.py (not importable from the package; the CPU tests hold the two
# equal). Elementwise, S = |x|·|ŵ|ᵀ in float64:
#   |y - x·ŵᵀ| <= (u_act + D·u_acc)(1 + u_act)·S + u_out·(|x·ŵᵀ| + (u_act + D·u_acc)(1 + u_act)·S) + tiny
U_ACT = {"fp16": 2.0**-11, "bf16": 2.0**-8}
U_ACC = 2.0**-23
TINY = {"fp16": 2.0**-24, "bf16": 0.0}  # fp16 outputs may be subnormal


def accumulation_depth(k: int, group: int) -> int:
    g = k if group == -1 else group
    return 2 * g + k // g + 80


def bound(ref, s, k: int, group: int, u_act: float, u_out: float, tiny: float):
    """The tests' bound, elementwise (numpy arrays or torch tensors, float64)."""
    acc = (u_act + accumulation_depth(k, group) * U_ACC) * (1 + u_act) * s
    return acc + u_out * (abs(ref) + acc) + tiny


# ------------------------------------------------------------------------------------------------ the table

COLUMNS = [  # header, width, format, key
    ("shape", 24, "<", "label"),
    ("M", 4, "d", "m"),
    ("dtype", 5, "<", "dtype"),
    ("kernel", 6, "<", "kernel"),
    ("us", 9, ".1f", "us"),
    ("GB/s", 7, ".0f", "gb_s"),
    ("TFLOP/s", 7, ".2f", "tflop_s"),
    ("speedup", 7, ".2f", "speedup"),
    ("%copy", 6, ".1f", "copy_pct"),
    ("err/bound", 9, ".3f", "err_bound"),
]


def shape_label(name: str, count: int, n: int, k: int) -> str:
    return f"{name} {count}x{n}x{k}" if count > 1 else f"{name} {n}x{k}"


def header() -> str:
    return "  ".join(f"{h:<{w}}" if f == "<" else f"{h:>{w}}" for h, w, f, _ in COLUMNS)


def format_row(r: dict) -> str:
    r = dict(r, copy_pct=100 * r["copy_frac"])
    cells = []
    for _, w, f, key in COLUMNS:
        v = r.get(key)
        if f == "<":
            cells.append(f"{v:<{w}}")
        elif v is None:
            cells.append(f"{'-':>{w}}")
        else:
            cells.append(f"{v:>{w}{f}}")
    return "  ".join(cells)


def table(rows: list[dict]) -> str:
    return "\n".join([header(), *(format_row(r) for r in rows)])


# ------------------------------------------------------------------------------------------------ torch parts


def pack_on_device(q, s, group_size: int, chunk_elems: int = 1 << 27):
    """layouts/marlin.py's `pack_quantized` in torch, on q's device: codes q uint8 [..., K, N] (0..15) and
    scales s fp16 [..., K/g, N] -> (qweight int32 [..., K/16, 2N], permuted scales fp16 [..., K/g, N]).
    Packed in N-chunks of 64-column blocks (a block's codes land in its own 128 qweight columns) of about
    chunk_elems codes."""
    import torch

    *lead, k, n = q.shape
    g = resolve_group(group_size, k)
    if k % 16 or n % 64 or k % g:
        raise ValueError(f"pack_on_device: K={k} must be a multiple of 16 and of g={g}, N={n} of 64")
    dev = q.device
    perm = torch.as_tensor(marlin.WEIGHT_PERM, device=dev)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=dev)
    qweight = torch.empty((*lead, k // 16, 2 * n), dtype=torch.int32, device=dev)
    step = max(64, (chunk_elems // max(1, k * math.prod(lead))) // 64 * 64)
    for n0 in range(0, n, step):
        n1 = min(n, n0 + step)
        c = n1 - n0
        t = q[..., n0:n1].reshape(*lead, k // 16, 16, c // 16, 16).transpose(-3, -2)
        t = t.reshape(*lead, k // 16, c // 64, 1024)[..., perm].to(torch.int64)
        words = (t.reshape(*lead, k // 16, 2 * c, 8) << shifts).sum(-1)
        qweight[..., 2 * n0 : 2 * n1] = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    sp = marlin.SCALE_PERM_SINGLE if g == k else marlin.SCALE_PERM
    sp = torch.as_tensor(sp, device=dev)
    scales = s.to(torch.float16).reshape(-1, sp.numel())[:, sp].reshape(s.shape).contiguous()
    return qweight, scales


def dequantize_on_device(q, s, group_size: int, dtype, cols=None, chunk_elems: int = 1 << 27):
    """The dequantized weight Ŵ[..., N, K] = ((q - 8) * s).T in `dtype` (torch) from codes q [..., K, N] and
    unpermuted scales s [..., K/g, N]; only columns `cols` of B = Wᵀ (rows of Ŵ) when given. Exact in dtype
    when the products are (float32 always; bf16 and fp16 for random_weights' 5-bit scales)."""
    import torch

    *lead, k, n = q.shape
    g = resolve_group(group_size, k)
    if cols is not None:
        idx = torch.as_tensor(cols, device=q.device)
        q, s = q[..., idx], s[..., idx]
        n = q.shape[-1]
    out = torch.empty((*lead, n, k), dtype=dtype, device=q.device)
    step = max(1, chunk_elems // max(1, k * math.prod(lead)))
    for n0 in range(0, n, step):
        n1 = min(n, n0 + step)
        b = (q[..., n0:n1].to(torch.float32) - 8) * s[..., n0:n1].to(torch.float32).repeat_interleave(g, dim=-2)
        out[..., n0:n1, :] = b.transpose(-1, -2).to(dtype)
    return out


def random_weights(count: int, n: int, k: int, group_size: int, gen):
    """Random codes q uint8 [count, K, N] and scales fp16 [count, K/g, N] = m * 2^-10 with m in 16..31, so
    (q - 8) * s has at most 8 significant bits: the dequantized weight is exact in bf16 and fp16."""
    import torch

    g = resolve_group(group_size, k)
    dev = gen.device
    q = torch.randint(0, 16, (count, k, n), dtype=torch.uint8, device=dev, generator=gen)
    m = torch.randint(16, 32, (count, k // g, n), dtype=torch.int32, device=dev, generator=gen)
    return q, (m.to(torch.float32) * 2.0**-10).to(torch.float16)


def measure_copy(nbytes: int, warmup: int, reps: int, device) -> float:
    """Device-to-device copy bandwidth, GB/s (read + write), the median over reps."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    times, _ = time_calls(lambda i, d=dst, s=src: d.copy_(s), 1, warmup, reps, False, device)
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return copy_gb_s(nbytes, statistics.median(times))


def time_once(step, device):
    """(step(0), its seconds): the check's call, whose time sizes the timed batches."""
    import time

    import torch

    if device.type != "cuda":
        t0 = time.perf_counter()
        y = step(0)
        return y, time.perf_counter() - t0
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    y = step(0)
    b.record()
    b.synchronize()
    return y, a.elapsed_time(b) * 1e-3


def time_calls(step, calls: int, warmup: int, reps: int, graph: bool, device) -> tuple[list[float], str]:
    """Seconds per call of step(0) .. step(calls - 1), one value per rep: CUDA events around the batch (replayed
    as a CUDA graph when `graph`), or the wall clock on the CPU (the dry run)."""
    import time

    import torch

    if device.type != "cuda":
        for _ in range(warmup):
            for i in range(calls):
                step(i)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for i in range(calls):
                step(i)
            times.append((time.perf_counter() - t0) / calls)
        return times, "cpu"
    run, mode = None, "eager"
    if graph:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for i in range(calls):
                    step(i)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for i in range(calls):
                    step(i)
            run, mode = g.replay, "graph"
        except RuntimeError as e:
            torch.cuda.synchronize()
            print(f"bench_marlin: graph capture failed ({e}); timing eagerly", file=sys.stderr)
    if run is None:

        def run():
            for i in range(calls):
                step(i)

    for _ in range(warmup):
        run()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in ev:
        a.record()
        run()
        b.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) * 1e-3 / calls for a, b in ev], mode


class Checker:
    """The exact product x·ŵᵀ and S = |x|·|ŵ|ᵀ in float64 for the checked outputs (float32 x before rounding,
    as the tests' _GpuRef), and err/bound of a result against them."""

    def __init__(self, x, w_parts: dict, cols) -> None:
        # w_parts: head -> float32 ŵ rows [c, K] (the checked columns of that matrix)
        import torch

        self.cols = None if cols is None else torch.as_tensor(cols, device=x.device)
        self.ref, self.s = {}, {}
        for h, w in w_parts.items():
            xh = (x[:, h] if x.dim() == 3 else x).double()
            w64 = w.double()
            self.ref[h] = xh @ w64.T
            self.s[h] = xh.abs() @ w64.abs().T

    def worst(self, y, k: int, group: int, dtype: str) -> float:
        """max err/bound over the checked outputs of y [M, N] or [M, count, N] (inf when not finite)."""
        u = U_ACT[dtype]
        worst = 0.0
        for h, ref in self.ref.items():
            yh = y[:, h] if y.dim() == 3 else y
            if self.cols is not None:
                yh = yh[:, self.cols]
            err = (yh.double() - ref).abs()
            r = (err / bound(ref, self.s[h], k, group, u, u, TINY[dtype])).max().item()
            worst = max(worst, r if math.isfinite(r) else math.inf)
        return worst


class ReferenceMarlin:
    """The dry run's stand-in for torch.ops.ktpack_cuda.marlin_gemm on the CPU: layouts/marlin.py's dequantize
    of the packed tensors (once per tensor), then a float32 GEMM, rounded to x's dtype."""

    def __init__(self) -> None:
        self.weights: dict = {}

    def __call__(self, x, qweight, scales, group_size: int, kernel: int):
        import torch

        key = (qweight.data_ptr(), scales.data_ptr())
        if key not in self.weights:
            *lead, rows, n2 = qweight.shape
            shape = (*lead, n2 // 2, rows * 16)
            w = marlin.dequantize(qweight.numpy(), scales.numpy(), shape, group_size)
            self.weights[key] = (torch.from_numpy(np.ascontiguousarray(w)), qweight, scales)  # keeps them alive
        w = self.weights[key][0]
        y = torch.einsum("tbk,bnk->tbn", x.float(), w) if w.dim() == 3 else x.float() @ w.T
        return y.to(x.dtype)


def bench_shape(name: str, a, ctx: dict, emit) -> list[dict]:
    import torch
    import torch.nn.functional as F

    dev = ctx["torch_device"]
    count, n, k = SHAPES[name]
    group = a.group_size
    gen = torch.Generator(device=dev).manual_seed(a.seed + list(SHAPES).index(name))
    q, s = random_weights(count, n, k, group, gen)
    qw, sc = pack_on_device(q, s, group)
    if count == 1:
        q, s, qw, sc = q[0], s[0], qw[0], sc[0]
    cols = check_columns(n, a.check_cols)
    heads = check_heads(count) if count > 1 else [0]
    w_parts = {}
    for h in heads:
        qh, sh = (q[h], s[h]) if count > 1 else (q, s)
        w_parts[h] = dequantize_on_device(qh, sh, group, torch.float32, cols)
    w_dense = {"bf16": dequantize_on_device(q, s, group, torch.bfloat16)}  # exact (5-bit scales)
    w_dense["fp16"] = w_dense["bf16"].to(torch.float16)  # exact too
    del q, s
    label = shape_label(name, count, n, k)
    mb = marlin_bytes(n, k, group, count)
    db = dense_bytes(n, k, count)
    m_copies, d_copies = rotation(mb, ctx["l2_bytes"]), rotation(db, ctx["l2_bytes"])
    mq = [(qw, sc)] + [(qw.clone(), sc.clone()) for _ in range(m_copies - 1)]
    op = ctx["op"]
    rows = []
    for m in a.m:
        x = torch.randn((m, count, k) if count > 1 else (m, k), device=dev, generator=gen)
        checker = Checker(x, w_parts, cols) if a.check_cols >= 0 else None
        flops = gemm_flops(m, n, k, count)
        for dt_name in a.dtypes:
            dt = torch.bfloat16 if dt_name == "bf16" else torch.float16
            xt = x.to(dt)
            wd = [w_dense[dt_name]] + [w_dense[dt_name].clone() for _ in range(d_copies - 1)]
            if count > 1:
                xb = xt.transpose(0, 1).contiguous()  # [count, M, K]: the dense batched GEMM -> [count, M, N]

                def dense(i, xb=xb, wd=wd):
                    return torch.matmul(xb, wd[i % len(wd)].transpose(1, 2))

            else:

                def dense(i, xt=xt, wd=wd):
                    return F.linear(xt, wd[i % len(wd)])

            base = dict(shape=name, label=label, count=count, n=n, k=k, m=m, dtype=dt_name, group_size=group)
            y, t1 = time_once(dense, dev)
            d_calls = batch_calls(d_copies, t1)
            y = y.transpose(0, 1) if count > 1 else y
            err = checker.worst(y, k, group, dt_name) if checker else None
            times, mode = time_calls(dense, d_calls, a.warmup, a.reps, not a.no_graph, dev)
            t_dense = statistics.median(times)
            dense_row = dict(base, kernel="dense", weight_bytes=db, flops=flops, copies=d_copies, calls=d_calls)
            dense_row.update(figures(db, flops, t_dense, t_dense, ctx["copy_gb_s"]))
            dense_row.update(err_bound=err, mode=mode, times_us=[t * 1e6 for t in times])
            rows.append(dense_row)
            emit(dense_row)
            for kname in a.kernels:
                kid = cuda_ops.KERNELS[kname]

                def step(i, xt=xt, kid=kid, mq=mq):
                    qwi, sci = mq[i % len(mq)]
                    return op(xt, qwi, sci, group, kid)

                y, t1 = time_once(step, dev)
                m_calls = batch_calls(m_copies, t1)
                err = checker.worst(y, k, group, dt_name) if checker else None
                times, mode = time_calls(step, m_calls, a.warmup, a.reps, not a.no_graph, dev)
                t = statistics.median(times)
                row = dict(base, kernel=kname, weight_bytes=mb, flops=flops, copies=m_copies, calls=m_calls)
                row.update(figures(mb, flops, t, t_dense, ctx["copy_gb_s"]))
                row.update(err_bound=err, mode=mode, times_us=[t * 1e6 for t in times])
                rows.append(row)
                emit(row)
            del wd, xt
    del mq, w_dense, w_parts
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--m", nargs="+", type=int, default=list(M_VALUES), help="rows of x (tokens)")
    ap.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES), help="activation dtypes")
    ap.add_argument("--kernels", nargs="+", choices=list(cuda_ops.KERNELS), default=list(cuda_ops.KERNELS))
    ap.add_argument("--group-size", type=int, choices=marlin.GROUP_SIZES, default=marlin.DEFAULT_GROUP_SIZE)
    ap.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    ap.add_argument("--reps", type=int, default=10, help="timed batches (the median is reported)")
    ap.add_argument("--no-graph", action="store_true", help="launch the timed calls eagerly (default: a CUDA graph)")
    ap.add_argument("--check-cols", type=int, default=4096, help="columns checked per matrix (0: all, -1: none)")
    ap.add_argument("--copy-mib", type=int, default=2048, help="size of the bandwidth-measuring copy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a dry run of the script (reference GEMM)"
    )
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)

    if a.device == "cuda":
        why = cuda_ops.why_unavailable()
        if why:
            print(f"bench_marlin: CUDA unavailable: {why}", file=sys.stderr)
            return 2
    if min(a.m) < 1 or a.reps < 1 or a.warmup < 0 or a.copy_mib < 1:
        print("bench_marlin: error: --m and --reps must be >= 1, --warmup >= 0, --copy-mib >= 1", file=sys.stderr)
        return 1
    for name in a.shapes:
        _, n, k = SHAPES[name]
        reason = marlin.supports((n, k), a.group_size)
        if reason:
            print(f"bench_marlin: error: {name}: {reason}", file=sys.stderr)
            return 1
    import torch

    dev = torch.device(a.device)
    if dev.type == "cuda":
        try:
            cuda_ops.load()
        except Exception as e:  # a failed build: the compiler's message
            print(f"bench_marlin: error: building the CUDA kernels failed: {e}", file=sys.stderr)
            return 1
        props = torch.cuda.get_device_properties(dev)
        l2 = int(getattr(props, "L2_cache_size", 0) or 0)
        name, sms = torch.cuda.get_device_name(dev), props.multi_processor_count
        op = torch.ops.ktpack_cuda.marlin_gemm
    else:  # the dry run: one call per batch, no weight copies
        name, sms, l2, op = "cpu (dry run)", 0, 0, ReferenceMarlin()
    ctx = {
        "device": name,
        "sm_count": sms,
        "l2_bytes": l2 if l2 or dev.type != "cuda" else 128 << 20,  # unknown: assume a large one
        "copy_gb_s": measure_copy(a.copy_mib << 20, 3, 20 if dev.type == "cuda" else 3, dev),
    }
    run = {"torch_device": dev, "op": op}
    settings = {
        "shapes": a.shapes,
        "m": a.m,
        "dtypes": a.dtypes,
        "kernels": a.kernels,
        "group_size": a.group_size,
        "warmup": a.warmup,
        "reps": a.reps,
        "graph": not a.no_graph and dev.type == "cuda",
        "check_cols": a.check_cols,
        "copy_mib": a.copy_mib,
        "seed": a.seed,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "allow_bf16_reduced_precision_reduction": torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
        "allow_fp16_reduced_precision_reduction": torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
    }
    l2_text = f"{l2 / 2**20:.0f} MiB" if l2 else "unknown"
    print(
        f"{ctx['device']}, {ctx['sm_count']} SMs, L2 {l2_text}; copy {ctx['copy_gb_s']:.0f} GB/s "
        f"(read + write, {a.copy_mib} MiB); torch {torch.__version__}, group {a.group_size}; "
        f"{'CUDA graph' if not a.no_graph and dev.type == 'cuda' else 'eager'} batches, median of {a.reps}; "
        "speedup = dense time / time"
    )
    print(header(), flush=True)
    rows: list[dict] = []
    failures: list[str] = []

    def emit(r: dict) -> None:
        print(format_row(r), flush=True)
        if r["kernel"] != "dense" and r["err_bound"] is not None and not r["err_bound"] <= 1.0:
            failures.append(f"{r['label']} M={r['m']} {r['dtype']} {r['kernel']}: err/bound {r['err_bound']:.3g}")

    def write_json() -> None:
        if a.json:
            doc = {**ctx, "settings": settings, "rows": rows, "failures": failures}
            a.json.write_text(json.dumps(doc, indent=1) + "\n")

    with torch.no_grad():
        for name in a.shapes:
            rows += bench_shape(name, a, {**ctx, **run}, emit)
            write_json()  # after each shape: a run cut short keeps what it measured
    write_json()
    if failures:
        print(f"bench_marlin: {len(failures)} result(s) outside the bound:", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        return 1
    checked = "all columns" if a.check_cols == 0 else "none" if a.check_cols < 0 else f"<= {a.check_cols} columns"
    print(f"every Marlin result within the tests' bound of the exact product ({checked} per matrix checked)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
