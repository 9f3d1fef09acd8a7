"""Roofline projection of one valid layout: per-stage cost of a pass, then TPOT, TTFT, throughput.

    proj = project(model, layout, hw, workload, micro_batches)   # a layout that passed its rules
    proj.tpot_s, proj.tokens_per_s_total, proj.comm_share, proj.load_balance

``make_plan`` (moerun.plan.planner) calls it once the layout is valid; the GPU count is the
layout's world size. Assumptions (each formula's own are in ``moerun.plan.cost``):
- a stage's time = roofline(compute, memory) of its busiest rank + its communication,
  not overlapped (communication on the critical path, as in the runtime's step);
- the busiest rank of a stage is its (dp 0, tp 0) rank: it holds the ceil vocab share;
  heads, experts and the replicated MLPs are the same on every rank, and its token share
  after the reduce-scatter is taken as T/tp;
- memory traffic = weights read once per micro-batch pass (only the experts a pass routes
  to, in expectation) + the KV cache read and written; activations are not counted;
- prefill attention is compute-bound (KV kept on chip), so its KV is written, not re-read;
- expert compute is scaled by the expected max/mean load of the EP group (uniform routing);
- a group's collectives use the inter-node bandwidth when its ranks span nodes;
- sampling is done vocab-parallel (no logits all-gather); the embedding's vocab-parallel
  partial sums are all-reduced over TP on stage 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import ModelConfig
from ..parallel import ParallelConfig
from . import cost
from .hardware import HardwareSpec
from .strategy import Workload


@dataclass(frozen=True)
class StageCost:
    """One pipeline stage processing one micro-batch, seen from its busiest rank."""
    stage: int
    tokens: float  # tokens in the micro-batch (per DP replica)
    flops: float
    hbm_bytes: float
    compute_s: float
    memory_s: float
    tp_bytes: float  # sent per rank: reduce-scatter + all-gather over TP
    a2a_bytes: float  # sent per rank: dispatch + combine over EP
    p2p_bytes: float  # sent per rank to the next stage
    comm_s: float

    @property
    def roof_s(self) -> float:
        return max(self.compute_s, self.memory_s)

    @property
    def time_s(self) -> float:
        return self.roof_s + self.comm_s


@dataclass(frozen=True)
class Links:
    tp_inter: bool  # the TP group spans nodes
    ep_inter: bool
    pp_inter: bool


def links_of(par: ParallelConfig, hw: HardwareSpec, stage: int) -> Links:
    """Which of a stage's groups cross nodes (checked on its dp-0 / ep-group-0 groups; ranks
    fill nodes in order and every group of a stage has the same shape)."""
    tp_ranks = [par.rank_of(stage, 0, t) for t in range(par.tp)]
    ep_ranks = par.ep_group_ranks(stage, 0)
    nxt = min(stage + 1, par.pp - 1)
    pp_ranks = [r for t in range(par.tp) for r in (par.rank_of(stage, 0, t), par.rank_of(nxt, 0, t))]
    return Links(hw.spans_nodes(tp_ranks), hw.spans_nodes(ep_ranks), hw.spans_nodes(pp_ranks))


def stage_cost(model: ModelConfig, par: ParallelConfig, hw: HardwareSpec, wl: Workload,
               stage: int, seqs: float, phase: str, measured_balance: float | None = None) -> StageCost:
    """Cost of ``stage`` on one micro-batch of ``seqs`` sequences per replica.
    ``phase`` = "decode" (one new token each, at the workload's mean decode context) or
    "prefill" (the whole prompt of each). ``measured_balance``: mean / max tokens per EP
    rank of a measured expert load (``moerun plan --expert-load``); the busiest rank's
    expert work is then the larger of it and uniform routing's expected max."""
    assert phase in ("decode", "prefill")
    b, H, k = wl.dtype_bytes, model.hidden_size, model.top_k
    world = par.world_size
    rank = par.rank_of(stage, 0, 0)
    rp = cost.rank_params(model, par, rank)
    layers = par.stage_layers(model.num_layers)[stage]
    last = stage == par.pp - 1
    q_heads = len(par.q_heads_of(0, model.num_heads))
    kv_heads = len(par.kv_heads_of(0, model.num_kv_heads))
    rows = len(par.vocab_rows_of(0, model.vocab_size))
    mean_ctx = wl.prompt_len + (wl.output_len + 1) / 2
    T = seqs if phase == "decode" else seqs * wl.prompt_len
    t_moe = T / par.tp  # tokens a rank routes after the reduce-scatter
    group_tokens = T * par.ep / par.tp  # tokens routed inside one EP group
    mean, emax = cost.expert_load(group_tokens, k, model.num_experts, par.ep)
    imbalance = emax / mean if mean > 0 else 1.0
    if measured_balance:
        imbalance = max(imbalance, 1.0 / measured_balance)
    local = len(par.experts_of(0, model.num_experts))
    active = cost.expected_active_experts(local, model.num_experts, k, group_tokens)
    attn_mm = model.attn_matmul_params(q_heads, kv_heads)

    flops = kv_tokens = 0.0
    n_moe = n_allreduce = 0
    for i in layers:
        w = model.sliding_windows[i]
        if phase == "decode":
            ctx_sum = cost.decode_ctx_sum(seqs, mean_ctx, w)
            kv_tokens += ctx_sum + T  # read the cache, write the new token
        else:
            ctx_sum = cost.prefill_ctx_sum(seqs, wl.prompt_len, w)
            kv_tokens += T  # written only
        flops += cost.matmul_flops(T, attn_mm) + cost.attn_core_flops(q_heads, model.head_dim, ctx_sum)
        n_allreduce += 1  # o_proj reduce-scatter + all-gather before the next attention
        # router, and the dense MLP or shared expert: replicated over TP, run on the rank's
        # token share (no collective of their own)
        flops += cost.matmul_flops(t_moe, model.router_params(i) + model.mlp_params(i))
        if model.moe_layers[i]:
            n_moe += 1
            flops += cost.matmul_flops(t_moe * k * imbalance, model.expert_params())
    if last:
        flops += cost.matmul_flops(seqs, rows * H)  # LM head on the last token of each sequence

    tied_head = last and model.tie_word_embeddings
    emb_read = rp.embedding if tied_head else min(rp.embedding, math.ceil(t_moe) * H)
    weights = (rp.total - rp.experts - rp.embedding + emb_read) * b
    weights += n_moe * active * model.expert_params() * b
    hbm = weights + kv_tokens * kv_heads * model.head_dim * 2 * b

    if stage == 0:
        n_allreduce += 1  # vocab-parallel embedding: partial sums all-reduced over TP
    tp_bytes = n_allreduce * cost.ring_all_reduce_bytes(T, H, b, par.tp)
    a2a_bytes = n_moe * cost.all_to_all_bytes(t_moe, k, H, b, par.ep)
    p2p = cost.p2p_bytes(T, H, b, par.tp) if not last else 0.0
    links = links_of(par, hw, stage)
    lat = hw.collective_latency_us * 1e-6
    comm = 0.0
    if par.tp > 1:
        comm += cost.transfer_time(tp_bytes, hw.link_bandwidth(links.tp_inter), 2 * n_allreduce, lat)
    if par.ep > 1:
        comm += cost.transfer_time(a2a_bytes, hw.link_bandwidth(links.ep_inter), 2 * n_moe, lat)
    if not last:
        comm += cost.transfer_time(p2p, hw.link_bandwidth(links.pp_inter), 1, lat)
    return StageCost(stage, T, flops, hbm, flops / hw.flops(world), hbm / hw.mem_bw(world),
                     tp_bytes, a2a_bytes, p2p, comm)


@dataclass(frozen=True)
class Projection:
    """Everything projected for one layout, hardware and workload (roofline: optimistic)."""
    label: str
    seqs_per_replica: int
    micro_batches: int  # effective: min(M, sequences per replica)
    seqs_per_micro_batch: int
    decode: tuple[StageCost, ...]  # one decode micro-batch per stage
    prefill: tuple[StageCost, ...]  # one prefill micro-batch per stage
    tick_s: float
    tpot_s: float
    tokens_per_s_replica: float
    tokens_per_s_total: float
    comm_share: float  # communication / step time (decode)
    comm_overhead: float  # communication / compute-or-memory time (decode); may exceed 1
    busy_fraction: float  # time ranks spend in compute/memory work (decode)
    mfu: float  # model FLOP/s over peak FLOP/s of all GPUs (decode)
    ttft_s: float  # one request alone: its prompt through every stage
    batch_prefill_s: float  # all of a replica's prompts at once, M micro-batches, with bubble
    bubble_fraction: float  # (pp - 1)/(M + pp - 1) of that batch prefill
    request_latency_s: float  # batch prefill + (output_len - 1) x TPOT
    flops_per_token_decode: float
    flops_per_token_prefill: float
    bytes_per_token_decode: float  # HBM traffic of all ranks per output token
    bytes_per_token_prefill: float  # per prompt token
    a2a_bytes_per_layer: float  # sent per rank, one MoE layer, one decode micro-batch
    tp_bytes_per_layer: float  # sent per rank, one RS + AG, one decode micro-batch
    a2a_s_per_layer: float  # its time on stage 0's EP links (latency included)
    tp_s_per_layer: float  # its time on stage 0's TP links (latency included)
    ep_group_tokens: float  # tokens an EP group routes per decode micro-batch
    expert_load_mean: float
    expert_load_max: float  # expected, uniform routing (or the measured skew when worse)
    load_balance: float  # mean / expected max (1 = perfect)
    links: tuple[Links, ...]
    measured_balance: float | None = None  # mean / max per EP rank of a measured load, when given


def project(model: ModelConfig, par: ParallelConfig, hw: HardwareSpec, wl: Workload,
            micro_batches: int, measured_balance: float | None = None) -> Projection:
    """Roofline projection of a valid layout (call only after ParallelConfig.problems is empty).
    ``measured_balance``: see ``stage_cost``."""
    seqs = math.ceil(wl.concurrency / par.dp)
    m_eff = min(micro_batches, seqs)
    per_mb = math.ceil(seqs / m_eff)
    mb = measured_balance
    decode = tuple(stage_cost(model, par, hw, wl, s, per_mb, "decode", mb) for s in range(par.pp))
    prefill = tuple(stage_cost(model, par, hw, wl, s, per_mb, "prefill", mb) for s in range(par.pp))
    single = [stage_cost(model, par, hw, wl, s, 1, "prefill", mb) for s in range(par.pp)]
    tick = max(c.time_s for c in decode)
    tpot = cost.decode_round_ticks(par.pp, m_eff) * tick
    comm = sum(c.comm_s for c in decode)
    roof = sum(c.roof_s for c in decode)
    total_tps = wl.concurrency / tpot
    mean_ctx = wl.prompt_len + (wl.output_len + 1) / 2
    f_dec = cost.decode_flops_per_token(model, mean_ctx)
    ranks_per_stage = par.dp * par.tp
    batch_prefill = (m_eff + par.pp - 1) * max(c.time_s for c in prefill)
    group_tokens = per_mb * par.ep / par.tp
    a2a = cost.all_to_all_bytes(per_mb / par.tp, model.top_k, model.hidden_size, wl.dtype_bytes, par.ep)
    tp_ar = cost.ring_all_reduce_bytes(per_mb, model.hidden_size, wl.dtype_bytes, par.tp)
    links0, lat = links_of(par, hw, 0), hw.collective_latency_us * 1e-6
    mean, emax = cost.expert_load(group_tokens, model.top_k, model.num_experts, par.ep)
    if mb and mean > 0:
        emax = max(emax, mean / mb)
    return Projection(
        label=f"projected (roofline on {hw.name})",
        seqs_per_replica=seqs, micro_batches=m_eff, seqs_per_micro_batch=per_mb,
        decode=decode, prefill=prefill, tick_s=tick, tpot_s=tpot,
        tokens_per_s_replica=seqs / tpot, tokens_per_s_total=total_tps,
        comm_share=comm / (comm + roof), comm_overhead=comm / roof,
        busy_fraction=m_eff * roof / (par.pp * tpot),
        mfu=total_tps * f_dec / (par.world_size * hw.flops(par.world_size)),
        ttft_s=sum(c.time_s for c in single), batch_prefill_s=batch_prefill,
        bubble_fraction=cost.pipeline_bubble(par.pp, m_eff),
        request_latency_s=batch_prefill + (wl.output_len - 1) * tpot,
        flops_per_token_decode=f_dec,
        flops_per_token_prefill=cost.prefill_flops_per_token(model, wl.prompt_len),
        bytes_per_token_decode=sum(c.hbm_bytes for c in decode) * ranks_per_stage * m_eff / wl.concurrency,
        bytes_per_token_prefill=(sum(c.hbm_bytes for c in prefill) * ranks_per_stage * m_eff
                                 / (wl.concurrency * wl.prompt_len)),
        a2a_bytes_per_layer=a2a, tp_bytes_per_layer=tp_ar,
        a2a_s_per_layer=cost.transfer_time(a2a, hw.link_bandwidth(links0.ep_inter), 2, lat) if par.ep > 1 else 0.0,
        tp_s_per_layer=cost.transfer_time(tp_ar, hw.link_bandwidth(links0.tp_inter), 2, lat) if par.tp > 1 else 0.0,
        ep_group_tokens=group_tokens, expert_load_mean=mean, expert_load_max=emax,
        measured_balance=mb,
        load_balance=mean / emax if emax > 0 else 1.0,
        links=tuple(links_of(par, hw, s) for s in range(par.pp)),
    )
