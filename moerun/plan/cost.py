"""The planner's formulas: one small named function per quantity, each stating its assumptions.

Pure arithmetic on ``ModelConfig`` / ``ParallelConfig`` numbers (no torch, no process
groups), so tests can check every one against a hand computation. Parameter counts come
from ``ModelConfig``'s size methods and every shard (heads, experts, vocabulary rows) from
``ParallelConfig``'s shard ranges: this module only adds them up. ``moerun.plan.planner``
and ``moerun.plan.roofline`` assemble these into a plan and a projection.

    cost.rank_params(model, par, rank).total     # parameters one rank holds
    cost.expert_load(tokens, top_k, E, ep)       # (mean, expected max) per expert-rank

Legend: T = tokens, H = hidden size, E = experts, K = top-k, F = expert FFN width,
b = bytes per element, V = vocabulary, ep/tp/pp = parallel degrees, M = micro-batches.
Units: FLOPs, bytes, seconds, bytes/s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from ..config import ModelConfig
from ..parallel import ParallelConfig


# --------------------------------------------------------------------------- sharding
@dataclass(frozen=True)
class RankParams:
    """Parameters one rank holds, by kind (counts, not bytes)."""
    attention: int  # q/k/v/o shards (+ biases, qk-norm weights) of the rank's layers
    norms: int  # the two RMSNorms per layer (+ the final norm on the last stage), replicated
    router: int  # E x H per MoE layer, replicated
    experts: int  # the rank's E/ep experts in each of its MoE layers
    mlp: int  # dense MLPs and shared experts (+ the shared-expert gate), replicated over TP:
    #            they run on the rank's 1/tp token share, between the reduce-scatter and all-gather
    embedding: int  # vocab-parallel rows, stage 0 (and the last stage when tied and pp > 1)
    lm_head: int  # vocab-parallel rows, last stage

    @property
    def total(self) -> int:
        return (self.attention + self.norms + self.router + self.experts + self.mlp
                + self.embedding + self.lm_head)


def rank_params(model: ModelConfig, par: ParallelConfig, rank: int) -> RankParams:
    """Exact parameters of ``rank`` under moerun's sharding (see moerun.parallel). A tied
    embedding needs a second copy on the last stage when pp > 1 (the LM head lives there)."""
    c = par.coord(rank)
    H = model.hidden_size
    layers = par.stage_layers(model.num_layers)[c.pp]
    q_heads = len(par.q_heads_of(c.tp, model.num_heads))
    kv_heads = len(par.kv_heads_of(c.tp, model.num_kv_heads))
    local_experts = len(par.experts_of(c.ep_rank, model.num_experts))
    attn = norms = router = experts = mlp = 0
    for i in layers:
        attn += model.attn_params(q_heads, kv_heads)
        norms += model.norm_params()
        router += model.router_params(i)
        experts += local_experts * model.expert_params() if model.moe_layers[i] else 0
        mlp += model.mlp_params(i)
    rows = len(par.vocab_rows_of(c.tp, model.vocab_size))
    first, last = c.pp == 0, c.pp == par.pp - 1
    emb = rows * H if first or (last and model.tie_word_embeddings and par.pp > 1) else 0
    head = rows * H if last and not model.tie_word_embeddings else 0
    norms += H if last else 0  # the final norm
    return RankParams(attn, norms, router, experts, mlp, emb, head)


def kv_bytes_per_token(model: ModelConfig, par: ParallelConfig, rank: int, b: int) -> int:
    """KV-cache bytes one token costs on ``rank``: its stage's layers x its KV heads x head_dim
    x 2 (K and V) x b. Assumes full-length caches (a sliding-window layer could keep less)."""
    c = par.coord(rank)
    n_layers = len(par.stage_layers(model.num_layers)[c.pp])
    kv_heads = len(par.kv_heads_of(c.tp, model.num_kv_heads))
    return n_layers * kv_heads * model.head_dim * 2 * b


# --------------------------------------------------------------------------- compute
def matmul_flops(tokens: float, params: float) -> float:
    """2 FLOPs (multiply + add) per weight per token."""
    return 2.0 * tokens * params


def attn_core_flops(q_heads: int, head_dim: int, ctx_sum: float) -> float:
    """QK^T and AV: 2 matmuls x 2 FLOPs x head_dim per (query, key) pair per head.
    ``ctx_sum`` = sum over query tokens of the keys each attends to."""
    return 4.0 * q_heads * head_dim * ctx_sum


def decode_ctx_sum(seqs: float, ctx: float, window: int = 0) -> float:
    """Keys attended by one decode token of each of ``seqs`` sequences at context ``ctx``."""
    return seqs * (min(ctx, window) if window else ctx)


def prefill_ctx_sum(seqs: float, prompt: int, window: int = 0) -> float:
    """Keys attended over a causal prefill of ``prompt`` tokens: P(P+1)/2 per sequence, or with a
    window w < P: w(w+1)/2 + (P - w) w."""
    if not window or window >= prompt:
        return seqs * prompt * (prompt + 1) / 2
    return seqs * (window * (window + 1) / 2 + (prompt - window) * window)


def expected_active_experts(local_experts: int, num_experts: int, top_k: int, tokens: float) -> float:
    """Expected number of a rank's ``local_experts`` that receive at least one of ``tokens``
    tokens under uniform routing: each token picks top_k distinct experts of E at random, so an
    expert is missed by one token with probability 1 - K/E, by all with (1 - K/E)^T."""
    return local_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


@lru_cache(maxsize=None)
def expected_max_std_normal(n: int) -> float:
    """E[max of n independent N(0,1)] = integral of x n phi(x) Phi(x)^(n-1) (Simpson, 4000 steps)."""
    if n <= 1:
        return 0.0
    lo, hi, steps = -10.0, 10.0, 4000
    h = (hi - lo) / steps
    total = 0.0
    for i in range(steps + 1):
        x = lo + i * h
        phi = math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
        cdf = 0.5 * (1 + math.erf(x / math.sqrt(2)))
        w = 1 if i in (0, steps) else (4 if i % 2 else 2)
        total += w * x * n * phi * cdf ** (n - 1)
    return total * h / 3


def expert_load(tokens: float, top_k: int, num_experts: int, ep: int) -> tuple[float, float]:
    """(mean, expected max) of token-expert assignments per expert-rank of an EP group that
    routes ``tokens`` tokens, under uniform routing (no trained router's skew).

    Approximation (stated): each rank's load is a sum over tokens of a hypergeometric count
    (K distinct picks of E, E/ep of them on the rank), variance per token
    K (1/ep)(1 - 1/ep)(E - K)/(E - 1); loads are taken as normal with the exact pairwise
    correlation -1/(ep - 1) that a fixed total imposes, which gives
    E[max] = mean + sigma sqrt(ep/(ep-1)) E[max of ep iid N(0,1)] (exact for ep = 2 in the
    normal limit). Good when the mean load is >~ 5; capped at the most a rank can receive,
    tokens x min(K, E/ep).
    """
    mean = tokens * top_k / ep
    if ep == 1 or tokens <= 0:
        return mean, mean
    p = 1.0 / ep
    var = tokens * top_k * p * (1 - p) * (num_experts - top_k) / max(num_experts - 1, 1)
    emax = mean + math.sqrt(var) * math.sqrt(ep / (ep - 1)) * expected_max_std_normal(ep)
    return mean, min(emax, tokens * min(top_k, num_experts // ep))


# --------------------------------------------------------------------------- communication
def all_to_all_bytes(tokens_on_rank: float, top_k: int, hidden: int, b: int, ep: int) -> float:
    """Bytes one rank sends in one MoE layer's dispatch + combine: each of its tokens goes to
    K experts (K x H x b each way), of which the fraction (ep - 1)/ep lives on other ranks
    under uniform routing. No de-duplication of a token sent twice to one rank."""
    return 2.0 * tokens_on_rank * top_k * hidden * b * (ep - 1) / ep


def ring_all_reduce_bytes(tokens: float, hidden: int, b: int, tp: int) -> float:
    """Bytes one rank sends for a reduce-scatter + all-gather of T x H hidden states over tp
    ranks with the ring algorithm: (tp - 1)/tp of the tensor each, 2 (tp - 1)/tp in all."""
    return 2.0 * (tp - 1) / tp * tokens * hidden * b


def p2p_bytes(tokens: float, hidden: int, b: int, tp: int) -> float:
    """Bytes one rank sends to the next pipeline stage: its 1/tp share of the T x H states
    (each TP rank sends the shard it holds after the reduce-scatter)."""
    return tokens * hidden * b / tp


def transfer_time(nbytes: float, bandwidth: float, calls: int = 0, latency_s: float = 0.0) -> float:
    """Bandwidth term (bytes / per-direction link bandwidth) plus a fixed cost per call."""
    return nbytes / bandwidth + calls * latency_s


# --------------------------------------------------------------------------- time
def roofline_time(flops: float, nbytes: float, peak_flops: float, mem_bw: float) -> float:
    """A kernel sequence takes at least its compute time and at least its memory time; the
    roofline takes the larger (perfect overlap of the two, peak rates)."""
    return max(flops / peak_flops, nbytes / mem_bw)


def pipeline_bubble(pp: int, micro_batches: int) -> float:
    """Idle fraction of a fill-and-drain pass of M micro-batches over pp stages:
    (pp - 1)/(M + pp - 1) (GPipe). Applies to a batch prefilled at once."""
    return (pp - 1) / (micro_batches + pp - 1)


def decode_round_ticks(pp: int, micro_batches: int) -> int:
    """Ticks between two tokens of one sequence in steady-state pipelined decode: a micro-batch
    needs pp ticks to cross the stages and gets its next turn after M ticks, so max(M, pp)."""
    return max(micro_batches, pp)


# --------------------------------------------------------------------------- whole model
def _layer_flops(model: ModelConfig, layer: int, ctx: float) -> float:
    """FLOPs of one token in ``layer`` attending to ``ctx`` keys (no parallelism, no replication)."""
    f = matmul_flops(1, model.attn_matmul_params())
    f += attn_core_flops(model.num_heads, model.head_dim, ctx)
    f += matmul_flops(1, model.router_params(layer) + model.mlp_params(layer))
    if model.moe_layers[layer]:
        f += matmul_flops(1, model.top_k * model.expert_params())
    return f


def decode_flops_per_token(model: ModelConfig, ctx: float) -> float:
    """Model FLOPs of one decode token at context ``ctx``: every layer's matmuls (K experts,
    router, shared/dense MLP) + attention over min(ctx, window) keys + the LM head."""
    layers = sum(_layer_flops(model, i, min(ctx, w) if w else ctx)
                 for i, w in enumerate(model.sliding_windows))
    return layers + matmul_flops(1, model.vocab_size * model.hidden_size)


def prefill_flops_per_token(model: ModelConfig, prompt: int) -> float:
    """Model FLOPs per prompt token of a causal prefill: the average token attends to
    ctx_sum/P keys; logits only for the last token (LM head / P)."""
    layers = sum(_layer_flops(model, i, prefill_ctx_sum(1, prompt, w) / prompt)
                 for i, w in enumerate(model.sliding_windows))
    return layers + matmul_flops(1, model.vocab_size * model.hidden_size) / prompt
