"""The planner: is a layout valid, what does each rank hold, does it fit, how fast could it be.

Pure Python on top of ``moerun.parallel`` (whose rules and shard ranges it uses, never
re-implements), ``moerun.plan.cost`` (the formulas) and ``moerun.plan.roofline`` (the
projection). No torch, no process groups, no GPU.

    from moerun.plan import make_plan, search
    rep = make_plan(ModelConfig.load("seed-30b"), ParallelConfig(tp=8, pp=2, ep=8),
                    HardwareSpec.load("seed"), gpus=16, workload=Workload())
    rep.valid, rep.errors, rep.per_rank[0].bytes, rep.projection.tpot_s
    search(model, hw, gpus=16, workload=Workload(), max_tpot_ms=50)   # best first

Command line: ``moerun plan --help`` (``moerun.plan.cli``); text rendering in
``moerun.plan.format``.
Memory: a rank needs weights + KV cache of its replica's sequences + the hardware's stated
reserve (activations, workspace); KV room = memory - weights - reserve.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .. import eplb
from ..config import ModelConfig
from ..parallel import ParallelConfig, valid_layouts
from . import cost
from .hardware import HardwareSpec
from .roofline import Projection, project
from .strategy import Workload


@dataclass(frozen=True)
class RankReport:
    rank: int
    pp: int
    dp: int
    tp: int
    ep_group: int
    ep_rank: int
    layers: tuple[int, ...]
    experts: tuple[int, ...]  # expert ids held in each of its MoE layers
    kv_heads: tuple[int, ...]
    params: int
    bytes: int  # weights, in the workload's dtype
    kv_bytes_per_token: int
    kv_room_bytes: int  # memory - weights - reserve (negative: weights do not fit)
    kv_tokens_max: int  # tokens of KV cache that room holds
    kv_bytes_needed: int  # the workload's sequences of this rank's replica
    fits: bool  # weights + reserve + needed KV <= memory


@dataclass(frozen=True)
class PlanReport:
    valid: bool
    errors: tuple[str, ...]
    model: ModelConfig
    layout: ParallelConfig
    hardware: HardwareSpec
    gpus: int
    workload: Workload
    micro_batches: int
    params_total: int
    per_rank: tuple[RankReport, ...] = ()
    projection: Projection | None = None

    @property
    def fits(self) -> bool:
        return self.valid and all(r.fits for r in self.per_rank)

    @property
    def label(self) -> str:
        return f"projected (roofline on {self.hardware.name})"

    @property
    def max_concurrent_tokens(self) -> int:
        """KV tokens one replica can hold: its tightest rank decides."""
        return min((r.kv_tokens_max for r in self.per_rank), default=0)

    @property
    def memory_per_gpu_bytes(self) -> int:
        """Largest weights + needed KV over ranks (the reserve is not included)."""
        return max((r.bytes + r.kv_bytes_needed for r in self.per_rank), default=0)

    def to_json(self) -> dict:
        return {
            "valid": self.valid, "errors": list(self.errors), "label": self.label,
            "model": self.model.name or self.model.model_type, "params_total": self.params_total,
            "layout": {**dataclasses.asdict(self.layout), "world_size": self.layout.world_size},
            "gpus": self.gpus, "hardware": dataclasses.asdict(self.hardware),
            "workload": dataclasses.asdict(self.workload), "micro_batches": self.micro_batches,
            "fits": self.fits, "max_concurrent_tokens_per_replica": self.max_concurrent_tokens,
            "memory_per_gpu_bytes": self.memory_per_gpu_bytes,
            "per_rank": [dataclasses.asdict(r) for r in self.per_rank],
            "projection": dataclasses.asdict(self.projection) if self.projection else None,
        }


def layout_errors(model: ModelConfig, par: ParallelConfig, hw: HardwareSpec, gpus: int) -> list[str]:
    """Every broken rule: the layout rules of moerun.parallel, and the hardware's GPU count."""
    errors = par.problems(model, gpus)
    if hw.num_gpus and gpus > hw.num_gpus:
        errors.append(f"hardware: {hw.name} has {hw.num_gpus} GPUs, the plan asks for {gpus}")
    return errors


def rank_report(model: ModelConfig, par: ParallelConfig, hw: HardwareSpec, wl: Workload,
                rank: int) -> RankReport:
    c = par.coord(rank)
    b, world = wl.dtype_bytes, par.world_size
    params = cost.rank_params(model, par, rank).total
    per_tok = cost.kv_bytes_per_token(model, par, rank, b)
    room = int(hw.memory_bytes(world) - hw.reserve_bytes(world)) - params * b
    seqs = math.ceil(wl.concurrency / par.dp)
    needed = seqs * (wl.prompt_len + wl.output_len) * per_tok
    experts = par.experts_of(c.ep_rank, model.num_experts) if any(model.moe_layers) else range(0)
    return RankReport(
        rank=rank, pp=c.pp, dp=c.dp, tp=c.tp, ep_group=c.ep_group, ep_rank=c.ep_rank,
        layers=tuple(par.stage_layers(model.num_layers)[c.pp]), experts=tuple(experts),
        kv_heads=tuple(par.kv_heads_of(c.tp, model.num_kv_heads)), params=params, bytes=params * b,
        kv_bytes_per_token=per_tok, kv_room_bytes=room,
        kv_tokens_max=max(0, room) // per_tok if per_tok else 0,
        kv_bytes_needed=needed, fits=needed <= room,
    )


def make_plan(model: ModelConfig, par: ParallelConfig, hw: HardwareSpec, gpus: int,
              workload: Workload, micro_batches: int | None = None,
              measured_balance: float | None = None) -> PlanReport:
    """The full report: errors if the layout is invalid, else per-rank memory and a projection.
    ``micro_batches``: None takes the workload's (0 there means one per stage).
    ``measured_balance``: mean / max tokens per EP rank of a measured expert load under this
    layout's placement (``expert_balance``); None projects uniform routing."""
    m = micro_batches or workload.micro_batches or par.pp
    if m < 1:
        raise ValueError(f"micro_batches = {m} must be >= 1")
    base = dict(model=model, layout=par, hardware=hw, gpus=gpus, workload=workload,
                micro_batches=m, params_total=model.num_params())
    errors = layout_errors(model, par, hw, gpus)
    if errors:
        return PlanReport(valid=False, errors=tuple(errors), **base)
    ranks = tuple(rank_report(model, par, hw, workload, r) for r in range(par.world_size))
    return PlanReport(valid=True, errors=(), per_rank=ranks,
                      projection=project(model, par, hw, workload, m, measured_balance), **base)


def expert_balance(model: ModelConfig, par: ParallelConfig, load_file: str, place: bool,
                   gpus_per_node: int | None = None) -> dict:
    """Balance of a measured expert-load file under ``par`` (mean over the MoE layers of
    each layer's mean / max tokens per EP rank): contiguous, and placed by ``moerun.eplb``
    (with ``par``'s redundant experts) when ``place`` or R > 0."""
    load = eplb.read_load(load_file, model)
    out = {"file": load_file, "contiguous_balance": eplb.layer_balance(load, None, par.ep)
           if model.num_experts % par.ep == 0 else None, "placed_balance": None}
    if place or par.redundant_experts:
        placement = eplb.plan(load, par.ep, par.redundant_experts, gpus_per_node)
        out["placed_balance"] = eplb.layer_balance(load, placement, par.ep)
    out["used"] = out["placed_balance"] if out["placed_balance"] is not None else out["contiguous_balance"]
    out["label"] = "projected from the measured load " + ("placed by moerun.eplb" if out["placed_balance"]
                                                          is not None else "on the contiguous split")
    return out


def search(model: ModelConfig, hw: HardwareSpec, gpus: int, workload: Workload,
           micro_batches: int | None = None, max_tpot_ms: float | None = None) -> list[PlanReport]:
    """Every valid layout (moerun.parallel.valid_layouts) whose memory fits the workload and,
    given a bound, whose projected TPOT is under it; best projected total throughput first."""
    out = []
    for par in valid_layouts(model, gpus):
        rep = make_plan(model, par, hw, gpus, workload, micro_batches)
        if not rep.fits:
            continue
        if max_tpot_ms is not None and rep.projection.tpot_s * 1e3 > max_tpot_ms:
            continue
        out.append(rep)
    return sorted(out, key=lambda r: -r.projection.tokens_per_s_total)
