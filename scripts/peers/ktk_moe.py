#!/usr/bin/env python3
"""Benchmark one MoE layer through kt-kernel's low-level extension API (``kt_kernel_ext``).

Peer baseline: drives the C++ MoE classes directly, the way ``KTMoEWrapper`` does
(``kt_kernel/utils/amx.py``, ``kt_kernel/experts_base.py``), without safetensors files:

* thread pool: ``WorkerPoolConfig`` -> ``CPUInfer`` (one subpool per NUMA node, ``--pools``);
* weights: random bf16 ``gate/up [E, I, H]`` and ``down [E, H, I]``; their pointers go into
  ``MOEConfig.gate_proj/up_proj/down_proj`` with ``load=False, save=False``, so
  ``load_weights_task`` quantizes/packs them online (AMXINT4, AMXINT8) or repacks them (BF16)
  into kt-kernel's own BufferB layout -- the path of ``AMXMoEWrapper.load_weights_from_tensors``
  minus writing ``.kt`` files.  That load is timed (``load_s``);
* check: kt-kernel's output for 2 tokens vs an fp32 torch reference on the same bf16 weights
  (``max_rel_err`` = max|diff| / max|ref|, ``rel_l2_err``); for AMXINT4/AMXINT8 also vs a
  reference whose weights are fake-quantized per row the way kt-kernel does (``*_vs_qref``),
  which isolates harness mistakes from quantization error;
* forward: ``moe.forward_task(qlen_ptr, k, ids_ptr, weights_ptr, in_ptr, out_ptr, False)``,
  then ``CPUInfer.submit`` + ``CPUInfer.sync``, timed around submit..sync.

Routing: ``topk`` distinct experts per token, re-drawn every rep.  By default a buffer of
twice the L3 size is written between reps (outside the timed region) so that the experts are
read from DRAM, not from cache (``--flush-mb 0`` turns this off).

``weight_gbs`` = bytes of the distinct experts touched in a call, in kt-kernel's weight format
(INT4: n*k/2 + 4n per matrix, INT8: n*k + 4n, BF16: 2nk) / time of that call; median over reps.

Run with the side venv that has kt-kernel and a CPU-only torch:

    PEERS/ktk-venv/bin/python scripts/peers/ktk_moe.py --hidden 2048 --inter 1024 \\
        --experts 64 --topk 8 --tokens 1 64 --method AMXINT4 --threads 2 --reps 5 --json out.json

The JSON object is printed to stdout (kt-kernel's own C++ prints are sent to stderr).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

# kt-kernel's C++ code printf()s to fd 1: keep stdout for the JSON object only.
_JSON_FD = os.dup(1)
os.dup2(2, 1)

import kt_kernel  # noqa: E402
import torch  # noqa: E402
from kt_kernel import kt_kernel_ext as ext  # noqa: E402

METHODS = ("AMXINT4", "AMXINT8", "BF16")


def _moe_class(method: str):
    m = ext.moe
    if method == "AMXINT4":
        return getattr(m, "AMXInt4_MOE", None)
    if method == "AMXINT8":
        return getattr(m, "AMXInt8_MOE", None)
    if method == "BF16":
        return getattr(m, "AMXBF16_MOE", None) or getattr(m, "AVX2BF16_MOE", None)
    raise ValueError(method)


def matrix_bytes(method: str, n: int, k: int) -> int:
    """Bytes of one n x k weight matrix in kt-kernel's BufferB layout (scales included)."""
    if method == "AMXINT4":
        return n * k // 2 + 4 * n
    if method == "AMXINT8":
        return n * k + 4 * n
    return 2 * n * k


def expert_bytes(method: str, hidden: int, inter: int) -> int:
    return 2 * matrix_bytes(method, inter, hidden) + matrix_bytes(method, hidden, inter)


def l3_bytes() -> int:
    try:
        base = "/sys/devices/system/cpu/cpu0/cache"
        for idx in sorted(os.listdir(base)):
            with open(f"{base}/{idx}/level") as f:
                if f.read().strip() != "3":
                    continue
            with open(f"{base}/{idx}/size") as f:
                s = f.read().strip()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
            return int(s.rstrip("KMG")) * mult
    except OSError:
        pass
    return 64 << 20


def random_weights(e: int, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """[e, n, k] bf16 ~ N(0, 1/k), so activations stay O(1)."""
    return torch.empty(e, n, k, dtype=torch.bfloat16).normal_(0.0, 1.0 / math.sqrt(k), generator=gen)


def random_routing(tokens: int, experts: int, topk: int, gen: torch.Generator):
    ids = torch.rand(tokens, experts, generator=gen).argsort(dim=1)[:, :topk].contiguous()
    wts = torch.softmax(torch.randn(tokens, topk, generator=gen), dim=1).to(torch.float32).contiguous()
    return ids.to(torch.int64), wts


class KtMoE:
    def __init__(self, args, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, max_len: int):
        cls = _moe_class(args.method)
        if cls is None:
            raise RuntimeError(f"{args.method}: no matching MoE class in kt_kernel_ext.moe")
        pools = args.pools
        wp = ext.WorkerPoolConfig()
        wp.subpool_count = pools
        wp.subpool_numa_map = list(range(pools))
        wp.subpool_thread_count = [args.threads // pools + (1 if i < args.threads % pools else 0) for i in range(pools)]
        self.cpu = ext.CPUInfer(wp)
        # Everything the C++ side holds a pointer to must stay alive.
        self.gate, self.up, self.down = gate, up, down
        self.mask = torch.zeros(args.experts, dtype=torch.bool)
        self.p2l = torch.arange(args.experts, dtype=torch.int64)
        self.topk = args.topk

        t0 = time.perf_counter()
        cfg = ext.moe.MOEConfig(args.experts, args.topk, args.hidden, args.inter, self.mask.data_ptr())
        cfg.layer_idx = 0
        cfg.pool = self.cpu.backend_
        cfg.max_len = max_len
        cfg.load = False
        cfg.save = False
        cfg.gate_proj = gate.data_ptr()
        cfg.up_proj = up.data_ptr()
        cfg.down_proj = down.data_ptr()
        self.cfg = cfg
        self.moe = cls(cfg)
        self.cpu.submit(self.moe.load_weights_task(self.p2l.data_ptr()))
        self.cpu.sync()
        self.load_s = time.perf_counter() - t0

    def task(self, qlen: torch.Tensor, ids: torch.Tensor, wts: torch.Tensor, x: torch.Tensor, out: torch.Tensor):
        return self.moe.forward_task(
            qlen.data_ptr(), ids.size(1), ids.data_ptr(), wts.data_ptr(), x.data_ptr(), out.data_ptr(), False
        )

    def run(self, task) -> None:
        self.cpu.submit(task)
        self.cpu.sync()

    def forward(self, x: torch.Tensor, ids: torch.Tensor, wts: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        qlen = torch.tensor([x.size(0)], dtype=torch.int32)
        self.run(self.task(qlen, ids, wts, x, out))
        return out


# Per-row symmetric online quantizers of kt-kernel (amx_buffers.hpp / amx_kernels.hpp):
# INT8 (GemmKernel224Int8::BufferB): d = amax/127, q = rint(w/d);
# INT4 (BufferBInt4Impl): d = amax/112, x = rint(w/d), q = sign(x) * ((|x| + 8) >> 4) in [-7, 7],
# stored as q*16 -- the double rounding moves ~1% of the weights one level vs round(w*7/amax).
QMAX = {"AMXINT4": 7, "AMXINT8": 127}


def fake_quant(w: torch.Tensor, qmax: int | None) -> torch.Tensor:
    w = w.float()
    if qmax is None:
        return w
    amax = w.abs().amax(dim=-1, keepdim=True)
    if qmax == 7:
        d = amax / 112.0
        x = torch.round(w * torch.where(d > 0, 1.0 / d, torch.zeros_like(d))).clamp(-127, 127)
        return torch.sign(x) * torch.div(x.abs() + 8, 16, rounding_mode="floor") * 16 * d
    d = amax / qmax
    return torch.round(w * torch.where(d > 0, 1.0 / d, torch.zeros_like(d))).clamp(-qmax, qmax) * d


def reference(x, ids, wts, gate, up, down, qmax: int | None = None) -> torch.Tensor:
    """fp32 SwiGLU MoE on the same bf16 weights (optionally fake-quantized per row like kt-kernel)."""
    y = torch.zeros(x.shape, dtype=torch.float32)
    xf = x.float()
    for t in range(x.size(0)):
        for j in range(ids.size(1)):
            e = int(ids[t, j])
            g = fake_quant(gate[e], qmax) @ xf[t]
            u = fake_quant(up[e], qmax) @ xf[t]
            y[t] += float(wts[t, j]) * (fake_quant(down[e], qmax) @ (torch.nn.functional.silu(g) * u))
    return y


def errors(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |got-ref| / max |ref|, ||got-ref|| / ||ref||)"""
    return float((got - ref).abs().max() / ref.abs().max()), float((got - ref).norm() / ref.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, required=True)
    ap.add_argument("--inter", type=int, required=True)
    ap.add_argument("--experts", type=int, required=True)
    ap.add_argument("--topk", type=int, required=True)
    ap.add_argument("--tokens", type=int, nargs="+", required=True)
    ap.add_argument("--method", choices=METHODS, default="AMXINT4")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--pools", type=int, default=1, help="CPUInfer subpools (one per NUMA node, TP split of inter)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--flush-mb", type=int, default=-1, help="cache-flush buffer per rep; -1 = 2x L3, 0 = off")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", dest="json_out", default=None, help="also write the JSON object here")
    args = ap.parse_args()
    if args.topk > args.experts:
        ap.error("--topk exceeds --experts")

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    gate = random_weights(args.experts, args.inter, args.hidden, gen)
    up = random_weights(args.experts, args.inter, args.hidden, gen)
    down = random_weights(args.experts, args.hidden, args.inter, gen)
    gen_s = time.perf_counter() - t0

    # MOEConfig.max_len sizes the per-expert activation buffers, which must be a multiple of the
    # kernels' M_STEP (KTMoEWrapper passes chunked_prefill_size, e.g. 512 or 25600).
    max_len = -(-max([*args.tokens, 2]) // 64) * 64
    moe = KtMoE(args, gate, up, down, max_len)

    # Correctness: 2 tokens against an fp32 torch reference on the same bf16 weights.
    x2 = torch.randn(2, args.hidden, generator=gen).to(torch.bfloat16)
    ids2, wts2 = random_routing(2, args.experts, args.topk, gen)
    got = moe.forward(x2, ids2, wts2).float()
    max_rel_err, rel_l2_err = errors(got, reference(x2, ids2, wts2, gate, up, down))
    qmax = QMAX.get(args.method)
    qerr = errors(got, reference(x2, ids2, wts2, gate, up, down, qmax)) if qmax else (None, None)

    flush_mb = args.flush_mb if args.flush_mb >= 0 else min(2 * l3_bytes() >> 20, 2048)
    flush_buf = torch.empty(flush_mb << 20, dtype=torch.uint8) if flush_mb else None
    per_expert = expert_bytes(args.method, args.hidden, args.inter)

    results = []
    for tokens in args.tokens:
        x = torch.randn(tokens, args.hidden, generator=gen).to(torch.bfloat16)
        out = torch.empty_like(x)
        qlen = torch.tensor([tokens], dtype=torch.int32)
        routes = [random_routing(tokens, args.experts, args.topk, gen) for _ in range(args.reps + 1)]
        times, gbs, distinct = [], [], []
        for rep, (ids, wts) in enumerate(routes):
            if flush_buf is not None:
                flush_buf.fill_(rep & 0xFF)
            task = moe.task(qlen, ids, wts, x, out)
            t0 = time.perf_counter()
            moe.run(task)
            dt = time.perf_counter() - t0
            if rep == 0:  # warm-up
                continue
            n = int(ids.unique().numel())
            times.append(dt)
            distinct.append(n)
            gbs.append(n * per_expert / dt / 1e9)
        s = statistics.median(times)
        results.append(
            {
                "tokens": tokens,
                "s": s,
                "tok_s": tokens / s,
                "weight_gbs": statistics.median(gbs),
                "s_min": min(times),
                "distinct_experts": statistics.mean(distinct),
            }
        )

    doc = {
        "method": args.method,
        "variant": kt_kernel.__cpu_variant__,
        "kt_kernel": getattr(kt_kernel, "__version__", None),
        "moe_class": type(moe.moe).__name__,
        "int8_kernel": getattr(kt_kernel, "__int8_kernel__", None) if args.method == "AMXINT8" else None,
        "hidden": args.hidden,
        "inter": args.inter,
        "experts": args.experts,
        "topk": args.topk,
        "threads": args.threads,
        "pools": args.pools,
        "reps": args.reps,
        "flush_mb": flush_mb,
        "bytes_per_expert": per_expert,
        "layer_weight_bytes": per_expert * args.experts,
        "gen_s": gen_s,
        "load_s": moe.load_s,
        "max_rel_err": max_rel_err,
        "rel_l2_err": rel_l2_err,
        "max_rel_err_vs_qref": qerr[0],
        "rel_l2_err_vs_qref": qerr[1],
        "results": results,
    }
    text = json.dumps(doc)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(text + "\n")
    sys.stderr.flush()
    os.write(_JSON_FD, (text + "\n").encode())


if __name__ == "__main__":
    main()
