"""Sampling parameters and the sampler: greedy at temperature 0, else temperature,
top-k and top-p, each request with its own seeded generator so a seed reproduces the
same tokens in any batch and any layout.

Shape legend: B = sequences sampled this step, V = vocab.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def make_generator(params: SamplingParams, index: int = 0) -> torch.Generator | None:
    if params.temperature == 0:
        return None
    g = torch.Generator()
    g.manual_seed(params.seed if params.seed is not None else torch.seed() + index)
    return g


def sample_one(logits_V: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    """One token from float logits (sampled on the CPU so seeds agree across devices)."""
    if params.temperature == 0:
        return int(torch.argmax(logits_V))
    logits = logits_V.float().cpu() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if params.top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        drop = torch.cumsum(sorted_p, -1) - sorted_p >= params.top_p  # keep the smallest set >= top_p
        probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0.0))
    return int(torch.multinomial(probs, 1, generator=gen))


def sample(logits_BV: torch.Tensor, params: list[SamplingParams], gens: list) -> list[int]:
    if all(p.temperature == 0 for p in params):
        return torch.argmax(logits_BV, dim=-1).tolist()
    return [sample_one(logits_BV[b], p, g) for b, (p, g) in enumerate(zip(params, gens))]
