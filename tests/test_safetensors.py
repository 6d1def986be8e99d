"""kt-convert from safetensors checkpoints: the tiny model as DeepSeek ships R1 (FP8 e4m3 + 128x128
block scales, sharded, with an MTP layer) and as a BF16 cast, through the runtime, against
transformers.

Figures (tiny, 80 tokens; printed by the tests):
- pack vs transformers on the pack's own (dequantized) weights: exact up to 1e-4 (the runtime is
  right on whatever the layout stores);
- pack vs transformers on the FP8-dequantized original: the layouts' quantization error, bounded by
  E2E_BOUNDS (measured: amx-int4 g64 max 1.9 / rms 0.33, amx-int8 max 1.1 / rms 0.08; for scale,
  the FP8 checkpoint itself is max 1.6 from the f32 weights it was made from);
- BF16 source, --cpu-layout amx-bf16, vs transformers on the f32 original: max <= 2e-2.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ktpack.convert.cli import SAFETENSORS_GROUP_SIZE, main
from ktpack.convert.plan import ConvertOptions, PlanError, make_plan
from ktpack.convert.safetensors_source import FP8_TABLE, open_safetensors
from ktpack.convert.source import SourceError
from ktpack.convert.synth.st_writer import dequantized_state, write_hf_sharded
from ktpack.convert.writer import write
from ktpack.layouts import manifest as mf
from ktpack.layouts.tensor_io import tensor_values
from ktpack.runtime.engine import Engine

N_TOKENS = 80
TOL = 1e-4
# end-to-end max / rms |logit diff| vs transformers on the FP8-dequantized weights (about 1.5x measured)
E2E_BOUNDS = {"amx-int4": (3.0, 0.5), "amx-int8": (1.7, 0.12)}


@pytest.fixture(scope="module")
def st_dirs(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("st")
    return {m: write_hf_sharded(tiny_dir / "hf", root / m, m, shards=3) for m in ("FP8", "BF16")}


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 4096, (N_TOKENS,), generator=torch.Generator().manual_seed(1234))


_packs: dict[tuple, Path] = {}


def pack(src: Path, root: Path, **opts) -> Path:
    key = (str(src), tuple(sorted(opts.items())))
    if key not in _packs:
        out = root / f"p{len(_packs)}"
        write(make_plan(open_safetensors(src), ConvertOptions(**opts)), out, progress=False)
        _packs[key] = out
    return _packs[key]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _packs.clear()
    return tmp_path_factory.mktemp("stpacks")


# ------------------------------------------------------------------ transformers on given weights

_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")


def hf_logits(tiny_dir: Path, state: dict[str, np.ndarray], ids: torch.Tensor) -> torch.Tensor:
    """transformers' DeepseekV3ForCausalLM (fused experts) on an HF-named float32 state."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config.from_pretrained(tiny_dir / "hf")
    cfg._attn_implementation = "eager"
    model = DeepseekV3ForCausalLM(cfg).float().eval()
    sd, experts = {}, {}
    for k, v in state.items():
        m = _EXPERT.match(k)
        if m:
            experts[(int(m.group(1)), m.group(3), int(m.group(2)))] = torch.from_numpy(np.asarray(v))
        elif not k.startswith("model.layers.") or int(k.split(".")[2]) < cfg.num_hidden_layers:
            sd[k] = torch.from_numpy(np.asarray(v, dtype=np.float32))
    for i in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
        stack = {
            p: torch.stack([experts[(i, p, e)] for e in range(cfg.n_routed_experts)]) for p in ("gate", "up", "down")
        }
        sd[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([stack["gate"], stack["up"]], 1)
        sd[f"model.layers.{i}.mlp.experts.down_proj"] = stack["down"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    with torch.no_grad():
        return model(ids[None]).logits[0].float()


_G2HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output.weight": "lm_head.weight",
    "output_norm.weight": "model.norm.weight",
}


def state_from_pack(folder: Path) -> dict[str, np.ndarray]:
    """The HF-named values the pack represents (its layouts decoded)."""
    from ktpack.convert.safetensors_source import HF_TO_GGUF

    g2hf = {v: k for k, v in HF_TO_GGUF.items()}
    out: dict[str, np.ndarray] = {}
    for t in mf.load(folder).tensors:
        v = tensor_values(folder, t)
        if t.name in _G2HF:
            out[_G2HF[t.name]] = v
            continue
        _, i, rest = t.name.split(".", 2)
        m = re.match(r"ffn_(gate|up|down)_exps\.weight", rest)
        if m:
            for e in range(v.shape[0]):
                out[f"model.layers.{i}.mlp.experts.{e}.{m.group(1)}_proj.weight"] = v[e]
        else:
            out[f"model.layers.{i}.{g2hf[rest]}"] = v
    return out


def score(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(Engine(folder, ctx_size=128).score(ids.tolist()))


@pytest.fixture(scope="module")
def fp8_ref(tiny_dir, st_dirs, ids) -> torch.Tensor:
    return hf_logits(tiny_dir, dequantized_state(st_dirs["FP8"]), ids)


# ------------------------------------------------------------------ reader


def test_e4m3_table_matches_torch():
    want = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(FP8_TABLE, want)  # NaN positions equal too


def test_reader_values_equal_torch_dequantization(st_dirs):
    src = open_safetensors(st_dirs["FP8"])
    ref = dequantized_state(st_dirs["FP8"])
    assert src.kind == "safetensors" and src.config.attention_layout == "kv_b"
    t = src.tensors["blk.1.ffn_down_exps.weight"]
    assert t.stacked and t.dtype == "F8_E4M3" and t.shape == (16, 256, 256) and not t.has_raw
    np.testing.assert_array_equal(t.values((3,)), ref["model.layers.1.mlp.experts.3.down_proj.weight"])
    np.testing.assert_array_equal(
        t.values((slice(2, 4), slice(16, 48), slice(128, 256)))[1],
        ref["model.layers.1.mlp.experts.3.down_proj.weight"][16:48, 128:256],
    )
    kva = src.tensors["blk.0.attn_kv_a_mqa.weight"]  # [320, 256]: a partial 128-row block at the end
    np.testing.assert_array_equal(
        kva.values((slice(250, 320), slice(100, 256))),
        ref["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"][250:, 100:],
    )
    emb = src.tensors["token_embd.weight"]
    assert emb.dtype == "BF16" and emb.has_raw
    np.testing.assert_array_equal(emb.values(), ref["model.embed_tokens.weight"])
    assert src.tensors["blk.2.exp_probs_b.bias"].dtype == "F32"
    assert not any(n.startswith("blk.3.") for n in src.tensors)
    assert any("model.layers.3.*" in n and "multi-token-prediction" in n for n in src.notes)


# ------------------------------------------------------------------ logits


@pytest.mark.parametrize(
    "opts",
    [
        {"target": "cpu", "cpu_layout": "amx-int4", "group_size": SAFETENSORS_GROUP_SIZE, "numa_nodes": 2},
        {"target": "cpu", "cpu_layout": "amx-int8"},
        {"target": "gpu", "cpu_layout": "amx-int4", "group_size": SAFETENSORS_GROUP_SIZE},
    ],
    ids=["amx_int4-cpu-2nodes", "amx_int8-cpu", "amx_int4-gpu_marlin"],
)
def test_fp8_pack_exact_on_its_weights(tiny_dir, st_dirs, root, ids, opts):
    folder = pack(st_dirs["FP8"], root, **opts)
    got = score(folder, ids)
    want = hf_logits(tiny_dir, state_from_pack(folder), ids)
    diff = (got - want).abs().max().item()
    print(f"\nFP8 {opts}: vs transformers on the pack's weights max |diff| {diff:.3g}")
    assert diff <= TOL
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("layout", ["amx-int4", "amx-int8"])
def test_fp8_pack_within_bounds_of_fp8_original(st_dirs, root, ids, fp8_ref, layout):
    opts = {"target": "cpu", "cpu_layout": layout, "group_size": SAFETENSORS_GROUP_SIZE}
    if layout == "amx-int4":
        opts["numa_nodes"] = 2
    got = score(pack(st_dirs["FP8"], root, **opts), ids)
    d = (got - fp8_ref).abs()
    mx, rms = d.max().item(), d.pow(2).mean().sqrt().item()
    print(f"\nFP8 -> {layout} (cpu) vs transformers on FP8-dequantized weights: max {mx:.3g}, rms {rms:.3g}")
    assert mx <= E2E_BOUNDS[layout][0] and rms <= E2E_BOUNDS[layout][1]


def test_bf16_amx_bf16_matches_original(tiny_dir, st_dirs, root, ids):
    """The original weights of a BF16 checkpoint are its bf16 values (amx-bf16 stores them unchanged)."""
    from safetensors.numpy import load_file

    folder = pack(st_dirs["BF16"], root, target="cpu", cpu_layout="amx-bf16")
    m = mf.load(folder)
    assert m.source["kind"] == "safetensors" and m.tensor("blk.1.ffn_up_exps.weight").layout == "amx_bf16_v1"
    assert m.tensor("token_embd.weight").layout == "ggml_rows_v1"  # BF16 rows kept as they are
    got = score(folder, ids)
    want = hf_logits(tiny_dir, dequantized_state(st_dirs["BF16"]), ids)
    diff = (got - want).abs().max().item()
    f32 = (got - hf_logits(tiny_dir, load_file(str(tiny_dir / "hf" / "model.safetensors")), ids)).abs().max().item()
    print(f"\nBF16 -> amx-bf16 vs transformers on the BF16 checkpoint: max |diff| {diff:.3g} "
          f"(vs the f32 weights the BF16 cast was made from: {f32:.3g})")  # fmt: skip
    assert diff <= 2e-2


def test_group_size_by_measured_error(st_dirs):
    """The default amx-int4 group size for safetensors: weight error of each group size on the
    FP8-dequantized routed experts (relative RMS), against its extra bytes."""
    from ktpack.layouts import amx

    w = open_safetensors(st_dirs["FP8"]).tensors["blk.1.ffn_gate_exps.weight"].values()
    w = w.reshape(-1, w.shape[-1])
    err = {}
    for g in (32, 64, 128):
        back = amx.dequantize("int4", amx.pack("int4", w, n_block=4, group_size=g), w.shape, n_block=4, group_size=g)
        err[g] = float(np.sqrt(np.mean((back - w) ** 2) / np.mean(w**2)))
    bits = {g: 4 + 32 / g for g in err}
    print(
        "\namx-int4 relative RMS weight error by group size: "
        + ", ".join(f"g{g}: {e:.4f} ({bits[g]:.2f} bit)" for g, e in err.items())
    )
    assert err[32] < err[64] < err[128]
    # error removed per extra bit: the step 128 -> 64 (+0.25 bit) pays more than 64 -> 32 (+0.5 bit)
    gain = {64: (err[128] - err[64]) / (bits[64] - bits[128]), 32: (err[64] - err[32]) / (bits[32] - bits[64])}
    print(f"error removed per extra bit: g128->g64 {gain[64]:.4f}, g64->g32 {gain[32]:.4f}")
    assert gain[64] > gain[32]
    assert SAFETENSORS_GROUP_SIZE == 64


# ------------------------------------------------------------------ CLI and bad input


def _cli(*args: str):
    return CliRunner().invoke(main, [*args, "-q"], catch_exceptions=False)


def test_cli_defaults_for_safetensors(st_dirs, tmp_path):
    out = tmp_path / "out"
    r = _cli(str(st_dirs["FP8"]), "-o", str(out), "--target", "cpu")
    assert r.exit_code == 0, r.output
    m = mf.load(out)
    assert m.options["cpu_layout"] == "amx-int4" and m.options["group_size"] == SAFETENSORS_GROUP_SIZE
    assert m.tensor("blk.2.ffn_down_exps.weight").source_dtype == "F8_E4M3"
    assert (out / "tokenizer.json").exists() and "chat_template" in json.loads(
        (out / "tokenizer_config.json").read_text()
    )
    assert any("multi-token-prediction" in n for n in m.notes)
    r = _cli(str(st_dirs["FP8"]), "-o", str(tmp_path / "g"), "--cpu-layout", "ggml")
    assert r.exit_code == 2 and "--cpu-layout ggml" in r.output and "amx-int4" in r.output
    assert not (tmp_path / "g").exists()


def _rewrite_shard(
    path: Path, drop: tuple[str, ...] = (), change: dict[str, tuple[str, list[int], bytes]] | None = None
):
    """Write a shard again without `drop` and with `change[name] = (dtype, shape, data)`."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    data, off, new = [], 0, {}
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        if name in drop:
            continue
        b, e = info["data_offsets"]
        dtype, shape, blob = (change or {}).get(name, (info["dtype"], info["shape"], raw[8 + n + b : 8 + n + e]))
        new[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(blob)]}
        data.append(blob)
        off += len(blob)
    body = json.dumps(new).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(len(body).to_bytes(8, "little") + body + b"".join(data))


def _shard_of(folder: Path, name: str) -> Path:
    return folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][name]


def _damage(src: Path, dst: Path, what: str) -> tuple[str, ...]:
    """A damaged copy of the FP8 checkpoint; returns what the error line must name."""
    shutil.copytree(src, dst)
    q_a = "model.layers.1.self_attn.q_a_proj.weight"
    if what == "missing shard":
        shard = _shard_of(dst, "model.layers.2.mlp.experts.0.up_proj.weight")
        shard.unlink()
        return ("model.safetensors.index.json", shard.name)
    if what == "FP8 without scale":
        shard = _shard_of(dst, q_a + "_scale_inv")
        _rewrite_shard(shard, drop=(q_a + "_scale_inv",))
        idx = json.loads((dst / "model.safetensors.index.json").read_text())
        del idx["weight_map"][q_a + "_scale_inv"]
        (dst / "model.safetensors.index.json").write_text(json.dumps(idx))
        return (_shard_of(dst, q_a).name, q_a, "scale")
    if what == "scale of wrong shape":
        shard = _shard_of(dst, q_a + "_scale_inv")
        _rewrite_shard(shard, change={q_a + "_scale_inv": ("F32", [2, 3], bytes(24))})
        return (shard.name, q_a + "_scale_inv", "[2, 3]", "[2, 2]")
    if what == "another architecture":
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
        (dst / "config.json").write_text(json.dumps(cfg))
        return ("config.json", "llama")
    if what == "dtype no layout takes":
        bias = "model.layers.2.mlp.gate.e_score_correction_bias"
        shard = _shard_of(dst, bias)
        _rewrite_shard(shard, change={bias: ("F64", [16], np.zeros(16, np.float64).tobytes())})
        return (shard.name, bias, "F64")
    raise AssertionError(what)


@pytest.mark.parametrize(
    "what",
    ["missing shard", "FP8 without scale", "scale of wrong shape", "another architecture", "dtype no layout takes"],
)
def test_bad_checkpoint_refused(st_dirs, tmp_path, what):
    bad = tmp_path / "bad"
    needles = _damage(st_dirs["FP8"], bad, what)
    with pytest.raises(SourceError) as e:
        open_safetensors(bad)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, [str(bad), "-o", str(out), "-q"])
    line = r.output.strip()
    print(f"\n{what}: {line}")
    assert r.exit_code == 1 and "\n" not in line and line.startswith("kt-convert: error: ")
    for n in needles:
        assert n in line and n in str(e.value), (n, line)
    assert not out.exists() and not any(tmp_path.glob("out*"))


def test_plan_error_for_safetensors_names_tensor(st_dirs):
    src = open_safetensors(st_dirs["BF16"])
    with pytest.raises(PlanError, match="--cpu-layout ggml"):
        make_plan(src, ConvertOptions(cpu_layout="ggml"))
