"""Which engine's greedy tokens does transformers agree with? (a diagnostic for bench_e2e's agreement)

transformers' DeepseekV3ForCausalLM, loaded with exactly the values a pack represents (f32, the same
mapping the tests' oracle uses), is run teacher-forced over the prompt and each engine's greedy
continuation from a bench_e2e JSON; printed per engine: at how many steps transformers' argmax is the
engine's token, and the first step where it is not. On a random model with flat logits a greedy
sequence diverges at the first near-tie that an engine's rounding (e.g. int8 activations) flips, so
this tells an engine's bug (transformers agrees with the other engine) from noise (it agrees with
neither for long).

    python scripts/oracle_tf.py BENCH/e2e/bench-Q8_0.ktpack --json BENCH/e2e.json --ids BENCH/e2e/bench-Q8_0/ids.npy

The pack must be a `--preset bench` model from scripts/make_test_model.py (its HF config is rebuilt
from the preset). Needs about 4x the model's f32 size in RAM (bench: ~11 GB).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("pack", type=Path)
    ap.add_argument("--json", type=Path, required=True, help="bench_e2e's JSON with the engines' output_ids")
    ap.add_argument("--ids", type=Path, required=True, help="the prompt ids bench_e2e used (ids.npy)")
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()

    from oracle import hf_state_from_pack  # tests/oracle.py: GGUF names -> transformers names
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from ktpack.convert.synth.config import get_config
    from ktpack.convert.synth.hf import hf_config_dict

    if args.threads:
        torch.set_num_threads(args.threads)
    stem = args.pack.name.split(".")[0]
    res = json.loads(args.json.read_text())
    rows = [r for r in res["results"] if Path(r["file"]).stem == stem]
    if not rows:
        sys.exit(f"{args.json}: no results for {stem}")
    engines = {k: v["output_ids"] for k, v in rows[0]["engines"].items() if v.get("output_ids")}
    ids = np.load(args.ids).astype(np.int64).tolist()
    vocab = json.loads((args.pack / "manifest.json").read_text())["config"]["vocab_size"]
    cfg_d = hf_config_dict(get_config(args.preset), vocab)
    cfg = DeepseekV3Config(**{k: v for k, v in cfg_d.items() if k not in ("architectures", "model_type", "auto_map")})
    cfg._attn_implementation = "eager"
    t0 = time.perf_counter()
    model = DeepseekV3ForCausalLM(cfg).float().eval()
    missing, unexpected = model.load_state_dict(hf_state_from_pack(args.pack), strict=False)
    if missing or unexpected:
        sys.exit(f"state dict mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    print(f"transformers loaded in {time.perf_counter() - t0:.0f} s")
    for name, out in engines.items():
        seq = torch.tensor(ids + out[:-1])[None]
        with torch.no_grad():
            logits = model(seq).logits[0, len(ids) - 1 :].float()
        top = logits.argmax(-1).numpy()
        ref = np.asarray(out)
        miss = np.flatnonzero(top != ref)
        first = int(miss[0]) if len(miss) else len(out)
        agree = len(out) - len(miss)
        print(f"{name}: transformers' argmax = the engine's token at {agree}/{len(out)} steps, first miss at {first}")


if __name__ == "__main__":
    main()
