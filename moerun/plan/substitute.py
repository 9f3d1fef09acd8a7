"""What a benchmark runs instead of what it was asked to run, each by a stated rule.

Pure Python on top of ``moerun.parallel`` (its rules, never re-implemented); no torch.

    closest_layouts(model, ParallelConfig(tp=4, ep=16, pp=4, dp=2), gpus=16)
        # [Candidate(TP4 EP16 PP1 DP4, 3.0), Candidate(TP8 EP16 PP1 DP2, 4.0), ...]
    measurable_subset(model, ParallelConfig(tp=8, ep=8, pp=2), max_world=8)
        # Subset(layout=TP8 EP8 PP1 DP1, steps=("PP2 -> PP1",), ...)
    narrow_model(ModelConfig.load("seed-30b"))   # same layers, experts, heads; narrow widths
    shard_model(model, layout)                   # rank 0's shard as a one-process model

1. Substitution (an invalid layout): the valid layouts of the same GPU count, ranked by
   ``layout_distance``: the sum over the axes of |log2(asked) - log2(valid)|, weighted by
   ``AXIS_WEIGHTS`` (EP 4, TP 2, PP 1, DP 1): EP fixes the experts per GPU and the
   all-to-all, TP the head split and the per-layer collectives, while PP and DP only
   regroup the same shards, so one doubling of EP costs as much as four of PP or DP. Ties
   keep ``valid_layouts``' order (most tensor-parallel first).
2. Subset (a world too large for the machine): halve DP, then PP, then TP (by their
   smallest prime factor), EP shrinking with them to gcd(EP, DP*TP) whenever it no longer
   divides a stage's DP*TP ranks, until the world fits. Replicas go first (each DP replica
   is an independent copy), then pipeline depth, and the sharding of a layer (TP, EP) last.
3. Narrow model (a model too large for the machine): every field the layout rules read
   (layers, experts, top-k, heads, KV heads, which layers are MoE) is kept, so every layout
   valid for the model is valid for the narrow one; the widths shrink to ``NARROW``.
4. Shard model (one GPU standing for a rank): the layers, experts, heads and vocabulary
   rows one rank holds, as a one-process model. It routes its tokens among its own experts
   (no all-to-all; one expert group, whatever the model's n_group) and runs no collective:
   it measures compute and memory, not communication.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import ModelConfig
from ..parallel import ParallelConfig, valid_layouts

AXES = ("tp", "ep", "pp", "dp")
AXIS_WEIGHTS = {"ep": 4.0, "tp": 2.0, "pp": 1.0, "dp": 1.0}
NARROW = {"hidden_size": 128, "head_dim": 8, "moe_ffn": 128, "dense_ffn": 128, "shared_expert_ffn": 128,
          "vocab_size": 512}
DISTANCE_RULE = ("distance = sum over axes of weight x |log2(asked) - log2(valid)|, weights "
                 + ", ".join(f"{a.upper()} {w:g}" for a, w in AXIS_WEIGHTS.items())
                 + " (keep EP, then TP; PP and DP only regroup the same shards)")
SUBSET_RULE = ("halve DP, then PP, then TP (smallest prime factor), EP shrinking to gcd(EP, DP*TP) "
               "when it no longer divides a stage's DP*TP ranks, until the world fits")


@dataclass(frozen=True)
class Candidate:
    layout: ParallelConfig
    distance: float


@dataclass(frozen=True)
class Subset:
    layout: ParallelConfig
    of: ParallelConfig
    max_world: int
    steps: tuple[str, ...]  # e.g. "DP4 -> DP2, EP16 -> EP8"; () when the layout already fits

    @property
    def is_subset(self) -> bool:
        return bool(self.steps)

    def describe(self, reason: str) -> str:
        if not self.steps:
            return f"measured the full layout {self.of} ({self.of.world_size} processes)"
        return (f"measured subset {self.layout} of {self.of} ({reason}: {self.of.world_size} processes > "
                f"{self.max_world}; rule: {SUBSET_RULE}; steps: {'; '.join(self.steps)})")


def layout_distance(a: ParallelConfig, b: ParallelConfig) -> float:
    return sum(w * abs(math.log2(getattr(a, x)) - math.log2(getattr(b, x))) for x, w in AXIS_WEIGHTS.items())


def closest_layouts(model: ModelConfig, layout: ParallelConfig, gpus: int, top: int = 5) -> list[Candidate]:
    """The ``top`` valid layouts of ``gpus`` processes nearest ``layout`` (rule 1 above);
    [] when none is valid. A valid ``layout`` comes first, at distance 0."""
    bad = [a for a in AXES if getattr(layout, a) < 1]
    if bad:
        raise ValueError(f"layout {layout}: {', '.join(bad)} must be >= 1")
    ranked = sorted(((layout_distance(layout, v), i, v) for i, v in enumerate(valid_layouts(model, gpus))),
                    key=lambda t: t[:2])
    return [Candidate(v, d) for d, _, v in ranked[:top]]


def _smallest_factor(n: int) -> int:
    return next(p for p in range(2, n + 1) if n % p == 0)


def measurable_subset(model: ModelConfig, layout: ParallelConfig, max_world: int) -> Subset:
    """The largest part of ``layout`` that runs in ``max_world`` processes (rule 2 above)."""
    if max_world < 1:
        raise ValueError(f"max_world = {max_world} must be >= 1")
    cur, steps = layout, []
    while cur.world_size > max_world:
        axis = next(a for a in ("dp", "pp", "tp") if getattr(cur, a) > 1)
        old = getattr(cur, axis)
        new = {axis: old // _smallest_factor(old)}
        dp, tp = new.get("dp", cur.dp), new.get("tp", cur.tp)
        if (dp * tp) % cur.ep:
            new["ep"] = math.gcd(cur.ep, dp * tp)
        steps.append(", ".join(f"{a.upper()}{getattr(cur, a)} -> {a.upper()}{v}" for a, v in new.items()))
        cur = ParallelConfig(**{a: new.get(a, getattr(cur, a)) for a in AXES})
    problems = cur.problems(model, cur.world_size)
    if problems:
        raise ValueError(f"subset {cur} of {layout} breaks the layout rules: " + "; ".join(problems))
    return Subset(cur, layout, max_world, tuple(steps))


def _in_vocab(model: ModelConfig, vocab: int) -> dict:
    bos = model.bos_token_id if model.bos_token_id is not None and model.bos_token_id < vocab else None
    return {"bos_token_id": bos, "eos_token_ids": tuple(e for e in model.eos_token_ids if e < vocab)}


def narrow_model(model: ModelConfig) -> ModelConfig:
    """``model`` with the widths of ``NARROW`` (where narrower) and everything the layout
    rules read unchanged (rule 3 above)."""
    widths = {k: min(getattr(model, k), v) if getattr(model, k) else 0 for k, v in NARROW.items()}
    # a partial rotary keeps its fraction of the narrowed head (even, >= 2)
    rotary = max(2, model.rotary_dim * widths["head_dim"] // model.head_dim // 2 * 2)
    name = f"{model.name or model.model_type}, narrowed"
    return model.replace(name=name, rotary_dim=rotary, **widths, **_in_vocab(model, widths["vocab_size"]))


def describe_model(model: ModelConfig) -> str:
    return (f"{model.name or model.model_type}: {model.num_params():,} parameters, {model.num_layers} layers, "
            f"{model.num_experts} experts (top-{model.top_k}), {model.num_heads} heads / {model.num_kv_heads} KV, "
            f"hidden {model.hidden_size}, head dim {model.head_dim}, expert FFN {model.moe_ffn}, "
            f"vocab {model.vocab_size}")


def shard_model(model: ModelConfig, layout: ParallelConfig, rank: int = 0) -> ModelConfig:
    """What ``rank`` of ``layout`` holds, as a one-process model (rule 4 above)."""
    problems = layout.problems(model)
    if problems:
        raise ValueError(f"layout {layout} is invalid for the model: " + "; ".join(problems))
    c = layout.coord(rank)
    layers = layout.stage_layers(model.num_layers)[c.pp]
    experts = len(layout.experts_of(c.ep_rank, model.num_experts)) if any(model.moe_layers) else model.num_experts
    vocab = len(layout.vocab_rows_of(c.tp, model.vocab_size))
    return model.replace(
        name=f"rank {rank} shard of {model.name or model.model_type} {layout}",
        num_layers=len(layers), moe_layers=tuple(model.moe_layers[i] for i in layers),
        sliding_windows=tuple(model.sliding_windows[i] for i in layers),
        num_experts=experts, top_k=min(model.top_k, experts), vocab_size=vocab, n_group=1, topk_group=1,
        num_heads=len(layout.q_heads_of(c.tp, model.num_heads)),
        num_kv_heads=len(layout.kv_heads_of(c.tp, model.num_kv_heads)), **_in_vocab(model, vocab))
