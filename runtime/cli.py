"""`kt-run PACKED`: generate from a packed DeepSeek-V3/R1 folder, score token sequences, or chat."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np

from ktpack.layouts.errors import ManifestError

from .chat import ChatError
from .cuda_ops import CudaUnavailable
from .engine import KV_CACHE_TYPES, Engine, EngineError, Generation
from .sampling import SamplingParams

_D = SamplingParams()
DIM, RESET = "\x1b[2m", "\x1b[0m"


def _load_ids(path: Path, what: str) -> list[int]:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise EngineError(f"{path}: cannot read {what} ({e})") from None
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise EngineError(f"{path}: {what} must be a 1-D integer array, got {arr.dtype} {list(arr.shape)}")
    return [int(x) for x in arr]


class _ThinkPainter:
    """Shows R1's <think> ... </think> section dimmed on a terminal (as plain text elsewhere)."""

    def __init__(self, tty: bool):
        self.tty = tty

    def __call__(self, delta: str) -> None:
        if self.tty:
            delta = delta.replace("<think>", DIM + "<think>").replace("</think>", "</think>" + RESET)
        sys.stdout.write(delta)
        sys.stdout.flush()


def _stats_out(gen: Generation, path: Path | None) -> None:
    click.echo(f"kt-run: {gen.stats.line()}", err=True)
    if path:
        d = gen.stats.as_dict() | {
            "prompt_ids": gen.prompt_ids,
            "output_ids": gen.output_ids,
            "finish_reason": gen.finish_reason,
        }
        path.write_text(json.dumps(d, indent=1) + "\n")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("packed", type=click.Path(path_type=Path))
@click.option("--prompt-file", type=click.Path(path_type=Path), help="Prompt text (chat template applied).")
@click.option("--prompt", help="Prompt text given inline.")
@click.option("--prompt-ids", type=click.Path(path_type=Path), help="Exact token ids (.npy, 1-D); no template, no BOS.")
@click.option("--system", default=None, help="System prompt for the chat template.")
@click.option("--raw", is_flag=True, help="Send the prompt text as it is (BOS added), without the chat template.")
@click.option("--score", type=click.Path(path_type=Path), help="Token ids (.npy) to score; writes --logits-out.")
@click.option("--logits-out", type=click.Path(path_type=Path), help="Where --score writes float32 logits [n, vocab].")
@click.option("--max-new-tokens", default=256, show_default=True)
@click.option("--temperature", default=_D.temperature, show_default=True, help="0 = greedy.")
@click.option("--top-k", default=_D.top_k, show_default=True, help="0 = off.")
@click.option("--top-p", default=_D.top_p, show_default=True)
@click.option("--repetition-penalty", default=_D.repetition_penalty, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--ignore-eos", is_flag=True, help="Do not stop at end-of-sequence (benchmarks).")
@click.option(
    "--ctx-size",
    default=4096,
    show_default=True,
    help="KV cache length, allocated once (GPU runs: 0 = the most that fits).",
)
@click.option("--prefill-chunk", default=256, show_default=True)
@click.option("--stats-json", type=click.Path(path_type=Path), help="Write the run's figures and ids as JSON.")
@click.option("--verify", is_flag=True, help="Check every checksum of the packed folder before loading.")
@click.option(
    "--engine",
    type=click.Choice(["native", "ref", "ref-actq"]),
    default=None,
    help="CPU engine: native (default; KTPACK_ENGINE), ref (f32 torch oracle), ref-actq (oracle with the "
    "native engine's activation quantization).",
)
@click.option(
    "--no-graph",
    is_flag=True,
    help="GPU runs (KTPACK_DEVICE=cuda): run each decode step eagerly instead of replaying one CUDA Graph.",
)
@click.option(
    "--kv-cache",
    type=click.Choice(list(KV_CACHE_TYPES)),
    default="f32",
    show_default=True,
    help="CPU runs: KV cache element type. f16 (llama.cpp's default) halves the cache and the bytes each "
    "decode step's attention reads; needs F16C. bf16 halves them too, and on AVX-512 BF16 CPUs its queries and "
    "probabilities are rounded to bf16 for vdpbf16ps (twice the f32 products per instruction).",
)
@click.option(
    "--gpu-mem",
    type=float,
    default=None,
    help="GPU runs: the most GiB of GPU memory to take (weights, KV cache, activations); default: what is free.",
)
def main(packed: Path, prompt_file: Path | None, prompt: str | None, prompt_ids: Path | None, system: str | None,
         raw: bool, score: Path | None, logits_out: Path | None, max_new_tokens: int, temperature: float, top_k: int,
         top_p: float, repetition_penalty: float, seed: int | None, stop: tuple[str, ...], ignore_eos: bool,
         ctx_size: int, prefill_chunk: int, stats_json: Path | None, verify: bool,
         engine: str | None, kv_cache: str, no_graph: bool, gpu_mem: float | None) -> None:  # fmt: skip
    """Generate from a packed folder (tokens streamed to stdout, one stats line on stderr).

    \b
    Examples:
      kt-run packed/ --prompt-file p.txt
      kt-run packed/ --prompt "Why is the sky blue?" --temperature 0 --max-new-tokens 64
      kt-run packed/ --prompt-ids ids.npy --ignore-eos --max-new-tokens 128 --temperature 0 --stats-json s.json
      kt-run packed/ --score ids.npy --logits-out logits.npy
      kt-run packed/                       # interactive chat
    """
    try:
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
        params.check()
        if sum(x is not None for x in (prompt_file, prompt, prompt_ids, score)) > 1:
            raise click.UsageError("give one of --prompt-file, --prompt, --prompt-ids, --score")
        if score is not None and logits_out is None:
            raise click.UsageError("--score needs --logits-out")
        if prompt_file is not None:
            try:
                prompt = prompt_file.read_text()
            except (OSError, UnicodeDecodeError) as e:
                raise EngineError(f"{prompt_file}: cannot read the prompt ({e})") from None
        ids_in = _load_ids(prompt_ids, "--prompt-ids") if prompt_ids else None
        score_ids = _load_ids(score, "--score ids") if score else None
        eng = Engine(
            packed, ctx_size=ctx_size, prefill_chunk=prefill_chunk, verify=verify, engine=engine, graph=not no_graph,
            gpu_mem=gpu_mem, kv_cache=kv_cache,
        )  # fmt: skip
        eng.settle_torch_threads()
        if eng.gpu_budget is not None:
            click.echo(f"kt-run: {eng.gpu_budget.line()}", err=True)
        if score_ids is not None:
            logits = eng.score(score_ids)
            np.save(logits_out, logits.astype(np.float32))
            click.echo(f"kt-run: scored {len(score_ids)} positions -> {logits_out}", err=True)
            return
        paint = _ThinkPainter(sys.stdout.isatty())
        run = dict(params=params, max_new_tokens=max_new_tokens, stop=stop, ignore_eos=ignore_eos, on_text=paint)
        if ids_in is None and prompt is None:
            _chat(eng, system, run)
            return
        if ids_in is None:
            if raw:
                ids_in = eng.tokenizer.encode_raw(prompt)
            else:
                msgs = [{"role": "system", "content": system}] if system else []
                msgs.append({"role": "user", "content": prompt})
                ids_in = eng.tokenizer.encode_chat(msgs)
        gen = eng.generate(ids_in, **run)
        sys.stdout.write("\n")
        _stats_out(gen, stats_json)
    except (ManifestError, EngineError, ChatError, ValueError, CudaUnavailable) as e:
        click.echo(f"kt-run: error: {e}", err=True)
        sys.exit(1)
    except OSError as e:  # a file that vanished or cannot be read while loading or writing
        where = f"{e.filename}: " if e.filename else ""
        click.echo(f"kt-run: error: {where}{e.strerror or e}", err=True)
        sys.exit(1)


def _chat(eng: Engine, system: str | None, run: dict) -> None:
    """Interactive chat in the terminal; the history is re-sent each turn (the template drops
    old <think> sections, as DeepSeek-R1's does)."""
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    click.echo("kt-run: chat; an empty line or Ctrl-D ends it", err=True)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        ids = eng.tokenizer.encode_chat(history)
        gen = eng.generate(ids, **run)
        sys.stdout.write("\n")
        click.echo(f"kt-run: {gen.stats.line()}", err=True)
        history.append({"role": "assistant", "content": gen.text})


if __name__ == "__main__":
    main()
