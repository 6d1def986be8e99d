"""kt-run, the command: what it prints, what it writes, and how it refuses bad input.

What can go wrong: text not streamed or the stats line missing or garbled; --stats-json without
the figures or ids; --score logits that differ from Engine.score or from transformers; a stop
string not honoured; --seed not reproducible (or ignored); chat that forgets the history; a bad
folder or a bad ids file ending in a traceback instead of one `kt-run: error: ...` line.
Most runs are in-process (click's CliRunner, stdout and stderr apart); a few start the console
script to see the real streams.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from oracle import TOL, Packs, compare, hf_logits, kt_run_cmd, oracle_for, session_packs

from ktpack.layouts import manifest as mf
from ktpack.runtime import cli
from ktpack.runtime.chat import ChatTokenizer, StreamDecoder
from ktpack.runtime.engine import Engine, _stop_prefix_len
from ktpack.runtime.sampling import SamplingParams

STATS_LINE = re.compile(
    r"^kt-run: prompt (\d+) tokens, prefill ([\d.]+) tok/s; "
    r"generated (\d+) tokens, decode ([\d.]+) tok/s; peak RSS (\d+) MB$"
)


@pytest.fixture(scope="module")
def packs(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Packs:
    return session_packs(tmp_path_factory, tiny_dir)


@pytest.fixture(scope="module")
def f32(packs) -> Path:
    return packs("tiny-F32.gguf", target="cpu")


@pytest.fixture(scope="module")
def tok(f32) -> ChatTokenizer:
    return ChatTokenizer.from_folder(f32)


def kt_run(*args, input: str | None = None) -> Result:
    return CliRunner().invoke(cli.main, [str(a) for a in args], input=input)


def ok(r: Result) -> Result:
    assert r.exit_code == 0, (r.exit_code, r.stderr, r.exception)
    return r


def save_ids(path: Path, ids) -> Path:
    np.save(path, np.asarray(ids, np.int64))
    return path


# ------------------------------------------------------------------------------ generation


def test_prompt_file_streams_text_and_one_stats_line(f32, tok, tmp_path):
    prompt = "Tell me about the moon."
    (tmp_path / "p.txt").write_text(prompt)
    stats = tmp_path / "s.json"
    args = ["--prompt-file", "p.txt", "--max-new-tokens", "24", "--seed", "3", "--stats-json", str(stats)]
    r = subprocess.run(
        [*kt_run_cmd(), str(f32), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    m = STATS_LINE.match(lines[0])
    assert m, lines[0]
    s = json.loads(stats.read_text())
    for k in ("prompt_tokens", "prefill_tok_s", "generated_tokens", "decode_tok_s", "peak_rss_mb"):
        assert isinstance(s[k], int | float), k
    assert s["prompt_ids"] == tok.encode_chat([{"role": "user", "content": prompt}])
    assert int(m[1]) == s["prompt_tokens"] == len(s["prompt_ids"])
    assert int(m[3]) == s["generated_tokens"] == len(s["output_ids"])
    assert 1 <= len(s["output_ids"]) <= 24
    assert int(m[5]) == round(s["peak_rss_mb"]) and s["peak_rss_mb"] > 0
    assert float(m[4]) == pytest.approx(s["decode_tok_s"], abs=0.01)
    # stdout is the streamed text (bytes of an unfinished character at the very end are not shown)
    d = StreamDecoder(tok, skip={tok.eos_id})
    assert r.stdout == "".join(d.push(i) for i in s["output_ids"]) + "\n"
    print(f"\nkt-run --prompt-file: {lines[0]}")


def test_text_is_written_per_token(f32, tmp_path, monkeypatch):
    writes: list[str] = []
    orig = cli._ThinkPainter.__call__

    def spy(self, delta):
        writes.append(delta)
        orig(self, delta)

    monkeypatch.setattr(cli._ThinkPainter, "__call__", spy)
    ids = save_ids(tmp_path / "ids.npy", [0, 5, 17, 300, 1000])
    r = ok(kt_run(f32, "--prompt-ids", ids, "--temperature", "0", "--max-new-tokens", "12", "--ignore-eos"))
    assert len(writes) > 1 and r.stdout == "".join(writes) + "\n"


def test_score_logits_equal_engine_and_transformers(f32, tiny_dir, tmp_path):
    ids = torch.randint(0, 4096, (70,), generator=torch.Generator().manual_seed(99))
    out = tmp_path / "logits.npy"
    r = ok(kt_run(f32, "--score", save_ids(tmp_path / "ids.npy", ids), "--logits-out", out))
    assert "scored 70 positions" in r.stderr
    got = np.load(out)
    assert got.dtype == np.float32 and got.shape == (70, 4096)
    assert np.array_equal(got, Engine(f32).score(ids.tolist()))
    diff = compare(torch.from_numpy(got), hf_logits(oracle_for(tiny_dir), ids), TOL)
    print(f"\nkt-run --score vs transformers: max |diff| = {diff:.3g} (equal to Engine.score)")


def test_stop_string_cuts_the_text(f32, tmp_path):
    ids = save_ids(tmp_path / "ids.npy", [0, 11, 222, 3333, 44, 555])
    base = ["--prompt-ids", ids, "--temperature", "0", "--max-new-tokens", "24", "--ignore-eos"]
    full = ok(kt_run(f32, *base)).stdout[:-1]
    assert len(full) >= 8, repr(full)
    # a stop string starting mid-text, at its first occurrence
    at = next(i for i in range(len(full) // 2, len(full) - 2) if full.find(full[i : i + 2]) == i)
    stop = full[at : at + 2]
    r = ok(kt_run(f32, *base, "--stop", stop, "--stats-json", tmp_path / "s.json"))
    assert r.stdout == full[:at] + "\n"
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["finish_reason"] == "stop" and len(s["output_ids"]) < 24
    # streamed pieces never show text past the stop, even when the stop spans tokens
    pieces: list[str] = []
    gen = Engine(f32).generate(
        np.load(ids).tolist(), SamplingParams(temperature=0), 24, stop=[stop], ignore_eos=True, on_text=pieces.append
    )
    assert "".join(pieces) == gen.text == full[:at]


def test_stop_prefix_held_back():
    assert _stop_prefix_len("abc", ["cde"]) == 1
    assert _stop_prefix_len("abcd", ["cde", "bcdx"]) == 3
    assert _stop_prefix_len("abc", ["xyz", ""]) == 0
    assert _stop_prefix_len("abc", ["c"]) == 0  # a whole stop string is cut, not held back


def test_seed_reproducible_and_seeds_differ(f32, tmp_path):
    ids = save_ids(tmp_path / "ids.npy", [0, 42, 43, 44])

    def sample(seed: int) -> list[int]:
        out = tmp_path / f"s{seed}.json"
        args = ["--prompt-ids", ids, "--temperature", "1.0", "--max-new-tokens", "16", "--ignore-eos"]
        ok(kt_run(f32, *args, "--seed", seed, "--stats-json", out))
        return json.loads(out.read_text())["output_ids"]

    a, b, c = sample(7), sample(7), sample(8)
    assert a == b
    assert a != c


def test_interactive_chat_answers_twice_and_keeps_history(f32, tok, monkeypatch):
    calls: list[tuple[list[int], str]] = []
    orig = Engine.generate

    def spy(self, prompt_ids, *a, **kw):
        gen = orig(self, prompt_ids, *a, **kw)
        calls.append((list(prompt_ids), gen.text))
        return gen

    monkeypatch.setattr(Engine, "generate", spy)
    r = ok(kt_run(f32, "--temperature", "0", "--max-new-tokens", "8", input="Hello there!\nAnd then?\n"))
    assert len(calls) == 2
    assert sum(bool(STATS_LINE.match(x)) for x in r.stderr.splitlines()) == 2
    (p1, a1), (p2, a2) = calls
    u1, u2 = {"role": "user", "content": "Hello there!"}, {"role": "user", "content": "And then?"}
    assert p1 == tok.encode_chat([u1])
    assert p2 == tok.encode_chat([u1, {"role": "assistant", "content": a1}, u2])
    assert p2[: len(p1)] == p1 and len(p2) > len(p1) + 2  # the first turn is in the second prompt
    assert a1 in r.stdout and a2 in r.stdout


# ------------------------------------------------------------------------------ bad input


@pytest.fixture(scope="module")
def q4k(packs) -> Path:
    return packs("tiny-Q4_K.gguf", target="cpu")


def _major2(folder: Path) -> str:
    d = json.loads((folder / "manifest.json").read_text())
    d["format_version"] = "2.0"
    (folder / "manifest.json").write_text(json.dumps(d))
    return "major 2"


def _missing(folder: Path) -> str:
    (folder / "cpu/blk.2.node0.bin").unlink()
    return "cpu/blk.2.node0.bin"


def _short(folder: Path) -> str:
    shard = folder / "cpu/blk.1.node0.bin"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 4096)
    return "cpu/blk.1.node0.bin"


def _flipped(folder: Path) -> str:
    p = mf.load(folder).tensor("blk.1.ffn_up_exps.weight").pieces[0]
    with open(folder / p.file, "r+b") as f:
        f.seek(p.offset + 100)
        b = f.read(1)
        f.seek(p.offset + 100)
        f.write(bytes([b[0] ^ 0xFF]))
    return "checksum"


def error_line(r: Result, *needles: str) -> str:
    assert r.exit_code != 0
    assert isinstance(r.exception, SystemExit), r.exception  # no uncaught exception
    assert "Traceback" not in r.stderr + r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kt-run: error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "damage,verify",
    [(_major2, False), (_missing, False), (_short, False), (_missing, True), (_short, True), (_flipped, True)],
    ids=["major2", "missing", "short", "missing-verify", "short-verify", "flip-verify"],
)
def test_bad_folder_one_error_line(q4k, tmp_path, damage, verify):
    folder = tmp_path / "packed"
    shutil.copytree(q4k, folder)
    needle = damage(folder)
    ids = save_ids(tmp_path / "ids.npy", [0, 1, 2])
    args = ["--prompt-ids", ids, "--max-new-tokens", "2", *(["--verify"] if verify else [])]
    print(f"\n{damage.__name__} verify={verify}: {error_line(kt_run(folder, *args), needle)}")


def test_flipped_byte_found_only_with_verify(q4k, tmp_path):
    folder = tmp_path / "packed"
    shutil.copytree(q4k, folder)
    _flipped(folder)
    ids = save_ids(tmp_path / "ids.npy", [0, 1, 2])
    ok(kt_run(folder, "--prompt-ids", ids, "--max-new-tokens", "2"))  # sizes are right
    error_line(kt_run(folder, "--prompt-ids", ids, "--max-new-tokens", "2", "--verify"), "checksum")


def _ids_2d(p: Path) -> None:
    np.save(p, np.zeros((2, 3), np.int64))


def _ids_float(p: Path) -> None:
    np.save(p, np.array([0.0, 1.5, 2.0]))


def _not_npy(p: Path) -> None:
    p.write_text("1 2 3\n")


def _outside_vocab(p: Path) -> None:
    np.save(p, np.array([0, 5, 4096], np.int64))


def _negative(p: Path) -> None:
    np.save(p, np.array([0, -1, 5], np.int32))


@pytest.mark.parametrize(
    "make,needle",
    [
        (_ids_2d, "1-D integer"),
        (_ids_float, "1-D integer"),
        (_not_npy, "cannot read"),
        (_outside_vocab, "outside the vocabulary"),
        (_negative, "outside the vocabulary"),
    ],
    ids=["2d", "float", "not-npy", "outside-vocab", "negative"],
)
def test_bad_prompt_ids_one_error_line(f32, tmp_path, make, needle):
    path = tmp_path / "ids.npy"
    make(path)
    print(f"\n{make.__name__}: {error_line(kt_run(f32, '--prompt-ids', path), needle)}")


def test_prompt_longer_than_ctx(f32, tmp_path):
    ids = save_ids(tmp_path / "ids.npy", list(range(40)))
    error_line(kt_run(f32, "--prompt-ids", ids, "--ctx-size", "16"), "--ctx-size 16")
    (tmp_path / "p.txt").write_text("word " * 40)
    error_line(kt_run(f32, "--prompt-file", tmp_path / "p.txt", "--ctx-size", "16"), "--ctx-size 16")


def test_real_process_error_has_no_traceback(q4k, tmp_path):
    folder = tmp_path / "packed"
    shutil.copytree(q4k, folder)
    _short(folder)
    (tmp_path / "p.txt").write_text("hi")
    r = subprocess.run(
        [*kt_run_cmd(), str(folder), "--prompt-file", str(tmp_path / "p.txt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("kt-run: error: ") and r.stderr.count("\n") == 1, r.stderr
