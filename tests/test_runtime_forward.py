"""The runtime's forward against transformers' DeepseekV3ForCausalLM (the oracle), on the tiny model.

What can go wrong: a DeepSeek detail done the common-but-wrong way (RoPE pairing, YaRN scale,
routing bias, group limit, routed scaling, shared expert), the absorbed MLA orientation of
k_b/v_b, a KV cache that leaks across positions or chunks, NUMA slices summed wrongly, the legacy
kv_b split, and a loader that accepts a damaged folder. Each is either compared with transformers
(1e-4 on logits, top-1 equal everywhere) or broken on purpose to show the bound catches it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from oracle import Packs, compare, hf_logits, oracle_for, session_packs

from ktpack.layouts import manifest as mf
from ktpack.layouts.errors import ManifestError
from ktpack.layouts.tensor_io import tensor_values
from ktpack.runtime.model import DeepseekV3Model, KVCache, linear
from ktpack.runtime.weights import load_pack

N_TOKENS = 80
CTX = 96


@pytest.fixture(scope="module")
def packs(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Packs:
    return session_packs(tmp_path_factory, tiny_dir)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 4096, (N_TOKENS,), generator=torch.Generator().manual_seed(1234))


@pytest.fixture(scope="module")
def hf_ref(tiny_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    return hf_logits(oracle_for(tiny_dir), ids)


def run(folder: Path, ids: torch.Tensor, **kw) -> torch.Tensor:
    model = DeepseekV3Model(load_pack(folder), **kw)
    return model.forward(ids, 0, KVCache(model.config, CTX))


# ------------------------------------------------------------------------------ vs transformers


def test_f32_cpu_pack_matches_transformers(tiny_dir, packs, ids, hf_ref, record_property):
    folder = packs("tiny-F32.gguf", target="cpu")
    diff = compare(run(folder, ids), hf_ref)
    record_property("max_abs_diff", diff)
    print(f"\nF32 --target cpu vs transformers: max |diff| = {diff:.3g}")


@pytest.mark.parametrize(
    "src,opts",
    [
        ("tiny-F32.gguf", {"target": "gpu"}),
        ("tiny-Q8_0.gguf", {"target": "gpu", "cpu_layout": "amx-int8", "numa_nodes": 3}),
        ("tiny-Q4_K_M.gguf", {"target": "cpu", "numa_nodes": 2}),
        ("tiny-legacy-Q8_0.gguf", {"target": "gpu", "cpu_layout": "amx-int4"}),
    ],
    ids=["F32-gpu-marlin", "Q8_0-amx_int8-3nodes", "Q4_K_M-cpu-2nodes", "legacy-Q8_0-gpu-amx_int4"],
)
def test_pack_matches_transformers_on_pack_weights(tiny_dir, packs, ids, src, opts):
    """Lossy layouts: transformers runs on exactly the weights the pack represents."""
    folder = packs(src, **opts)
    want = hf_logits(oracle_for(tiny_dir, folder), ids)
    diff = compare(run(folder, ids), want)
    print(f"\n{src} {opts} vs transformers on the pack's weights: max |diff| = {diff:.3g}")


# ------------------------------------------------------------------------------ KV cache


def test_decode_and_chunked_prefill_equal_one_shot(tiny_dir, packs, ids):
    folder = packs("tiny-F32.gguf", target="cpu")
    model = DeepseekV3Model(load_pack(folder))
    full = model.forward(ids, 0, KVCache(model.config, CTX))
    worst = {}
    for chunk in (1, 7, 64):
        cache = KVCache(model.config, CTX)
        parts = [model.forward(ids[s : s + chunk], s, cache) for s in range(0, N_TOKENS, chunk)]
        got = torch.cat(parts)
        worst[chunk] = (got - full).abs().max().item()
        assert worst[chunk] <= 1e-5, (chunk, worst[chunk])
        assert torch.equal(got.argmax(-1), full.argmax(-1))
    # static window (whole cache, masked): the CUDA-graph shaped path gives the same values
    model.static_kv = True
    cache = KVCache(model.config, CTX)
    got = torch.cat([model.forward(ids[s : s + 1], s, cache) for s in range(N_TOKENS)])
    worst["static"] = (got - full).abs().max().item()
    assert worst["static"] <= 1e-5
    print(f"\nchunked / decode vs one-shot: {worst}")


def test_causal_query_blocks_equal_one_block(tiny_dir, packs, ids, monkeypatch):
    """A prefill cut into query blocks (each reading only the cache rows up to its last position) gives
    the one-block result: the rows it skips are exactly the ones the causal mask zeroes."""
    from ktpack.runtime import model as model_mod

    folder = packs("tiny-F32.gguf", target="cpu")
    model = DeepseekV3Model(load_pack(folder))
    monkeypatch.setattr(model_mod, "PREFILL_Q_BLOCK", 1 << 20)
    one = model.forward(ids, 0, KVCache(model.config, CTX))
    for block in (16, 33):
        monkeypatch.setattr(model_mod, "PREFILL_Q_BLOCK", block)
        got = model.forward(ids, 0, KVCache(model.config, CTX))
        assert (got - one).abs().max().item() <= 1e-5, block


@pytest.mark.parametrize("engine", ["native", "ref"])
def test_values_from_cache_rows_equal_absorbed(tiny_dir, packs, ids, monkeypatch, engine):
    """Prefill's values with v_b applied to every cached latent row (then summed per head over v) equal the
    absorbed form (summed over latents, v_b applied per query): the same product regrouped, f32 weights."""
    from ktpack.runtime import model as model_mod

    folder = packs("tiny-F32.gguf", target="cpu")
    model = DeepseekV3Model(load_pack(folder, engine=engine))
    assert all(b.attn.v_rows is not None for b in model.blocks), "ggml rows: the stack is one matrix"
    assert ids.numel() >= model_mod.VALUES_FROM_ROWS_MIN
    rows = model.forward(ids, 0, KVCache(model.config, CTX))
    monkeypatch.setattr(model_mod, "VALUES_FROM_ROWS_MIN", 1 << 20)
    absorbed = model.forward(ids, 0, KVCache(model.config, CTX))
    assert (rows - absorbed).abs().max().item() <= 1e-4 * absorbed.abs().max().item()
    assert (rows - absorbed).abs().max().item() > 0, "the two forms should not be the same code path"


@pytest.mark.parametrize("engine", ["native", "ref"])
@pytest.mark.parametrize("cpu_layout", [None, "amx-bf16"], ids=["ggml_rows", "amx_bf16"])
def test_stacked_v_b_as_one_matrix(tiny_dir, packs, engine, cpu_layout):
    """attn_v_b [H, v, kv_lora] read as the one matrix [H*v, kv_lora] over the same bytes (what prefill's
    values-from-rows uses): its rows m*v..(m+1)*v are matrix m, bit for bit (the same kernel on the same
    weight bytes and the same activation rounding; amx_bf16: the tile blocks of the stack in flat order).
    The reference engine: the dequantized weights equal (its products go through torch, whose 2-D and
    batched paths sum in different orders)."""
    opts = {"cpu_layout": cpu_layout} if cpu_layout else {}
    model = DeepseekV3Model(load_pack(packs("tiny-F32.gguf", target="cpu", **opts), engine=engine))
    a = model.blocks[1].attn
    assert a.v_rows is not None, "the stack is one matrix"
    if engine == "ref":
        assert torch.equal(a.v_rows.weight().view(a.h, a.v, a.kv_lora), a.v_b.weight())
        return
    x = torch.randn(5, a.kv_lora, generator=torch.Generator().manual_seed(7))
    flat = linear(a.v_rows, x).view(5, a.h, a.v)
    per_head = linear(a.v_b, x[:, None, :].expand(5, a.h, a.kv_lora).contiguous())
    assert torch.equal(flat, per_head)


def test_rope_pairs_rotated(tiny_dir, packs):
    """RoPE on a query's rope part (a strided view, as q_pe is) rotates each adjacent pair by its position's
    angle: within 2 f32 roundings of the f64 rotation, on the CPU's complex-product path."""
    model = DeepseekV3Model(load_pack(packs("tiny-F32.gguf", target="cpu")))
    cache = KVCache(model.config, CTX)
    q = torch.randn(7, 4, 192, generator=torch.Generator().manual_seed(3))
    pos = torch.tensor([0, 1, 2, 5, 17, 60, 95])
    got = cache.rope.apply(q[..., 128:], pos)
    x = q[..., 128:].double().reshape(7, 4, 32, 2)
    cos, sin = cache.rope.cos[pos].double()[:, None], cache.rope.sin[pos].double()[:, None]
    want = torch.stack((x[..., 0] * cos - x[..., 1] * sin, x[..., 1] * cos + x[..., 0] * sin), -1).flatten(-2)
    size = torch.stack((x[..., 0] * cos, x[..., 1] * sin, x[..., 1] * cos, x[..., 0] * sin), -1).abs()
    bound = 2 * 2.0**-24 * size.reshape(7, 4, 32, 2, 2).sum(-1).flatten(-2)
    assert ((got.double() - want).abs() <= bound).all()
    assert (got.double() - want).abs().max() < (q[..., 128:].double() - want).abs().max()  # really rotated


def test_cache_bounds(tiny_dir, packs, ids):
    folder = packs("tiny-F32.gguf", target="cpu")
    model = DeepseekV3Model(load_pack(folder))
    with pytest.raises(ValueError, match="do not fit"):
        model.forward(ids[:10], 90, KVCache(model.config, CTX))


# ------------------------------------------------------------------------------ sensitivity

BREAKS = {
    "routing bias ignored": lambda m: setattr(m.flags, "ignore_bias", True),
    "no group limit": lambda m: setattr(m.flags, "no_group_limit", True),
    "rope half-split": lambda m: setattr(m, "rope_interleaved", False),
    "routed scaling 1.0": lambda m: setattr(m.flags, "scaling_one", True),
    "shared expert dropped": lambda m: setattr(m.flags, "drop_shared", True),
}


def test_each_broken_detail_fails_the_comparison(tiny_dir, packs, ids, hf_ref):
    folder = packs("tiny-F32.gguf", target="cpu")
    model = DeepseekV3Model(load_pack(folder))
    seen = {}
    for what, brk in BREAKS.items():
        model.flags.__init__()  # all DeepSeek details right again
        model.rope_interleaved = True
        brk(model)
        seen[what] = (model.forward(ids, 0, KVCache(model.config, CTX)) - hf_ref).abs().max().item()
    print(f"\nbroken details, max |diff| vs transformers: {seen}")
    for what, d in seen.items():
        assert d > 1e-3, f"{what}: the comparison did not notice ({d:.3g})"


# ------------------------------------------------------------------------------ layouts agree


def test_legacy_and_split_sources_agree(tiny_dir, packs, ids, hf_ref):
    cur = run(packs("tiny-F32.gguf", target="cpu"), ids)
    legacy = run(packs("tiny-legacy-F32.gguf", target="cpu"), ids)
    d_legacy = compare(legacy, cur)
    q8 = run(packs("tiny-Q8_0.gguf", target="cpu"), ids)
    split = run(packs("split/tiny-Q8_0-00001-of-00003.gguf", target="cpu"), ids)
    d_split = compare(split, q8)
    print(f"\nlegacy-F32 vs F32: {d_legacy:.3g}; split Q8_0 vs Q8_0: {d_split:.3g}")


def test_embedding_rows_match_tensor_values(tiny_dir, packs):
    for src in ("tiny-Q4_K_M.gguf", "tiny-BF16.gguf"):
        folder = packs(src, target="cpu")
        pack = load_pack(folder)
        want = tensor_values(folder, pack.entry("token_embd.weight"))
        ids = torch.tensor([0, 7, 8, 4095, 1234, 7])
        assert torch.equal(pack.embedding(ids), torch.from_numpy(want[ids.numpy()]))


# ------------------------------------------------------------------------------ memory mapping


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    pytest.skip(f"/proc/self/status has no {field}")


def test_cpu_shards_are_mapped_not_copied(tiny_dir, packs):
    folder = packs("tiny-F32.gguf", target="cpu")
    m = mf.load(folder)
    shard_bytes = sum(f.size for f in m.files if f.kind == "cpu_shard")
    before = _status_kb("RssAnon")
    pack = load_pack(folder)
    grown = (_status_kb("RssAnon") - before) * 1024
    assert grown < shard_bytes // 4, (grown, shard_bytes)
    p = pack.entry("blk.1.ffn_gate_exps.weight").pieces[0]
    view = pack.piece_bytes(p)
    assert not view.flags.writeable  # a read-only view into the shard's map, not a copy
    assert isinstance(pack._maps[p.file], np.memmap) and np.shares_memory(view, pack._maps[p.file])


# ------------------------------------------------------------------------------ bad input


def _one_line(e: pytest.ExceptionInfo, *needles: str) -> None:
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg


def test_bad_folders_refused(tiny_dir, packs, tmp_path):
    good = packs("tiny-Q4_K.gguf", target="cpu")

    major2 = tmp_path / "major2"
    shutil.copytree(good, major2)
    d = json.loads((major2 / "manifest.json").read_text())
    d["format_version"] = "2.0"
    (major2 / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError) as e:
        load_pack(major2)
    _one_line(e, "manifest.json", "major 2")

    missing = tmp_path / "missing"
    shutil.copytree(good, missing)
    (missing / "cpu/blk.2.node0.bin").unlink()
    with pytest.raises(ManifestError) as e:
        load_pack(missing)
    _one_line(e, "cpu/blk.2.node0.bin", "missing")

    short = tmp_path / "short"
    shutil.copytree(good, short)
    shard = short / "cpu/blk.1.node0.bin"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 4096)
    with pytest.raises(ManifestError) as e:
        load_pack(short)
    _one_line(e, "cpu/blk.1.node0.bin", "the manifest says")

    corrupt = tmp_path / "corrupt"
    shutil.copytree(good, corrupt)
    p = mf.load(corrupt).tensor("blk.1.ffn_up_exps.weight").pieces[0]
    with open(corrupt / p.file, "r+b") as f:
        f.seek(p.offset + 100)
        b = f.read(1)
        f.seek(p.offset + 100)
        f.write(bytes([b[0] ^ 0xFF]))
    load_pack(corrupt)  # sizes are right: only verify=True reads the bytes
    with pytest.raises(ManifestError) as e:
        load_pack(corrupt, verify=True)
    _one_line(e, p.file, "checksum")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kv_cache_memory_is_zeroed_aligned_and_writable(packs, dtype):
    """The CPU KV cache's memory (model.zeros_huge): zeros, 2 MiB-aligned when it is that big, each
    tensor its own memory, writes land where the view says, and reset() clears them."""
    from ktpack.runtime.model import HUGE_PAGE, zeros_huge

    small = zeros_huge((3, 5), dtype)
    assert small.shape == (3, 5) and small.dtype == dtype and not small.any()
    shape = (2, 700, 1024)  # 2.9 MB in f16, 5.7 MB in f32
    a, b = zeros_huge(shape, dtype), zeros_huge(shape, dtype)
    assert a.shape == shape and a.dtype == dtype and a.is_contiguous() and not a.any()
    import mmap

    if hasattr(mmap, "MADV_HUGEPAGE"):
        assert a.data_ptr() % HUGE_PAGE == 0
    a[1, 699, 1023] = 3.0
    a[0, 0, 0] = -1.0
    assert float(a.sum()) == 2.0 and not b.any()
    assert float(a.view(-1)[-1]) == 3.0 and float(a.view(-1)[0]) == -1.0

    model = DeepseekV3Model(load_pack(packs("tiny-F32.gguf", target="cpu")))
    cache = KVCache(model.config, 4096, dtype=dtype)  # > 2 MiB: the huge-page path
    assert cache.c_kv.dtype == dtype and not cache.c_kv.any() and not cache.k_pe.any()
    cache.c_kv[0, 3] = 1.0
    cache.k_pe[-1, -1] = 2.0
    cache.reset()
    assert not cache.c_kv.any() and not cache.k_pe.any()


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc/self/smaps to read VmFlags")
def test_shard_mappings_ask_for_huge_pages(packs):
    """Every CPU shard is mapped read-only and shared (VmFlags `rd`, `ms`), with MADV_HUGEPAGE (`hg`): the page
    cache may then hold it in 2 MiB folios mapped whole (runtime/weights.py)."""
    import mmap

    if not hasattr(mmap, "MADV_HUGEPAGE"):
        pytest.skip("this Python's mmap has no MADV_HUGEPAGE")
    folder = packs("tiny-Q4_K_M.gguf", target="cpu", numa_nodes=2)
    pack = load_pack(folder)
    shards = {str((folder / p).resolve()) for p in pack._maps}
    flags: dict[str, str] = {}
    cur = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and "-" in parts[0] and parts[5] in shards:
            cur = parts[5]
        elif line.startswith("VmFlags:") and cur:
            flags[cur] = line
            cur = None
    assert set(flags) == shards, "every shard should be mapped"
    for path, f in flags.items():
        words = f.split()[1:]
        assert "hg" in words, (path, f)
        assert "rd" in words and "ms" in words and "wr" not in words, (path, f)  # ms: a shared mapping


def test_kv_cache_memory_without_huge_pages(monkeypatch):
    """A kernel that refuses MADV_HUGEPAGE (THP compiled out or disabled): the same zeroed, writable memory."""
    import mmap
    import types

    from ktpack.runtime import model as model_mod

    if not hasattr(mmap, "MADV_HUGEPAGE"):
        pytest.skip("this Python's mmap has no MADV_HUGEPAGE: torch.zeros is used anyway")

    class Refusing(mmap.mmap):
        def madvise(self, *args):
            raise OSError(22, "Invalid argument")

    fake = types.SimpleNamespace(
        mmap=Refusing, MADV_HUGEPAGE=mmap.MADV_HUGEPAGE, MAP_PRIVATE=mmap.MAP_PRIVATE, MAP_ANONYMOUS=mmap.MAP_ANONYMOUS
    )
    monkeypatch.setattr(model_mod, "mmap", fake)
    a = model_mod.zeros_huge((3, 1024, 1024), torch.float32)
    assert a.shape == (3, 1024, 1024) and not a.any()
    a[2, 1023, 1023] = 1.5
    assert float(a.sum()) == 1.5
