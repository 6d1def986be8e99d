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

from ktpack.convert.gguf_source import open_gguf
from ktpack.convert.plan import ConvertOptions, make_plan
from ktpack.convert.writer import write
from ktpack.layouts import manifest as mf
from ktpack.layouts.errors import ManifestError
from ktpack.layouts.tensor_io import tensor_values
from ktpack.runtime.model import DeepseekV3Model, KVCache
from ktpack.runtime.weights import load_pack

N_TOKENS = 80
CTX = 96
TOL = 1e-4

_packs: dict[tuple, Path] = {}


def make_pack(tiny_dir: Path, root: Path, src: str, **opts) -> Path:
    """Convert once per (source, options) for the whole module."""
    key = (src, tuple(sorted(opts.items())))
    if key not in _packs:
        out = root / f"p{len(_packs)}"
        write(make_plan(open_gguf(tiny_dir / src), ConvertOptions(**opts)), out, progress=False)
        _packs[key] = out
    return _packs[key]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _packs.clear()
    return tmp_path_factory.mktemp("packs")


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 4096, (N_TOKENS,), generator=torch.Generator().manual_seed(1234))


def hf_model(tiny_dir: Path, state: dict[str, torch.Tensor] | None = None):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    if state is None:
        return DeepseekV3ForCausalLM.from_pretrained(
            tiny_dir / "hf", dtype=torch.float32, attn_implementation="eager"
        ).eval()
    cfg = DeepseekV3Config.from_pretrained(tiny_dir / "hf")
    cfg._attn_implementation = "eager"
    model = DeepseekV3ForCausalLM(cfg).float().eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None]).logits[0].float()


@pytest.fixture(scope="module")
def hf_ref(tiny_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    return hf_logits(hf_model(tiny_dir), ids)


def run(folder: Path, ids: torch.Tensor, **kw) -> torch.Tensor:
    model = DeepseekV3Model(load_pack(folder), **kw)
    return model.forward(ids, 0, KVCache(model.config, CTX))


def compare(got: torch.Tensor, want: torch.Tensor) -> float:
    diff = (got - want).abs().max().item()
    assert diff <= TOL, f"max |diff| {diff:.3g} > {TOL}"
    assert torch.equal(got.argmax(-1), want.argmax(-1)), "top-1 differs"
    return diff


# --------------------------------------------------------------- GGUF names -> transformers names

_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output.weight": "lm_head.weight",
    "output_norm.weight": "model.norm.weight",
}
_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q_a.weight": "self_attn.q_a_proj.weight",
    "attn_q_a_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn_q_b.weight": "self_attn.q_b_proj.weight",
    "attn_kv_a_mqa.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn_kv_a_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn_kv_b.weight": "self_attn.kv_b_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "exp_probs_b.bias": "mlp.gate.e_score_correction_bias",
    "ffn_gate_shexp.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_experts.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_experts.down_proj.weight",
    "ffn_down_exps.weight": "mlp.experts.down_proj",
}


def hf_state_from_pack(folder: Path) -> dict[str, torch.Tensor]:
    """A transformers state dict holding exactly the values the pack represents."""
    m = mf.load(folder)
    vals = {t.name: tensor_values(folder, t) for t in m.tensors}
    state: dict[str, torch.Tensor] = {}
    for name, v in vals.items():
        if name in _GLOBAL:
            state[_GLOBAL[name]] = torch.from_numpy(v)
            continue
        _, i, rest = name.split(".", 2)
        p = f"model.layers.{i}."
        if rest in _BLOCK:
            state[p + _BLOCK[rest]] = torch.from_numpy(v)
        elif rest == "ffn_gate_exps.weight":  # transformers fuses gate and up: [E, 2I, H]
            up = vals[f"blk.{i}.ffn_up_exps.weight"]
            state[p + "mlp.experts.gate_up_proj"] = torch.from_numpy(np.concatenate([v, up], axis=1))
        elif rest == "attn_k_b.weight":  # kv_b per head = [k_b[h]ᵀ ; v_b[h]]
            vb = vals[f"blk.{i}.attn_v_b.weight"]
            kv = np.concatenate([v.transpose(0, 2, 1), vb], axis=1)
            state[p + "self_attn.kv_b_proj.weight"] = torch.from_numpy(kv.reshape(-1, kv.shape[-1]))
        elif rest not in ("ffn_up_exps.weight", "attn_v_b.weight"):
            raise AssertionError(f"unmapped tensor {name}")
    return state


# ------------------------------------------------------------------------------ vs transformers


def test_f32_cpu_pack_matches_transformers(tiny_dir, root, ids, hf_ref, record_property):
    folder = make_pack(tiny_dir, root, "tiny-F32.gguf", target="cpu")
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
def test_pack_matches_transformers_on_pack_weights(tiny_dir, root, ids, src, opts):
    """Lossy layouts: transformers runs on exactly the weights the pack represents."""
    folder = make_pack(tiny_dir, root, src, **opts)
    want = hf_logits(hf_model(tiny_dir, hf_state_from_pack(folder)), ids)
    diff = compare(run(folder, ids), want)
    print(f"\n{src} {opts} vs transformers on the pack's weights: max |diff| = {diff:.3g}")


# ------------------------------------------------------------------------------ KV cache


def test_decode_and_chunked_prefill_equal_one_shot(tiny_dir, root, ids):
    folder = make_pack(tiny_dir, root, "tiny-F32.gguf", target="cpu")
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


def test_cache_bounds(tiny_dir, root, ids):
    folder = make_pack(tiny_dir, root, "tiny-F32.gguf", target="cpu")
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


def test_each_broken_detail_fails_the_comparison(tiny_dir, root, ids, hf_ref):
    folder = make_pack(tiny_dir, root, "tiny-F32.gguf", target="cpu")
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


def test_legacy_and_split_sources_agree(tiny_dir, root, ids, hf_ref):
    cur = run(make_pack(tiny_dir, root, "tiny-F32.gguf", target="cpu"), ids)
    legacy = run(make_pack(tiny_dir, root, "tiny-legacy-F32.gguf", target="cpu"), ids)
    d_legacy = compare(legacy, cur)
    q8 = run(make_pack(tiny_dir, root, "tiny-Q8_0.gguf", target="cpu"), ids)
    split = run(make_pack(tiny_dir, root, "split/tiny-Q8_0-00001-of-00003.gguf", target="cpu"), ids)
    d_split = compare(split, q8)
    print(f"\nlegacy-F32 vs F32: {d_legacy:.3g}; split Q8_0 vs Q8_0: {d_split:.3g}")


def test_embedding_rows_match_tensor_values(tiny_dir, root):
    for src in ("tiny-Q4_K_M.gguf", "tiny-BF16.gguf"):
        folder = make_pack(tiny_dir, root, src, target="cpu")
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


def test_cpu_shards_are_mapped_not_copied(tiny_dir, root):
    folder = make_pack(tiny_dir, root, "tiny-F32.gguf", target="cpu")
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


def test_bad_folders_refused(tiny_dir, root, tmp_path):
    good = make_pack(tiny_dir, root, "tiny-Q4_K.gguf", target="cpu")

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
