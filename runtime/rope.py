"""RoPE with YaRN for DeepSeek-V3, computed as transformers does (formats.md §5.3).

Frequencies follow transformers' `_compute_yarn_parameters` operation for operation (float32
torch arithmetic), so the angle table is bit-identical to `DeepseekV3RotaryEmbedding`:
`angle[p, i] = f32(p) * inv_freq[i]`, `cos = cos(angle) * attention_factor` (1.0 for V3, where
mscale == mscale_all_dim). The softmax scale is `qk_head_dim^-0.5 * mscale(factor,
mscale_all_dim)^2` (transformers' `yarn_apply_mscale`; DeepSeek's `softmax_scale`).

The rotation pairs ADJACENT elements (2i, 2i+1) by angle i, as DeepSeek's reference code, GGUF
and llama.cpp (ROPE_TYPE_NORM) do. transformers with `rope_interleave=True` computes the same
rotation but writes its output de-interleaved ([evens | odds]); q and k are permuted alike, so
q·k is the same. The runtime caches k_pe in the adjacent-pair order it rotates q_pe in.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..layouts.config import ModelConfig


def _get_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _rope_params(cfg: ModelConfig) -> dict[str, Any] | None:
    rs = cfg.rope_scaling
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "yarn":
        raise ValueError(f"rope scaling type {kind!r} is not supported (DeepSeek-V3 uses yarn)")
    return rs


def inv_freq_and_factor(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [rope_dim/2] float32, attention factor multiplying cos/sin)."""
    dim = cfg.qk_rope_head_dim
    base = float(cfg.rope_theta)
    rs = _rope_params(cfg)
    if rs is None:
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    factor = rs.get("factor")
    original = rs["original_max_position_embeddings"]
    if factor is None:
        factor = cfg.max_position_embeddings / original
    attention_factor = rs.get("attention_factor")
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(_get_mscale(factor, mscale) / _get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = _get_mscale(factor)
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1

    def correction_dim(n_rot: float) -> float:
        return (dim * math.log(original / (n_rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extra = 1.0 / pos_freqs
    inter = 1.0 / (factor * pos_freqs)
    extra_factor = 1 - ramp
    inv_freq = inter * (1 - extra_factor) + extra * extra_factor
    return inv_freq, float(attention_factor)


def softmax_scale(cfg: ModelConfig) -> float:
    """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (never kv_lora based)."""
    scale = cfg.qk_head_dim**-0.5
    rs = _rope_params(cfg)
    if rs is not None:
        mscale_all_dim = rs.get("mscale_all_dim", 0)
        if mscale_all_dim:
            m = _get_mscale(rs["factor"], mscale_all_dim)
            scale = scale * m * m
    return scale


class RopeTable:
    """cos/sin for positions 0..n-1, `[n, rope_dim/2]` float32, built once (with the KV cache)."""

    def __init__(self, cfg: ModelConfig, n_positions: int) -> None:
        inv_freq, self.attention_factor = inv_freq_and_factor(cfg)
        pos = torch.arange(n_positions)
        angle = pos[:, None].float() * inv_freq[None, :]
        self.cos = angle.cos() * self.attention_factor
        self.sin = angle.sin() * self.attention_factor

    def apply(self, x: torch.Tensor, positions: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
        """Rotate `x[T, ..., rope_dim]` at `positions[T]`: adjacent pairs (DeepSeek, GGUF), or
        halves with interleaved=False (NOT DeepSeek's order; kept for the sensitivity tests)."""
        cos = self.cos[positions]
        sin = self.sin[positions]
        while cos.dim() < x.dim():
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        if interleaved and x.dtype == torch.float32 and x.device.type == "cpu":
            # the pairs as complex numbers times cos + i sin: the same products and sums in one pass (the
            # strided halves and the stack below took 0.8 ms for 256 tokens x 16 heads, this 0.05)
            pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
            return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2)
        if interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
