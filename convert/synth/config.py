"""Dimensions of the synthetic DeepSeek-V3 test models."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SynthConfig:
    name: str
    hidden_size: int
    num_hidden_layers: int
    first_k_dense_replace: int
    intermediate_size: int
    moe_intermediate_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    n_shared_experts: int
    num_attention_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    vocab_size: int  # target; the tiny checkpoint records the size its BPE training reached
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    max_position_embeddings: int = 163840
    # init scales
    linear_std: float = 0.05
    embed_std: float = 0.5
    router_std: float = 0.05
    bias_std: float = 0.15

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def rope_scaling(self) -> dict[str, Any]:
        """DeepSeek's config.json ``rope_scaling`` dict (both ``type`` and ``rope_type``)."""
        return {
            "type": "yarn",
            "rope_type": "yarn",
            "factor": self.rope_factor,
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "beta_fast": self.beta_fast,
            "beta_slow": self.beta_slow,
            "mscale": self.mscale,
            "mscale_all_dim": self.mscale_all_dim,
        }

    def replace(self, **kw: Any) -> SynthConfig:
        return dataclasses.replace(self, **kw)


PRESETS: dict[str, SynthConfig] = {
    "tiny": SynthConfig(
        name="tiny",
        hidden_size=256,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        intermediate_size=512,
        moe_intermediate_size=256,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        num_attention_heads=4,
        q_lora_rank=256,
        kv_lora_rank=256,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        vocab_size=4096,
    ),
    "bench": SynthConfig(
        name="bench",
        hidden_size=2048,
        num_hidden_layers=6,
        first_k_dense_replace=1,
        intermediate_size=5632,
        moe_intermediate_size=512,
        n_routed_experts=64,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        n_shared_experts=1,
        num_attention_heads=16,
        q_lora_rank=768,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        vocab_size=32000,
        linear_std=0.02,
        router_std=0.02,
    ),
    # DeepSeek-R1's per-layer dimensions (attention, dense and expert FFN shapes as in the real model)
    # with 4 layers (1 dense + 3 MoE), 64 routed experts and a 32k vocabulary: the per-token work of
    # one R1 layer at a size a workstation holds (Q4_K_M about 6 GB; see write_random_gguf).
    "r1dims": SynthConfig(
        name="r1dims",
        hidden_size=7168,
        num_hidden_layers=4,
        first_k_dense_replace=1,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        n_routed_experts=64,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        n_shared_experts=1,
        num_attention_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        vocab_size=32000,
        linear_std=0.02,
        router_std=0.02,
    ),
}


def get_config(preset_or_cfg: str | SynthConfig) -> SynthConfig:
    if isinstance(preset_or_cfg, SynthConfig):
        return preset_or_cfg
    try:
        return PRESETS[preset_or_cfg]
    except KeyError:
        raise ValueError(f"unknown preset {preset_or_cfg!r}; known: {', '.join(PRESETS)}") from None
