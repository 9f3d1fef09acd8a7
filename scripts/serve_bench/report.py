"""What a run ran on (CPU and GPU names) and its plots (latency CDFs, tokens/s over time)."""
from __future__ import annotations

import glob
import math
import os
import platform
import sys
from pathlib import Path

from .client import RequestRecord
from .stats import percentile


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip().lower()
                if key in ("model name", "hardware", "cpu model"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def gpu_names() -> list[str]:
    """NVIDIA GPU models from /proc (no torch import); torch.cuda only if torch is loaded already."""
    names = []
    for info in sorted(glob.glob("/proc/driver/nvidia/gpus/*/information")):
        try:
            with open(info) as f:
                for line in f:
                    if line.startswith("Model:"):
                        names.append(line.split(":", 1)[1].strip())
        except OSError:
            pass
    if not names and "torch" in sys.modules:
        torch = sys.modules["torch"]
        try:
            if torch.cuda.is_available():
                names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        except Exception:  # noqa: BLE001
            pass
    return names


def machine() -> str:
    desc = f"{cpu_model()} ({os.cpu_count()} CPUs)"
    gpus = gpu_names()
    if gpus:
        uniq = sorted(set(gpus))
        desc += ", GPU: " + ", ".join(f"{n} x{gpus.count(n)}" if gpus.count(n) > 1 else n for n in uniq)
    return desc


def _save(plt, fig, label: str, path) -> str:
    """Title, lay out, write and close one figure; its path."""
    fig.suptitle(label, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def write_plots(records: list[RequestRecord], out_dir: str, label: str) -> list[str]:
    """latency_cdf.png (TTFT, TPOT, E2E) and output_throughput.png (1 s bins) in out_dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ok = [r for r in records if r.success]
    paths = []

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (name, vals) in zip(axes, (("TTFT", [r.ttft_s for r in ok]),
                                       ("TPOT", [r.tpot_s for r in ok if r.tpot_s is not None]),
                                       ("E2E latency", [r.e2e_s for r in ok]))):
        xs = sorted(v * 1000 for v in vals)
        if xs:
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step(xs, ys, where="post")
            for q, ls in ((50, "--"), (99, ":")):
                ax.axvline(percentile(xs, q), color="gray", ls=ls, lw=1, label=f"p{q} {percentile(xs, q):.1f} ms")
            ax.legend(loc="lower right", fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(f"{name} CDF ({len(xs)} requests)")
    paths.append(_save(plt, fig, label, out / "latency_cdf.png"))

    # output tokens per 1 s bin (a request's tokens spread evenly over its token chunks),
    # divided by the part of the bin the run lasted; requests in flight as a step function
    spans = [(r.start_s, r.start_s + r.e2e_s) for r in records
             if r.sent and r.start_s is not None and r.e2e_s is not None]
    t_end = max((e for _, e in spans), default=0.0)
    nbins = max(1, math.ceil(t_end))
    tok = [0.0] * nbins
    for r in ok:
        per = r.output_tokens / len(r.token_times_s)
        for t in r.token_times_s:
            tok[min(int(r.start_s + t), nbins - 1)] += per
    rate = [x / max(min(1.0, t_end - b), 1e-3) for b, x in enumerate(tok)]
    events = sorted([(s0, 1) for s0, _ in spans] + [(e, -1) for _, e in spans], key=lambda ev: (ev[0], ev[1]))
    ts, level, cur = [0.0], [0], 0
    for t, d in events:
        cur += d
        ts.append(t)
        level.append(cur)
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    a1.bar([b + 0.5 for b in range(nbins)], rate, width=0.9)
    a1.set_ylabel("output tokens/s")
    a1.set_title("output token throughput over time (1 s bins, successful requests)")
    a1.grid(alpha=0.3)
    a2.step(ts, level, where="post")
    a2.set_ylim(bottom=0)
    a2.set_ylabel("requests in flight")
    a2.set_xlabel("time since the first request (s)")
    a2.grid(alpha=0.3)
    paths.append(_save(plt, fig, label, out / "output_throughput.png"))
    return paths
