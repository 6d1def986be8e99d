"""Bad input to kt-convert / kt-inspect: one clear line naming the file, a non-zero exit, and no
output folder that looks complete (no `manifest.json` anywhere under the output name).

Corrupt GGUFs are made from the project's tiny model by editing bytes of the header, so each test
breaks exactly one thing.
"""

from __future__ import annotations

import json
import resource
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ktpack.convert.writer import partial_dir


def kt_convert(*args: str, preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ktpack.convert.cli", *map(str, args), "-q"],
        capture_output=True, text=True, timeout=300, preexec_fn=preexec,
    )  # fmt: skip


def assert_refused(r: subprocess.CompletedProcess, out: Path, *needles: str) -> None:
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("kt-convert: error")]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    assert not (out / "manifest.json").exists()
    assert not (partial_dir(out) / "manifest.json").exists()


def tensor_info_offset(data: bytes, name: str) -> int:
    """Byte offset of a tensor-table entry (its u64 name length) in a GGUF header."""
    key = struct.pack("<Q", len(name)) + name.encode()
    pos = data.find(key)
    assert pos > 0, name
    return pos


def patch_tensor(src: Path, dst: Path, name: str, *, ttype: int | None = None, ne1: int | None = None) -> None:
    data = bytearray(src.read_bytes())
    pos = tensor_info_offset(data, name) + 8 + len(name)
    nd = struct.unpack_from("<I", data, pos)[0]
    if ne1 is not None:
        struct.pack_into("<Q", data, pos + 4 + 8, ne1)
    if ttype is not None:
        struct.pack_into("<I", data, pos + 4 + 8 * nd, ttype)
    dst.write_bytes(bytes(data))


@pytest.fixture
def q8(tiny_dir) -> Path:
    return tiny_dir / "tiny-Q8_0.gguf"


def test_truncated_file(q8, tmp_path):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(q8.read_bytes()[: q8.stat().st_size // 2])
    r = kt_convert(bad, "-o", tmp_path / "out")
    assert_refused(r, tmp_path / "out", "cut.gguf", "truncated")


def test_truncated_inside_header(q8, tmp_path):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(q8.read_bytes()[:1000])
    assert_refused(kt_convert(bad, "-o", tmp_path / "out"), tmp_path / "out", "cut.gguf", "truncated")


def test_bad_magic(q8, tmp_path):
    bad = tmp_path / "magic.gguf"
    bad.write_bytes(b"GGUX" + q8.read_bytes()[4:])
    assert_refused(kt_convert(bad, "-o", tmp_path / "out"), tmp_path / "out", "magic.gguf", "not a GGUF file")


def test_unread_version(q8, tmp_path):
    bad = tmp_path / "v9.gguf"
    data = bytearray(q8.read_bytes())
    struct.pack_into("<I", data, 4, 9)
    bad.write_bytes(bytes(data))
    assert_refused(kt_convert(bad, "-o", tmp_path / "out"), tmp_path / "out", "v9.gguf", "GGUF version 9")


def test_other_architecture(tmp_path):
    import gguf

    path = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = kt_convert(path, "-o", tmp_path / "out")
    assert_refused(r, tmp_path / "out", "model.gguf: architecture 'llama' is not supported (ktpack reads deepseek2)")


def test_unknown_quant_type(q8, tmp_path):
    bad = tmp_path / "type.gguf"
    patch_tensor(q8, bad, "blk.1.ffn_up_exps.weight", ttype=99)
    r = kt_convert(bad, "-o", tmp_path / "out")
    assert_refused(r, tmp_path / "out", "type.gguf", "blk.1.ffn_up_exps.weight", "unknown ggml type id 99")


def test_type_no_layout_takes(tiny_dir, tmp_path):
    """I32 (id 26) has F32's geometry, so only the type changes: a known GGUF type that no layout
    stores and that cannot be re-quantized (it holds integers, not weights)."""
    bad = tmp_path / "i32.gguf"
    patch_tensor(tiny_dir / "tiny-F32.gguf", bad, "blk.1.ffn_up_exps.weight", ttype=26)
    for layout in ("ggml", "amx-int4"):
        r = kt_convert(bad, "-o", tmp_path / "out", "--cpu-layout", layout)
        assert_refused(r, tmp_path / "out", "blk.1.ffn_up_exps.weight", "type I32 is not supported")


def test_byte_size_disagrees_with_shape(q8, tmp_path):
    bad = tmp_path / "size.gguf"
    patch_tensor(q8, bad, "blk.0.attn_q_a.weight", ne1=10_000)
    r = kt_convert(bad, "-o", tmp_path / "out")
    assert_refused(r, tmp_path / "out", "size.gguf", "blk.0.attn_q_a.weight")


def test_missing_split_part(tiny_dir, tmp_path):
    for p in (tiny_dir / "split").glob("*.gguf"):
        shutil.copy(p, tmp_path / p.name)
    (tmp_path / "tiny-Q8_0-00002-of-00003.gguf").unlink()
    r = kt_convert(tmp_path / "tiny-Q8_0-00001-of-00003.gguf", "-o", tmp_path / "out")
    assert_refused(r, tmp_path / "out", "tiny-Q8_0-00001-of-00003.gguf", "missing tiny-Q8_0-00002-of-00003.gguf")


def test_existing_output_needs_force(q8, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = kt_convert(q8, "-o", out)
    assert r.returncode != 0 and "output exists; pass --force" in r.stderr
    assert (out / "keep.txt").read_text() == "mine"
    r = kt_convert(q8, "-o", out, "--force")
    assert r.returncode == 0, r.stderr
    assert (out / "manifest.json").exists() and not (out / "keep.txt").exists()


def test_partial_output_needs_resume_or_force(q8, tmp_path):
    out = tmp_path / "out"
    partial_dir(out).mkdir()
    r = kt_convert(q8, "-o", out)
    assert r.returncode != 0 and "--resume" in r.stderr and "--force" in r.stderr


def _limit_file_size() -> None:
    # A write error as a full disk gives it: writes past 2 MB fail (EFBIG) instead of killing us.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))


def test_write_error(tiny_dir, tmp_path):
    out = tmp_path / "out"
    r = kt_convert(tiny_dir / "tiny-F32.gguf", "-o", out, "--target", "cpu", preexec=_limit_file_size)
    assert_refused(r, out, "write failed")
    assert not out.exists()


def test_wrong_manifest_major(q8, tmp_path):
    out = tmp_path / "out"
    assert kt_convert(q8, "-o", out).returncode == 0
    m = json.loads((out / "manifest.json").read_text())
    m["format_version"] = "2.0"
    (out / "manifest.json").write_text(json.dumps(m))
    r = subprocess.run([sys.executable, "-m", "ktpack.convert.inspect_cli", str(out)], capture_output=True, text=True)
    assert r.returncode == 1
    assert "format version 2.0 (major 2); this ktpack reads major 1" in r.stderr


def test_verify_finds_corruption(q8, tmp_path):
    out = tmp_path / "out"
    assert kt_convert(q8, "-o", out, "--target", "cpu").returncode == 0
    m = json.loads((out / "manifest.json").read_text())
    t = next(t for t in m["tensors"] if t["name"] == "blk.1.ffn_down_exps.weight")
    p = t["pieces"][0]
    with open(out / p["file"], "r+b") as f:
        f.seek(p["offset"] + 100)
        b = f.read(1)
        f.seek(p["offset"] + 100)
        f.write(bytes([b[0] ^ 0xFF]))
    insp = [sys.executable, "-m", "ktpack.convert.inspect_cli", str(out), "--verify"]
    r = subprocess.run(insp, capture_output=True, text=True)
    assert r.returncode == 1
    assert p["file"] in r.stderr and "blk.1.ffn_down_exps.weight" in r.stderr
    # a short shard is caught by its size
    with open(out / p["file"], "r+b") as f:
        f.truncate(p["offset"])
    r = subprocess.run(insp, capture_output=True, text=True)
    assert r.returncode == 1 and "bytes, the manifest says" in r.stderr


def test_missing_source(tmp_path):
    r = kt_convert(tmp_path / "nope.gguf", "-o", tmp_path / "out")
    assert_refused(r, tmp_path / "out", "nope.gguf", "no such file")
