"""Synthetic DeepSeek-V3 models: HF checkpoint loads in transformers, GGUF files follow deepseek2."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors import safe_open

from ktpack.convert.synth import PRESETS, make_hf_checkpoint, write_float_gguf, write_gguf, write_random_gguf
from ktpack.convert.synth.kquants import quantize
from ktpack.convert.synth.make import GGUF_QTYPES, LEGACY_QTYPES
from ktpack.convert.synth.writer import hf_source_names, use_more_bits

T = gguf.GGMLQuantizationType
CFG = PRESETS["tiny"]
N_CURRENT = 3 + 13 * CFG.first_k_dense_replace + 18 * CFG.n_moe_layers  # 52, as llama.cpp's tinyk
N_LEGACY = N_CURRENT - CFG.num_hidden_layers  # one attn_kv_b instead of attn_k_b + attn_v_b per block

# Relative RMS error of a whole tensor vs its HF source (random normal weights): generous
# ceilings (measured: Q4_K 0.08, Q5_0/Q5_1 0.04, Q5_K 0.04, Q6_K 0.02, Q8_0 0.005, BF16 0.002).
REL_RMS = {
    T.F32: 0.0,
    T.BF16: 0.004,
    T.Q8_0: 0.01,
    T.Q6_K: 0.03,
    T.Q5_K: 0.05,
    T.Q5_1: 0.05,
    T.Q5_0: 0.05,
    T.Q4_K: 0.1,
}

REQUIRED_KEYS = [
    "general.architecture",
    "general.type",
    "general.name",
    "general.size_label",
    "general.quantization_version",
    "general.file_type",
    "deepseek2.block_count",
    "deepseek2.context_length",
    "deepseek2.embedding_length",
    "deepseek2.feed_forward_length",
    "deepseek2.attention.head_count",
    "deepseek2.attention.head_count_kv",
    "deepseek2.rope.scaling.type",
    "deepseek2.rope.scaling.factor",
    "deepseek2.rope.scaling.original_context_length",
    "deepseek2.rope.scaling.yarn_beta_fast",
    "deepseek2.rope.scaling.yarn_beta_slow",
    "deepseek2.rope.freq_base",
    "deepseek2.attention.layer_norm_rms_epsilon",
    "deepseek2.expert_count",
    "deepseek2.expert_used_count",
    "deepseek2.expert_group_count",
    "deepseek2.expert_group_used_count",
    "deepseek2.expert_gating_func",
    "deepseek2.attention.key_length",
    "deepseek2.attention.value_length",
    "deepseek2.leading_dense_block_count",
    "deepseek2.vocab_size",
    "deepseek2.attention.q_lora_rank",
    "deepseek2.attention.kv_lora_rank",
    "deepseek2.expert_feed_forward_length",
    "deepseek2.expert_shared_count",
    "deepseek2.expert_weights_scale",
    "deepseek2.expert_weights_norm",
    "deepseek2.rope.dimension_count",
    "deepseek2.rope.scaling.yarn_log_multiplier",
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token",
    "tokenizer.chat_template",
]
MLA_KEYS = ["deepseek2.attention.key_length_mla", "deepseek2.attention.value_length_mla"]
FILE_TYPES = {"F32": 0, "BF16": 32, "Q8_0": 7, "Q4_K": 14, "Q5_K": 16, "Q6_K": 18, "Q4_K_M": 15}


def _fields(r: gguf.GGUFReader) -> dict[str, object]:
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


class _HF:
    def __init__(self, hf_dir: Path) -> None:
        self.st = safe_open(str(hf_dir / "model.safetensors"), framework="numpy")
        self.config = json.loads((hf_dir / "config.json").read_text())

    def expected(self, gguf_name: str) -> np.ndarray:
        """The float32 tensor a GGUF tensor should hold, assembled independently of the writer."""
        srcs = [self.st.get_tensor(n) for n in hf_source_names(gguf_name, CFG)]
        if gguf_name.endswith("_exps.weight"):
            return np.stack(srcs)
        x = srcs[0]
        if gguf_name.endswith(("attn_k_b.weight", "attn_v_b.weight")):
            h, nope, v = CFG.num_attention_heads, CFG.qk_nope_head_dim, CFG.v_head_dim
            per_head = [x[i * (nope + v) : (i + 1) * (nope + v)] for i in range(h)]
            if gguf_name.endswith("attn_k_b.weight"):
                return np.stack([p[:nope].T for p in per_head])  # [H, kv_lora, nope]
            return np.stack([p[nope:] for p in per_head])  # [H, v, kv_lora]
        return x


@pytest.fixture(scope="module")
def hf(tiny_models: dict[str, Path]) -> _HF:
    return _HF(tiny_models["hf"])


# ------------------------------------------------------------------------------------------ HF


def test_hf_checkpoint_loads_in_transformers(tiny_models: dict[str, Path], hf: _HF) -> None:
    torch = pytest.importorskip("torch")
    from transformers import DeepseekV3ForCausalLM

    model, info = DeepseekV3ForCausalLM.from_pretrained(
        tiny_models["hf"], dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.config.rope_parameters["rope_type"] == "yarn"
    # per-expert checkpoint names were mapped onto transformers' fused expert parameters
    experts = model.model.layers[1].mlp.experts
    inter = CFG.moe_intermediate_size
    for e in (0, 7, CFG.n_routed_experts - 1):
        gate = hf.st.get_tensor(f"model.layers.1.mlp.experts.{e}.gate_proj.weight")
        up = hf.st.get_tensor(f"model.layers.1.mlp.experts.{e}.up_proj.weight")
        down = hf.st.get_tensor(f"model.layers.1.mlp.experts.{e}.down_proj.weight")
        np.testing.assert_array_equal(experts.gate_up_proj[e, :inter].detach().numpy(), gate)
        np.testing.assert_array_equal(experts.gate_up_proj[e, inter:].detach().numpy(), up)
        np.testing.assert_array_equal(experts.down_proj[e].detach().numpy(), down)
    bias = model.model.layers[2].mlp.gate.e_score_correction_bias.detach().numpy()
    np.testing.assert_array_equal(bias, hf.st.get_tensor("model.layers.2.mlp.gate.e_score_correction_bias"))

    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert logits.std(dim=-1).mean() > 0.2  # activations did not vanish through the layers
    assert (logits.argmax(-1)[0] != logits.argmax(-1)[0, 0]).any()  # position-dependent output


def test_hf_config_has_deepseek_keys(hf: _HF) -> None:
    c = hf.config
    assert c["scoring_func"] == "sigmoid"
    assert c["topk_method"] == "noaux_tc"
    assert c["architectures"] == ["DeepseekV3ForCausalLM"]
    assert c["num_nextn_predict_layers"] == 0
    rs = c["rope_scaling"]
    assert rs["type"] == "yarn" and rs["factor"] == 40 and rs["original_max_position_embeddings"] == 4096
    assert rs["mscale"] == 1.0 and rs["mscale_all_dim"] == 1.0
    assert c["rope_parameters"]["rope_type"] == "yarn"
    assert 1024 <= c["vocab_size"] <= 4096
    assert hf.st.get_tensor("model.embed_tokens.weight").shape[0] == c["vocab_size"]


def _route(scores: np.ndarray, bias: np.ndarray, n_group: int, topk_group: int, k: int) -> np.ndarray:
    """Sorted expert ids chosen per token (noaux_tc); n_group=1 means no group limit."""
    b = scores + bias
    n, e = b.shape
    grp = b.reshape(n, n_group, e // n_group)
    gscore = np.sort(grp, axis=-1)[..., -2:].sum(-1)
    keep = np.argsort(-gscore, axis=-1, kind="stable")[:, :topk_group]
    mask = np.full((n, n_group), -np.inf)
    np.put_along_axis(mask, keep, 0.0, axis=-1)
    masked = (grp + mask[..., None]).reshape(n, e)
    return np.sort(np.argsort(-masked, axis=-1, kind="stable")[:, :k], axis=-1)


def test_routing_bias_and_groups_change_choices(hf: _HF) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1024, CFG.hidden_size)).astype(np.float32)
    k, g, tg = CFG.num_experts_per_tok, CFG.n_group, CFG.topk_group
    for layer in range(CFG.first_k_dense_replace, CFG.num_hidden_layers):
        w = hf.st.get_tensor(f"model.layers.{layer}.mlp.gate.weight")
        bias = hf.st.get_tensor(f"model.layers.{layer}.mlp.gate.e_score_correction_bias")
        assert w.dtype == np.float32 and bias.dtype == np.float32
        s = 1 / (1 + np.exp(-(x @ w.T)))
        with_bias = _route(s, bias, g, tg, k)
        no_bias = _route(s, np.zeros_like(bias), g, tg, k)
        no_groups = _route(s, bias, 1, 1, k)
        frac_bias = np.mean(np.any(with_bias != no_bias, axis=-1))
        frac_group = np.mean(np.any(with_bias != no_groups, axis=-1))
        assert frac_bias > 0.3, frac_bias
        assert 0.05 < frac_group, frac_group


def test_checkpoint_is_deterministic(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    again = make_hf_checkpoint("tiny", tmp_path / "hf")
    for f in sorted(p.name for p in tiny_models["hf"].iterdir()):
        assert (again / f).read_bytes() == (tiny_models["hf"] / f).read_bytes(), f
    (q,) = write_gguf(again, tmp_path / "tiny-Q4_K_M.gguf", "Q4_K_M")
    assert q.read_bytes() == tiny_models["Q4_K_M"].read_bytes()


# ---------------------------------------------------------------------------------------- GGUF


@pytest.mark.parametrize("key", [*GGUF_QTYPES, *(f"legacy-{q}" for q in LEGACY_QTYPES)])
def test_gguf_file(tiny_models: dict[str, Path], hf: _HF, key: str) -> None:
    legacy = key.startswith("legacy-")
    qtype = key.removeprefix("legacy-")
    r = gguf.GGUFReader(tiny_models[key])
    f = _fields(r)
    assert f["general.architecture"] == "deepseek2"
    assert f["general.name"] == "Tiny"
    for k in REQUIRED_KEYS:
        assert k in f, k
    assert f["general.file_type"] == FILE_TYPES[qtype]
    assert f["general.quantization_version"] == 2
    assert f["deepseek2.expert_gating_func"] == 2
    assert f["deepseek2.expert_weights_scale"] == pytest.approx(2.5)
    assert f["deepseek2.rope.scaling.yarn_log_multiplier"] == pytest.approx(0.1)
    assert f["deepseek2.vocab_size"] == hf.config["vocab_size"] == len(f["tokenizer.ggml.tokens"])
    assert f["tokenizer.ggml.pre"] == "deepseek-v3" and f["tokenizer.ggml.model"] == "gpt2"
    assert f["tokenizer.ggml.add_bos_token"] is True and f["tokenizer.ggml.add_eos_token"] is False
    if legacy:
        assert f["deepseek2.attention.head_count_kv"] == CFG.num_attention_heads
        assert f["deepseek2.attention.key_length"] == CFG.qk_head_dim
        assert f["deepseek2.attention.value_length"] == CFG.v_head_dim
        assert not any(k in f for k in MLA_KEYS)
    else:
        assert f["deepseek2.attention.head_count_kv"] == 1
        assert f["deepseek2.attention.key_length"] == CFG.kv_lora_rank + CFG.qk_rope_head_dim
        assert f["deepseek2.attention.value_length"] == CFG.kv_lora_rank
        assert f["deepseek2.attention.key_length_mla"] == CFG.qk_head_dim
        assert f["deepseek2.attention.value_length_mla"] == CFG.v_head_dim

    names = [t.name for t in r.tensors]
    assert len(names) == (N_LEGACY if legacy else N_CURRENT) == len(set(names))
    assert any("attn_kv_b" in n for n in names) == legacy
    assert any("attn_k_b" in n for n in names) != legacy

    for t in r.tensors:
        want = hf.expected(t.name)
        shape = tuple(int(s) for s in reversed(t.shape))
        assert shape == want.shape, t.name
        if len(shape) == 1 or ".ffn_gate_inp." in t.name:
            assert t.tensor_type == T.F32, t.name
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
        if t.tensor_type == T.F32:
            np.testing.assert_array_equal(got, want, err_msg=t.name)
            continue
        # stored bytes are exactly the quantization of the right source tensor ...
        ref = quantize(want, t.tensor_type)
        np.testing.assert_array_equal(np.asarray(t.data).reshape(-1).view(np.uint8), ref.reshape(-1).view(np.uint8))
        # ... and close to it
        rel = np.sqrt(np.mean((got - want) ** 2) / np.mean(want**2))
        assert rel <= REL_RMS[T(t.tensor_type)], (t.name, T(t.tensor_type).name, rel)


def test_q4_k_m_mix(tiny_models: dict[str, Path]) -> None:
    r = gguf.GGUFReader(tiny_models["Q4_K_M"])
    types = {t.name: T(t.tensor_type) for t in r.tensors}
    assert types["output.weight"] == T.Q6_K
    assert types["token_embd.weight"] == T.Q4_K
    assert types["blk.0.attn_k_b.weight"] == T.Q5_0  # ne0 = 128: Q4_K falls back like llama.cpp
    assert types["blk.0.attn_v_b.weight"] == T.Q4_K
    n = CFG.num_hidden_layers
    for i in range(CFG.first_k_dense_replace, n):
        want = T.Q6_K if use_more_bits(i, n) else T.Q4_K
        assert types[f"blk.{i}.ffn_down_exps.weight"] == want
        assert types[f"blk.{i}.ffn_down_shexp.weight"] == want
        assert types[f"blk.{i}.ffn_gate_exps.weight"] == T.Q4_K
    assert types["blk.2.ffn_down_exps.weight"] == T.Q6_K  # llama.cpp tinyk: block 2 of 3
    assert len(set(types.values())) >= 4


def test_k_b_v_b_exact_against_kv_b(tiny_models: dict[str, Path], hf: _HF) -> None:
    cur = {t.name: t for t in gguf.GGUFReader(tiny_models["F32"]).tensors}
    leg = {t.name: t for t in gguf.GGUFReader(tiny_models["legacy-F32"]).tensors}
    h, nope, v, c = CFG.num_attention_heads, CFG.qk_nope_head_dim, CFG.v_head_dim, CFG.kv_lora_rank
    for i in range(CFG.num_hidden_layers):
        kv_b = np.asarray(leg[f"blk.{i}.attn_kv_b.weight"].data)
        np.testing.assert_array_equal(kv_b, hf.st.get_tensor(f"model.layers.{i}.self_attn.kv_b_proj.weight"))
        k_b = np.asarray(cur[f"blk.{i}.attn_k_b.weight"].data)
        v_b = np.asarray(cur[f"blk.{i}.attn_v_b.weight"].data)
        assert k_b.shape == (h, c, nope) and v_b.shape == (h, v, c)
        for head in range(h):
            rows = kv_b[head * (nope + v) : (head + 1) * (nope + v)]
            np.testing.assert_array_equal(k_b[head], rows[:nope].T)
            np.testing.assert_array_equal(v_b[head], rows[nope:])


def test_split_parts(tiny_models: dict[str, Path]) -> None:
    parts = [tiny_models[f"split-{i}"] for i in (1, 2, 3)]
    assert [p.name for p in parts] == [f"tiny-Q8_0-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    whole = {t.name: t for t in gguf.GGUFReader(tiny_models["Q8_0"]).tensors}
    seen: list[str] = []
    for i, p in enumerate(parts):
        r = gguf.GGUFReader(p)
        f = _fields(r)
        assert f["split.no"] == i and f["split.count"] == 3 and f["split.tensors.count"] == len(whole)
        if i == 0:
            assert all(k in f for k in REQUIRED_KEYS)
        else:
            assert set(f) <= {"general.architecture", "split.no", "split.count", "split.tensors.count"}
        assert len(r.tensors) > 0
        for t in r.tensors:
            seen.append(t.name)
            ref = whole[t.name]
            assert T(t.tensor_type) == T(ref.tensor_type)
            np.testing.assert_array_equal(np.asarray(t.data), np.asarray(ref.data))
    assert sorted(seen) == sorted(whole) and len(seen) == len(set(seen))


def test_random_blocks_file(tmp_path: Path) -> None:
    """write_random_gguf (used for converter speed runs on "bench") gives a valid, finite file."""
    (p,) = write_random_gguf("tiny", tmp_path / "tiny-Q4_K_M.gguf", "Q4_K_M")
    r = gguf.GGUFReader(p)
    assert len(r.tensors) == N_CURRENT
    assert _fields(r)["deepseek2.vocab_size"] == len(_fields(r)["tokenizer.ggml.tokens"])
    for t in r.tensors:
        x = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        assert np.all(np.isfinite(x)), t.name


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K_M"])
def test_float_gguf_is_the_hf_models_gguf(tiny_models: dict[str, Path], tmp_path: Path, qtype: str) -> None:
    """write_float_gguf (no HF folder, tensor by tensor) writes the very bytes of HF checkpoint + write_gguf."""
    (p,) = write_float_gguf("tiny", tmp_path / f"tiny-{qtype}.gguf", qtype)
    a, b = gguf.GGUFReader(p), gguf.GGUFReader(tiny_models[qtype])
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors, strict=True):
        assert T(ta.tensor_type) == T(tb.tensor_type), ta.name
        np.testing.assert_array_equal(np.asarray(ta.data), np.asarray(tb.data), err_msg=ta.name)


def test_random_blocks_file_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors over RANDOM_CHUNK_BYTES are streamed in row chunks (r1dims' 528 MB experts): still valid."""
    from ktpack.convert.synth import writer

    monkeypatch.setattr(writer, "RANDOM_CHUNK_BYTES", 20_000)
    (p,) = write_random_gguf("tiny", tmp_path / "tiny-Q4_K_M.gguf", "Q4_K_M")
    r = gguf.GGUFReader(p)
    assert len(r.tensors) == N_CURRENT
    for t in r.tensors:
        x = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        assert np.all(np.isfinite(x)), t.name
