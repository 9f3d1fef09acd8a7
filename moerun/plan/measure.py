"""Measuring a layout: one ``moerun generate --profile`` run and its ``summary.json``.

No torch here: the run is a subprocess (``torchrun`` for a world of several processes,
plain ``python`` for one), and the summary is JSON written by ``moerun.profile.summary``.

    prompts_file(path, requests=16, prompt_len=32, seed=0)
    cmd = profile_command(layout, model="cfg.json", prompts="p.jsonl", new_tokens=16, out_dir="prof")
    summary = run_profile(cmd, "prof", timeout_s=300)          # DIR/summary.json, checked
    measured_values(summary)                                   # {claims metric: number}

A failed run, a run that writes no summary, or a summary without the keys below is a
``MeasureError`` carrying the command and the tail of its log.
"""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

from ..parallel import ParallelConfig

SUMMARY_KEYS = ("layout", "world_size", "device", "model", "dtype", "workload", "wall_s", "ticks", "phases_s",
                "requests", "expert_load", "memory", "metrics")
# claims metric (moerun.plan.claims.METRICS) -> key of the summary's "metrics"
SUMMARY_METRICS = {"latency": "latency_ms", "throughput": "throughput_tok_s", "comm_overhead": "comm_overhead_pct",
                   "load_balance": "load_balance_pct", "gpu_utilization": "gpu_utilization_pct",
                   "memory_per_gpu": "memory_per_gpu_gb"}
PROMPT_VOCAB = 256  # prompt ids are drawn from 0..255, inside every model's vocabulary here


class MeasureError(RuntimeError):
    """A measurement that did not produce a usable summary."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def profiling_available() -> bool:
    """Whether this checkout's ``moerun generate`` has ``--profile``."""
    p = subprocess.run([sys.executable, "-m", "moerun.generate", "--help"], capture_output=True, text=True)
    return p.returncode == 0 and "--profile-out" in p.stdout


def prompts_file(path: str | Path, requests: int, prompt_len: int, seed: int) -> Path:
    """JSONL of ``requests`` prompts of ``prompt_len`` ids each, drawn from ``seed``."""
    rng = random.Random(seed)
    path = Path(path)
    path.write_text("".join(json.dumps({"prompt_ids": [rng.randrange(PROMPT_VOCAB) for _ in range(prompt_len)]})
                            + "\n" for _ in range(requests)))
    return path


def profile_command(layout: ParallelConfig, *, model: str, prompts: str, new_tokens: int, out_dir: str,
                    seed: int = 0, device: str = "cpu", dtype: str | None = None,
                    max_batch_tokens: int = 2048, timeout_s: float = 120.0) -> list[str]:
    """The command line of one profiled run of ``layout`` (torchrun when it has several ranks)."""
    gen = ["-m", "moerun.generate", "--model", model, "--device", device,
           "--tp", str(layout.tp), "--pp", str(layout.pp), "--ep", str(layout.ep), "--dp", str(layout.dp),
           "--prompts-file", prompts, "--max-new-tokens", str(new_tokens), "--ignore-eos",
           "--max-batch-tokens", str(max_batch_tokens), "--weights-seed", str(seed), "--timeout", f"{timeout_s:g}",
           "--profile", "--profile-out", out_dir, "--json"]
    if dtype:
        gen += ["--dtype", dtype]
    if layout.world_size == 1:
        return [sys.executable] + gen
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={layout.world_size}",
            f"--master_port={free_port()}"] + gen


def read_summary(path: str | Path) -> dict:
    """A ``summary.json``; MeasureError when it is missing or lacks a key this module reads."""
    path = Path(path)
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MeasureError(f"{path}: no readable summary ({e})") from e
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    missing += [f"metrics.{k}" for k in SUMMARY_METRICS.values() if k not in summary.get("metrics", {})]
    if missing:
        raise MeasureError(f"{path}: summary lacks {', '.join(missing)}")
    return summary


def run_profile(cmd: list[str], out_dir: str | Path, timeout_s: float) -> dict:
    """Run ``cmd`` (one thread per process: the ranks share this machine's cores) and read
    ``out_dir/summary.json``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    shown = " ".join(cmd[1:])
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired as e:
        raise MeasureError(f"timed out after {timeout_s:g}s: {shown}") from e
    if p.returncode != 0:
        lines = p.stderr.strip().splitlines()
        ours = [ln for ln in lines if ln.startswith("moerun generate:")]  # moerun's own error lines
        raise MeasureError(f"exit code {p.returncode}: {shown}\n" + "\n".join(ours or lines[-12:]))
    return read_summary(Path(out_dir) / "summary.json")


def measured_values(summary: dict) -> dict[str, float]:
    """The claims metrics a summary measured (a metric the run could not measure, such as
    TPOT without a second output token, is left out)."""
    m = summary["metrics"]
    return {name: float(m[key]) for name, key in SUMMARY_METRICS.items() if m.get(key) is not None}


def summary_layout(summary: dict) -> ParallelConfig:
    return ParallelConfig(**{a: int(summary["layout"][a]) for a in ("tp", "pp", "ep", "dp")})


def device_kind(device: str) -> str:
    """"cpu" or "cuda" from a summary's device ("cpu", "cuda (NVIDIA H200)")."""
    return device.split()[0].split(":")[0]
