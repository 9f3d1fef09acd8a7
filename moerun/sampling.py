"""The sampler: greedy at temperature 0, else temperature, top-k and top-p, each request
with its own seeded generator so a seed reproduces the same tokens in any batch and any
layout; and the log probabilities a request asks for (``SamplingParams.logprobs``),
taken from the model's distribution before temperature and truncation, as vLLM does.

    toks = sample(logits_BV, params, gens)                 # [token] per row
    lps = logprobs_of(logits_BV, toks, [p.logprobs for p in params])

Shape legend: B = sequences sampled this step, V = vocab, N = top-N.
"""
from __future__ import annotations

import torch

from .options import SamplingParams

__all__ = ["SamplingParams", "Sampled", "make_generator", "sample", "sample_one", "logprobs_of"]

# (token, its log probability or None, top-N (token, log probability) pairs)
Sampled = tuple[int, float | None, tuple[tuple[int, float], ...]]


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


def logprobs_of(logits_BV: torch.Tensor, tokens: list[int], top_n: list[int | None]) -> list[Sampled]:
    """Each row's sampled token with its log probability and the row's top-N, for the rows
    that ask (``top_n[b]`` not None); the others get (token, None, ())."""
    out: list[Sampled] = [(t, None, ()) for t in tokens]
    rows = [b for b, n in enumerate(top_n) if n is not None]
    if not rows:
        return out
    lp_RV = torch.log_softmax(logits_BV[rows].float(), dim=-1).cpu()
    n_max = max(top_n[b] for b in rows)
    top_val, top_idx = lp_RV.topk(n_max, dim=-1) if n_max else (None, None)
    for j, b in enumerate(rows):
        n = top_n[b]
        top = tuple(zip(top_idx[j, :n].tolist(), top_val[j, :n].tolist())) if n else ()
        out[b] = (tokens[b], float(lp_RV[j, tokens[b]]), top)
    return out
