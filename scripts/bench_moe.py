#!/usr/bin/env python3
"""One MoE layer on the CPU: ktpack's native engine against its peers, measured in the same run.

Shapes: (a) "small" hidden 2048, intermediate 1024, 64 experts, top-8; (b) "r1" DeepSeek-V3/R1's hidden
7168 and intermediate 2048, top-8, with as many experts as --mem-gb allows per layout. For each layout
and token count (decode 1, prefill 64 and 512) it prints tok/s and the effective weight GB/s (bytes of
the distinct experts a call touches ÷ time), with ratios against, measured here and now:

- the read bandwidth of this machine (a read-only pass over 1 GiB with the engine's own threads);
- torch's best CPU paths: `torch._weight_int8pack_mm` per expert (int8 weights, bf16 activations) and
  bf16 `matmul`, with the same threads;
- KTransformers' kt-kernel, when `--ktk-python` names a Python that has it (scripts/peers/ktk_moe.py
  is run there; kt-kernel needs its own environment, installed with `pip install --no-deps kt-kernel`
  plus a CPU torch).

The routing changes every repetition (random top-8 per token) and a buffer of twice the last-level
cache is written between repetitions (outside the timing; this machine's L3 holds 480 MiB, more than
the whole "small" layer), so that weights come from DRAM as they do at R1 scale. Each repetition waits
for a quiet machine and is discarded (and redone) when other processes
used more than 5% of a core while it ran; medians are reported.

    python scripts/bench_moe.py --shapes small r1 --json moe.json [--ktk-python /path/to/python]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from ktpack import kernels as K
from ktpack.convert.synth.writer import random_blocks
from ktpack.kernels import _native
from ktpack.layouts import amx, ggml, ggml_lanes

SHAPES = {"small": (2048, 1024, 64), "r1": (7168, 2048, 256)}
LAYOUTS = ("amx-int4", "amx-int8", "amx-bf16", "ggml-q4_k", "lanes-q4_k", "ggml-q8_0")
TOPK = 8
ME = psutil.Process()
QUIET = 0.05  # other processes' CPU (in cores) above which a repetition is discarded


# ------------------------------------------------------------------------------------- quiet machine


def _busy() -> tuple[float, float]:
    """(CPU seconds all processes used, CPU seconds this process used) so far."""
    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)
    mine = ME.cpu_times()
    return busy, mine.user + mine.system + getattr(mine, "children_user", 0) + getattr(mine, "children_system", 0)


def others_load(window: float) -> float:
    b0, m0 = _busy()
    time.sleep(window)
    b1, m1 = _busy()
    return max(0.0, (b1 - b0) - (m1 - m0)) / window


def wait_quiet(limit: float | None = None, timeout: float = 120.0) -> None:
    limit = QUIET if limit is None else limit
    t0 = time.time()
    while others_load(0.3) > limit and time.time() - t0 < timeout:
        time.sleep(0.5)


FLUSH: np.ndarray | None = None  # written between repetitions (outside the timing) to evict the L3


def l3_bytes() -> int:
    """The largest cache's size from sysfs (0 when unknown)."""
    best = 0
    for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            txt = (idx / "size").read_text().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1:], 1)
        best = max(best, int(txt.rstrip("KMG")) * mult)
    return best


def flush_cache() -> None:
    if FLUSH is not None:
        np.add(FLUSH, 1, out=FLUSH)


def timed(fn, reps: int, limit: float | None = None, max_tries: int = 5) -> float:
    """Median seconds of `fn()` over `reps` undisturbed repetitions (after one warm-up); the last-level
    cache is flushed before each one, so weights come from DRAM as they do at scale."""
    limit = QUIET if limit is None else limit
    fn()
    times = []
    for _ in range(reps):
        for _attempt in range(max_tries):
            flush_cache()
            wait_quiet(limit)
            b0, m0 = _busy()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            b1, m1 = _busy()
            if max(0.0, (b1 - b0) - (m1 - m0)) / max(dt, 1e-3) <= limit or dt < 0.01:
                break  # (a call under 10 ms is below the counters' resolution: taken as is)
        times.append(dt)
    return statistics.median(times)


# ------------------------------------------------------------------------------------- weights


def _one_expert(layout: str, h: int, inter: int, rng: np.random.Generator) -> dict[str, tuple]:
    """Packed bytes of one expert's gate, up, down in `layout` (valid values)."""
    out = {}
    for part, (n, k) in (("gate", (inter, h)), ("up", (inter, h)), ("down", (h, inter))):
        if layout.startswith("amx"):
            kind = layout.split("-")[1]
            w = rng.standard_normal((n, k), dtype=np.float32) * np.float32(0.02)
            out[part] = (amx.pack(kind, w, group_size=128), ("amx", kind))
        else:
            gt = {"ggml-q4_k": "Q4_K", "ggml-q8_0": "Q8_0", "lanes-q4_k": "Q4_K"}[layout]
            if layout in ("ggml-q4_k", "lanes-q4_k") and part == "down":
                gt = "Q6_K"  # the Q4_K_M mix: down in Q6_K
            from gguf import GGMLQuantizationType

            raw = np.ascontiguousarray(random_blocks(rng, (n, k), GGMLQuantizationType[gt])).view(np.uint8)
            if layout.startswith("lanes"):
                out[part] = (ggml_lanes.pack(raw.reshape(n, -1), gt), ("lanes", gt))
            else:
                out[part] = (ggml.pack(raw.reshape(n, -1), gt, 8), ("ggml", gt))
    return out


def make_experts(layout: str, h: int, inter: int, e: int, rng: np.random.Generator):
    one = _one_expert(layout, h, inter, rng)
    specs = []
    nbytes = 0
    for part, (n, k) in (("gate", (inter, h)), ("up", (inter, h)), ("down", (h, inter))):
        data, (fam, kind) = one[part]
        full = np.tile(data, e)  # distinct memory per expert (same contents: irrelevant for speed)
        nbytes += full.nbytes
        if fam == "amx":
            spec = K.weight_spec(f"amx_{kind}_v1", {"n_block": 4, "group_size": 128}, (e, n, k), full)
        elif fam == "lanes":
            spec = K.weight_spec("ggml_lanes_v1", {"ggml_type": kind, "rows": 16}, (e, n, k), full)
        else:
            spec = K.weight_spec("ggml_rows_v1", {"ggml_type": kind, "rows": 8}, (e, n, k), full)
        specs.append(spec)
    return K.Experts([(*specs, 0, inter, 0)], e, h, inter), nbytes // e


def routing(t: int, e: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    idx = np.argsort(rng.random((t, e)), axis=1)[:, :TOPK].astype(np.int64)
    return idx, rng.random((t, TOPK)).astype(np.float32)


# ------------------------------------------------------------------------------------- torch peers


class TorchMoE:
    """The same layer with torch's CPU kernels: int8 weight-only (`_weight_int8pack_mm`) or bf16."""

    def __init__(self, kind: str, h: int, inter: int, e: int, rng: np.random.Generator) -> None:
        self.kind = kind
        g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))

        def mat(n: int, k: int):
            if kind == "int8":
                one = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
                scales = [torch.rand(n, generator=g).to(torch.bfloat16) for _ in range(e)]
                return [one.clone() for _ in range(e)], scales
            one = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16)
            return [one.clone() for _ in range(e)], None

        self.gate, self.gs = mat(inter, h)
        self.up, self.us = mat(inter, h)
        self.down, self.ds = mat(h, inter)
        self.bytes_per_expert = sum(t[0].numel() * t[0].element_size() for t in (self.gate, self.up, self.down))

    def _mm(self, x: torch.Tensor, w: list, s: list | None, e: int) -> torch.Tensor:
        if self.kind == "int8":
            return torch._weight_int8pack_mm(x, w[e], s[e])
        return x @ w[e].T

    def __call__(self, x: torch.Tensor, idx: np.ndarray, wts: np.ndarray) -> torch.Tensor:
        xb = x.to(torch.bfloat16)
        out = torch.zeros(x.shape, dtype=torch.float32)
        for e in np.unique(idx):
            tok, pos = np.nonzero(idx == e)
            xe = xb[torch.from_numpy(tok)]
            h = torch.nn.functional.silu(self._mm(xe, self.gate, self.gs, e)) * self._mm(xe, self.up, self.us, e)
            y = self._mm(h, self.down, self.ds, e).float() * torch.from_numpy(wts[tok, pos])[:, None]
            out.index_add_(0, torch.from_numpy(tok), y)
        return out


# ------------------------------------------------------------------------------------- main


def read_bandwidth(reps: int) -> float:
    buf = np.ones(1 << 30, np.uint8)
    dt = timed(lambda: _native.read_all(buf), reps)
    return buf.nbytes / dt / 1e9


def experts_for(mem_gb: float, per_expert: int, cap: int) -> int:
    return int(max(TOPK, min(cap, mem_gb * 1e9 // per_expert)))


def run_ktk(python: str, h: int, inter: int, e: int, tokens: list[int], threads: int, reps: int) -> list[dict]:
    script = Path(__file__).with_name("peers") / "ktk_moe.py"
    out = []
    for method in ("AMXINT4", "AMXINT8", "BF16"):
        jpath = Path(f"/tmp/ktk_{os.getpid()}_{method}.json")
        cmd = [python, str(script), "--hidden", str(h), "--inter", str(inter), "--experts", str(e)]
        cmd += ["--topk", str(TOPK), "--tokens", *map(str, tokens), "--method", method]
        cmd += ["--threads", str(threads), "--reps", str(reps), "--json", str(jpath)]
        wait_quiet()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if r.returncode != 0 or not jpath.exists():
            print(f"  kt-kernel {method}: failed ({(r.stderr or r.stdout).strip().splitlines()[-1:]})", file=sys.stderr)
            continue
        out.append(json.loads(jpath.read_text()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["small", "r1"], choices=list(SHAPES))
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 64, 512])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--mem-gb", type=float, default=6.0, help="weight memory per layout for the r1 shape")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--ktk-python", help="a Python with kt-kernel + CPU torch (runs scripts/peers/ktk_moe.py)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--flush-mb", type=int, help="bytes written between reps to evict caches (default 2x L3)")
    ap.add_argument("--max-other", type=float, default=0.05, help="other processes' load (cores) that voids a rep")
    args = ap.parse_args()
    global QUIET, FLUSH
    QUIET = args.max_other
    flush = args.flush_mb if args.flush_mb is not None else 2 * l3_bytes() // (1 << 20)
    FLUSH = np.zeros(flush << 20, np.uint8) if flush > 0 else None

    os.environ.setdefault("KTPACK_THREADS", str(args.threads))
    _native.set_threads(args.threads)
    torch.set_num_threads(args.threads)
    isa = K.ensure_engine()
    rng = np.random.default_rng(0)
    print(f"ISA {isa}, {args.threads} threads; measuring read bandwidth ...", flush=True)
    bw = read_bandwidth(args.reps)
    print(f"read bandwidth: {bw:.1f} GB/s")
    rows = []

    def report(shape, engine, layout, t, dt, bytes_touched):
        gbs = bytes_touched / dt / 1e9
        row = dict(shape=shape, engine=engine, layout=layout, tokens=t, s=dt, tok_s=t / dt, weight_gbs=gbs,
                   of_bandwidth=gbs / bw)  # fmt: skip
        rows.append(row)
        print(f"{shape:5s} {engine:9s} {layout:10s} T={t:<4d} {t / dt:9.1f} tok/s {gbs:6.1f} GB/s  "
              f"{100 * gbs / bw:5.1f}% of read bw", flush=True)  # fmt: skip

    for shape in args.shapes:
        h, inter, cap = SHAPES[shape]
        for layout in args.layouts:
            one = make_experts(layout, h, inter, 1, rng)[1]
            e = 64 if shape == "small" else experts_for(args.mem_gb, one, cap)
            op, per_expert = make_experts(layout, h, inter, e, rng)
            for t in args.tokens:
                x = rng.standard_normal((t, h), dtype=np.float32)
                out = np.empty_like(x)
                routes = [routing(t, e, rng) for _ in range(4 * args.reps + 8)]
                it = iter(routes * 4)

                def call(op=op, x=x, out=out, it=it):
                    idx, w = next(it)
                    op.forward(x, idx, w, out)

                dt = timed(call, args.reps)
                touched = min(e, len(np.unique(routes[0][0]))) * per_expert
                report(shape, "ktpack", layout, t, dt, touched)
            del op
        if not args.no_torch:
            for kind in ("int8", "bf16"):
                probe = TorchMoE(kind, h, inter, 1, rng).bytes_per_expert
                e = 64 if shape == "small" else experts_for(args.mem_gb, probe, cap)
                tm = TorchMoE(kind, h, inter, e, rng)
                for t in args.tokens:
                    x = torch.from_numpy(rng.standard_normal((t, h), dtype=np.float32))
                    routes = [routing(t, e, rng) for _ in range(4 * args.reps + 8)]
                    it = iter(routes * 4)

                    def call(tm=tm, x=x, it=it):
                        idx, w = next(it)
                        with torch.inference_mode():
                            tm(x, idx, w)

                    dt = timed(call, args.reps)
                    touched = min(e, len(np.unique(routes[0][0]))) * tm.bytes_per_expert
                    report(shape, "torch", kind, t, dt, touched)
                del tm
        if args.ktk_python:
            e = 64 if shape == "small" else min(cap, 64)
            for res in run_ktk(args.ktk_python, h, inter, e, args.tokens, args.threads, args.reps):
                for r in res["results"]:
                    touched = r["weight_gbs"] * r["s"] * 1e9
                    report(shape, "kt-kernel", res["method"].lower(), r["tokens"], r["s"], touched)

    # ratios: ktpack vs the best peer at the same shape and token count
    print("\nratios (ktpack best layout of each family vs peers, same shape and tokens):")
    for shape in args.shapes:
        for t in args.tokens:
            mine = [r for r in rows if r["shape"] == shape and r["tokens"] == t and r["engine"] == "ktpack"]
            peers = [r for r in rows if r["shape"] == shape and r["tokens"] == t and r["engine"] != "ktpack"]
            if not mine:
                continue
            best = max(mine, key=lambda r: r["tok_s"])
            line = f"{shape:5s} T={t:<4d} ktpack {best['layout']} {best['tok_s']:.1f} tok/s"
            for p in peers:
                line += f" | x{best['tok_s'] / p['tok_s']:.2f} vs {p['engine']} {p['layout']}"
            print(line)
    if args.json:
        args.json.write_text(json.dumps({"isa": isa, "threads": args.threads, "read_gbs": bw, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
