"""kt-convert on the project's own test GGUFs: coverage, exactness, NUMA, determinism, resume.

What can go wrong: a tensor silently missing from the manifest; bytes reordered so that a tensor
no longer dequantizes to the source values; a NUMA slice that drops or repeats columns; output
that depends on timing or dictionary order; a resumed conversion that differs from a clean one.
The oracle for values is gguf-py (`GGUFReader` + `gguf.quants.dequantize`), which nobody here wrote.
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors import safe_open

from ktpack.convert.gguf_source import open_gguf
from ktpack.convert.plan import ConvertOptions, make_plan
from ktpack.convert.writer import partial_dir, write
from ktpack.layouts import amx, marlin
from ktpack.layouts import ids as L
from ktpack.layouts import manifest as mf
from ktpack.layouts.tensor_io import tensor_values, verify

GGUF_VARIANTS = [
    "tiny-F32.gguf", "tiny-BF16.gguf", "tiny-Q8_0.gguf", "tiny-Q4_K.gguf", "tiny-Q5_K.gguf",
    "tiny-Q6_K.gguf", "tiny-Q4_K_M.gguf", "tiny-legacy-F32.gguf", "tiny-legacy-Q8_0.gguf",
    "tiny-legacy-Q4_K.gguf", "split/tiny-Q8_0-00001-of-00003.gguf",
]  # fmt: skip


def source_values(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF (or split set) dequantized by gguf-py, in numpy shape."""
    from ktpack.convert.gguf_source import split_set

    out = {}
    for part in split_set(path):
        r = gguf.GGUFReader(part)
        for t in r.tensors:
            shape = [int(x) for x in reversed(t.shape)]
            if t.tensor_type == gguf.GGMLQuantizationType.BF16:
                v = (t.data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
            else:
                v = gguf.quants.dequantize(t.data, t.tensor_type)
            out[t.name] = np.asarray(v, np.float32).reshape(shape)
    return out


def convert(src: Path, out: Path, **opts) -> mf.Manifest:
    plan = make_plan(open_gguf(src), ConvertOptions(**opts))
    write(plan, out, progress=False)
    return mf.load(out)


def lossy_bound(layout: str, params: dict, src: np.ndarray) -> np.ndarray:
    """Elementwise bound of a lossy layout, from the layout module's own derivation."""
    if layout == L.MARLIN_INT4:
        return marlin.error_bound(src, params["group_size"])
    if layout == L.PLAIN and params["dtype"] == "bf16":
        return plain_bf16_bound(src)
    kind = {L.AMX_BF16: "bf16", L.AMX_INT8: "int8", L.AMX_INT4: "int4"}[layout]
    return amx.error_bound(kind, src, **params)


def plain_bf16_bound(x: np.ndarray) -> np.ndarray:
    # plain bf16 rounds exactly as amx_bf16_v1 does (nearest even, 8-bit significand)
    return amx.error_bound("bf16", x)


def check_against_source(folder: Path, m: mf.Manifest, ref: dict[str, np.ndarray]) -> None:
    assert sorted(t.name for t in m.tensors) == sorted(ref), "every source tensor appears exactly once"
    for t in m.tensors:
        got = tensor_values(folder, t)
        want = ref[t.name]
        assert got.shape == want.shape, t.name
        lossless = (
            t.layout in (L.GGML_ROWS, L.GGML_LANES)
            or (t.layout == L.PLAIN and t.params["dtype"] == "f32")
            or (t.layout == L.AMX_BF16 and t.source_dtype == "BF16")  # bf16 values kept as they are
        )
        if lossless:
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), f"{t.name} ({t.layout}) not exact"
        else:
            err = np.abs(got - want)
            bound = lossy_bound(t.layout, t.params, want)
            assert np.all(err <= bound), f"{t.name} ({t.layout}): max excess {(err - bound).max()}"


@pytest.mark.parametrize("variant", GGUF_VARIANTS)
def test_every_tensor_exact_cpu_target(tiny_dir, tmp_path, variant):
    src = tiny_dir / variant
    m = convert(src, tmp_path / "p", target="cpu")
    check_against_source(tmp_path / "p", m, source_values(src))
    assert not list(verify(tmp_path / "p", m))


@pytest.mark.parametrize("variant", ["tiny-F32.gguf", "tiny-Q4_K_M.gguf", "tiny-legacy-Q8_0.gguf"])
@pytest.mark.parametrize(
    "opts",
    [
        {"target": "gpu"},
        {"target": "gpu", "gpu_layout": "bf16"},
        {"target": "cpu", "cpu_layout": "amx-int4"},
        {"target": "cpu", "cpu_layout": "amx-int4", "group_size": 32},
        {"target": "cpu", "cpu_layout": "amx-int8"},
        {"target": "gpu", "cpu_layout": "amx-bf16", "numa_nodes": 2},
    ],
    ids=lambda o: "-".join(f"{v}" for v in o.values()),
)
def test_every_tensor_within_bound_lossy(tiny_dir, tmp_path, variant, opts):
    src = tiny_dir / variant
    m = convert(src, tmp_path / "p", **opts)
    check_against_source(tmp_path / "p", m, source_values(src))
    layouts = {t.layout for t in m.tensors}
    if opts["target"] == "gpu" and opts.get("gpu_layout", "marlin") == "marlin":
        assert L.MARLIN_INT4 in layouts
    if opts.get("cpu_layout", "ggml") != "ggml":
        assert L.CPU_LAYOUT_CHOICES[opts["cpu_layout"]] in layouts


def test_gpu_files_are_plain_safetensors(tiny_dir, tmp_path):
    m = convert(tiny_dir / "tiny-Q4_K_M.gguf", tmp_path / "p", target="gpu")
    for f in m.files:
        if f.kind != "safetensors":
            continue
        with safe_open(tmp_path / "p" / f.path, "np") as st:
            keys = set(st.keys())
            for t in m.tensors:
                for p in t.pieces:
                    if p.file == f.path:
                        assert p.key in keys
                        arr = st.get_tensor(p.key)
                        assert arr.nbytes == p.nbytes


@pytest.mark.parametrize("nodes", range(1, 9))
@pytest.mark.parametrize("variant", ["tiny-Q8_0.gguf", "tiny-BF16.gguf", "tiny-Q4_K.gguf"])
def test_numa_slices_join_to_unsplit(tiny_dir, tmp_path, variant, nodes):
    src = tiny_dir / variant
    m = convert(src, tmp_path / "p", target="cpu", numa_nodes=nodes)
    ref = source_values(src)
    experts = [t for t in m.tensors if t.role == "routed_expert"]
    assert experts
    for t in experts:
        assert len(t.pieces) == nodes and [p.node for p in t.pieces] == list(range(nodes))
        assert sum(b[1] - b[0] for b in t.split_bounds) == t.shape[t.split_axis]
        for p in t.pieces:
            assert p.file.endswith(f".node{p.node}.bin") and p.offset % L.SHARD_ALIGN == 0
        assert np.array_equal(tensor_values(tmp_path / "p", t), ref[t.name])
    if nodes > 1 and variant != "tiny-Q4_K.gguf":  # Q4_K's 256-wide blocks leave tiny's I = 256 uncut
        assert all(sum(1 for p in t.pieces if p.nbytes) > 1 for t in experts)


def test_manifest_matches_schema(tiny_dir, tmp_path):
    import json

    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is a test extra")
    convert(tiny_dir / "tiny-Q4_K_M.gguf", tmp_path / "p", target="gpu", numa_nodes=2)
    schema = json.loads((Path(L.__file__).parent / "manifest.schema.json").read_text())
    jsonschema.validate(json.loads((tmp_path / "p" / "manifest.json").read_text()), schema)


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_deterministic(tiny_dir, tmp_path):
    for name in ("a", "b"):
        convert(tiny_dir / "tiny-Q4_K_M.gguf", tmp_path / name, target="gpu", numa_nodes=3)
    a, b = tree_digest(tmp_path / "a"), tree_digest(tmp_path / "b")
    assert a == b and len(a) > 5


def run_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ktpack.convert.cli", *args], capture_output=True, text=True, timeout=300, **kw
    )


def test_kill_and_resume_gives_same_bytes(tiny_dir, tmp_path):
    src = tiny_dir / "tiny-F32.gguf"
    args = [str(src), "--target", "gpu", "--numa-nodes", "2", "-q"]
    assert run_cli(*args, "-o", str(tmp_path / "clean")).returncode == 0
    out = tmp_path / "killed"
    journal = partial_dir(out) / "journal.jsonl"
    killed_mid_way = False
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-m", "ktpack.convert.cli", *args, "-o", str(out), "--force"])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if journal.exists() and journal.read_text().count("\n") >= 8:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait()
        if proc.returncode == -signal.SIGKILL and not out.exists():
            killed_mid_way = True
            break
        import shutil

        shutil.rmtree(out, ignore_errors=True)
    assert killed_mid_way, "could not kill the conversion mid-way"
    assert not (partial_dir(out) / "manifest.json").exists()
    r = run_cli(*args, "-o", str(out), "--resume")
    assert r.returncode == 0, r.stderr
    assert tree_digest(out) == tree_digest(tmp_path / "clean")


def test_cli_plan_writes_nothing(tiny_dir, tmp_path):
    out = tmp_path / "p"
    r = run_cli(str(tiny_dir / "tiny-Q4_K_M.gguf"), "--plan", "--numa-nodes", "2", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "node0" in r.stdout and "node1" in r.stdout and "gpu" in r.stdout
    assert not out.exists() and not partial_dir(out).exists()


def test_plan_figures_match_hand_computation(tiny_dir):
    """GPU bytes of a Marlin plan: int32 [K/16, 2N] + f16 [K/128, N] per linear, f32 per small tensor."""
    src = open_gguf(tiny_dir / "tiny-Q8_0.gguf")
    plan = make_plan(src, ConvertOptions(target="gpu", gpu_layout="marlin"))
    want_gpu = 0
    for t in plan.manifest.tensors:
        if t.placement != "gpu":
            continue
        *lead, n, k = t.shape if len(t.shape) > 1 else (1, t.shape[0])
        mats = int(np.prod(lead)) if lead else 1
        if t.layout == L.MARLIN_INT4:
            want_gpu += mats * (k // 16 * 2 * n * 4 + k // 128 * n * 2)
        elif t.layout == L.PLAIN:
            want_gpu += int(np.prod(t.shape)) * (4 if t.params["dtype"] == "f32" else 2)
    assert plan.totals()["gpu"] == want_gpu


def test_budget_refused_with_numbers(tiny_dir, tmp_path):
    r = run_cli(str(tiny_dir / "tiny-F32.gguf"), "--plan", "--gpu-mem", "0.001")
    assert r.returncode == 2
    assert "plan does not fit" in r.stderr and "GiB" in r.stderr and "--gpu-mem is 0.001 GiB" in r.stderr


def test_cli_convert_inspect_extract(tiny_dir, tmp_path):
    src = tiny_dir / "tiny-Q4_K_M.gguf"
    out = tmp_path / "p"
    r = run_cli(str(src), "-o", str(out), "--target", "cpu")
    assert r.returncode == 0, r.stderr
    assert "kt-convert:" in r.stderr and "MB/s" in r.stderr
    insp = [sys.executable, "-m", "ktpack.convert.inspect_cli", str(out)]
    r = subprocess.run(insp, capture_output=True, text=True)
    assert r.returncode == 0 and "blk.1.ffn_up_exps.weight" in r.stdout
    r = subprocess.run([*insp, "--json"], capture_output=True, text=True)
    assert r.returncode == 0 and '"format": "ktpack"' in r.stdout
    r = subprocess.run([*insp, "--verify"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ref = source_values(src)
    r = subprocess.run([*insp, "--extract", "blk.2.ffn_down_exps.weight", "--out", str(tmp_path / "d.npy")])
    assert r.returncode == 0
    assert np.array_equal(np.load(tmp_path / "d.npy"), ref["blk.2.ffn_down_exps.weight"])
    r = subprocess.run([*insp, "--extract", "all", "--out", str(tmp_path / "all")])
    assert r.returncode == 0
    assert sorted(p.stem for p in (tmp_path / "all").glob("*.npy")) == sorted(ref)


def test_tokenizer_written(tiny_dir, tmp_path):
    from tokenizers import Tokenizer

    m = convert(tiny_dir / "tiny-Q8_0.gguf", tmp_path / "p", target="cpu")
    tok = Tokenizer.from_file(str(tmp_path / "p" / "tokenizer.json"))
    hf = Tokenizer.from_file(str(tiny_dir / "hf" / "tokenizer.json"))
    text = "Hello world 123 的 def f(x):\n    return x"
    assert tok.encode(text).ids == hf.encode(text).ids
    assert any(f.path == "tokenizer_config.json" for f in m.files)


def test_missing_group_and_gating_keys_fall_back_and_say_so(tiny_dir, tmp_path):
    """Older llama.cpp files lack expert_group_count/expert_group_used_count/expert_gating_func: the
    reader falls back to DeepSeek-V3's values (8/4 groups when they divide the experts, sigmoid) and
    records it in the manifest's notes."""
    from ktpack.convert.synth.writer import write_gguf

    keys = frozenset(f"deepseek2.{k}" for k in ("expert_group_count", "expert_group_used_count", "expert_gating_func"))
    (src,) = write_gguf(tiny_dir / "hf", tmp_path / "old-Q8_0.gguf", "Q8_0", legacy=True, omit_keys=keys)
    m = convert(src, tmp_path / "p", target="cpu")
    assert m.config.n_group == 8 and m.config.topk_group == 4 and m.config.scoring_func == "sigmoid"
    notes = " ".join(m.notes)
    for k in keys:
        assert f"{k} is missing" in notes
    assert m.config.attention_layout == "kv_b"
    check_against_source(tmp_path / "p", m, source_values(src))


def test_chunked_packing_gives_the_same_bytes(tiny_dir, tmp_path, monkeypatch):
    """Streaming in small chunks (as a 600 GB model is) writes the very bytes of one-shot packing."""
    from ktpack.convert import produce

    opts = {"target": "gpu", "cpu_layout": "amx-int4", "numa_nodes": 2}
    convert(tiny_dir / "tiny-Q4_K_M.gguf", tmp_path / "big", **opts)
    convert(tiny_dir / "tiny-Q4_K_M.gguf", tmp_path / "bigcpu", target="cpu", cpu_layout="amx-int8")
    monkeypatch.setattr(produce, "CHUNK_VALUES", 4096)
    convert(tiny_dir / "tiny-Q4_K_M.gguf", tmp_path / "small", **opts)
    convert(tiny_dir / "tiny-Q4_K_M.gguf", tmp_path / "smallcpu", target="cpu", cpu_layout="amx-int8")
    assert tree_digest(tmp_path / "big") == tree_digest(tmp_path / "small")
    assert tree_digest(tmp_path / "bigcpu") == tree_digest(tmp_path / "smallcpu")


def test_tall_marlin_matrix_is_placed_in_bounded_chunks(tiny_dir, monkeypatch):
    """A K chunk of a tall matrix (the output head; R1's is 129280 rows: 16.5 MB of qweight per K
    chunk) is handed to the writer in N slices placed at their offsets, so no chunk grows with the
    row count; the placed chunks tile each piece exactly once (test above: the same bytes)."""
    from ktpack.convert import produce

    monkeypatch.setattr(produce, "CHUNK_VALUES", 4096)
    plan = make_plan(open_gguf(tiny_dir / "tiny-Q4_K_M.gguf"), ConvertOptions(target="gpu"))
    pt = next(p for p in plan.tensors if p.entry.name == "output.weight")
    assert pt.entry.layout == L.MARLIN_INT4 and pt.entry.shape[0] * 256 > 4 * 4096
    chunks = list(produce.produce(pt))
    assert all(c.at is not None for c in chunks)
    assert max(c.data.nbytes for c in chunks) <= 4 * 4096
    for i, piece in enumerate(pt.entry.pieces):
        spans = sorted((c.at, c.at + c.data.nbytes) for c in chunks if c.piece == i)
        assert spans[0][0] == 0 and spans[-1][1] == piece.nbytes
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
