"""The model configuration a manifest carries: DeepSeek-V3/R1 hyper-parameters, HF names.

The converter fills it from the source's metadata (never from a file name); the runtime
builds the model from it. Field names follow transformers' DeepseekV3Config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense FFN (layers < first_k_dense_replace)
    moe_intermediate_size: int  # one routed expert's FFN
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None  # None: q_proj without the low-rank path (DeepSeek-V2-Lite)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    first_k_dense_replace: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    scoring_func: str  # "sigmoid" (V3/R1) or "softmax" (V2)
    topk_method: str  # "noaux_tc" (V3/R1) or "greedy"/"group_limited_greedy" (V2)
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # "split": attention as attn_k_b/attn_v_b (llama.cpp's current layout);
    # "kv_b": one kv_b matrix (HF checkpoints and llama.cpp's legacy layout).
    attention_layout: str = "split"
    architecture: str = "deepseek_v3"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace and self.n_routed_experts > 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**d)
