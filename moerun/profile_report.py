"""``moerun profile-report DIR``: print a profile that ``moerun generate --profile-out DIR``
wrote, as tables: per-rank phase seconds and shares, the metrics with their definitions,
the expert load per EP rank, the memory per rank and the profiler's own overhead.

    moerun generate --profile-out prof/ --prompt "Hello"
    moerun profile-report prof/

DIR/summary.json is the input (its schema: ``moerun.profile.summary.build_summary``);
DIR/trace.json opens in ui.perfetto.dev. ``publish`` is what generate and serve do with a
profile at the end of a run: write it under --profile-out, or print this report.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .args import HelpFormatter
from .plan.format import table
from .profile.summary import trace_events, write_profile

log = logging.getLogger("moerun")

UNITS = {"_ms": "ms", "_tok_s": "tok/s", "_pct": "%", "_gb": "GB"}  # a metric key's suffix -> its unit
# the summary's top-level keys; a file without them is not a profile summary
SUMMARY_KEYS = ("layout", "world_size", "device", "model", "dtype", "workload", "wall_s", "ticks", "phases_s",
                "requests", "expert_load", "memory", "metrics", "definitions", "profile_overhead")


def load_summary(directory: str) -> dict:
    path = os.path.join(directory, "summary.json")
    try:
        with open(path) as f:
            summary = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    missing = [k for k in SUMMARY_KEYS if not isinstance(summary, dict) or k not in summary]
    if missing:
        raise ValueError(f"{path} is not a moerun profile summary: no {', '.join(missing)}")
    return summary


def _num(x, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _unit(key: str) -> str:
    return next((u for suffix, u in UNITS.items() if key.endswith(suffix)), "")


def format_report(s: dict) -> str:
    lay, w = s["layout"], s["workload"]
    out = [f"model     {s['model']} ({s['dtype']}) on {s['device']}, TP{lay['tp']} EP{lay['ep']} PP{lay['pp']} "
           f"DP{lay['dp']} ({s['world_size']} ranks)",
           f"workload  {w['requests']} requests, {w['prompt_tokens']} prompt tokens, {w['output_tokens']} output "
           f"tokens; {s['wall_s']:.3f} s wall (Engine.generate on rank 0), {s['ticks']} ticks", ""]

    ranks = sorted(s["phases_s"], key=int)
    per = s["phases_s"]
    names = [p for p in per[ranks[0]] if p not in ("other", "wall") and any(per[r][p] > 0 for r in ranks)]
    rows = []
    for p in names + ["other", "wall"]:
        rows.append([p] + [f"{per[r][p]:.3f} {100 * per[r][p] / per[r]['wall'] if per[r]['wall'] else 0:5.1f}%"
                           for r in ranks])
    out += ["phase seconds per rank (share of the rank's profiled wall)"]
    out += table(["phase"] + [f"rank {r}" for r in ranks], rows) + [""]

    m, d = s["metrics"], s["definitions"]
    out += ["metrics"]
    out += table(["metric", "value", "unit"], [[k, _num(v), _unit(k)] for k, v in m.items()]) + [""]
    keys_of: dict[str, list[str]] = {}  # one definition may cover several keys (ttft and e2e with latency)
    for k in m:
        keys_of.setdefault(d.get(k, "(no definition)"), []).append(k)
    out += ["definitions (moerun.plan.metrics)"]
    out += [f"  {', '.join(keys)}: {text}" for text, keys in keys_of.items()] + [""]

    load = s["expert_load"]["per_ep_rank"]
    total = sum(load)
    out += [f"expert load per EP rank (token-slots over {len(s['expert_load']['per_layer'])} MoE layers)"]
    out += table(["ep rank", "token-slots", "share"],
                 [[r, n, f"{100 * n / total if total else 0:.1f}%"] for r, n in enumerate(load)]) + [""]

    out += ["memory per rank"]
    out += table(["rank", "weights", "kv cache", "peak activations", "peak total"],
                 [[r, *(_bytes(mem[k]) for k in ("weights_bytes", "kv_cache_bytes", "peak_activation_bytes",
                                                 "peak_total_bytes"))]
                  for r, mem in sorted(s["memory"].items(), key=lambda kv: int(kv[0]))]) + [""]

    ov = s["profile_overhead"]
    out += [f"profiler overhead  {_num(ov['pct'])}% of wall", f"  method: {ov['method']}"]
    return "\n".join(out)


def publish(summary: dict, reports: dict, out_dir: str | None) -> None:
    """A finished run's profile: summary.json and trace.json under ``out_dir``, else the
    report on stderr; the profiler's own overhead logged either way."""
    if out_dir is not None:
        paths = write_profile(out_dir, summary, trace_events(reports))
        log.info("profile: wrote %s (moerun profile-report %s)", ", ".join(paths), out_dir)
    else:
        print(format_report(summary), file=sys.stderr)
    ov = summary["profile_overhead"]
    log.info("profiler overhead: %s%% of wall (%s)", "-" if ov["pct"] is None else f"{ov['pct']:.2f}", ov["method"])


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moerun profile-report", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("dir", help="the --profile-out directory of a profiled run")
    return ap


def main(argv: list[str] | None = None) -> int:
    """No torch here (a report reads JSON only), so not ``moerun.entry``: a bad DIR is one
    line and exit 2, as there."""
    args = parser().parse_args(argv)
    try:
        summary = load_summary(args.dir)
    except ValueError as e:
        print(f"moerun profile-report: error: {e}", file=sys.stderr)
        return 2
    print(format_report(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
