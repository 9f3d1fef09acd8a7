"""ParallelConfig: the TP x PP x EP x DP layout, its rules, and who owns what.

Pure Python, no torch.distributed: the runtime (``moerun.mesh``), ``moerun layout`` and
the planner (``moerun.plan``) all call the same rules, so they can never disagree.

    par = ParallelConfig(tp=2, pp=2, ep=4, dp=2)
    par.validate(model_cfg, world_size=8)      # raises LayoutError naming every broken rule
    par.coord(rank)                            # RankCoord(pp, dp, tp, ep_group, ep_rank)
    par.stage_layers(num_layers)               # contiguous, balanced layer ranges per stage

Rank layout: the mesh is ("pp", "dp", "tp") with tp fastest, so
``rank = (pp_idx * dp + dp_idx) * tp + tp_idx``. Expert parallelism is carved out of a
stage's ``dp * tp`` ranks: its ``local = dp_idx * tp + tp_idx`` ranks are cut into
``dp * tp / ep`` consecutive EP groups of ``ep`` ranks; each group holds all experts once
(EP rank r owns experts ``[r * E/ep, (r+1) * E/ep)``), so with ``ep < dp * tp`` every
expert is replicated ``dp * tp / ep`` times per stage. With ``redundant_experts`` R > 0 a
group holds ``E + R`` physical experts (``moerun.eplb``: hot experts get copies), EP rank r
the physical slots ``[r * (E+R)/ep, (r+1) * (E+R)/ep)``.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig
from .eplb import redundant_problems


class LayoutError(ValueError):
    """An invalid layout. ``.problems`` lists every rule broken, one message each."""

    def __init__(self, problems: list[str], suggestions: list["ParallelConfig"] = ()):
        self.problems = list(problems)
        self.suggestions = list(suggestions)
        msg = "invalid layout:\n" + "\n".join(f"  - {p}" for p in self.problems)
        if self.suggestions:
            shown = ", ".join(str(s) for s in self.suggestions[:12])
            more = f" (+{len(self.suggestions) - 12} more)" if len(self.suggestions) > 12 else ""
            msg += f"\nvalid layouts for this model and world size: {shown}{more}"
        else:
            msg += "\nno valid layout exists for this model and world size"
        super().__init__(msg)


@dataclass(frozen=True)
class RankCoord:
    rank: int
    pp: int
    dp: int
    tp: int
    ep_group: int  # which EP group of its stage (a full copy of the experts)
    ep_rank: int  # position inside that EP group


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    dp: int = 1
    redundant_experts: int = 0  # R: physical experts beyond E per EP group (moerun.eplb)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def __str__(self) -> str:
        r = f" R{self.redundant_experts}" if self.redundant_experts else ""
        return f"TP{self.tp} EP{self.ep} PP{self.pp} DP{self.dp}{r}"

    # ------------------------------------------------------------------ rules
    def problems(self, model: ModelConfig, world_size: int | None = None) -> list[str]:
        """Every rule this layout breaks for ``model`` on ``world_size`` processes."""
        p = []
        for axis in ("tp", "pp", "ep", "dp"):
            v = getattr(self, axis)
            if not isinstance(v, int) or v < 1:
                p.append(f"{axis} = {v!r} must be a positive integer")
        if p:
            return p
        tp, pp, ep, dp = self.tp, self.pp, self.ep, self.dp
        if world_size is not None and tp * pp * dp != world_size:
            p.append(f"world size: tp*pp*dp = {tp}*{pp}*{dp} = {tp * pp * dp} processes, "
                     f"but the world has {world_size}")
        if (dp * tp) % ep:
            p.append(f"expert parallelism: ep ({ep}) must divide a stage's dp*tp = {dp}*{tp} = {dp * tp} "
                     f"ranks (EP groups are carved out of one pipeline stage)")
        if any(model.moe_layers) and self.redundant_experts:
            p += redundant_problems(model.num_experts, ep, self.redundant_experts)
        elif any(model.moe_layers) and model.num_experts % ep:
            p.append(f"experts: num_experts ({model.num_experts}) must be divisible by ep ({ep})")
        if model.num_heads % tp:
            p.append(f"attention heads: num_heads ({model.num_heads}) must be divisible by tp ({tp})")
        kv = model.num_kv_heads
        if kv % tp and tp % kv:
            p.append(f"KV heads: num_kv_heads ({kv}) must be divisible by tp ({tp}), or tp a multiple "
                     f"of it (KV heads are then replicated)")
        if not 1 <= pp <= model.num_layers:
            p.append(f"pipeline: pp ({pp}) must be between 1 and num_layers ({model.num_layers})")
        return p

    def validate(self, model: ModelConfig, world_size: int | None = None) -> None:
        problems = self.problems(model, world_size)
        if problems:
            ws = world_size if world_size is not None else self.world_size
            raise LayoutError(problems, valid_layouts(model, ws))

    # -------------------------------------------------------------- ownership
    def coord(self, rank: int) -> RankCoord:
        tp_idx = rank % self.tp
        dp_idx = (rank // self.tp) % self.dp
        pp_idx = rank // (self.tp * self.dp)
        local = dp_idx * self.tp + tp_idx
        return RankCoord(rank, pp_idx, dp_idx, tp_idx, local // self.ep, local % self.ep)

    def rank_of(self, pp: int, dp: int, tp: int) -> int:
        return (pp * self.dp + dp) * self.tp + tp

    def stage_layers(self, num_layers: int) -> list[range]:
        """Contiguous layer ranges, sizes differing by at most one (earlier stages larger)."""
        base, extra = divmod(num_layers, self.pp)
        out, start = [], 0
        for s in range(self.pp):
            n = base + (1 if s < extra else 0)
            out.append(range(start, start + n))
            start += n
        return out

    # Shard ranges: the one place that says which slice of a tensor a rank holds. The
    # layers read them through their ``Comm``; the planner and ``moerun layout`` call them
    # directly.
    def experts_of(self, ep_rank: int, num_experts: int) -> range:
        """Physical expert slots an EP rank holds: a contiguous 1/ep of the E + R (with R = 0,
        the experts themselves; ``moerun.eplb`` says which logical expert each slot holds)."""
        n = (num_experts + self.redundant_experts) // self.ep
        return range(ep_rank * n, (ep_rank + 1) * n)

    def q_heads_of(self, tp_idx: int, num_heads: int) -> range:
        """Query heads a TP rank holds: a contiguous 1/tp of them."""
        n = num_heads // self.tp
        return range(tp_idx * n, (tp_idx + 1) * n)

    def kv_heads_of(self, tp_idx: int, num_kv_heads: int) -> range:
        """KV heads a TP rank holds: a 1/tp share, or one replicated head when tp > kv."""
        if num_kv_heads >= self.tp:
            n = num_kv_heads // self.tp
            return range(tp_idx * n, (tp_idx + 1) * n)
        h = tp_idx // (self.tp // num_kv_heads)
        return range(h, h + 1)

    def kv_replicas(self, num_kv_heads: int) -> int:
        """TP ranks holding a copy of each KV head (1 unless tp > kv heads)."""
        return max(self.tp // num_kv_heads, 1)

    def vocab_rows_of(self, tp_idx: int, vocab_size: int) -> range:
        """Rows of the embedding / LM head a TP rank holds: ceil(V/tp) each, the last
        ranks what is left (possibly none)."""
        return ceil_range(vocab_size, self.tp, tp_idx)

    def token_rows_of(self, tp_idx: int, num_tokens: int) -> range:
        """Rows of a step's T tokens a TP rank keeps between the reduce-scatter after
        attention and the all-gather at the end of the layer (ceil split)."""
        return ceil_range(num_tokens, self.tp, tp_idx)

    def ep_group_ranks(self, pp: int, ep_group: int) -> list[int]:
        """Global ranks of one EP group of stage ``pp``."""
        first = pp * self.dp * self.tp + ep_group * self.ep
        return list(range(first, first + self.ep))


def ceil_range(n: int, parts: int, idx: int) -> range:
    """Part ``idx`` of ``n`` rows split in ``parts`` pieces of ceil(n/parts) rows; the last
    pieces get what is left, possibly nothing."""
    per = -(-n // parts)
    start = min(idx * per, n)
    return range(start, min(start + per, n))


def valid_layouts(model: ModelConfig, world_size: int) -> list[ParallelConfig]:
    """Every valid layout for ``world_size`` processes, most tensor-parallel first."""
    out = []
    for tp in _divisors(world_size):
        for pp in _divisors(world_size // tp):
            dp = world_size // (tp * pp)
            for ep in _divisors(dp * tp):
                par = ParallelConfig(tp=tp, pp=pp, ep=ep, dp=dp)
                if not par.problems(model, world_size):
                    out.append(par)
    return sorted(out, key=lambda c: (-c.tp, -c.ep, c.pp, c.dp))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
