"""CPU time of the timed run: this client's, and (with ``--launch``) every process of the
launched server's tree, read from /proc (Linux; elsewhere None and nothing is printed).

    before = snapshot(server_pid)        # {pid: (label, cpu seconds)}, client included
    ...the timed requests...
    used = cpu_used(before, snapshot(server_pid))   # [(label, seconds)], largest first

On a machine whose cores the server's engine also computes on, the HTTP process's and the
client's CPU time comes out of the engine's: this is where a served / offline gap goes.
"""
from __future__ import annotations

import os
import time

CLIENT = "this client (bench_serve.py)"


def _ticks_per_s() -> float:
    try:
        return float(os.sysconf("SC_CLK_TCK"))
    except (AttributeError, ValueError, OSError):
        return 100.0


def _proc_cpu_s(pid: int) -> float | None:
    """utime + stime of a process (all its threads), seconds; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state is field 3
        return (int(fields[11]) + int(fields[12])) / _ticks_per_s()
    except (OSError, IndexError, ValueError):
        return None


def _children(pid: int) -> list[int]:
    out = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            pass
    return out


def label(pid: int) -> str:
    """What a server process is, from its command line."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        argv = []
    text = " ".join(argv)
    ranked = False  # a rank's own process (torchrun's children inherit its RANK too)
    if "multiprocessing.resource_tracker" in text:
        kind = "resource tracker"
    elif "multiprocessing.spawn" in text or "multiprocessing-fork" in text:
        kind = "spawned child (the HTTP process of moerun serve)"
    elif "torch.distributed.run" in text or "torchrun" in text:
        kind = "torchrun"
    elif "-m" in argv and argv.index("-m") + 1 < len(argv):
        kind, ranked = argv[argv.index("-m") + 1], True
    elif len(argv) > 1 and argv[1].endswith(".py"):
        kind, ranked = os.path.basename(argv[1]), True
    else:
        kind, ranked = (os.path.basename(argv[0]) if argv else "?"), True
    rank = _env(pid, "RANK") if ranked else None
    return f"pid {pid} {kind}" + (f" (rank {rank})" if rank is not None else "")


def _env(pid: int, name: str) -> str | None:
    """A variable of a process's environment (torchrun gives each rank its RANK)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                if item.startswith(name.encode() + b"="):
                    return item.split(b"=", 1)[1].decode(errors="replace")
    except OSError:
        pass
    return None


def snapshot(server_pid: int | None) -> dict[int, tuple[str, float]] | None:
    """CPU seconds so far of this process (key 0) and of the server's process tree."""
    if not os.path.exists("/proc/self/stat"):
        return None
    out = {0: (CLIENT, time.process_time())}
    todo, seen = ([server_pid] if server_pid else []), set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        s = _proc_cpu_s(pid)
        if s is not None:
            out[pid] = (label(pid), s)
            todo += _children(pid)
    return out


def cpu_used(before: dict | None, after: dict | None) -> list[tuple[str, float]] | None:
    """Each process's CPU seconds between the snapshots (one that started in between counts
    from zero; one that ended in between is not seen), largest first."""
    if before is None or after is None:
        return None
    rows = [(lab, s - (before[pid][1] if pid in before else 0.0)) for pid, (lab, s) in after.items()]
    return sorted(rows, key=lambda r: -r[1])


def format_cpu(rows: list[tuple[str, float]], wall_s: float, *, launched: bool) -> str:
    lines = [f"CPU time over the timed run ({wall_s:.2f} s wall, {os.cpu_count()} CPUs; from /proc):"]
    for lab, v in rows:
        share = f"  ({100 * v / wall_s:.1f}% of one CPU)" if wall_s > 0 else ""
        lines.append(f"  {lab:<62}{v:7.2f} s{share}")
    if not launched:
        lines.append("  (the server's own processes are seen only when bench_serve.py starts it: --launch)")
    return "\n".join(lines)
