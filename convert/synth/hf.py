"""Deterministic Hugging Face DeepSeek-V3 checkpoints (random weights, real BPE tokenizer)."""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .config import SynthConfig, get_config
from .corpus import BOS, CHAT_TEMPLATE, EOS, PAD, train_tokenizer


def tensor_rng(seed: int, name: str) -> np.random.Generator:
    """Per-tensor generator: the weights do not depend on the order they are made in."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def hf_tensor_shapes(cfg: SynthConfig, vocab_size: int | None = None) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(HF name, torch shape) of every tensor of DeepseekV3ForCausalLM, in a fixed order."""
    h = cfg.hidden_size
    v = vocab_size if vocab_size is not None else cfg.vocab_size
    nh = cfg.num_attention_heads
    yield "model.embed_tokens.weight", (v, h)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "self_attn.q_a_proj.weight", (cfg.q_lora_rank, h)
        yield p + "self_attn.q_a_layernorm.weight", (cfg.q_lora_rank,)
        yield p + "self_attn.q_b_proj.weight", (nh * cfg.qk_head_dim, cfg.q_lora_rank)
        yield p + "self_attn.kv_a_proj_with_mqa.weight", (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h)
        yield p + "self_attn.kv_a_layernorm.weight", (cfg.kv_lora_rank,)
        yield (
            p + "self_attn.kv_b_proj.weight",
            (nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
        )
        yield p + "self_attn.o_proj.weight", (h, nh * cfg.v_head_dim)
        if i < cfg.first_k_dense_replace:
            yield p + "mlp.gate_proj.weight", (cfg.intermediate_size, h)
            yield p + "mlp.up_proj.weight", (cfg.intermediate_size, h)
            yield p + "mlp.down_proj.weight", (h, cfg.intermediate_size)
        else:
            inter = cfg.moe_intermediate_size
            yield p + "mlp.gate.weight", (cfg.n_routed_experts, h)
            yield p + "mlp.gate.e_score_correction_bias", (cfg.n_routed_experts,)
            for e in range(cfg.n_routed_experts):
                yield p + f"mlp.experts.{e}.gate_proj.weight", (inter, h)
                yield p + f"mlp.experts.{e}.up_proj.weight", (inter, h)
                yield p + f"mlp.experts.{e}.down_proj.weight", (h, inter)
            sh = inter * cfg.n_shared_experts
            yield p + "mlp.shared_experts.gate_proj.weight", (sh, h)
            yield p + "mlp.shared_experts.up_proj.weight", (sh, h)
            yield p + "mlp.shared_experts.down_proj.weight", (h, sh)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (v, h)


def make_tensor(cfg: SynthConfig, name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """The float32 value of one HF tensor (deterministic in seed and name)."""
    rng = tensor_rng(seed, name)
    if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    if name.endswith("e_score_correction_bias"):
        return (cfg.bias_std * rng.standard_normal(shape)).astype(np.float32)
    if name.endswith("mlp.gate.weight"):
        std = cfg.router_std
    elif name == "model.embed_tokens.weight":
        std = cfg.embed_std
    else:
        std = cfg.linear_std
    return (std * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)


def hf_config_dict(cfg: SynthConfig, vocab_size: int) -> dict[str, Any]:
    """config.json: transformers' DeepseekV3Config plus DeepSeek's own keys that it does not write."""
    from transformers import DeepseekV3Config

    rope_scaling = cfg.rope_scaling()
    rope_parameters = {k: v for k, v in rope_scaling.items() if k != "type"}
    rope_parameters["rope_theta"] = cfg.rope_theta
    hc = DeepseekV3Config(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        n_shared_experts=cfg.n_shared_experts,
        n_routed_experts=cfg.n_routed_experts,
        routed_scaling_factor=cfg.routed_scaling_factor,
        kv_lora_rank=cfg.kv_lora_rank,
        q_lora_rank=cfg.q_lora_rank,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        n_group=cfg.n_group,
        topk_group=cfg.topk_group,
        num_experts_per_tok=cfg.num_experts_per_tok,
        first_k_dense_replace=cfg.first_k_dense_replace,
        norm_topk_prob=cfg.norm_topk_prob,
        hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
        rope_parameters=rope_parameters,
        rope_interleave=True,
        attention_bias=False,
        num_mtp_layers=0,
    )
    d = hc.to_dict()
    d.pop("transformers_version", None)  # keep the files independent of the installed version
    d.update(
        {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            "scoring_func": "sigmoid",
            "topk_method": "noaux_tc",
            "rope_scaling": rope_scaling,
            "rope_theta": cfg.rope_theta,
            "num_nextn_predict_layers": 0,
            "torch_dtype": "float32",
        }
    )
    return d


def _dump_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def make_hf_checkpoint(preset_or_cfg: str | SynthConfig, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a complete HF folder (model.safetensors f32, config.json, tokenizer files)."""
    from safetensors.numpy import save_file

    cfg = get_config(preset_or_cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = train_tokenizer(cfg.vocab_size, seed=seed)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    if vocab_size < 1024:
        raise RuntimeError(f"BPE training reached only {vocab_size} tokens")
    (out / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    _dump_json(
        out / "tokenizer_config.json",
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "clean_up_tokenization_spaces": False,
            "legacy": True,
            "model_max_length": cfg.max_position_embeddings,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "chat_template": CHAT_TEMPLATE,
        },
    )
    _dump_json(
        out / "generation_config.json",
        {"bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 0.6, "top_p": 0.95},
    )
    _dump_json(out / "config.json", hf_config_dict(cfg, vocab_size))

    tensors = {name: make_tensor(cfg, name, shape, seed) for name, shape in hf_tensor_shapes(cfg, vocab_size)}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
