"""Claims checking: a claims file (TOML) against the planner's projection and, when given,
measured values, with a verdict per claim that the numbers support and nothing more.

Owns the claims data (``ClaimsFile``, ``Claim``, ``METRICS``), the verdict rules and the
measured-values file; the table is rendered by ``moerun.plan.format.format_claims`` and the
command line is ``moerun plan --claims``:

    moerun plan --claims seed                          # configs/claims/seed.toml
    moerun plan --claims seed --measured m.json        # with a benchmark's measurements
    moerun plan --claims seed --json

    results = check(ClaimsFile.load("seed"), measured={"baseline": {"latency": 131.0}})

A measured-values file is JSON (``scripts/bench.py --json`` writes one):
    {"source": "<device, date, command>",
     "values": {"<strategy>": {"<metric>": number, ...}},        # in the units of METRICS
     "measured_as": {"<strategy>": {"layout": "TP8 EP8 PP1 DP1", "model": "<name>", ...}},
     "report": {...}}                                            # anything; not read here
"measured_as" (optional) says what was run for a strategy's values: without it they are
taken to be of the claim's own layout and model. Each value must lie in its metric's range
(``Metric.check``): a load balance of 500% is an error, not a verdict.

Verdict rules, applied in this order (the first that applies decides):
1. "invalid layout": the claim's layout breaks a layout rule on its hardware and GPU count.
   Nothing can be measured or projected for a layout that cannot run; the rules are the reason.
2. "ambiguous": the claims file says why the figure's meaning is not fixed (no workload, no
   definition). No number can confirm a figure that does not say what it measures; the
   projection and any measurement are still shown, under our stated interpretation.
3. "not measured": no measured value. A projection never makes a claim hold: it is shown,
   with whether it is consistent with the claim, in its own column.
4. "not comparable": the value was measured on another layout or model than the claim's
   (a substitute for an invalid layout, a subset of a world too large for the machine, a
   narrowed model), as "measured_as" says. It is shown, never judged against the claim.
5. "holds" / "fails": measured vs claimed. Holds when the measurement is no worse than the
   claimed figure beyond the file's relative tolerance (lower-is-better: measured <=
   claimed x (1 + tol); higher-is-better: measured >= claimed x (1 - tol)); else fails.
Projection column "consistent": "yes" when the claimed figure is no better than the
projection beyond the tolerance. The roofline is optimistic (a lower bound on time, an upper
bound on throughput), so "no" means the claim beats the model's best case.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..config import ModelConfig
from .hardware import HardwareSpec
from .metrics import METRIC_UNITS
from .planner import PlanReport, make_plan
from .presets import from_table, load_toml, resolve_preset
from .strategy import Strategy

VERDICTS = ("holds", "fails", "invalid layout", "not measured", "not comparable", "ambiguous")


@dataclass(frozen=True)
class Metric:
    name: str
    meaning: str  # what moerun projects / a benchmark must measure
    projected: Callable[[PlanReport], float]
    low: float = 0.0  # smallest value that can be measured
    high: float = math.inf  # largest
    low_open: bool = True  # low itself is impossible (a latency of 0 ms)
    unit: str = field(init=False)
    better: str = field(init=False)  # "lower" | "higher"

    def __post_init__(self):
        unit, better = METRIC_UNITS[self.name]  # moerun.plan.metrics owns units and direction
        object.__setattr__(self, "unit", unit)
        object.__setattr__(self, "better", better)

    def check(self, value) -> str:
        """Why ``value`` cannot be a measurement of this metric ("" = it can)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"{self.name} = {value!r} is not a finite number"
        if value < self.low or (self.low_open and value == self.low) or value > self.high:
            lo = "(" if self.low_open else "["
            hi = f"{self.high:g}]" if math.isfinite(self.high) else "inf)"
            return f"{self.name} = {value:g} {self.unit} is outside its range {lo}{self.low:g}, {hi}"
        return ""


METRICS = {m.name: m for m in (
    Metric("latency", "decode time per output token (TPOT) of the workload",
           lambda r: r.projection.tpot_s * 1e3),
    Metric("throughput", "decode output tokens/s of all replicas",
           lambda r: r.projection.tokens_per_s_total),
    Metric("comm_overhead", "communication time / compute-or-memory time (decode)",
           lambda r: r.projection.comm_overhead * 100, low_open=False),
    Metric("load_balance", "mean / max token-expert assignments per expert-rank",
           lambda r: r.projection.load_balance * 100, high=100.0),
    Metric("gpu_utilization", "share of time in compute or memory work (decode)",
           lambda r: r.projection.busy_fraction * 100, high=100.0, low_open=False),
    Metric("memory_per_gpu", "weights + the workload's KV cache, largest rank",
           lambda r: r.memory_per_gpu_bytes / 1e9),
)}


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
            better: str, tol: float, elsewhere: str = "") -> tuple[str, str]:
    """(verdict, reason) by the rules in the module docstring; ``elsewhere`` says what other
    layout or model the value was measured on ("" = the claim's own)."""
    if invalid:
        return "invalid layout", "; ".join(invalid)
    if ambiguous:
        return "ambiguous", ambiguous
    if measured is None:
        return "not measured", "no measured value given"
    if elsewhere:
        return "not comparable", f"measured {measured:g} on {elsewhere}; shown, not judged against the claim"
    ok = no_worse(measured, claimed, better, tol)
    side = "at most" if better == "lower" else "at least"
    return ("holds" if ok else "fails"), f"measured {measured:g} vs claimed {claimed:g} ({better} is better; " \
        f"holds if {side} claimed within {tol:.0%})"


def check_measured(values: dict, where: str = "measured values") -> None:
    """ValueError naming every unknown metric and every value outside its metric's range."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected {{strategy: {{metric: number}}}}, got {type(values).__name__}")
    bad = []
    for strat, vals in values.items():
        if not isinstance(vals, dict):
            bad.append(f"{strat!r}: expected {{metric: number}}, got {vals!r}")
            continue
        unknown = [m for m in vals if m not in METRICS]
        if unknown:
            bad.append(f"{strat!r}: unknown metric(s) {', '.join(unknown)}; metrics: {', '.join(METRICS)}")
        bad += [f"{strat!r}: {why}" for m, v in vals.items() if m in METRICS and (why := METRICS[m].check(v))]
    if bad:
        raise ValueError(f"{where}: " + "; ".join(bad))


def measured_elsewhere(claim_layout: str, claim_model: str, measured_as: dict | None) -> str:
    """What the measurement ran on, when that is not the claim's layout and model ("" = it is)."""
    if not measured_as:
        return ""
    layout, model = measured_as.get("layout", claim_layout), measured_as.get("model", claim_model)
    if layout == claim_layout and model == claim_model:
        return ""
    return f"{layout} of model {model} (the claim is about {claim_layout} of {claim_model})"


def check(cf: ClaimsFile, measured: dict[str, dict[str, float]] | None = None,
          measured_as: dict[str, dict] | None = None) -> list[ClaimResult]:
    """One ClaimResult per claim. ``measured_as[strategy]`` ({"layout", "model", ...}) says
    what a strategy's values were measured on (absent: the claim's own layout and model)."""
    measured, measured_as = measured or {}, measured_as or {}
    check_measured(measured)
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
        elsewhere = measured_elsewhere(str(strat.layout), key[1], measured_as.get(c.strategy))
        v, reason = verdict(list(rep.errors), c.ambiguous, meas, c.claimed, m.better, cf.tolerance, elsewhere)
        out.append(ClaimResult(c, str(strat.layout), key[2], key[3], m.unit, m.meaning, proj,
                               rep.label, consistent, meas, v, reason, strat.workload.describe()))
    return out


@dataclass(frozen=True)
class MeasuredFile:
    values: dict[str, dict[str, float]]
    source: str
    measured_as: dict[str, dict]


MEASURED_KEYS = ("source", "values", "measured_as", "report")


def load_measured(path: str | Path) -> MeasuredFile:
    """A measured-values file (format in the module docstring), every value range-checked."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except OSError as e:
        raise ValueError(f"--measured {path}: cannot read it ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--measured {path}: not valid JSON ({e})") from None
    unknown = sorted(set(raw) - set(MEASURED_KEYS)) if isinstance(raw, dict) else []
    if not isinstance(raw, dict) or unknown or not isinstance(raw.get("values"), dict):
        raise ValueError(f"{path}: expected {{\"source\": str, \"values\": {{strategy: {{metric: number}}}}, "
                         f"\"measured_as\": {{strategy: {{\"layout\", \"model\", ...}}}} (optional), "
                         f"\"report\": {{...}} (optional)}}"
                         + (f"; unknown key(s) {', '.join(unknown)}" if unknown else ""))
    check_measured(raw["values"], where=str(path))
    measured_as = raw.get("measured_as", {})
    if not isinstance(measured_as, dict) or not all(isinstance(v, dict) for v in measured_as.values()):
        raise ValueError(f"{path}: \"measured_as\" must be {{strategy: {{\"layout\": str, \"model\": str, ...}}}}")
    return MeasuredFile(raw["values"], str(raw.get("source", path)), measured_as)
