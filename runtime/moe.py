"""The MoE block: router (DeepSeek-V3 noaux_tc; V2 softmax), routed experts, shared expert.

Router, as transformers' `DeepseekV3TopkRouter` (5.24) and DeepSeek's reference `Gate`:
    s       = sigmoid(x_f32 · W_gateᵀ)                     f32
    b       = s + e_score_correction_bias                   selection only
    gscore  = sum of the top-2 of b in each of n_group groups
    keep the topk_group best groups; the others' experts are masked to -inf
    idx     = top-k of the masked b;  w = s[idx] (unbiased)
    w       = w / (Σw + 1e-20) if norm_topk_prob;  w *= routed_scaling_factor

Masking: transformers 5.24 masks dropped groups with -inf (`masked_fill(~mask, -inf)`), as
DeepSeek's reference and llama.cpp do (older transformers used 0.0; that differs only when every
kept biased score is negative). This module uses -inf, and so matches transformers 5.24.

The `Routing` flags exist to break one DeepSeek detail at a time (tests prove the comparison
with transformers catches each); they are all off in normal use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..layouts.config import ModelConfig


@dataclass
class Routing:
    """Deliberate deviations, for sensitivity tests only."""

    ignore_bias: bool = False
    no_group_limit: bool = False
    scaling_one: bool = False
    drop_shared: bool = False


class Router:
    def __init__(
        self, cfg: ModelConfig, weight: torch.Tensor, bias: torch.Tensor | None, flags: Routing | None = None
    ) -> None:
        self.weight = weight.float()
        self.bias = None if bias is None else bias.float()
        self.k = cfg.num_experts_per_tok
        self.n_experts = cfg.n_routed_experts
        self.n_group = max(1, cfg.n_group or 1)
        self.topk_group = cfg.topk_group or self.n_group
        self.norm = cfg.norm_topk_prob
        self.scale = float(cfg.routed_scaling_factor)
        self.scoring = cfg.scoring_func
        self.method = cfg.topk_method
        self.flags = flags or Routing()

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (topk_idx [T, k] int64, topk_w [T, k] float32)."""
        logits = F.linear(x.float(), self.weight)
        if self.scoring == "sigmoid":
            scores = logits.sigmoid()
        elif self.scoring == "softmax":
            scores = logits.softmax(dim=-1, dtype=torch.float32)
        else:
            raise ValueError(f"scoring function {self.scoring!r} is not supported")
        choice = scores
        if self.bias is not None and not self.flags.ignore_bias:
            choice = scores + self.bias
        grouped = self.method in ("noaux_tc", "group_limited_greedy") and self.n_group > 1
        if grouped and not self.flags.no_group_limit:
            t = choice.shape[0]
            per = self.n_experts // self.n_group
            g = choice.view(t, self.n_group, per)
            if self.method == "noaux_tc":
                gscore = g.topk(2, dim=-1)[0].sum(dim=-1)
            else:  # V2 group_limited_greedy: the best expert of each group
                gscore = g.max(dim=-1).values
            keep = torch.topk(gscore, k=self.topk_group, dim=-1, sorted=False)[1]
            gmask = torch.zeros_like(gscore, dtype=torch.bool).scatter_(1, keep, True)
            emask = gmask.unsqueeze(-1).expand(t, self.n_group, per).reshape(t, self.n_experts)
            choice = choice.masked_fill(~emask, float("-inf"))
        idx = torch.topk(choice, k=self.k, dim=-1, sorted=False)[1]
        w = scores.gather(1, idx)
        if self.norm:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        if not self.flags.scaling_one:
            w = w * self.scale
        return idx, w


ExpertsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class MoE:
    """routed(x) + shared(x): `experts(x, idx, w)` is a `CpuExperts` (or anything with its call)."""

    def __init__(
        self,
        router: Router,
        experts: ExpertsFn,
        shared: Callable[[torch.Tensor], torch.Tensor] | None,
        flags: Routing | None = None,
    ) -> None:
        self.router = router
        self.experts = experts
        self.shared = shared
        self.flags = flags or router.flags

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        idx, w = self.router(x)
        out = self.experts(x, idx, w)
        if self.shared is not None and not self.flags.drop_shared:
            out = out + self.shared(x)
        return out
