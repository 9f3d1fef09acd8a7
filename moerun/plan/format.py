"""All text ``moerun plan`` prints: a plan, a search, a claims check.

    print(format_plan(make_plan(...)))
    print(format_search(search(...), top=10, model=model, hw=hw, gpus=16, workload=workload))
    print(format_claims(cf, check(cf, measured, measured_as), measured_source, measured_as))

Every table goes through ``table`` (one column layout for all of them). Every projected
figure sits under a heading "projected (roofline on <hardware>)": none of them is a
measurement.
"""
from __future__ import annotations

from ..config import ModelConfig
from .claims import METRICS, ClaimResult, ClaimsFile
from .hardware import HardwareSpec
from .planner import PlanReport, RankReport
from .strategy import Workload

GB, MB = 1e9, 1e6


def table(header: list[str], rows: list[list], indent: str = "  ", align: str = "right") -> list[str]:
    """A header, a dashed rule and one line per row, columns two blanks apart; cells are
    right-aligned (numbers) or left-aligned (text); trailing blanks are dropped."""
    assert align in ("right", "left")
    cells = [[str(x) for x in r] for r in [header, *rows]]
    widths = [max(len(x) for x in col) for col in zip(*cells)]
    just = str.rjust if align == "right" else str.ljust

    def line(r: list[str]) -> str:
        return (indent + "  ".join(just(x, w) for x, w in zip(r, widths))).rstrip()

    return [line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]]


def _span(xs) -> str:
    xs = list(xs)
    if not xs:
        return "-"
    return str(xs[0]) if len(xs) == 1 else f"{xs[0]}-{xs[-1]}"


def header(model: ModelConfig, hw: HardwareSpec, workload: Workload) -> list[str]:
    lines = [
        f"model     {model.name or model.model_type}: {model.num_params():,} parameters, "
        f"{model.num_layers} layers, {model.num_experts} experts (top-{model.top_k}), hidden {model.hidden_size}",
        f"hardware  {hw.name}: {hw.memory_gb:g} GB, {hw.peak_tflops:g} TFLOP/s, memory {hw.mem_bw_gbs:g} GB/s, "
        f"links {hw.intra_node_bw_gbs:g} / {hw.inter_node_bw_gbs:g} GB/s intra / inter node "
        f"(per GPU, per direction), {hw.gpus_per_node} GPUs per node, reserve {hw.reserve_gb:g} GB"
        + (" [shared box: figures split over all ranks]" if hw.shared else ""),
    ]
    lines += [f"          ambiguous: {a}" for a in hw.ambiguous]
    lines.append(f"workload  {workload.describe()}")
    return lines


def _rank_key(r: RankReport):
    return (r.pp, r.layers, len(r.experts), r.params, r.kv_bytes_per_token, r.kv_room_bytes, r.fits)


def rank_rows(ranks: tuple[RankReport, ...]) -> list[list[str]]:
    """One row per run of consecutive ranks that hold the same amounts."""
    rows, group = [], []
    for r in list(ranks) + [None]:
        if group and (r is None or _rank_key(r) != _rank_key(group[0])):
            g = group[0]
            rows.append([_span([x.rank for x in group]), g.pp, _span(g.layers),
                         len(g.experts), f"{g.params:,}", f"{g.bytes / GB:.2f}",
                         f"{g.kv_room_bytes / GB:.2f}", f"{g.kv_tokens_max:,}",
                         f"{g.kv_bytes_needed / GB:.2f}", "yes" if g.fits else "NO"])
            group = []
        if r is not None:
            group.append(r)
    return rows


def format_plan(rep: PlanReport) -> str:
    lines = header(rep.model, rep.hardware, rep.workload)
    lines.append(f"layout    {rep.layout} on {rep.gpus} GPUs, {rep.micro_batches} micro-batch"
                 f"{'es' if rep.micro_batches != 1 else ''} per replica")
    if not rep.valid:
        lines.append(f"\nINVALID layout {rep.layout} for {rep.gpus} GPUs; rules broken:")
        lines += [f"  - {e}" for e in rep.errors]
        return "\n".join(lines)
    lines.append("valid     every layout rule holds")
    lines.append("\nper rank (weights in the workload dtype; KV room = memory - weights - reserve)")
    lines += table(["ranks", "stage", "layers", "experts", "params", "weights GB", "KV room GB",
                     "KV tokens max", "KV needed GB", "fits"], rank_rows(rep.per_rank))
    p = rep.projection
    lines.append(f"\n{p.label}: one micro-batch per stage, busiest rank "
                 f"({p.seqs_per_micro_batch} sequences of {p.seqs_per_replica} per replica)")
    rows = []
    for phase, stages in (("decode", p.decode), ("prefill", p.prefill)):
        for c in stages:
            rows.append([phase, c.stage, f"{c.tokens:,.0f}", f"{c.flops / 1e9:,.1f}",
                         f"{c.hbm_bytes / GB:.2f}", f"{c.compute_s * 1e3:.3f}", f"{c.memory_s * 1e3:.3f}",
                         f"{c.tp_bytes / MB:,.2f}", f"{c.a2a_bytes / MB:,.2f}", f"{c.p2p_bytes / MB:,.2f}",
                         f"{c.comm_s * 1e3:.3f}", f"{c.time_s * 1e3:.3f}"])
    lines += table(["phase", "stage", "tokens", "GFLOP", "HBM GB", "compute ms", "memory ms",
                     "TP MB", "A2A MB", "P2P MB", "comm ms", "time ms"], rows)
    wl, par = rep.workload, rep.layout
    links = sorted({f"{name} {'inter' if inter else 'intra'}-node"
                    for s, ln in enumerate(p.links) for name, inter, used in
                    (("TP", ln.tp_inter, par.tp > 1), ("EP", ln.ep_inter, par.ep > 1),
                     ("PP", ln.pp_inter, s < par.pp - 1)) if used})
    summary = [
        ("TPOT (decode time per output token)",
         f"{p.tpot_s * 1e3:.2f} ms = max(M, PP) = {max(p.micro_batches, par.pp)} tick(s) x {p.tick_s * 1e3:.3f} ms"),
        (f"TTFT, one {wl.prompt_len}-token prompt alone", f"{p.ttft_s * 1e3:.2f} ms"),
        (f"batch prefill, {p.seqs_per_replica} prompts per replica",
         f"{p.batch_prefill_s * 1e3:.1f} ms (pipeline bubble (PP-1)/(M+PP-1) = {p.bubble_fraction:.1%})"),
        (f"request latency (batch prefill + {wl.output_len - 1} x TPOT)", f"{p.request_latency_s:.3f} s"),
        ("decode throughput", f"{p.tokens_per_s_replica:,.0f} tok/s per replica, "
                              f"{p.tokens_per_s_total:,.0f} tok/s total ({par.dp} replica{'s' if par.dp > 1 else ''})"),
        ("communication", f"{p.comm_share:.2%} of step time; {p.comm_overhead:.2%} of compute/memory time"),
        ("GPU busy fraction / MFU (decode)", f"{p.busy_fraction:.1%} / {p.mfu:.2%}"),
        ("FLOPs per token", f"{p.flops_per_token_decode / 1e9:.3f} GFLOP decode, "
                            f"{p.flops_per_token_prefill / 1e9:.3f} GFLOP prefill"),
        ("HBM bytes per token (all ranks)", f"{p.bytes_per_token_decode / MB:,.1f} MB decode, "
                                            f"{p.bytes_per_token_prefill / MB:,.3f} MB prefill"),
        ("per layer per rank (decode micro-batch)",
         f"all-to-all {p.a2a_bytes_per_layer / MB:.3f} MB in {p.a2a_s_per_layer * 1e6:.2f} us "
         f"(dispatch+combine, (ep-1)/ep leaves the rank); TP RS+AG {p.tp_bytes_per_layer / MB:.3f} MB "
         f"in {p.tp_s_per_layer * 1e6:.2f} us (ring, 2(tp-1)/tp)"),
        ("links used", ", ".join(links) or "none (one rank)"),
        ("expert load (uniform routing)" if p.measured_balance is None else
         f"expert load (measured balance {p.measured_balance:.1%} applied)",
         f"{p.ep_group_tokens:,.0f} tokens per EP group: mean {p.expert_load_mean:,.1f}, expected max "
         f"{p.expert_load_max:,.1f} assignments per expert-rank -> balance {p.load_balance:.1%}"),
        ("memory per GPU (weights + needed KV)",
         f"{rep.memory_per_gpu_bytes / GB:.2f} GB of {rep.hardware.memory_gb:g} GB; fits: "
         f"{'yes' if rep.fits else 'NO'}; KV room holds {rep.max_concurrent_tokens:,} tokens per replica"),
    ]
    width = max(len(k) for k, _ in summary)
    lines.append(f"\n{p.label}: summary")
    lines += [f"  {k.ljust(width)}  {v}" for k, v in summary]
    return "\n".join(lines)


def format_search(reps: list[PlanReport], top: int, model: ModelConfig, hw: HardwareSpec, gpus: int,
                  workload: Workload, max_tpot_ms: float | None = None) -> str:
    lines = header(model, hw, workload)
    bound = f", TPOT <= {max_tpot_ms:g} ms" if max_tpot_ms is not None else ""
    lines.append(f"\nprojected (roofline on {hw.name}): valid layouts of {gpus} GPUs whose memory fits{bound}, "
                 f"best total throughput first ({len(reps)} qualify, top {min(top, len(reps))} shown)")
    rows = []
    for i, r in enumerate(reps[:top], 1):
        p = r.projection
        rows.append([i, str(r.layout), r.micro_batches, f"{p.tpot_s * 1e3:.2f}", f"{p.tokens_per_s_total:,.0f}",
                     f"{p.tokens_per_s_replica:,.0f}", f"{p.ttft_s * 1e3:.2f}", f"{p.comm_share:.2%}",
                     f"{p.load_balance:.1%}", f"{r.memory_per_gpu_bytes / GB:.2f}"])
    lines += table(["#", "layout", "M", "TPOT ms", "tok/s total", "tok/s/replica", "TTFT ms",
                     "comm", "balance", "mem/GPU GB"], rows)
    return "\n".join(lines)


def _num(x: float | None, unit: str) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f} {unit}" if abs(x) >= 1000 else f"{x:.4g} {unit}"


def format_claims(cf: ClaimsFile, results: list[ClaimResult], measured_source: str = "",
                  measured_as: dict[str, dict] | None = None) -> str:
    """The claims table; ``measured_as`` (strategy -> {"layout", "model", "label", ...}) says
    what each strategy's measured values were measured on."""
    hws = sorted({r.hardware for r in results})
    label = f"projected (roofline on {hws[0]})" if len(hws) == 1 else "projected (roofline, row's hardware)"
    rows, notes = [], {}  # reason text -> footnote number (shared reasons print once)
    for r in results:
        c = r.claim
        target = "-" if c.target is None else f"{'<' if METRICS[c.metric].better == 'lower' else '>'} {c.target:,g}"
        text = r.reason + (f" (note: {c.note})" if c.note and r.verdict != "invalid layout" else "")
        n = notes.setdefault(text, len(notes) + 1)
        rows.append([f"{c.strategy} ({r.layout}, {r.gpus} GPUs)", c.metric, _num(c.claimed, r.unit), target,
                     _num(r.projected, r.unit), r.consistent, _num(r.measured, r.unit), f"{r.verdict} [{n}]"])
    header = ["claim (layout, GPUs)", "metric", "claimed", "target", label, "consistent", "measured", "verdict"]
    lines = [f"claims {cf.name} ({cf.source}); model {cf.model}, hardware {', '.join(hws)}; "
             f"tolerance {cf.tolerance:.0%}",
             f"measured: {measured_source or 'nothing measured yet'}"]
    lines += [f"measured {name} as: " + (info.get("label") or f"{info.get('layout')} of {info.get('model')}")
              for name, info in sorted((measured_as or {}).items())]
    lines += [f"workload of {name}: {w}" for name, w in
              sorted({(r.claim.strategy, r.workload) for r in results})]
    lines += [f"hardware {h} ambiguous: {a}" for h in hws for a in HardwareSpec.load(h).ambiguous]
    lines += [""] + table(header, rows, indent="", align="left") + [""]
    lines += [f"[{n}] {text}" for text, n in notes.items()]
    lines.append("\nconsistent: yes = the claimed figure is no better than the projection (the roofline's best "
                 "case) beyond the tolerance;\n            no = the claim beats that best case; n/a = nothing "
                 "to project. A projection never makes a claim hold.")
    lines.append("\nmetrics (what is projected and what a measurement must report):")
    lines += [f"  {k}: {m.meaning} [{m.unit}, {m.better} is better]" for k, m in METRICS.items()]
    return "\n".join(lines)


def format_balance(b: dict) -> str:
    """The ``moerun plan --expert-load`` lines: the measured load's balance per placement."""
    def pct(x):
        return "n/a" if x is None else f"{x:.1%}"
    return (f"expert balance of {b['file']} (mean / max tokens per EP rank, mean over MoE layers; "
            f"{b['label']}): contiguous {pct(b['contiguous_balance'])}, placed {pct(b['placed_balance'])}")
