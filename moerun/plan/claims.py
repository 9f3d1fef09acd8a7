"""Claims checking: a claims file (TOML) against the planner's projection and, when given,
measured values, with a verdict per claim that the numbers support and nothing more.

Owns the claims data (``ClaimsFile``, ``Claim``, ``METRICS``), the verdict rules and the
measured-values file; the table is rendered by ``moerun.plan.format.format_claims`` and the
command line is ``moerun plan --claims``:

    moerun plan --claims seed                          # configs/claims/seed.toml
    moerun plan --claims seed --measured m.json        # with a benchmark's measurements
    moerun plan --claims seed --json

    results = check(ClaimsFile.load("seed"), measured={"baseline": {"latency": 131.0}})

A measured-values file is JSON: {"source": "<device, date, command>",
"values": {"<strategy>": {"<metric>": number, ...}}}, in the units of METRICS.

Verdict rules, applied in this order (the first that applies decides):
1. "invalid layout": the claim's layout breaks a layout rule on its hardware and GPU count.
   Nothing can be measured or projected for a layout that cannot run; the rules are the reason.
2. "ambiguous": the claims file says why the figure's meaning is not fixed (no workload, no
   definition). No number can confirm a figure that does not say what it measures; the
   projection and any measurement are still shown, under our stated interpretation.
3. "not measured": no measured value. A projection never makes a claim hold: it is shown,
   with whether it is consistent with the claim, in its own column.
4. "holds" / "fails": measured vs claimed. Holds when the measurement is no worse than the
   claimed figure beyond the file's relative tolerance (lower-is-better: measured <=
   claimed x (1 + tol); higher-is-better: measured >= claimed x (1 - tol)); else fails.
Projection column "consistent": "yes" when the claimed figure is no better than the
projection beyond the tolerance. The roofline is optimistic (a lower bound on time, an upper
bound on throughput), so "no" means the claim beats the model's best case.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..config import ModelConfig
from .hardware import HardwareSpec
from .planner import PlanReport, make_plan
from .presets import from_table, load_toml, resolve_preset
from .strategy import Strategy

VERDICTS = ("holds", "fails", "invalid layout", "not measured", "ambiguous")


@dataclass(frozen=True)
class Metric:
    unit: str
    better: str  # "lower" | "higher"
    meaning: str  # what moerun projects / a benchmark must measure
    projected: Callable[[PlanReport], float]


METRICS = {
    "latency": Metric("ms", "lower", "decode time per output token (TPOT) of the workload",
                      lambda r: r.projection.tpot_s * 1e3),
    "throughput": Metric("tok/s", "higher", "decode output tokens/s of all replicas",
                         lambda r: r.projection.tokens_per_s_total),
    "comm_overhead": Metric("%", "lower", "communication time / compute-or-memory time (decode)",
                            lambda r: r.projection.comm_overhead * 100),
    "load_balance": Metric("%", "higher", "mean / max token-expert assignments per expert-rank",
                           lambda r: r.projection.load_balance * 100),
    "gpu_utilization": Metric("%", "higher", "share of time in compute or memory work (decode)",
                              lambda r: r.projection.busy_fraction * 100),
    "memory_per_gpu": Metric("GB", "lower", "weights + the workload's KV cache, largest rank",
                             lambda r: r.memory_per_gpu_bytes / 1e9),
}


@dataclass(frozen=True)
class Claim:
    metric: str  # a key of METRICS
    strategy: str  # layout preset (configs/strategies/) the claim is about
    claimed: float
    target: float | None = None  # the source's own target (direction from the metric)
    model: str = ""  # default: the file's
    hardware: str = ""  # default: the file's
    gpus: int = 0  # default: the file's
    ambiguous: str = ""  # why the figure's meaning is not fixed ("" = it is)
    quote: str = ""  # the source's words
    note: str = ""  # a remark that does not make the claim ambiguous

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"claim metric {self.metric!r} is not one of {', '.join(METRICS)}")


@dataclass(frozen=True)
class ClaimsFile:
    name: str
    model: str
    hardware: str
    gpus: int
    claims: tuple[Claim, ...]
    tolerance: float = 0.05  # relative, for holds/fails and for projection consistency
    source: str = ""

    @staticmethod
    def load(name: str | Path) -> "ClaimsFile":
        path = resolve_preset("claims", name)
        raw = dict(load_toml(path))
        items = raw.pop("claim", [])
        if not isinstance(items, list) or not items:
            raise ValueError(f"{path}: needs one or more [[claim]] tables")
        raw["claims"] = [from_table(Claim, t, where=f"{path} [[claim]] #{i + 1}") for i, t in enumerate(items)]
        return from_table(ClaimsFile, raw, where=str(path))


@dataclass(frozen=True)
class ClaimResult:
    claim: Claim
    layout: str
    hardware: str
    gpus: int
    unit: str
    meaning: str
    projected: float | None
    label: str  # "projected (roofline on <hardware>)"
    consistent: str  # "yes" | "no" | "n/a"
    measured: float | None
    verdict: str
    reason: str
    workload: str  # the strategy's workload, which the projection assumes


def no_worse(value: float, reference: float, better: str, tol: float) -> bool:
    """``value`` is not worse than ``reference`` by more than the relative tolerance."""
    if better == "lower":
        return value <= reference * (1 + tol)
    return value >= reference * (1 - tol)


def verdict(invalid: list[str], ambiguous: str, measured: float | None, claimed: float,
            better: str, tol: float) -> tuple[str, str]:
    """(verdict, reason) by the rules in the module docstring."""
    if invalid:
        return "invalid layout", "; ".join(invalid)
    if ambiguous:
        return "ambiguous", ambiguous
    if measured is None:
        return "not measured", "no measured value given"
    ok = no_worse(measured, claimed, better, tol)
    side = "at most" if better == "lower" else "at least"
    return ("holds" if ok else "fails"), f"measured {measured:g} vs claimed {claimed:g} ({better} is better; " \
        f"holds if {side} claimed within {tol:.0%})"


def check(cf: ClaimsFile, measured: dict[str, dict[str, float]] | None = None) -> list[ClaimResult]:
    measured = measured or {}
    for strat, values in measured.items():
        bad = [m for m in values if m not in METRICS]
        if bad:
            raise ValueError(f"measured values for {strat!r}: unknown metric(s) {', '.join(bad)}; "
                             f"metrics: {', '.join(METRICS)}")
    plans: dict[tuple, PlanReport] = {}
    out = []
    for c in cf.claims:
        strat = Strategy.load(c.strategy)
        key = (c.strategy, c.model or cf.model, c.hardware or cf.hardware, c.gpus or cf.gpus)
        if key not in plans:
            plans[key] = make_plan(ModelConfig.load(key[1]), strat.layout, HardwareSpec.load(key[2]),
                                   key[3], strat.workload)
        rep = plans[key]
        m = METRICS[c.metric]
        proj = m.projected(rep) if rep.valid else None
        # the projection (a best case) is no worse than the claim: the claim is attainable
        consistent = "n/a" if proj is None else ("yes" if no_worse(proj, c.claimed, m.better, cf.tolerance)
                                                 else "no")
        meas = measured.get(c.strategy, {}).get(c.metric)
        v, reason = verdict(list(rep.errors), c.ambiguous, meas, c.claimed, m.better, cf.tolerance)
        out.append(ClaimResult(c, str(strat.layout), key[2], key[3], m.unit, m.meaning, proj,
                               rep.label, consistent, meas, v, reason, strat.workload.describe()))
    return out


def load_measured(path: str | Path) -> tuple[dict[str, dict[str, float]], str]:
    """(values, source) of a measured-values file (format in the module docstring)."""
    with open(path) as f:
        raw = json.load(f)
    unknown = sorted(set(raw) - {"source", "values"})
    if unknown or not isinstance(raw.get("values"), dict):
        raise ValueError(f"{path}: expected {{\"source\": str, \"values\": {{strategy: {{metric: number}}}}}}"
                         + (f"; unknown key(s) {', '.join(unknown)}" if unknown else ""))
    return raw["values"], str(raw.get("source", path))
