"""A calibrated projection: the roofline with its compute and memory terms replaced by a
measurement, when (and only when) the measurement stands for the projected ranks.

    cal = calibrate(plan, summary, measured_model)
    cal.applicable, cal.reason, cal.values      # values: {claims metric: number}

Applicable when all of these hold (otherwise ``reason`` names the first that fails):
- the measurement ran on the target's kind of device ("cpu" for a shared-box spec such as
  ``cpu``, "cuda" for every other spec);
- it ran the projected model on the projected layout, or one rank's shard of them as a
  one-process model (``moerun.plan.substitute.shard_model``);
- at the projected batch: the workload's sequences (a full layout) or one decode
  micro-batch of one replica (a shard), with the workload's prompt and output lengths.

The replacement: measured decode compute per tick = measured TPOT / the measured run's
ticks per round (its PP: generate runs M = PP) x the busiest rank's share of wall time in
compute phases (``moerun.plan.metrics.COMPUTE_PHASES``). Every projected stage's
max(compute, memory) becomes that figure; its communication stays the roofline's. TPOT,
throughput, communication overhead and utilization then follow the roofline's own formulas
(``moerun.plan.roofline``); load balance and memory are not calibrated.
A shard routes all T tokens of its micro-batch where the real rank routes its T/tp share
(after the reduce-scatter), so its MoE phases count up to TP times the rank's expert work:
calibrated from a shard, compute time is an upper bound (and throughput a lower bound).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ModelConfig
from ..parallel import ParallelConfig
from . import cost
from .measure import device_kind, summary_layout
from .metrics import COMPUTE_PHASES
from .planner import PlanReport
from .substitute import shard_model


@dataclass(frozen=True)
class Calibration:
    applicable: bool
    reason: str  # why not ("" when applicable)
    label: str
    values: dict[str, float] = field(default_factory=dict)


def _same(a: ModelConfig, b: ModelConfig) -> bool:
    return a.replace(name="") == b.replace(name="")


def _form(plan: PlanReport, measured: ParallelConfig, model: ModelConfig) -> str:
    if measured == plan.layout and _same(model, plan.model):
        return "full"
    if measured.world_size == 1 and _same(model, shard_model(plan.model, plan.layout)):
        return "shard"
    return ""


def calibrate(plan: PlanReport, summary: dict, measured_model: ModelConfig) -> Calibration:
    hw, wl, p = plan.hardware, plan.workload, plan.projection
    label = f"calibrated (roofline on {hw.name}, compute and memory measured on {summary['device']})"

    def no(reason: str) -> Calibration:
        return Calibration(False, reason, label)

    if not plan.valid:
        return no(f"layout {plan.layout} is invalid for {plan.gpus} GPUs")
    target = "cpu" if hw.shared else "cuda"
    if device_kind(summary["device"]) != target:
        return no(f"measured on {summary['device']}, target {hw.name}")
    measured = summary_layout(summary)
    form = _form(plan, measured, measured_model)
    if not form:
        return no(f"measured {measured_model.name} on {measured}, neither {plan.model.name} on {plan.layout} "
                  f"nor one rank's shard of it")
    w = summary["workload"]
    seqs = wl.concurrency if form == "full" else p.seqs_per_micro_batch
    want = (seqs, seqs * wl.prompt_len, seqs * wl.output_len)
    got = (w["requests"], w["prompt_tokens"], w["output_tokens"])
    if got != want:
        return no(f"measured {got[0]} requests, {got[1]} prompt and {got[2]} output tokens; the projection's "
                  f"batch is {want[0]}, {want[1]} and {want[2]}")
    tpot_ms = summary["metrics"]["latency_ms"]
    if tpot_ms is None:
        return no("the measurement has no TPOT (no second output token)")
    share = max(sum(ph.get(k, 0.0) for k in COMPUTE_PHASES) / ph["wall"]
                for ph in summary["phases_s"].values() if ph["wall"] > 0)
    compute = tpot_ms / 1e3 / measured.pp * share
    tick = max(compute + c.comm_s for c in p.decode)
    tpot = cost.decode_round_ticks(plan.layout.pp, p.micro_batches) * tick
    comm = sum(c.comm_s for c in p.decode)
    values = {"latency": tpot * 1e3, "throughput": wl.concurrency / tpot,
              "comm_overhead": 100 * comm / (plan.layout.pp * compute),
              "gpu_utilization": 100 * p.micro_batches * compute / tpot}
    shard = f"; one rank's shard: MoE work counted up to TP{plan.layout.tp} times, an upper bound on compute"
    return Calibration(True, "", label[:-1] + (shard if form == "shard" else "") + ")", values)
