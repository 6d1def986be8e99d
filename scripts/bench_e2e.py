#!/usr/bin/env python
"""End-to-end CPU speed of ktpack against llama.cpp and ik_llama.cpp on the same GGUF files.

For each GGUF: convert it (`kt-convert SRC -o WORK/STEM.ktpack --target cpu --force`, reused when its
manifest.json is newer than SRC), then time, on the same threads and the same 512 seeded prompt ids:

* ktpack: `kt-run OUT --prompt-ids ids.npy --ignore-eos --max-new-tokens 128 --temperature 0
  --stats-json s.json` (one untimed warm-up run, median of 3; prefill and decode tok/s as kt-run
  reports them: prefill = 512 / prefill time, decode = 127 / time of the other 127 tokens);
* llama.cpp through llama-cpp-python (model loaded once; one untimed warm-up, median of 3): wall time
  around the evaluation of the 512 prompt ids (prefill = 512 / that), then around the greedy loop that
  makes the other 127 tokens (decode = 127 / that);
* ik_llama.cpp with `--ik-llama-bench PATH`: `llama-bench -m SRC -p 512 -n 128 -t THREADS -r 3 -o json`
  plus the CPU options its docs give for DeepSeek (`--ik-args`, default `-fmoe 1 -rtr 1 -mla 3 -fa 1`),
  and `-gp 512,128`; its own pp512 and tg128@pp512 tok/s (128 tokens decoded after a 512-token prompt,
  as the others decode here; mean of its 3 repetitions). Its plain tg128 (empty cache) is in the JSON.

It also prints the decode roofline (read bandwidth / bytes one decode step reads from the GGUF: all
tensors but token_embd, the routed experts at top-k / n_experts of their bytes) and the fraction of
it each engine reaches, and the greedy agreement: how many leading generated tokens ktpack and
llama.cpp share; with llama.cpp's flash attention on (the default), also against one untimed llama.cpp
run without it, and llama.cpp's two runs against each other (on a random model with flat logits any
two correct engines part at the first near-tie their rounding flips; the peer's self-agreement says
where that is); one untimed ktpack run with each other cache type (f32, f16: llama.cpp's own, bf16);
ktpack's argmax at each step fed llama.cpp's greedy prefix (`kt-run --score`), and the same for llama.cpp's
own batched path (one evaluation of prompt + its tokens): how often the peer agrees with itself.

Quiet machine: before each timed repetition it waits until other processes use < --quiet of a core
(default 5%) over 1 s (from /proc/stat minus this process tree's own CPU time), and a repetition
during which other processes used more than that is discarded and run again (at most --max-discards
times per engine and file; then the noisy ones are kept and flagged `noisy` in the JSON).

llama-cpp-python and matplotlib are optional, bench-only imports. They need not be in this venv
(the repo venv has torch, which must not meet llama_cpp's own libggml): `--llama-python` names
another interpreter that has them, and the llama.cpp side (and the chart) run there in a subprocess:

    python -m venv PEERS/venv && PEERS/venv/bin/pip install numpy matplotlib
    CMAKE_ARGS="-DGGML_NATIVE=ON" PEERS/venv/bin/pip install --no-binary llama-cpp-python llama-cpp-python

On a CPU with AMX, -march=native also builds ggml's AMX buffer type, and llama.cpp (0.3.36's, as
mainline issue 18099) then aborts on deepseek2 at context creation (`GGML_ASSERT(*cur_backend_id != -1)`:
a weight in the AMX buffer feeds an op AMX does not do). Build it native without AMX (GCC keeps
explicit -mno-* flags over -march=native), which keeps the CPU_REPACK kernels:

    CMAKE_ARGS="-DGGML_NATIVE=ON -DCMAKE_C_FLAGS=-mno-amx-tile\\ -mno-amx-int8\\ -mno-amx-bf16 \\
      -DCMAKE_CXX_FLAGS=-mno-amx-tile\\ -mno-amx-int8\\ -mno-amx-bf16" pip install --no-binary ...

or run a native build with `--llama-no-repack` (no AMX and no CPU_REPACK: slower).

    python scripts/bench_e2e.py BENCH/bench-Q8_0.gguf BENCH/bench-Q4_K_M.gguf \\
        --llama-python PEERS/venv/bin/python \\
        --ik-llama-bench PEERS/ik_llama.cpp/build/bin/llama-bench \\
        --json e2e.json --png e2e.png

Only the standard library is imported at module level: the same file is the llama.cpp worker
(`--llama-worker SPEC.json`) and the chart worker (`--plot-worker RESULTS.json`) in the other venv.
PEERS and BENCH stand for folders of your choice outside the repository (the peers' builds, the GGUFs).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

N_PROMPT = 512
N_GEN = 128
N_CTX = 2048
IK_DEFAULT_ARGS = "-fmoe 1 -rtr 1 -mla 3 -fa 1"
ENGINES = ("ktpack", "llama.cpp", "ik_llama.cpp")


def log(msg: str) -> None:
    print(f"[bench_e2e {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------
# quiet machine: other processes' CPU = machine busy time (/proc/stat) - this process tree's own


_TCK = os.sysconf("SC_CLK_TCK")


def _machine_busy_s() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq + steal) / _TCK


def _own_cpu_s() -> float:
    """CPU time of this process and of its finished (waited-for) children."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


class CpuWindow:
    """Measures, over a `with` block, the cores other processes kept busy (0.05 = 5% of one core).
    Children must have been waited for by the end of the block to count as our own."""

    def __enter__(self) -> CpuWindow:
        self.t0, self.busy0, self.own0 = time.perf_counter(), _machine_busy_s(), _own_cpu_s()
        return self

    def __exit__(self, *exc: Any) -> None:
        wall = max(time.perf_counter() - self.t0, 1e-6)
        other = (_machine_busy_s() - self.busy0) - (_own_cpu_s() - self.own0)
        self.wall_s = wall
        self.other_cores = max(other, 0.0) / wall


def wait_quiet(threshold: float, timeout: float, window: float = 1.0) -> tuple[bool, float]:
    """Wait until other processes use < threshold of a core over `window` s; (quiet?, seconds waited)."""
    t0 = time.perf_counter()
    last = None
    while True:
        with CpuWindow() as w:
            time.sleep(window)
        if w.other_cores < threshold:
            return True, time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout:
            log(f"machine not quiet after {timeout:.0f} s (others: {w.other_cores:.2f} cores); going on")
            return False, time.perf_counter() - t0
        if last is None or time.perf_counter() - last > 30:
            log(f"waiting for a quiet machine (others use {w.other_cores:.2f} cores)")
            last = time.perf_counter()


class Reps:
    """Runs warm-ups, then timed repetitions under the quiet-machine rules."""

    def __init__(self, threshold: float, quiet_timeout: float, max_discards: int):
        self.threshold, self.quiet_timeout, self.max_discards = threshold, quiet_timeout, max_discards

    def run(self, fn: Any, reps: int, warmup: int, label: str) -> dict[str, Any]:
        for i in range(warmup):
            log(f"{label}: warm-up {i + 1}/{warmup}")
            fn()
        kept: list[dict[str, Any]] = []
        discarded: list[dict[str, Any]] = []
        while len(kept) < reps:
            quiet, waited = wait_quiet(self.threshold, self.quiet_timeout)
            with CpuWindow() as w:
                r = fn()
            r = dict(r, other_cores=round(w.other_cores, 4), waited_s=round(waited, 1))
            noisy = w.other_cores > self.threshold
            if noisy and len(discarded) < self.max_discards:
                discarded.append(r)
                log(f"{label}: rep discarded, others used {w.other_cores:.2f} cores")
                continue
            r["noisy"] = noisy
            kept.append(r)
            log(f"{label}: rep {len(kept)}/{reps}: {_fmt_rep(r)}")
        return {"reps": kept, "discarded": discarded}


def _fmt_rep(r: dict[str, Any]) -> str:
    return (
        f"prefill {r.get('prefill_tok_s', 0):.1f} tok/s, decode {r.get('decode_tok_s', 0):.2f} tok/s, "
        f"others {r['other_cores']:.2f} cores{' (noisy)' if r.get('noisy') else ''}"
    )


def _median(reps: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in reps if r.get(key)]
    return statistics.median(vals) if vals else None


# ---------------------------------------------------------------------------------------------
# the GGUF: vocabulary, prompt ids, bytes one decode step reads


def gguf_info(src: Path) -> dict[str, Any]:
    import gguf
    import numpy as np

    r = gguf.GGUFReader(src)

    def field(key: str, default: Any = None) -> Any:
        f = r.fields.get(key)
        return f.contents() if f is not None else default

    arch = field("general.architecture", "deepseek2")
    n_exp = int(field(f"{arch}.expert_count", 0) or 0)
    k = int(field(f"{arch}.expert_used_count", 0) or 0)
    tokens = field("tokenizer.ggml.tokens")
    types = field("tokenizer.ggml.token_type")
    n_vocab = len(tokens) if tokens is not None else int(field(f"{arch}.vocab_size"))
    routed = embd = other = 0
    for t in r.tensors:
        nb = int(t.n_bytes)
        if t.name == "token_embd.weight":
            embd += nb
        elif t.name.endswith(("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")):
            routed += nb
        else:
            other += nb
    per_token = other + (routed * k / n_exp if n_exp else 0)
    normal = np.flatnonzero(np.asarray(types) == 1) if types is not None else np.arange(n_vocab)
    return {
        "arch": arch,
        "n_vocab": n_vocab,
        "n_experts": n_exp,
        "top_k": k,
        "file_bytes": src.stat().st_size,
        "routed_expert_bytes": routed,
        "token_embd_bytes": embd,
        "other_bytes": other,
        "decode_bytes_per_token": int(per_token),
        "_normal_ids": normal,
    }


def set_prompt_length(n_prompt: int, n_gen: int) -> None:
    """Every engine's prompt length (--n-prompt), and a context that holds it and the generated tokens."""
    global N_PROMPT, N_CTX
    N_PROMPT = n_prompt
    N_CTX = max(N_CTX, 1 << (n_prompt + n_gen - 1).bit_length())
    log(f"note: --n-prompt {N_PROMPT}, context {N_CTX}")


def prompt_ids(info: dict[str, Any], n: int, seed: int) -> list[int]:
    """`n` seeded random ids among the vocabulary's normal tokens (all ids if it has no types)."""
    import numpy as np

    pool = info["_normal_ids"]
    if len(pool) < 16:
        pool = np.arange(info["n_vocab"])
    return [int(x) for x in np.random.default_rng(seed).choice(pool, size=n, replace=True)]


def read_bandwidth(threads: int, gib: float, repeats: int = 5) -> dict[str, float]:
    """Read bandwidth (GB/s), best of `repeats` over a `gib` GiB array: numpy sums with 1 and `threads`
    threads (numpy releases the GIL in the reduction), and ktpack's native read kernel (AVX-512 loads on
    every engine thread) where it imports; the highest counts (an engine that streams faster than a
    probe would otherwise show a roofline fraction above 100%)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    a = np.ones(int(gib * (1 << 30)) // 8, dtype=np.uint64)
    out: dict[str, float] = {}
    for nt in sorted({1, threads}):
        parts = np.array_split(a, nt)
        best = 0.0
        with ThreadPoolExecutor(nt) as ex:
            for _ in range(repeats):
                t0 = time.perf_counter()
                s = sum(ex.map(np.sum, parts))
                dt = time.perf_counter() - t0
                assert int(s) == a.size
                best = max(best, a.nbytes / dt / 1e9)
        out[f"gb_s_{nt}t"] = round(best, 2)
    try:
        from ktpack import kernels as K

        K.ensure_engine()
        K._native.set_threads(threads, 1)
        buf = a.view(np.uint8)
        best = 0.0
        for _ in range(repeats):
            t0 = time.perf_counter()
            K._native.read_all(buf)
            best = max(best, buf.nbytes / (time.perf_counter() - t0) / 1e9)
        out["gb_s_native"] = round(best, 2)
    except Exception as e:  # noqa: BLE001 - the numpy figures stand alone
        log(f"native read probe skipped: {e}")
    out["gb_s"] = max(out.values())
    return out


# ---------------------------------------------------------------------------------------------
# ktpack


def _venv_tool(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def packed_dir(work: Path, src: Path, cpu_layout: str | None) -> Path:
    return work / (f"{src.stem}.{cpu_layout}.ktpack" if cpu_layout else f"{src.stem}.ktpack")


def convert(src: Path, out: Path, kt_convert: str, cpu_layout: str | None = None) -> dict[str, Any]:
    manifest = out / "manifest.json"
    if manifest.exists() and manifest.stat().st_mtime > src.stat().st_mtime:
        log(f"reusing {out}")
        return {"reused": True, "cpu_layout": cpu_layout or "ggml"}
    log(f"converting {src} -> {out}")
    t0 = time.perf_counter()
    cmd = [kt_convert, str(src), "-o", str(out), "--target", "cpu", "--force", "-q"]
    cmd += ["--cpu-layout", cpu_layout] if cpu_layout else []
    subprocess.run(cmd, check=True)
    return {"reused": False, "convert_s": round(time.perf_counter() - t0, 1), "cpu_layout": cpu_layout or "ggml"}


def ktpack_once(
    kt_run: str, packed: Path, ids_npy: Path, threads: int, n_gen: int, work: Path, timeout: float, kv_cache: str
):
    stats = work / "kt-stats.json"
    stats.unlink(missing_ok=True)
    env = dict(os.environ, KTPACK_THREADS=str(threads), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [kt_run, str(packed), "--prompt-ids", str(ids_npy), "--ignore-eos", "--max-new-tokens", str(n_gen)]
    cmd += ["--temperature", "0", "--ctx-size", str(N_CTX), "--kv-cache", kv_cache, "--stats-json", str(stats)]
    p = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"kt-run failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    s = json.loads(stats.read_text())
    return {
        "prefill_tok_s": s["prefill_tok_s"],
        "decode_tok_s": s["decode_tok_s"],
        "prefill_s": s["prefill_s"],
        "decode_s": s["decode_s"],
        "generated": len(s["output_ids"]),
        "peak_rss_mb": s.get("peak_rss_mb"),
        "decode_profile": s.get("decode_profile"),  # seconds per phase of the native decode step
        "output_ids": s["output_ids"],
    }


def teacher_forced(
    kt_run: str, packed: Path, ids: list[int], ref_out: list[int], threads: int, work: Path, timeout: float
) -> dict[str, Any]:
    """ktpack's argmax at every step of llama.cpp's greedy continuation, given llama.cpp's own prefix
    (`kt-run --score` of prompt + ref_out[:-1]): the count that matches, and how far ktpack's logit of
    llama.cpp's token is below its own top one where they differ (near-ties are expected: a random model's
    top two logits are often within 1e-3 of each other, so one early tie flips all later greedy tokens)."""
    import numpy as np

    seq = work / "tf-ids.npy"
    out = work / "tf-logits.npy"
    np.save(seq, np.asarray(ids + ref_out[:-1], dtype=np.int64))
    env = dict(os.environ, KTPACK_THREADS=str(threads), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [kt_run, str(packed), "--score", str(seq), "--logits-out", str(out), "--ctx-size", str(N_CTX)]
    p = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"kt-run --score failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    rows = np.load(out)[len(ids) - 1 : len(ids) - 1 + len(ref_out)]
    out.unlink()
    ref = np.asarray(ref_out)
    top = rows.argmax(-1)
    r = np.arange(len(ref))
    below = rows[r, top] - rows[r, ref]
    miss = np.flatnonzero(top != ref)
    return {
        "agree": int(len(ref) - len(miss)),
        "n": len(ref),
        "mismatch_steps": miss.tolist(),
        "mismatch_logit_gap": [round(float(below[i]), 5) for i in miss],
        "logit_std": round(float(rows.std(-1).mean()), 4),
    }


# ---------------------------------------------------------------------------------------------
# llama.cpp through llama-cpp-python (runs as `--llama-worker` in the interpreter that has it)


def llama_worker(spec_path: Path) -> None:
    import llama_cpp
    import numpy as np

    spec = json.loads(spec_path.read_text())
    ids, n_gen, threads = spec["ids"], spec["n_gen"], spec["threads"]
    if not spec["extra_bufts"]:  # = llama.cpp's --no-repack: weights stay as stored (no AMX / CPU_REPACK copies)
        import llama_cpp.llama_cpp as low

        default_params = low.llama_model_default_params

        def no_extra_bufts() -> Any:
            p = default_params()
            p.use_extra_bufts = False
            return p

        low.llama_model_default_params = no_extra_bufts
    llm = llama_cpp.Llama(
        model_path=spec["model"],
        n_ctx=spec["n_ctx"],
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=spec["n_batch"],
        n_ubatch=spec["n_batch"],
        logits_all=bool(spec.get("teacher_force")),
        flash_attn=spec["flash_attn"],
        type_k=spec.get("kv_type", 1),  # ggml type ids: 0 = F32, 1 = F16 (llama.cpp's default)
        type_v=spec.get("kv_type", 1),
        verbose=False,
    )
    ctx = llm._ctx.ctx  # llama_context*
    n_vocab = llm.n_vocab()
    ref = spec.get("teacher_force")
    if ref:  # one batched evaluation of prompt + ref[:-1]: llama.cpp's argmax after each prefix of ref
        llm.eval(ids + ref[:-1])
        rows = np.asarray(llm.scores[len(ids) - 1 : len(ids) - 1 + len(ref)])
        Path(spec["out"]).write_text(json.dumps({"argmax": rows.argmax(-1).tolist()}))
        return

    def next_greedy() -> int:
        # logits of the last token of the last decoded batch
        p = llama_cpp.llama_get_logits_ith(ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(p, shape=(n_vocab,))))

    def once() -> dict[str, Any]:
        llm.reset()  # n_tokens = 0; eval() drops the KV cache beyond it
        t0 = time.perf_counter()
        llm.eval(ids)
        tok = next_greedy()
        t1 = time.perf_counter()
        out = [tok]
        for _ in range(n_gen - 1):
            llm.eval([tok])
            tok = next_greedy()
            out.append(tok)
        t2 = time.perf_counter()
        return {
            "prefill_s": t1 - t0,
            "decode_s": t2 - t1,
            "prefill_tok_s": len(ids) / (t1 - t0),
            "decode_tok_s": (n_gen - 1) / (t2 - t1),
            "output_ids": out,
        }

    reps = Reps(spec["quiet"], spec["quiet_timeout"], spec["max_discards"])
    res = reps.run(once, spec["reps"], spec["warmup"], "llama.cpp")
    res["version"] = getattr(llama_cpp, "__version__", "?")
    res["system_info"] = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    Path(spec["out"]).write_text(json.dumps(res))


def run_llama(
    python: str, model: Path, ids: list[int], args: argparse.Namespace, work: Path, **over: Any
) -> dict[str, Any]:
    spec = {
        "model": str(model),
        "ids": ids,
        "n_gen": args.n_gen,
        "n_ctx": N_CTX,
        "n_batch": N_PROMPT,
        "threads": args.threads,
        "reps": args.reps,
        "warmup": 1,
        "quiet": args.quiet,
        "quiet_timeout": args.quiet_timeout,
        "max_discards": args.max_discards,
        "extra_bufts": not args.llama_no_repack,
        "flash_attn": args.llama_flash_attn == "on",
        "kv_type": {"f32": 0, "f16": 1}[args.llama_kv_type],
        "out": str(work / "llama-result.json"),
        **over,
    }
    sp = work / "llama-spec.json"
    sp.write_text(json.dumps(spec))
    Path(spec["out"]).unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    env.pop("PYTHONPATH", None)
    p = subprocess.run([python, __file__, "--llama-worker", str(sp)], env=env, timeout=args.timeout)
    if p.returncode != 0:
        raise RuntimeError(f"llama.cpp worker failed ({p.returncode})")
    return json.loads(Path(spec["out"]).read_text())


def has_module(python: str, module: str) -> bool:
    code = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({module!r}) else 1)"
    return subprocess.run([python, "-c", code], capture_output=True).returncode == 0


# ---------------------------------------------------------------------------------------------
# ik_llama.cpp's llama-bench


def run_ik(bench: str, model: Path, args: argparse.Namespace) -> dict[str, Any]:
    # pp512; tg128 after a 512-token prompt (-gp: as ktpack and llama.cpp decode here); tg128 on an empty cache
    cmd = [bench, "-m", str(model), "-p", str(N_PROMPT), "-n", str(args.n_gen), "-gp", f"{N_PROMPT},{args.n_gen}"]
    cmd += ["-t", str(args.threads), "-r", str(args.reps), "-o", "json", *shlex.split(args.ik_args)]

    def once() -> dict[str, Any]:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        if p.returncode != 0:
            raise RuntimeError(f"llama-bench failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
        rows = json.loads(p.stdout)
        out: dict[str, Any] = {}
        keys = {
            f"pp{N_PROMPT}": "prefill",
            f"tg{args.n_gen}@pp{N_PROMPT}": "decode",
            f"tg{args.n_gen}": "decode_empty_cache",
        }
        for row in rows:
            if (k := keys.get(row.get("test", ""))) is not None:
                out[f"{k}_tok_s"], out[f"{k}_samples"] = row["avg_ts"], row.get("samples_ts")
        if "prefill_tok_s" not in out or "decode_tok_s" not in out:
            raise RuntimeError(f"llama-bench gave no pp{N_PROMPT} / tg{args.n_gen}@pp{N_PROMPT}: {p.stdout[-1000:]}")
        out["build"] = rows[0].get("build_commit") if rows else None
        return out

    log(f"ik_llama.cpp: {shlex.join(cmd)}")
    # llama-bench runs its own warm-up and its -r repetitions: one quiet-checked run of the lot
    res = Reps(args.quiet, args.quiet_timeout, args.max_discards).run(once, 1, 0, "ik_llama.cpp")
    res["command"] = shlex.join(cmd)
    return res


# ---------------------------------------------------------------------------------------------
# one file, the table, the chart


def agreement(a: list[int] | None, b: list[int] | None) -> int | None:
    if not a or not b:
        return None
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def bench_file(src: Path, args: argparse.Namespace, bw: dict[str, float], llama_python: str | None) -> dict[str, Any]:
    import numpy as np

    info = gguf_info(src)
    work = args.work / src.stem
    work.mkdir(parents=True, exist_ok=True)
    ids = prompt_ids(info, N_PROMPT, args.seed)
    ids_npy = work / "ids.npy"
    np.save(ids_npy, np.asarray(ids, dtype=np.int64))
    # the host's bandwidth drifts over minutes (33 -> 58 GB/s seen within one run): measured at the start and
    # again before and after this file's runs; the median of the three counts (one outlier window aside)
    gb_s = [bw["gb_s"]] if bw.get("given") else [bw["gb_s"], read_bandwidth(args.threads, args.bw_gib, 3)["gb_s"]]
    roof = max(gb_s) * 1e9 / info["decode_bytes_per_token"]  # for the log line; the median replaces it below
    res: dict[str, Any] = {
        "file": str(src),
        "gguf": {k: v for k, v in info.items() if not k.startswith("_")},
        "decode_roofline_tok_s": roof,
        "engines": {},
    }
    log(f"{src.name}: {info['decode_bytes_per_token'] / 1e6:.1f} MB per decode step, roofline {roof:.1f} tok/s")
    eng = res["engines"]
    for rnd in range(args.rounds):  # rounds: each engine again after the others, reps pooled (host drift)
        if args.rounds > 1:
            log(f"{src.name}: round {rnd + 1}/{args.rounds}")
        one: dict[str, Any] = {}
        _engines_once(src, args, llama_python, ids, ids_npy, work, one)
        for name, r in one.items():
            if name not in eng or "error" in eng[name]:
                eng[name] = r
            elif "reps" in r:
                eng[name]["reps"] += r["reps"]
                eng[name].setdefault("discarded", []).extend(r.get("discarded", []))
    ll = eng.get("llama.cpp", {})
    if args.llama_flash_attn == "on" and ll.get("reps") and llama_python:
        # llama.cpp's one-token flash-attention step moves deepseek2 logits by up to ~0.3 from its own
        # batched and non-FA paths (which agree with each other and with ktpack's f32 reference to ~0.015;
        # measured on bench-Q8_0); the greedy tokens of its plain attention, untimed, give the agreement
        # that compares the weights' math rather than that kernel
        try:
            r = run_llama(llama_python, src, ids, args, work, reps=1, warmup=0, flash_attn=False)
            ll["output_ids_flash_attn_off"] = r["reps"][0]["output_ids"]
        except (subprocess.SubprocessError, RuntimeError, OSError, ValueError, KeyError) as e:
            log(f"llama.cpp without flash attention on {src.name} failed: {e}")
    if ll.get("reps") and llama_python:
        # the peer against itself on its own tokens: its batched path's argmax after each prefix of its greedy
        # output (the yardstick for ktpack's teacher-forced agreement below)
        try:
            ref = ll["reps"][0]["output_ids"]
            r = run_llama(llama_python, src, ids, args, work, teacher_force=ref)
            miss = [i for i, (a, b) in enumerate(zip(r["argmax"], ref, strict=True)) if a != b]
            ll["batched_self_tf"] = {"agree": len(ref) - len(miss), "n": len(ref), "mismatch_steps": miss}
        except (subprocess.SubprocessError, RuntimeError, OSError, ValueError, KeyError) as e:
            log(f"llama.cpp's batched self-check on {src.name} failed: {e}")
    if not bw.get("given"):
        gb_s.append(read_bandwidth(args.threads, args.bw_gib, 3)["gb_s"])
        roof = statistics.median(gb_s) * 1e9 / info["decode_bytes_per_token"]
    res["bandwidth_gb_s"] = gb_s  # at the start of the run, before and after this file
    res["decode_roofline_tok_s"] = roof
    _summarize(res, args, src, ids, ids_npy, work, roof)
    return res


def _engines_once(
    src: Path, args: argparse.Namespace, llama_python: str | None, ids: list[int], ids_npy: Path, work: Path,
    eng: dict[str, Any],
) -> None:  # fmt: skip
    reps = Reps(args.quiet, args.quiet_timeout, args.max_discards)
    if "ktpack" in args.engines:
        packed = packed_dir(args.work, src, args.cpu_layout)
        try:
            conv = convert(src, packed, args.kt_convert, args.cpu_layout)
            r = reps.run(
                lambda: ktpack_once(
                    args.kt_run, packed, ids_npy, args.threads, args.n_gen, work, args.timeout, args.kt_kv_cache
                ),
                args.reps,
                1,
                f"ktpack {src.name}",
            )
            eng["ktpack"] = {"convert": conv, **r}
        except (subprocess.SubprocessError, RuntimeError, OSError, KeyError, ValueError) as e:
            log(f"ktpack on {src.name} failed: {e}")
            eng["ktpack"] = {"error": str(e)}
    if "llama.cpp" in args.engines:
        if llama_python is None:
            eng["llama.cpp"] = {"error": "llama_cpp not importable (give --llama-python)"}
        else:
            try:
                eng["llama.cpp"] = run_llama(llama_python, src, ids, args, work)
            except (subprocess.SubprocessError, RuntimeError, OSError, ValueError) as e:
                log(f"llama.cpp on {src.name} failed: {e}")
                eng["llama.cpp"] = {"error": str(e)}
    if "ik_llama.cpp" in args.engines and args.ik_llama_bench:
        try:
            eng["ik_llama.cpp"] = run_ik(args.ik_llama_bench, src, args)
        except (subprocess.SubprocessError, RuntimeError, OSError, ValueError) as e:
            log(f"ik_llama.cpp on {src.name} failed: {e}")
            eng["ik_llama.cpp"] = {"error": str(e)}


def _summarize(
    res: dict[str, Any], args: argparse.Namespace, src: Path, ids: list[int], ids_npy: Path, work: Path, roof: float
) -> None:
    eng = res["engines"]
    for r in eng.values():
        if "reps" in r:
            r["prefill_tok_s"] = _median(r["reps"], "prefill_tok_s")
            r["decode_tok_s"] = _median(r["reps"], "decode_tok_s")
            r["decode_roofline_fraction"] = r["decode_tok_s"] / roof if r["decode_tok_s"] else None
            r["noisy_reps"] = sum(bool(x.get("noisy")) for x in r["reps"])
    kt, ll = eng.get("ktpack", {}), eng.get("llama.cpp", {})
    kt_ids = kt["reps"][0]["output_ids"] if kt.get("reps") else None
    ll_ids = ll["reps"][0]["output_ids"] if ll.get("reps") else None
    res["greedy_agreement"] = agreement(kt_ids, ll_ids)
    res["greedy_agreement_flash_attn_off"] = agreement(kt_ids, ll.get("output_ids_flash_attn_off"))
    # the peer against itself (its two attention paths): how long any two correct engines can agree here
    res["llama_self_agreement"] = agreement(ll_ids, ll.get("output_ids_flash_attn_off"))
    # the other cache types, one untimed run each: f16 is llama.cpp's own cache type (the like-for-like
    # comparison), f32 kt-run's default; the cache's rounding alone moves where a near-tie flips
    res["greedy_agreement_by_cache"] = {}
    ll_off = ll.get("output_ids_flash_attn_off")
    for kv in ("f32", "f16", "bf16"):
        if not (kt_ids and ll_ids):
            break
        try:
            if kv == args.kt_kv_cache:
                o = kt_ids
            else:
                packed = packed_dir(args.work, src, args.cpu_layout)
                o = ktpack_once(args.kt_run, packed, ids_npy, args.threads, args.n_gen, work, args.timeout, kv)[
                    "output_ids"
                ]
            res["greedy_agreement_by_cache"][kv] = {"fa_on": agreement(o, ll_ids), "fa_off": agreement(o, ll_off)}
        except (subprocess.SubprocessError, RuntimeError, OSError, KeyError, ValueError) as e:
            log(f"ktpack {kv}-cache run on {src.name} failed: {e}")
    res["teacher_forced"] = None
    if kt_ids and ll_ids:
        try:
            packed = packed_dir(args.work, src, args.cpu_layout)
            res["teacher_forced"] = teacher_forced(args.kt_run, packed, ids, ll_ids, args.threads, work, args.timeout)
        except (subprocess.SubprocessError, RuntimeError, OSError, ValueError) as e:
            log(f"teacher-forced agreement on {src.name} failed: {e}")
    for r in (kt, ll):  # every rep gives the same greedy tokens; keep one copy
        if r.get("reps"):
            r["output_ids"] = r["reps"][0]["output_ids"]
            r["same_ids_every_rep"] = all(x["output_ids"] == r["output_ids"] for x in r["reps"])
            for x in r["reps"]:
                x.pop("output_ids", None)
            for x in r.get("discarded", []):
                x.pop("output_ids", None)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _agree(res: dict[str, Any]) -> str:
    g, tf = res.get("greedy_agreement"), res.get("teacher_forced")
    n = len(res.get("engines", {}).get("ktpack", {}).get("output_ids") or []) or N_GEN
    out = f"{g}/{n}" if g is not None else "-"
    g_off, g_self = res.get("greedy_agreement_flash_attn_off"), res.get("llama_self_agreement")
    out += f", llama fa-on/off {g_self}/{n}" if g_off is not None else ""
    for kv, a in res.get("greedy_agreement_by_cache", {}).items():
        out += f", {kv} cache {a['fa_on']}/{a['fa_off']}"
    out += f" (tf {tf['agree']}/{tf['n']}" if tf else ""
    self_tf = res.get("engines", {}).get("llama.cpp", {}).get("batched_self_tf")
    out += f"; llama self tf {self_tf['agree']}/{self_tf['n']}" if tf and self_tf else ""
    return out + (")" if tf else "")


def table(results: list[dict[str, Any]]) -> str:
    head = ["file", "engine", "prefill tok/s", "decode tok/s", "vs llama.cpp pp/tg", "vs ik_llama pp/tg"]
    head += ["roofline", "agree"]
    rows = [head]
    for res in results:
        eng = res["engines"]
        ll, ik = eng.get("llama.cpp", {}), eng.get("ik_llama.cpp", {})
        for name in ENGINES:
            r = eng.get(name)
            if r is None:
                continue
            if "error" in r:
                rows.append([Path(res["file"]).name, name, "error", "", "", "", "", ""])
                continue
            pp, tg = r.get("prefill_tok_s"), r.get("decode_tok_s")
            noisy = " *" if r.get("noisy_reps") else ""
            frac = r.get("decode_roofline_fraction")
            rows.append(
                [
                    Path(res["file"]).name,
                    name + noisy,
                    f"{pp:.1f}" if pp else "-",
                    f"{tg:.2f}" if tg else "-",
                    f"{_ratio(pp, ll.get('prefill_tok_s'))}/{_ratio(tg, ll.get('decode_tok_s'))}",
                    f"{_ratio(pp, ik.get('prefill_tok_s'))}/{_ratio(tg, ik.get('decode_tok_s'))}",
                    f"{frac:.0%}" if frac else "-",
                    _agree(res) if name == "ktpack" else "",
                ]
            )
    w = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w[i]) if i < 2 else c.rjust(w[i]) for i, c in enumerate(r)) for r in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)


def plot(results_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = json.loads(results_path.read_text())
    results = doc["results"]
    fig, axes = plt.subplots(1, 2, figsize=(5 + 2.5 * len(results), 4.5))
    colors = {"ktpack": "tab:green", "llama.cpp": "tab:blue", "ik_llama.cpp": "tab:orange"}
    width = 0.8 / len(ENGINES)
    for ax, key, title in ((axes[0], "prefill_tok_s", "prefill (512 tokens)"), (axes[1], "decode_tok_s", "decode")):
        for j, name in enumerate(ENGINES):
            xs, ys = [], []
            for i, res in enumerate(results):
                v = res["engines"].get(name, {}).get(key)
                if v:
                    xs.append(i + (j - (len(ENGINES) - 1) / 2) * width)
                    ys.append(v)
            if xs:
                bars = ax.bar(xs, ys, width, label=name, color=colors[name])
                ax.bar_label(bars, fmt="%.1f", fontsize=7)
        if key == "decode_tok_s":
            for i, res in enumerate(results):
                ax.hlines(res["decode_roofline_tok_s"], i - 0.45, i + 0.45, colors="k", linestyles="--", lw=1)
        ax.set_xticks(range(len(results)), [Path(r["file"]).stem for r in results], fontsize=8)
        ax.set_ylabel("tok/s")
        ax.set_title(title + (" (- - roofline)" if key == "decode_tok_s" else ""))
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{doc['threads']} threads, {doc['host']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("gguf", nargs="*", type=Path, help="GGUF files (a split model: its first part)")
    ap.add_argument(
        "--threads", type=int, default=usable_cores(), help="threads for every engine (default: usable cores)"
    )
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench_e2e", help="packed folders, ids")
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma list of: " + ", ".join(ENGINES))
    ap.add_argument("--llama-python", help="python with llama_cpp (and matplotlib), e.g. PEERS/venv/bin/python")
    ap.add_argument(
        "--llama-no-repack",
        action="store_true",
        help="llama.cpp without its extra buffer types (AMX, CPU_REPACK), as its --no-repack",
    )
    ap.add_argument(
        "--llama-flash-attn",
        choices=("on", "off"),
        default="on",
        help="llama.cpp's flash attention (default on: what its default `auto` picks on a CPU)",
    )
    ap.add_argument(
        "--llama-kv-type",
        choices=("f16", "f32"),
        default="f16",
        help="llama.cpp's KV cache type (default f16, its own default)",
    )
    ap.add_argument("--ik-llama-bench", help="ik_llama.cpp's llama-bench binary")
    ap.add_argument(
        "--ik-args", default=IK_DEFAULT_ARGS, help=f"extra llama-bench options (default: {IK_DEFAULT_ARGS})"
    )
    ap.add_argument(
        "--cpu-layout",
        help="kt-convert --cpu-layout for ktpack's pack (default: the converter's, ggml: the GGUF blocks as they "
        "are; amx-int4 etc. re-quantize, so ktpack then runs different weights than the peers)",
    )
    ap.add_argument("--kt-run", default=_venv_tool("kt-run"))
    ap.add_argument("--kt-convert", default=_venv_tool("kt-convert"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--rounds", type=int, default=1, help="run the engines one after another this many times per file, reps pooled"
    )
    ap.add_argument("--n-gen", type=int, default=N_GEN)
    ap.add_argument(
        "--n-prompt",
        type=int,
        default=N_PROMPT,
        help="prompt length (default 512, the issue's); longer ones measure decode at a long context (the roofline "
        "counts weights only, not the KV cache the attention reads)",
    )
    ap.add_argument(
        "--kt-kv-cache",
        choices=("f32", "f16", "bf16"),
        default="bf16",
        help="ktpack's KV cache type (kt-run --kv-cache). Default bf16: 16-bit as the peers' (f16) caches, and "
        "its vdpbf16ps attention is the fastest (2026-11-30, 2 threads, ~600 positions: r1dims attention 4.6 "
        "ms/token f32 -> 2.6 bf16, bench-Q4_K_M 1.0 -> 0.7). Its rounding (2^-9) flips near-ties sooner than "
        "f32: greedy agreement with llama.cpp on bench-Q8_0 10 (f32) -> 2, on bench-BF16 113 -> 73",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompt ids")
    ap.add_argument("--quiet", type=float, default=0.05, help="others' CPU allowed during a rep, in cores")
    ap.add_argument("--quiet-timeout", type=float, default=300.0, help="longest wait for a quiet machine (s)")
    ap.add_argument("--max-discards", type=int, default=6, help="noisy reps discarded per engine and file")
    ap.add_argument("--timeout", type=float, default=3600.0, help="limit for one engine run (s)")
    ap.add_argument("--bw-gib", type=float, default=1.0, help="array size of the bandwidth measurement")
    ap.add_argument("--bandwidth", type=float, help="read bandwidth in GB/s (skip the measurement)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--png", type=Path, help="bar chart (matplotlib, here or in --llama-python)")
    ap.add_argument("--llama-worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--plot-worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.llama_worker:
        return llama_worker(args.llama_worker)
    if args.plot_worker:
        return plot(*args.plot_worker)
    if not args.gguf:
        ap.error("give at least one GGUF file")
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if bad := set(args.engines) - set(ENGINES):
        ap.error(f"unknown engines: {', '.join(sorted(bad))}")
    if args.n_gen != N_GEN:
        log(f"note: --n-gen {args.n_gen}; ik_llama.cpp runs tg{args.n_gen}")
    if args.n_prompt != N_PROMPT:
        set_prompt_length(args.n_prompt, args.n_gen)
    args.work.mkdir(parents=True, exist_ok=True)

    llama_python = args.llama_python
    if llama_python is None and has_module(sys.executable, "llama_cpp"):
        llama_python = sys.executable
    if llama_python and not has_module(llama_python, "llama_cpp"):
        ap.error(f"{llama_python} cannot import llama_cpp")

    if args.bandwidth:
        bw = {"gb_s": args.bandwidth, "given": True}
    else:
        wait_quiet(args.quiet, args.quiet_timeout)
        bw = read_bandwidth(args.threads, args.bw_gib)
    log(f"read bandwidth {bw['gb_s']:.1f} GB/s")

    results = [bench_file(src, args, bw, llama_python) for src in args.gguf]
    doc = {
        "host": os.uname().nodename,
        "cpu": _cpu_model(),
        "threads": args.threads,
        "rounds": args.rounds,
        "n_prompt": N_PROMPT,
        "n_gen": args.n_gen,
        "bandwidth": bw,
        "quiet_threshold_cores": args.quiet,
        "ktpack_cpu_layout": args.cpu_layout or "ggml",
        "ktpack_kv_cache": args.kt_kv_cache,
        "results": results,
    }
    print(table(results))
    same = "ggml (the GGUF blocks as they are: the same weights as the peers)"
    print(f"\nktpack's CPU layout: {args.cpu_layout or same}")
    per_file = ", ".join(f"{statistics.median(r.get('bandwidth_gb_s', [bw['gb_s']])):.1f}" for r in results)
    print(f"\nthreads {args.threads}; read bandwidth {bw['gb_s']:.1f} GB/s at the start, per file (the median")
    print(f"of the start, before and after it) {per_file}; roofline = decode tok/s / (bandwidth")
    print("/ bytes per decode step); agree = leading greedy tokens equal in ktpack and llama.cpp (timed run;")
    print("llama fa-on/off: llama.cpp with and without flash attention against each other;")
    print("f32/f16/bf16 cache: ktpack with that KV cache type (untimed unless it is the timed one) against llama.cpp")
    print("with / without flash attention (llama.cpp's cache is f16); tf: steps where ktpack's argmax is llama.cpp's")
    print("token, fed llama.cpp's prefix; llama self tf: the same for llama.cpp's own batched path);")
    print("* = noisy reps kept")
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
        log(f"wrote {args.json}")
    if args.png:
        tmp = args.json or (args.work / "results.json")
        if not args.json:
            tmp.write_text(json.dumps(doc))
        py = sys.executable if has_module(sys.executable, "matplotlib") else llama_python
        if py and has_module(py, "matplotlib"):
            subprocess.run([py, __file__, "--plot-worker", str(tmp), str(args.png)], check=True)
            log(f"wrote {args.png}")
        else:
            log("no matplotlib here or in --llama-python: no chart")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


if __name__ == "__main__":
    main()
