"""``--launch``: start ``moerun serve`` on a free loopback port and stop it after the run;
and the offline engine on the same prompts, for the served / offline comparison."""
from __future__ import annotations

import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

from .datasets import Prompt

# launch args the offline comparison reads (the rest are the server's business)
OFFLINE_FLAGS = {"--model": str, "--weights-seed": int, "--max-batch-tokens": int, "--kv-cache-gb": float,
                 "--block-size": int, "--micro-batches": int, "--dtype": str, "--device": str,
                 "--kernels": str}
PARALLEL_FLAGS = ("--tp", "--pp", "--ep", "--dp")
SERVER_CMD = [sys.executable, "-m", "moerun.serve"]  # what --launch runs, before its ARGS


def torchrun_cmd(nproc: int, server_cmd: list[str]) -> list[str]:
    """``server_cmd`` (a ``python -m MODULE`` or ``python SCRIPT``) under torchrun with
    ``nproc`` processes on this node, on a free rendezvous port."""
    py, *rest = server_cmd
    return [py, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}", *rest]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_launch_args(launch: str) -> dict:
    """The flags of OFFLINE_FLAGS found in the --launch string (both "--f v" and "--f=v"),
    converted; model defaults to "tiny" and weights_seed to 0. Also "parallel": the layout flags seen."""
    toks = shlex.split(launch)
    out: dict = {"model": "tiny", "weights_seed": 0, "parallel": []}
    i = 0
    while i < len(toks):
        t = toks[i]
        name, val = (t.split("=", 1) + [None])[:2] if t.startswith("--") else (t, None)
        if name in OFFLINE_FLAGS or name in PARALLEL_FLAGS:
            if val is None and i + 1 < len(toks):
                val, i = toks[i + 1], i + 1
            if val is None:
                raise ValueError(f"--launch: {name} needs a value")
            if name in PARALLEL_FLAGS:
                out["parallel"].append(f"{name} {val}")
            else:
                try:
                    out[name[2:].replace("-", "_")] = OFFLINE_FLAGS[name](val)
                except ValueError:
                    raise ValueError(f"--launch: bad value for {name}: {val!r}") from None
        i += 1
    return out


class LaunchError(RuntimeError):
    pass


class LaunchedServer:
    """``python -m moerun.serve ARGS --host 127.0.0.1 --port P`` as a subprocess, its output
    in a log file. ``cmd_prefix`` replaces SERVER_CMD (tests)."""

    def __init__(self, launch_args: str, *, ready_timeout: float = 300.0, log_path: str | None = None,
                 cmd_prefix: list[str] | None = None, nproc: int = 1):
        args = shlex.split(launch_args)
        for a in args:
            if a.split("=", 1)[0] in ("--host", "--port"):
                raise ValueError("--launch must not set --host or --port: the benchmark picks them")
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        prefix = cmd_prefix or SERVER_CMD
        self.nproc = nproc
        self.cmd = [*(torchrun_cmd(nproc, prefix) if nproc > 1 else prefix), *args,
                    "--host", "127.0.0.1", "--port", str(self.port)]
        self.ready_timeout = ready_timeout
        self.keep_log = log_path is not None
        self.log_path = log_path or tempfile.mkstemp(prefix="moerun-serve-", suffix=".log")[1]
        self.proc: subprocess.Popen | None = None

    def tail(self, n: int = 40) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def start(self) -> None:
        print(f"Launching: {shlex.join(self.cmd)}", flush=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        t0 = time.monotonic()
        deadline = t0 + self.ready_timeout
        with httpx.Client(timeout=2.0, trust_env=False) as c:
            while True:
                code = self.proc.poll()
                if code is not None:
                    raise LaunchError(f"the server exited with code {code} before it was ready; "
                                      f"last lines of its output ({self.log_path}):\n{self.tail()}")
                try:
                    if c.get(self.base_url + "/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() >= deadline:
                    raise LaunchError(f"GET /health did not return 200 within {self.ready_timeout:g} s; "
                                      f"last lines of its output ({self.log_path}):\n{self.tail()}")
                time.sleep(0.25)
        print(f"Server ready at {self.base_url} after {time.monotonic() - t0:.1f} s", flush=True)

    def stop(self) -> int | None:
        code = None
        if self.proc is not None:
            if self.proc.poll() is not None and self.proc.returncode != 0:
                print(f"Warning: the server exited by itself (code {self.proc.returncode}) before the end; "
                      f"last lines of its output:\n{self.tail()}", file=sys.stderr)
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    print("Server ignored SIGTERM for 30 s: killing it", file=sys.stderr)
                    self.proc.kill()
                    self.proc.wait(timeout=10)
            code = self.proc.returncode
        if not self.keep_log:
            try:
                os.unlink(self.log_path)
            except OSError:
                pass
        return code


def run_offline(prompts: list[Prompt], opts: dict, temperature: float, max_concurrency: int | None = None) -> dict:
    """Build the launched model in this process and time the engine on the same prompts (one
    SamplingParams each), twice: with at most ``max_concurrency`` requests in the engine at
    once (a new one joins as one finishes, as the served run's clients kept it) and with all
    prompts at once (``Engine.generate``). The first is what "served / offline" compares
    with: the same work, without HTTP. Returns durations, tokens and throughputs."""
    from moerun.build import (
        build_model,  # lazily: the rest of the script needs no torch
    )
    from moerun.engine import Engine, EngineConfig
    from moerun.options import SamplingParams

    if opts.get("kernels"):
        from moerun import kernels

        kernels.set_default_impl(opts["kernels"])
    model = build_model(opts["model"], dtype=opts.get("dtype"), device=opts.get("device"), seed=opts["weights_seed"])
    ecfg = {k: opts[k] for k in ("max_batch_tokens", "kv_cache_gb", "block_size", "micro_batches") if k in opts}
    ids = [p.ids for p in prompts]
    params = [SamplingParams(max_new_tokens=p.max_tokens, temperature=temperature, ignore_eos=True) for p in prompts]
    engine = Engine(model, EngineConfig(**ecfg))  # one engine: on a GPU its KV cache takes the memory
    engine.generate(ids[:1], [SamplingParams(  # untimed warm-up, as the served run had
        max_new_tokens=min(prompts[0].max_tokens, 8), temperature=temperature, ignore_eos=True)])
    cap = min(max_concurrency or len(ids), len(ids))
    t0 = time.perf_counter()
    n_capped, nxt, live = 0, 0, 0
    while nxt < len(ids) or engine.has_unfinished():
        while live < cap and nxt < len(ids):
            engine.add_request(ids[nxt], params[nxt])
            nxt, live = nxt + 1, live + 1
        for ev in engine.step():
            n_capped += ev.token is not None
            live -= ev.finished
    dt_capped = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_all = sum(len(o) for o in engine.generate(ids, params))
    dt_all = time.perf_counter() - t0
    return {"duration_s": dt_capped, "output_tokens": n_capped, "max_concurrency": cap,
            "output_throughput": n_capped / dt_capped if dt_capped > 0 else math.nan,
            "all_at_once_duration_s": dt_all,
            "all_at_once_output_throughput": n_all / dt_all if dt_all > 0 else math.nan,
            "model": opts["model"], "weights_seed": opts["weights_seed"], "engine_config": ecfg}
