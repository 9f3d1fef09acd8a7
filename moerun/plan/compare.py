"""One table of the six metrics for a strategy: the source's claim, the measurement, the
projection (and the calibrated projection where it applies) and the claims verdict.

    rows = build_rows("optimized", check(cf, values, measured_as), plan, values["optimized"], cal, labels)
    print("\\n".join(format_rows(rows, {"claimed": "claimed (TP4 EP16 PP4 DP2)", ...})))
    [r.to_json() for r in rows]

Every figure is a ``Figure``, a value with its label: "claimed (<source>, <layout>)",
"measured (<device>, ...)", "projected (roofline on <hardware>): ...", "calibrated (...)" or
"not applicable: <why>".
The verdict is the claims checker's (``moerun.plan.claims``) for the claim as written; a
metric the claims file says nothing about for this strategy gets "no claim".
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .calibrate import Calibration
from .claims import METRICS, ClaimResult
from .format import table
from .planner import PlanReport


@dataclass(frozen=True)
class Figure:
    value: float | None
    label: str


@dataclass(frozen=True)
class Row:
    metric: str
    unit: str
    better: str
    claimed: Figure
    measured: Figure
    projected: Figure
    calibrated: Figure
    verdict: str
    reason: str

    def to_json(self) -> dict:
        return asdict(self)


def build_rows(strategy: str, results: list[ClaimResult], plan: PlanReport, measured: dict[str, float],
               calibration: Calibration, labels: dict[str, str]) -> list[Row]:
    """``results``: the claims check (only this strategy's are read); ``plan``: the layout
    that was projected; ``measured``: {metric: number}; ``labels``: the "claimed",
    "measured" and "projected" labels."""
    mine = {r.claim.metric: r for r in results if r.claim.strategy == strategy}
    cal_label = calibration.label if calibration.applicable else f"not applicable: {calibration.reason}"
    rows = []
    for name, m in METRICS.items():
        r = mine.get(name)
        verdict, reason = ((r.verdict, r.reason) if r else
                           ("no claim", f"the claims file makes no {name} claim for {strategy}"))
        rows.append(Row(
            name, m.unit, m.better, Figure(r.claim.claimed if r else None, labels["claimed"] if r else "no claim"),
            Figure(measured.get(name), labels["measured"]),
            Figure(m.projected(plan) if plan.valid else None, labels["projected"]),
            Figure(calibration.values.get(name), cal_label), verdict, reason))
    return rows


def cell(x: float | None, unit: str) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f} {unit}" if abs(x) >= 1000 else f"{x:.4g} {unit}"


def format_rows(rows: list[Row], headings: dict[str, str]) -> list[str]:
    """The table; ``headings``: column -> its short label ("claimed", "measured", ...), the
    full labels printed by the caller above it. The calibrated column is left out when no
    metric has a calibrated figure. Verdict reasons follow as numbered notes."""
    cal = any(r.calibrated.value is not None for r in rows)
    cols = ["claimed", "measured", "projected"] + (["calibrated"] if cal else [])
    notes: dict[str, int] = {}
    body = []
    for r in rows:
        n = notes.setdefault(r.reason, len(notes) + 1)
        body.append([r.metric] + [cell(getattr(r, c).value, r.unit) for c in cols] + [f"{r.verdict} [{n}]"])
    lines = table(["metric"] + [headings[c] for c in cols] + ["verdict"], body, indent="", align="left")
    return lines + [""] + [f"[{n}] {text}" for text, n in notes.items()]
