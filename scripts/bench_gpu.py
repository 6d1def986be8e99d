#!/usr/bin/env python3
"""Decode speed on a GPU: the CUDA-graph step against the same step run eagerly, and the CPU-expert hand-offs.

On a --target gpu pack (Marlin GPU side, routed experts on the CPU), the way kt-run runs it: weights placed and
the KV cache sized by runtime/gpu.py's place_for_run, prefill eagerly, then greedy decode steps (runtime/graph.py
DecodeStep; the logits copied to the CPU each token, as Engine does). For each mode, eager (kt-run --no-graph)
and graph, it reports:

- decode tok/s and ms/token over --tokens steps (after --warmup steps, which include the graph's capture),
  the median of --reps runs from the same prompt;
- the hand-offs per token, measured by the experts worker: request -> done (from the start node's timestamp
  to the worker's done, summed over the token's MoE layers), split into pick-up latency and the experts call;
- the stream's stall per token: the time the wait nodes held the GPU stream (what the shared expert's overlap
  and the rest of the layer did not hide);
- whether graph and eager produced the same greedy tokens.

It prints one table and writes --json. Without CUDA (no device, a CPU-only torch, no nvcc or ninja) it says
why on one line and exits with code 2. `--device cpu` is a dry run of the same code on the CPU (eager only),
for checking the script without a GPU.

    python scripts/bench_gpu.py PACKED --tokens 64 --prompt-len 32 --ctx-size 4096 --json gpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ktpack.layouts.errors import ManifestError
from ktpack.runtime import cuda_ops
from ktpack.runtime.doorbell import HandoffStats
from ktpack.runtime.graph import DecodeStep
from ktpack.runtime.model import DeepseekV3Model, KVCache
from ktpack.runtime.weights import load_pack


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_mode(
    model: DeepseekV3Model, cache: KVCache, graph: bool, prompt: list[int], tokens: int, warmup: int
) -> tuple[dict, list[int]]:
    """One greedy run: prefill `prompt`, `warmup` untimed steps, `tokens` timed steps. Returns the figures and
    every generated token."""
    device = cache.c_kv.device
    step = DecodeStep(model, cache, graph=graph)
    try:
        cache.reset()
        with torch.inference_mode():
            logits = model.forward(torch.tensor(prompt), 0, cache)[-1].cpu()
        out = [int(logits.argmax())]
        pos = len(prompt)
        for _ in range(warmup):
            out.append(int(step(out[-1], pos)[-1].cpu().argmax()))
            pos += 1
        _sync(device)
        h0, s0 = step.handoffs, step.doorbell.stall()
        t0 = time.perf_counter()
        for _ in range(tokens):
            out.append(int(step(out[-1], pos)[-1].cpu().argmax()))  # .cpu() synchronises, as Engine's step does
            pos += 1
        dt = time.perf_counter() - t0
        h: HandoffStats = step.handoffs.minus(h0)
        s1 = step.doorbell.stall()
        n_moe = len(step.moes)
    finally:
        step.close()

    def ms(ns: int) -> float:  # nanoseconds summed over the run -> milliseconds per token
        return ns * 1e-6 / tokens

    row = {
        "mode": "graph" if graph and device.type == "cuda" else "eager",
        "tokens": tokens,
        "seconds": dt,
        "tok_s": tokens / dt,
        "ms_per_token": 1e3 * dt / tokens,
        "handoffs_per_token": h.requests / tokens,
        "moe_layers": n_moe,
        "handoff_ms_per_token": ms(h.handoff_ns),
        "pickup_ms_per_token": ms(h.pickup_ns),
        "experts_ms_per_token": ms(h.compute_ns),
        "stall_ms_per_token": ms(s1[0] - s0[0]),
    }
    return row, out


def _median_row(rows: list[dict]) -> dict:
    out = dict(rows[0])
    for k, v in rows[0].items():
        if isinstance(v, float):
            out[k] = statistics.median(r[k] for r in rows)
    out["reps"] = len(rows)
    out["tok_s_all"] = [r["tok_s"] for r in rows]
    return out


COLUMNS = [  # header, width, format, key
    ("mode", 6, "<", "mode"),
    ("tok/s", 8, ".2f", "tok_s"),
    ("ms/tok", 8, ".2f", "ms_per_token"),
    ("handoff ms/tok", 14, ".3f", "handoff_ms_per_token"),
    ("pickup ms/tok", 13, ".3f", "pickup_ms_per_token"),
    ("experts ms/tok", 14, ".3f", "experts_ms_per_token"),
    ("stall ms/tok", 12, ".3f", "stall_ms_per_token"),
    ("handoffs/tok", 12, ".1f", "handoffs_per_token"),
]


def table(rows: list[dict]) -> str:
    """One line per mode: request -> done (handoff) = pick-up + experts; stall = the stream waiting on them."""
    lines = ["  ".join(f"{h:<{w}}" if f == "<" else f"{h:>{w}}" for h, w, f, _ in COLUMNS)]
    for r in rows:
        lines.append("  ".join(f"{r[k]:<{w}}" if f == "<" else f"{r[k]:>{w}{f}}" for _, w, f, k in COLUMNS))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("packed", type=Path, help="a pack converted with kt-convert --target gpu")
    ap.add_argument("--tokens", type=int, default=64, help="timed decode steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (the graph is captured in the first)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--ctx-size", type=int, default=4096, help="KV cache length (GPU: 0 = the most that fits)")
    ap.add_argument("--prefill-chunk", type=int, default=256)
    ap.add_argument("--gpu-mem", type=float, default=None, help="GiB of GPU memory the run may take")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--engine", choices=["native", "ref"], default="native", help="the CPU experts' engine")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a dry run of the script (eager)")
    ap.add_argument("--seed", type=int, default=0, help="the prompt's random ids")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)

    device = torch.device(a.device)
    if device.type == "cuda":
        why = cuda_ops.why_unavailable()
        if why:
            print(f"bench_gpu: CUDA unavailable: {why}", file=sys.stderr)
            return 2
    try:
        if a.tokens < 1 or a.reps < 1 or a.prompt_len < 1 or a.warmup < 0:
            raise ValueError("--tokens, --reps and --prompt-len must be >= 1, --warmup >= 0")
        pack = load_pack(a.packed, engine=a.engine)
        target = pack.manifest.options.get("target")
        if target != "gpu":
            raise ValueError(f"{a.packed} was converted with --target {target}; this benchmark needs --target gpu")
        model = DeepseekV3Model(pack, static_kv=True)
        budget = None
        ctx = a.ctx_size
        if device.type == "cuda":
            from ktpack.runtime.gpu import place_for_run

            budget = place_for_run(model, device, ctx, a.prefill_chunk, a.gpu_mem)
            ctx = budget.kv.ctx_size
            print(f"bench_gpu: {budget.line()}", file=sys.stderr)
        need = a.prompt_len + a.warmup + a.tokens
        if ctx < need:
            raise ValueError(f"--ctx-size {ctx} is shorter than prompt + warm-up + tokens = {need}")
        cache = model.new_cache(ctx)
        rng = np.random.default_rng(a.seed)
        prompt = [int(i) for i in rng.integers(0, pack.config.vocab_size, a.prompt_len)]

        rows, tokens = [], {}
        modes = (False, True) if device.type == "cuda" else (False,)
        for graph in modes:
            runs = []
            for _ in range(a.reps):
                row, out = run_mode(model, cache, graph, prompt, a.tokens, a.warmup)
                runs.append(row)
                tokens.setdefault(row["mode"], out)
            rows.append(_median_row(runs))
    except (ManifestError, ValueError, OSError, cuda_ops.CudaUnavailable) as e:
        print(f"bench_gpu: error: {e}", file=sys.stderr)
        return 1

    agree = tokens.get("graph") == tokens.get("eager") if "graph" in tokens else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    print(f"{name}; {a.packed}; ctx {ctx}, prompt {a.prompt_len}, {a.tokens} tokens x {a.reps} reps (median)")
    print(table(rows))
    if agree is not None:
        print(f"graph and eager greedy tokens {'agree' if agree else 'DIFFER'}")
    if a.json:
        doc = {
            "device": name,
            "pack": str(a.packed),
            "ctx_size": ctx,
            "prompt_len": a.prompt_len,
            "engine": a.engine,
            "budget": budget.as_dict() if budget is not None else None,
            "rows": rows,
            "tokens": tokens,
            "graph_eager_agree": agree,
        }
        a.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
