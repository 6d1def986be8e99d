"""Teacher-forced logits of ktpack, its f32 reference engine and llama.cpp on one prompt: how far apart?

bench_e2e counts how many greedy tokens two engines share; on a random model with flat logits that
count ends at the first near-tie any rounding difference flips, so it cannot tell a wrong kernel from
noise. This script compares whole logit vectors at every prompt position instead, for three pairs:
ktpack's native engine (int8 activations, as llama.cpp's quantized dot products), ktpack's f32 torch
reference (`--engine ref`: the same weights, no activation rounding) and llama.cpp (llama-cpp-python in a
side environment, `logits_all`). Printed per pair: the share of positions whose argmax agrees, the rms
and max logit difference, and per-position rms percentiles next to the median top-1/top-2 gap. If the
exact f32 math is as far from llama.cpp as ktpack is, the disagreement is the model's sensitivity to
rounding, not an engine error.

    python scripts/compare_logits.py BENCH/bench-Q8_0.gguf BENCH/e2e/bench-Q8_0.ktpack \
        --llama-python PEERS/venv/bin/python

The prompt is bench_e2e's (same seed). Needs the pack's f32 weights in RAM for the reference (bench: ~6 GB).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

LLAMA_CODE = """
import json, sys, numpy as np, llama_cpp
model, ids_path, out = sys.argv[1:4]
ids = json.load(open(ids_path))
llm = llama_cpp.Llama(model_path=model, n_ctx=max(2048, len(ids)), n_threads=int(sys.argv[4]),
                      n_threads_batch=int(sys.argv[4]), n_batch=len(ids), n_ubatch=len(ids), logits_all=True,
                      type_k=0, type_v=0, verbose=False)
llm.eval(ids)
np.save(out, np.asarray(llm.scores[: len(ids)], dtype=np.float32))
"""


def pair(name: str, a: np.ndarray, b: np.ndarray) -> dict:
    d = a - b
    s = np.sort(b, axis=-1)
    per_pos = np.sqrt((d**2).mean(-1))
    out = {
        "pair": name,
        "top1_agree": float(np.mean(a.argmax(-1) == b.argmax(-1))),
        "rms": float(np.sqrt((d**2).mean())),
        "max": float(np.abs(d).max()),
        "per_position_rms_p50_p90_p99": [float(x) for x in np.percentile(per_pos, [50, 90, 99])],
        "median_top1_top2_gap": float(np.median(s[:, -1] - s[:, -2])),
        "logit_std": float(b.std()),
    }
    print(
        f"{name:28s} top-1 agree {out['top1_agree'] * 100:5.1f}%  rms {out['rms']:.4f}  max {out['max']:.3f}  "
        f"per-position rms p50/p90/p99 {'/'.join(f'{x:.3f}' for x in out['per_position_rms_p50_p90_p99'])}  "
        f"(logit std {out['logit_std']:.3f}, median top-2 gap {out['median_top1_top2_gap']:.3f})"
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("gguf", type=Path)
    ap.add_argument("pack", type=Path, help="the GGUF converted by kt-convert (--target cpu)")
    ap.add_argument("--llama-python", required=True, help="python with llama_cpp")
    ap.add_argument("--n", type=int, default=512, help="prompt length (bench_e2e: 512)")
    ap.add_argument("--seed", type=int, default=0, help="bench_e2e's prompt seed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_e2e import gguf_info, prompt_ids

    from ktpack.runtime.engine import Engine

    ids = prompt_ids(gguf_info(args.gguf), args.n, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        ids_path, out = Path(tmp) / "ids.json", Path(tmp) / "llama.npy"
        ids_path.write_text(json.dumps(ids))
        cmd = [args.llama_python, "-c", LLAMA_CODE, str(args.gguf), str(ids_path), str(out), str(args.threads)]
        subprocess.run(cmd, check=True)
        llama = np.load(out)
    native = Engine(args.pack, ctx_size=max(2048, args.n), engine="native").score(ids)
    ref = Engine(args.pack, ctx_size=max(2048, args.n), engine="ref").score(ids)
    rows = [
        pair("ktpack native vs llama.cpp", native, llama),
        pair("f32 reference vs llama.cpp", ref, llama),
        pair("ktpack native vs f32 ref", native, ref),
    ]
    if args.json:
        args.json.write_text(json.dumps({"gguf": str(args.gguf), "n": args.n, "pairs": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
