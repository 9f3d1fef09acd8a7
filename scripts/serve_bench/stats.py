"""The serving benchmark's numbers: percentiles, TTFT/TPOT/ITL, goodput, Poisson arrivals,
and the summary table (vLLM's `bench serve` layout)."""
from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .client import BenchRun


PERCENTILES = (50, 90, 99)


def percentile(values, q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's
    default); NaN for no values."""
    xs = sorted(values)
    if not xs:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def mean(values) -> float:
    xs = list(values)
    return sum(xs) / len(xs) if xs else math.nan


def latency_stats(values_s) -> dict[str, float]:
    """mean, median, p90, p99 in milliseconds of values given in seconds."""
    ms = [v * 1000 for v in values_s]
    out = {"mean": mean(ms)}
    for q in PERCENTILES:
        out["median" if q == 50 else f"p{q}"] = percentile(ms, q)
    return out


def tpot(ttft_s: float, e2e_s: float, output_tokens: int) -> float | None:
    """Time per output token after the first; None for fewer than two output tokens."""
    if output_tokens is None or output_tokens < 2:
        return None
    return (e2e_s - ttft_s) / (output_tokens - 1)


def itls(token_times_s) -> list[float]:
    """Gaps between successive token chunk arrival times."""
    ts = list(token_times_s)
    return [b - a for a, b in zip(ts, ts[1:])]


def meets_slo(ttft_s: float | None, tpot_s: float | None, slo_ttft_ms: float | None,
              slo_tpot_ms: float | None) -> bool:
    if slo_ttft_ms is not None and (ttft_s is None or ttft_s * 1000 > slo_ttft_ms):
        return False
    if slo_tpot_ms is not None and tpot_s is not None and tpot_s * 1000 > slo_tpot_ms:
        return False
    return True


def goodput(records, duration_s: float, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> float:
    """Successful requests per second that meet every SLO given. ``records`` are
    RequestRecord objects or dicts with success, ttft_s and tpot_s."""
    if duration_s <= 0:
        return math.nan
    good = 0
    for r in records:
        get = r.get if isinstance(r, dict) else lambda k, r=r: getattr(r, k)
        if get("success") and meets_slo(get("ttft_s"), get("tpot_s"), slo_ttft_ms, slo_tpot_ms):
            good += 1
    return good / duration_s


def poisson_intervals(n: int, rate: float, seed: int) -> list[float]:
    """n inter-arrival gaps (s) of a Poisson process of ``rate`` requests/s: exponential
    with mean 1/rate, seeded; all zeros for an infinite rate."""
    if rate <= 0:
        raise ValueError(f"request rate must be > 0, got {rate}")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    return [rng.expovariate(rate) for _ in range(n)]


def arrival_offsets(n: int, rate: float, seed: int) -> list[float]:
    """When each request is due (s after the start): the first at 0, then Poisson gaps."""
    gaps = poisson_intervals(max(n - 1, 0), rate, seed)
    out, t = [], 0.0
    for i in range(n):
        out.append(t)
        if i < len(gaps):
            t += gaps[i]
    return out


def summarize(run: BenchRun, slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None) -> dict:
    ok = [r for r in run.records if r.success]
    sent = [r for r in run.records if r.sent]
    d = run.duration_s
    tin = sum(r.input_tokens for r in ok)
    tout = sum(r.output_tokens for r in ok)

    def rate(x):
        return x / d if d > 0 else math.nan

    s = {
        "completed": len(ok),
        "failed": len(sent) - len(ok),
        "not_sent": len(run.records) - len(sent),
        "duration_s": d,
        "total_input_tokens": tin,
        "total_output_tokens": tout,
        "request_throughput": rate(len(ok)),
        "output_throughput": rate(tout),
        "total_token_throughput": rate(tin + tout),
        "output_len_mismatch": sum(1 for r in ok if r.output_tokens != r.max_tokens),
        "stopped_early": run.stopped,
    }
    for name, vals in (("ttft", [r.ttft_s for r in ok]),
                       ("tpot", [r.tpot_s for r in ok if r.tpot_s is not None]),
                       ("itl", [g for r in ok for g in r.itl_s]),
                       ("e2el", [r.e2e_s for r in ok])):
        for k, v in latency_stats(vals).items():
            s[f"{k}_{name}_ms"] = v
    if slo_ttft_ms is not None or slo_tpot_ms is not None:
        s["slo_ttft_ms"], s["slo_tpot_ms"] = slo_ttft_ms, slo_tpot_ms
        s["request_goodput"] = goodput(ok, d, slo_ttft_ms, slo_tpot_ms)
    errors: dict[str, int] = {}
    for r in sent:
        if not r.success:
            errors[r.error or "?"] = errors.get(r.error or "?", 0) + 1
    s["errors"] = errors
    return s


def fmt(v, nd: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def format_table(s: dict, *, request_rate: float, max_concurrency: int | None,
                 offline: dict | None = None) -> str:
    W = 50
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=W, c="=")]

    def row(label, value):
        lines.append(f"{label:<40}{value}")

    def sep(title):
        lines.append("{s:{c}^{n}}".format(s=title, n=W, c="-"))

    row("Successful requests:", s["completed"])
    row("Failed requests:", s["failed"])
    if s.get("not_sent"):
        row("Requests not sent (bound reached):", s["not_sent"])
    row("Maximum request concurrency:", max_concurrency if max_concurrency else "none")
    row("Traffic request rate (req/s):", fmt(float(request_rate)))
    row("Benchmark duration (s):", fmt(s["duration_s"]))
    row("Total input tokens:", s["total_input_tokens"])
    row("Total generated tokens:", s["total_output_tokens"])
    row("Request throughput (req/s):", fmt(s["request_throughput"]))
    if "request_goodput" in s:
        row("Request goodput (req/s):", fmt(s["request_goodput"]))
    row("Output token throughput (tok/s):", fmt(s["output_throughput"]))
    row("Total token throughput (tok/s):", fmt(s["total_token_throughput"]))
    for key, title, short in (("ttft", "Time to First Token", "TTFT"),
                              ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
                              ("itl", "Inter-token Latency", "ITL"),
                              ("e2el", "End-to-end Latency", "E2EL")):
        sep(title)
        for stat, label in (("mean", "Mean"), ("median", "Median"), ("p90", "P90"), ("p99", "P99")):
            row(f"{label} {short} (ms):", fmt(s[f"{stat}_{key}_ms"]))
    if "request_goodput" in s:
        sep("Goodput SLOs")
        row("TTFT SLO (ms):", fmt(s["slo_ttft_ms"]) if s["slo_ttft_ms"] is not None else "none")
        row("TPOT SLO (ms):", fmt(s["slo_tpot_ms"]) if s["slo_tpot_ms"] is not None else "none")
    if offline is not None:
        sep("Served vs offline engine")
        if offline.get("error"):
            row("Offline run:", "failed")
            lines.append(f"  {offline['error']}")
        else:
            row("Offline concurrency (requests):", offline["max_concurrency"])
            row("Offline duration (s):", fmt(offline["duration_s"]))
            row("Offline generated tokens:", offline["output_tokens"])
            row("Offline output throughput (tok/s):", fmt(offline["output_throughput"]))
            row("Served / offline (%):", fmt(offline["served_over_offline_pct"], 1))
            row("Offline, all prompts at once (tok/s):", fmt(offline["all_at_once_output_throughput"]))
    lines.append("=" * W)
    return "\n".join(lines)
