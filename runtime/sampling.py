"""Choosing the next token: greedy, temperature, top-k, top-p, repetition penalty, seeded.

Semantics follow transformers' logits processors (RepetitionPenaltyLogitsProcessor, TopK, TopP),
applied in that order, so a user who tuned settings there gets the same behaviour here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.6  # DeepSeek-R1's recommended value; 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None

    def check(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition penalty must be > 0, got {self.repetition_penalty}")


class Sampler:
    def __init__(self, params: SamplingParams):
        params.check()
        self.p = params
        self.gen = torch.Generator()
        self.gen.manual_seed(params.seed if params.seed is not None else torch.seed())

    @property
    def greedy(self) -> bool:
        """True when a choice is the argmax of the logits alone (temperature 0, no repetition penalty)."""
        return self.p.temperature == 0 and self.p.repetition_penalty == 1.0

    def __call__(self, logits: torch.Tensor, history: torch.Tensor | None = None) -> int:
        """logits: [vocab] float; history: ids seen so far (prompt + generated) for the penalty."""
        x = logits.float().clone()
        p = self.p
        if p.repetition_penalty != 1.0 and history is not None and history.numel():
            seen = torch.unique(history)
            v = x[seen]
            x[seen] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
        if p.temperature == 0:
            return int(torch.argmax(x))
        x = x / p.temperature
        if p.top_k > 0 and p.top_k < x.numel():
            kth = torch.topk(x, p.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_x, order = torch.sort(x, descending=False)
            cum = torch.softmax(sorted_x, dim=-1).cumsum(dim=-1)
            remove = cum <= (1 - p.top_p)
            remove[-1] = False  # always keep the most likely token
            x = x.scatter(0, order, sorted_x.masked_fill(remove, float("-inf")))
        probs = torch.softmax(x, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.gen))
