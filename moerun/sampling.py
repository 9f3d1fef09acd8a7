"""The sampler: greedy at temperature 0, else temperature, top-k and top-p, each request
with its own seeded generator so a seed reproduces the same tokens in any batch and any
layout; and the log probabilities a request asks for (``SamplingParams.logprobs``),
taken from the model's distribution before temperature and truncation, as vLLM does.

    gens = [make_generator(p, rid, logits_BV.device) for p, rid in ...]   # once per request
    out = sample_step(logits_BV, params, gens)   # [(token, logprob, top-N)] per row: one host copy
    toks_B = sample_tokens(logits_BV, params, gens)                        # on the device, no sync

Batched on the logits' device: one temperature / top-k / top-p pass over the B rows. A
sampled row draws its token as ``argmax(probs / q)`` with ``q ~ Exp(1)`` drawn by the
request's own generator (one ``exponential_`` of V values per step), which is exactly
what ``torch.multinomial(probs, 1)`` does, so on the CPU the batch gives the tokens of
the per-row reference ``sample_one`` bit for bit. A generator lives on the device that
samples (a CUDA generator on a GPU): a seed gives the same tokens in any batch and any
layout on one kind of device; a GPU's random stream is not the CPU's.

Shape legend: B = sequences sampled this step, V = vocab, N = top-N.
"""
from __future__ import annotations

import torch

from .kernels import cpu_ext
from .options import SamplingParams

__all__ = ["SamplingParams", "Sampled", "make_generator", "sample", "sample_one", "sample_step",
           "sample_tokens", "logprobs_of"]

# (token, its log probability or None, top-N (token, log probability) pairs)
Sampled = tuple[int, float | None, tuple[tuple[int, float], ...]]


def make_generator(params: SamplingParams, index: int = 0, device="cpu") -> torch.Generator | None:
    """The request's generator on ``device`` (None for greedy): seeded with ``params.seed``,
    else a fresh random seed."""
    if params.temperature == 0:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(params.seed if params.seed is not None else torch.seed() + index)
    return g


def sample_one(logits_V: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    """One token from float logits, one row at a time: the readable reference of
    ``sample_tokens`` (sampled on the CPU; ``gen`` a CPU generator)."""
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


def _to_device(rows: list[list[float]], device) -> torch.Tensor:
    """Small per-row values as one float32 tensor on ``device``: pinned and copied without
    blocking on a GPU (a pageable copy would wait for the stream)."""
    t = torch.tensor(rows, dtype=torch.float32)
    if torch.device(device).type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    return t


def sample_tokens(logits_BV: torch.Tensor, params: list[SamplingParams], gens: list,
                  greedy_B: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's token [B] (int64, on the logits' device), batched: greedy rows take the
    argmax (``greedy_B`` when the caller has it); the others are scaled by their
    temperature, cut to their top-k and top-p and drawn with their own generator
    (``gens[b]``, on the logits' device). The per-row settings reach the device in one
    non-blocking copy; nothing waits for the device."""
    if greedy_B is None:  # each row's first maximum: one C call for CPU float32 (None elsewhere)
        fast = cpu_ext.argmax_rows(logits_BV)
        greedy_B = fast[0] if fast is not None else torch.max(logits_BV, dim=-1).indices
    rand = [b for b, p in enumerate(params) if p.temperature != 0]
    if not rand:
        return greedy_B
    V = logits_BV.shape[-1]
    ps = [params[b] for b in rand]
    some = len(rand) < len(params)
    # per sampled row: temperature, top-k's last kept index, top-k on, top-p, top-p on, its row
    cfg_R6 = _to_device([[p.temperature, min(p.top_k or 1, V) - 1, bool(p.top_k), p.top_p, p.top_p < 1, b]
                         for p, b in zip(ps, rand)], logits_BV.device)
    rows_R = cfg_R6[:, 5].long() if some else None
    logits_RV = (logits_BV[rows_R] if some else logits_BV).float() / cfg_R6[:, 0:1]
    if any(p.top_k for p in ps):
        top_RK = torch.topk(logits_RV, min(max(p.top_k for p in ps), V), dim=-1).values
        kth_R1 = top_RK.gather(1, cfg_R6[:, 1:2].long())
        kth_R1 = kth_R1.masked_fill(cfg_R6[:, 2:3] == 0, float("-inf"))  # top_k = 0: keep every token
        logits_RV = logits_RV.masked_fill(logits_RV < kth_R1, float("-inf"))
    probs_RV = torch.softmax(logits_RV, -1)
    if any(p.top_p < 1 for p in ps):
        sorted_p, order = torch.sort(probs_RV, descending=True)
        drop = torch.cumsum(sorted_p, -1) - sorted_p >= cfg_R6[:, 3:4]  # keep the smallest set >= top_p
        drop &= cfg_R6[:, 4:5] != 0  # top_p = 1: keep every token
        probs_RV = probs_RV.scatter(1, order, sorted_p.masked_fill(drop, 0.0))
    q_RV = torch.empty_like(probs_RV)
    for r, b in enumerate(rand):  # each request's own draws, as torch.multinomial(probs, 1) makes them
        q_RV[r].exponential_(1, generator=gens[b])
    toks_R = torch.argmax(probs_RV / q_RV, dim=-1)
    return greedy_B.index_copy(0, rows_R, toks_R) if some else toks_R


def sample(logits_BV: torch.Tensor, params: list[SamplingParams], gens: list) -> list[int]:
    """``sample_tokens`` as a list of ints (one copy to the host)."""
    return sample_tokens(logits_BV, params, gens).tolist()


def sample_step(logits_BV: torch.Tensor, params: list[SamplingParams], gens: list,
                request_ids: list | None = None) -> list[Sampled]:
    """One step's tokens with the log probabilities the rows ask for, checked finite: the
    tokens, a finite flag per row and the log probabilities travel to the host in one
    float64 copy (ids up to 2**53 are exact in it). Non-finite logits in any row are a
    ``FloatingPointError`` naming the requests (``request_ids``, else the row numbers)."""
    B = logits_BV.shape[0]
    if B == 0:
        return []
    fast = cpu_ext.argmax_rows(logits_BV)  # (first maxima, finite rows) on CPU float32, else None
    toks_B = sample_tokens(logits_BV, params, gens, None if fast is None else fast[0])
    top_n = [p.logprobs for p in params]
    asks = [b for b, n in enumerate(top_n) if n is not None]
    # a row's float32 sum is finite when all its logits are (a cheap pass); a row whose sum is
    # not (NaN, inf, or finite logits so large that the sum overflows) is checked exactly below.
    # The C argmax says exactly which rows are finite.
    finite_B = fast[1] if fast is not None else torch.isfinite(logits_BV.sum(dim=-1))
    cols = [toks_B.double()[:, None], finite_B.double()[:, None]]
    n_max = max((top_n[b] for b in asks), default=0)
    if asks:
        lp_BV = torch.log_softmax(logits_BV.float(), dim=-1)
        cols.append(lp_BV.gather(1, toks_B[:, None]).double())
        if n_max:
            top_val, top_idx = lp_BV.topk(n_max, dim=-1)
            cols += [top_idx.double(), top_val.double()]
    host = torch.cat(cols, dim=1).tolist()  # the step's one device-to-host copy
    bad = [b for b in range(B) if not host[b][1]]
    if bad:
        bad = [b for b, ok in zip(bad, torch.isfinite(logits_BV[bad]).all(dim=-1).tolist()) if not ok]
    if bad:  # argmax of NaNs is token 0: never sample garbage silently
        names = [request_ids[b] for b in bad] if request_ids is not None else bad
        raise FloatingPointError(f"the model produced non-finite logits (NaN or inf) for request(s) {names[:8]}: "
                                 "the weights or the dtype overflowed; try --dtype float32")
    out: list[Sampled] = []
    for b, row in enumerate(host):
        tok, n = int(row[0]), top_n[b]
        if n is None:
            out.append((tok, None, ()))
            continue
        top = tuple(zip((int(i) for i in row[3:3 + n]), row[3 + n_max:3 + n_max + n])) if n else ()
        out.append((tok, row[2], top))
    return out


def logprobs_of(logits_BV: torch.Tensor, tokens: list[int], top_n: list[int | None]) -> list[Sampled]:
    """Each row's given token with its log probability and the row's top-N, for the rows
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
