"""The ranks' profiler reports (``Profiler.report``, gathered to rank 0) turned into the
run's summary, its Perfetto trace, and the two files ``--profile-out DIR`` writes.

    reports = gather_to_rank0(mesh, {rank: worker.profile_report()})     # rank -> report
    summary = build_summary(reports, par=par, model="tiny", dtype="float32",
                            workload={"requests": 2, "prompt_tokens": 9, "output_tokens": 16},
                            wall_s=1.3, ticks=17)
    write_profile("prof/", summary, trace_events(reports))    # summary.json, trace.json

Every metric is computed by the functions of ``moerun.plan.metrics`` and carries that
module's definition (``metric_definitions``): the planner's projections, this
measurement and the claims checker mean the same thing by each name.
"""
from __future__ import annotations

import json
import os
import re

from .. import eplb
from ..parallel import ParallelConfig
from ..plan import metrics as M

OVERHEAD_METHOD = (
    "per rank: (phase enters+exits x the host cost of one + count_experts and note_activation calls x "
    "the cost of one, each timed 2000 times in a loop on a scratch profiler of the same device) + the "
    "host time of step_end (resolving the marks, counting the experts; timed in the run), over the "
    "rank's profiled wall time; the largest rank. A lower bound: a tight loop is warm in cache, and on "
    "CUDA the loss of CPU/GPU overlap to the one synchronize per step is not counted")


def metric_definitions() -> dict[str, str]:
    """The summary's metric keys -> their one-line definition, read from the "Definitions"
    list of ``moerun.plan.metrics``' docstring (that module is the one source)."""
    bullets, cur = {}, None
    for line in M.__doc__.split("Definitions", 1)[1].splitlines():
        m = re.match(r"- (\w+): (.*)", line)
        if m:
            cur = m[1]
            bullets[cur] = m[2].strip()
        elif cur and line.startswith("  ") and line.strip():
            bullets[cur] += " " + line.strip()
        else:
            cur = None
    of = {"latency_ms": "latency", "ttft_ms": "latency", "e2e_ms": "latency", "throughput_tok_s": "throughput",
          "comm_overhead_pct": "comm_overhead", "comm_share_pct": "comm_overhead",
          "load_balance_pct": "load_balance", "expert_balance_pct": "load_balance",
          "gpu_utilization_pct": "utilization", "memory_per_gpu_gb": "memory_per_gpu"}
    return {key: bullets[name] for key, name in of.items()}


def request_times(leader: dict) -> dict[str, list]:
    """Per request (the leader's clock), in arrival order: TTFT, TPOT and end-to-end ms;
    None where a request has no such time (TPOT of a one-token output)."""
    out = {"ttft_ms": [], "tpot_ms": [], "e2e_ms": []}
    for r in sorted(leader["requests"], key=lambda r: r["arrival"]):
        got = r["first"] is not None
        out["ttft_ms"].append(1e3 * (r["first"] - r["arrival"]) if got else None)
        out["tpot_ms"].append(M.tpot_ms(r["last"] - r["first"], r["tokens"] - 1) if got else None)
        out["e2e_ms"].append(1e3 * (r["last"] - r["arrival"]) if got else None)
    return out


def expert_load(reports: dict, par: ParallelConfig, placement: dict | None = None) -> dict:
    """Token-slots per expert of every MoE layer (summed over the ranks that route its
    tokens), and per EP rank over the run: EP rank r receives the slots of experts
    ``par.experts_of(r, E)``, summed over the layers and the EP groups. With redundant
    experts or a measured ``placement`` ({layer: physical slot -> logical expert}), an
    expert's slots count evenly on the ranks of its replicas (``moerun.eplb``). Under EP the
    ranks count the rows their experts computed (``Profiler.count_rows``): then
    ``per_ep_rank`` is that measured count (equal to the above for R = 0)."""
    layers: dict[int, list[int]] = {}
    for rep in reports.values():
        for layer, counts in rep["experts"].items():
            acc = layers.setdefault(int(layer), [0] * len(counts))
            layers[int(layer)] = [a + c for a, c in zip(acc, counts)]
    per_layer = [layers[k] for k in sorted(layers)]
    E = len(per_layer[0]) if per_layer else 0
    if E and (placement or par.redundant_experts):
        phys = {k: (placement or {}).get(k) or eplb.default_placement(E, par.ep, par.redundant_experts)
                for k in layers}
        per_ep = eplb.summed_rank_loads(layers, phys, par.ep)
    else:
        per_ep = [sum(c[e] for c in per_layer for e in par.experts_of(r, E)) for r in range(par.ep)] if E else []
    if par.ep > 1 and any(rep.get("ep_rows") for rep in reports.values()):
        measured = [0] * par.ep
        for rep in reports.values():
            measured[rep["coord"]["ep"]] += sum(rep.get("ep_rows", {}).values())
        per_ep = measured
    return {"per_layer": per_layer, "per_ep_rank": per_ep}


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def overhead(reports: dict) -> dict:
    def cost(r):
        o = r["overhead"]
        return (r["phase_calls"] * o["phase_call_s"] + r["count_calls"] * o["count_call_s"]
                + r["note_calls"] * o["note_call_s"] + r["bookkeeping_s"])
    pcts = [100 * cost(r) / r["wall_s"] for r in reports.values() if r["wall_s"] > 0]
    return {"method": OVERHEAD_METHOD, "pct": max(pcts) if pcts else None}


def check_out_dir(path: str) -> None:
    """``--profile-out``: a directory rank 0 can make and write in."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--profile-out {path}: {e}") from e
    if not os.access(path, os.W_OK):
        raise ValueError(f"--profile-out {path}: not writable")


def build_summary(reports: dict, *, par: ParallelConfig, model: str, dtype: str, workload: dict,
                  wall_s: float, ticks: int, placement: dict | None = None) -> dict:
    """``reports``: rank -> ``Profiler.report()``; rank 0 is the leader (request timings).
    ``workload``: {"requests", "prompt_tokens", "output_tokens"}; ``wall_s``: the
    leader's Engine.generate."""
    ranks = sorted(reports)
    phases = {}
    for r in ranks:
        rep = reports[r]
        phases[str(r)] = {**{p: rep["phases_s"].get(p, 0.0) for p in M.PHASES},
                          "other": rep["other_s"], "wall": rep["wall_s"]}
    comm = {r: sum(phases[str(r)][p] for p in M.COMM_PHASES) for r in ranks}
    compute = {r: sum(phases[str(r)][p] for p in M.COMPUTE_PHASES) for r in ranks}
    walls = {r: phases[str(r)]["wall"] for r in ranks}
    reqs = request_times(reports[0])
    load = expert_load(reports, par, placement)
    memory = {str(r): reports[r]["memory"] for r in ranks}
    per_expert = [sum(col) for col in zip(*load["per_layer"])]
    metrics = {
        "latency_ms": _mean(reqs["tpot_ms"]),
        "ttft_ms": _mean(reqs["ttft_ms"]),
        "e2e_ms": _mean(reqs["e2e_ms"]),
        "throughput_tok_s": M.throughput(workload["output_tokens"], wall_s),
        "comm_overhead_pct": 100 * M.comm_overhead(sum(comm.values()), sum(compute.values())),
        "comm_share_pct": 100 * M.comm_share(sum(comm.values()), sum(walls.values())),
        "load_balance_pct": 100 * M.load_balance(load["per_ep_rank"]),
        "expert_balance_pct": 100 * M.load_balance(per_expert),
        "gpu_utilization_pct": 100 * _mean([M.utilization(compute[r], walls[r]) for r in ranks]),
        "memory_per_gpu_gb": M.memory_per_gpu([m["peak_total_bytes"] for m in memory.values()]) / 1e9,
    }
    return {
        "layout": {"tp": par.tp, "pp": par.pp, "ep": par.ep, "dp": par.dp},
        "world_size": par.world_size,
        "device": reports[0]["device"],
        "model": model,
        "dtype": dtype,
        "workload": dict(workload),
        "wall_s": wall_s,
        "ticks": ticks,
        "phases_s": phases,
        "requests": reqs,
        "expert_load": load,
        "memory": memory,
        "metrics": metrics,
        "definitions": metric_definitions(),
        "profile_overhead": overhead(reports),
    }


def rank_label(rep: dict) -> str:
    c = rep["coord"]
    return f"rank {rep['rank']} (stage {c['pp']}, tp {c['tp']}, dp {c['dp']}, ep {c['ep']})"


def trace_events(reports: dict) -> dict:
    """Chrome / Perfetto trace-event JSON: one process per rank, thread 0 the steps
    ("tick N"), one thread per phase; ts and dur in microseconds from the earliest step.
    Ranks are aligned by each step's ``time.time()`` start (one host: the same clock)."""
    starts = [t[1] for rep in reports.values() for t in rep["timeline"]]
    origin = min(starts, default=0.0)
    tids = {p: i + 1 for i, p in enumerate(M.PHASES)}
    ev = []
    for r in sorted(reports):
        rep = reports[r]
        ev.append({"ph": "M", "pid": r, "tid": 0, "name": "process_name", "args": {"name": rank_label(rep)}})
        ev.append({"ph": "M", "pid": r, "tid": 0, "name": "process_sort_index", "args": {"sort_index": r}})
        ev.append({"ph": "M", "pid": r, "tid": 0, "name": "thread_name", "args": {"name": "step"}})
        for p, tid in tids.items():
            ev.append({"ph": "M", "pid": r, "tid": tid, "name": "thread_name", "args": {"name": p}})
        for tick, start, wall, names, offs, durs in rep["timeline"]:
            base = (start - origin) * 1e6
            ev.append({"ph": "X", "pid": r, "tid": 0, "name": f"tick {tick}", "ts": base, "dur": wall * 1e6,
                       "args": {"tick": tick}})
            ev += [{"ph": "X", "pid": r, "tid": tids[p], "name": p, "ts": base + off * 1e6, "dur": d * 1e6,
                    "args": {"tick": tick}} for p, off, d in zip(names, offs, durs)]
    return {"traceEvents": ev, "displayTimeUnit": "ms"}


def write_profile(out_dir: str, summary: dict, trace: dict) -> list[str]:
    """Write ``summary.json`` and ``trace.json`` into ``out_dir`` (made if missing)."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        paths = []
        for name, obj in (("summary.json", summary), ("trace.json", trace)):
            path = os.path.join(out_dir, name)
            with open(path, "w") as f:
                json.dump(obj, f, indent=1 if name == "summary.json" else None)
            paths.append(path)
    except OSError as e:
        raise ValueError(f"cannot write the profile to {out_dir!r}: {e}") from e
    return paths
