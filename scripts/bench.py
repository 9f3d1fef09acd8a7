"""The project benchmark: moerun's offline throughput beside transformers on the same
weights, and the pipeline schedule (the bubble with one micro-batch versus PP of them).

    python scripts/bench.py                  # 32 x 64 offline (median of 3), PP 2/4 on 32 x 64
    python scripts/bench.py --quick          # 32 x 64 offline (1 run),       PP 2/4 on 16 x 32
    python scripts/bench.py --json out.json  # also write every figure as JSON

1. Offline throughput, one process, the default ``tiny`` preset (random weights from
   --seed). The preset is saved with ``save_checkpoint`` and loaded by transformers, so
   both run the same weights on the same prompts (random ids 0..255, lengths 8..32,
   seeded) in one batch: moerun through ``Engine.generate`` (greedy, ignore EOS),
   transformers through ``generate(do_sample=False, min_new_tokens=max_new_tokens)`` on
   the prompts left-padded into one batch with an attention mask. Each is warmed up once
   on a short run; model loading and engine creation are outside the timed region. The
   greedy outputs are compared per prompt and the count that agree is printed (a float
   near-tie may flip one, and transformers' ``min_new_tokens`` forbids EOS where moerun's
   ignore-EOS lets greedy emit it, so a mismatch is reported, not asserted).
2. The pipeline schedule on gloo: ``moerun generate`` under torchrun (a subprocess per
   run, OMP_NUM_THREADS=1 per process) with PP = 2 and 4, each with ``--micro-batches 1``
   and ``--micro-batches PP``; its ``[stats]`` lines give wall time, tokens/s and per
   stage compute, wait and idle ticks. The outputs are checked against one process.
   A failed run (offline or torchrun) or missing ``[stats]`` is printed, the rest still runs,
   and the script exits 1 at the end.

Every figure is measured in this run on the CPU named in the header; nothing is projected.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moerun.engine import Engine, EngineConfig
from moerun.build import build_model
from moerun.options import SamplingParams
from moerun.weights import save_checkpoint

MODEL = "tiny"
STATS_TOTAL = re.compile(r"\[stats\] ticks (\d+), generated tokens (\d+), ([\d.]+)s, ([\d.]+) tokens/s")
STATS_STAGE = re.compile(r"\[stats\] stage (\d+): compute ([\d.]+)s, waiting for input ([\d.]+)s, "
                         r"idle ticks \(no tokens\) (\d+) of (\d+)")


# ------------------------------------------------------------------ helpers
def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown cpu"


def measured(threads: int, note: str = "") -> str:
    return f"measured (cpu, {cpu_model()}, {threads} threads{note})"


def load_avg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def make_prompts(n: int, seed: int, lo: int = 8, hi: int = 32, vocab: int = 256) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r):  # first column left-aligned, figures right-aligned
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------- 1. offline throughput
def run_moerun(model, prompts, new_tokens: int) -> tuple[float, list[list[int]]]:
    """Wall seconds of one Engine.generate (engine built outside the timed region)."""
    engine = Engine(model, EngineConfig(max_batch_tokens=4096))
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    return time.perf_counter() - t0, outs


def left_pad(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(map(len, prompts))
    ids_BL = torch.full((len(prompts), L), pad, dtype=torch.long)
    mask_BL = torch.zeros(len(prompts), L, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids_BL[b, L - len(p):] = torch.tensor(p)
        mask_BL[b, L - len(p):] = 1
    return ids_BL, mask_BL


@torch.inference_mode()
def run_hf(hf, prompts, new_tokens: int) -> tuple[float, list[list[int]]]:
    ids_BL, mask_BL = left_pad(prompts)
    t0 = time.perf_counter()
    out = hf.generate(ids_BL, attention_mask=mask_BL, do_sample=False, max_new_tokens=new_tokens,
                      min_new_tokens=new_tokens, pad_token_id=0)
    dt = time.perf_counter() - t0
    return dt, out[:, ids_BL.shape[1]:].tolist()


def compare(ours: list[list[int]], ref: list[list[int]], eos: set[int]) -> tuple[int, list[str]]:
    """Prompts whose greedy tokens are identical, and a line for each that is not."""
    same, notes = 0, []
    for b, (o, r) in enumerate(zip(ours, ref)):
        if o == r:
            same += 1
            continue
        i = next((j for j, (x, y) in enumerate(zip(o, r)) if x != y), min(len(o), len(r)))
        why = " (moerun emitted EOS, which min_new_tokens forbids transformers)" if i < len(o) and o[i] in eos else ""
        notes.append(f"prompt {b}: first differs at new token {i}: moerun {o[i:i + 3]} vs transformers {r[i:i + 3]}{why}")
    return same, notes


def offline(args, model) -> dict:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    prompts = make_prompts(32, args.seed)
    warm = make_prompts(4, args.seed + 1)
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(model, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    experts_impl = getattr(hf.config, "_experts_implementation", None)
    run_moerun(model, warm, 4)
    run_hf(hf, warm, 4)
    ours_s, ref_s = [], []
    for _ in range(args.repeats):  # alternate, so drift in machine load hits both alike
        dt, ours = run_moerun(model, prompts, args.new_tokens)
        ours_s.append(dt)
        dt, ref = run_hf(hf, prompts, args.new_tokens)
        ref_s.append(dt)
    same, notes = compare(ours, ref, set(model.cfg.eos_token_ids))
    res = {"prompts": len(prompts), "new_tokens": args.new_tokens, "repeats": args.repeats,
           "transformers_experts_implementation": experts_impl, "greedy_agree": same, "mismatches": notes}
    for name, secs, outs in (("moerun", ours_s, ours), ("transformers", ref_s, ref)):
        n = sum(map(len, outs))
        wall = statistics.median(secs)
        res[name] = {"wall_s": wall, "runs_s": secs, "tokens": n, "tokens_per_s": n / wall}
    res["ratio"] = res["moerun"]["tokens_per_s"] / res["transformers"]["tokens_per_s"]
    res["ratio_per_pair"] = [r / m for m, r in zip(ours_s, ref_s)]  # each run beside the one after it
    return res


def print_offline(res: dict) -> None:
    rows = []
    for name in ("moerun", "transformers"):
        r = res[name]
        runs = ", ".join(f"{s:.2f}" for s in r["runs_s"])
        rows.append([name, f"{r['wall_s']:.2f}", runs, r["tokens"], f"{r['tokens_per_s']:.1f}"])
    print(f"\n== 1. Offline throughput, {MODEL} preset, one process: {res['prompts']} prompts x "
          f"{res['new_tokens']} new tokens, one batch, greedy, fp32 ==")
    print(f"   {measured(torch.get_num_threads())}; wall = median of {res['repeats']} run(s)")
    print(table(["engine", "wall s", "each run s", "generated tokens", "tokens/s"], rows))
    print(f"moerun / transformers (tokens/s): {res['ratio']:.2f}x (medians); run by run: "
          + ", ".join(f"{r:.2f}x" for r in res["ratio_per_pair"]))
    print(f"transformers experts implementation: {res['transformers_experts_implementation']}")
    print(f"greedy outputs identical: {res['greedy_agree']} of {res['prompts']} prompts")
    for line in res["mismatches"]:
        print("  " + line)


# ------------------------------------------------------- 2. pipeline schedule
def run_layout(pp: int, M: int, prompts_file: str, new_tokens: int, seed: int, timeout: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={pp}", f"--master_port={free_port()}",
           "-m", "moerun.generate", "--pp", str(pp), "--micro-batches", str(M), "--prompts-file", prompts_file,
           "--max-new-tokens", str(new_tokens), "--max-batch-tokens", "8192", "--seed", str(seed),
           "--ignore-eos", "--stats", "--json", "--timeout", "120"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = {"pp": pp, "micro_batches": M, "cmd": " ".join(cmd[1:])}
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**res, "error": f"timed out after {timeout}s"}
    res["process_wall_s"] = time.perf_counter() - t0
    total = STATS_TOTAL.search(p.stderr)
    stages = STATS_STAGE.findall(p.stderr)
    if p.returncode != 0 or total is None or len(stages) != pp:
        lines = p.stderr.strip().splitlines()
        ours = [ln for ln in lines if ln.startswith("moerun generate:")]  # moerun's own error lines
        tail = "\n".join(ours or lines[-8:])
        return {**res, "error": f"exit code {p.returncode}, [stats] total {'found' if total else 'missing'}, "
                                f"{len(stages)} of {pp} stage lines\n{tail}"}
    ticks, tokens, secs, tps = total.groups()
    res.update(ticks=int(ticks), tokens=int(tokens), wall_s=float(secs), tokens_per_s=float(tps),
               stages=[{"stage": int(s), "compute_s": float(c), "wait_s": float(w), "idle_ticks": int(i),
                        "ticks": int(n)} for s, c, w, i, n in stages])
    try:
        out = json.loads(p.stdout.strip().splitlines()[-1])
        res["outputs"] = [r["output_ids"] for r in (out if isinstance(out, list) else [out])]
    except (ValueError, IndexError, KeyError) as e:
        res["error"] = f"could not read the --json output: {e}"
    return res


def pipeline(args, model) -> list[dict]:
    prompts = make_prompts(args.pp_prompts, args.seed + 2)
    _, single = run_moerun(model, prompts, args.pp_tokens)  # the one-process reference outputs
    runs = []
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "prompts.jsonl"
        f.write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in prompts))
        for pp in (2, 4):
            for M in (1, pp):
                print(f"  running PP={pp} M={M} ...", file=sys.stderr, flush=True)
                r = run_layout(pp, M, str(f), args.pp_tokens, args.seed, args.timeout)
                if "outputs" in r:
                    r["same_as_one_process"] = sum(a == b for a, b in zip(r.pop("outputs"), single))
                runs.append(r)
    return runs


def print_pipeline(args, runs: list[dict]) -> None:
    print(f"\n== 2. Pipeline schedule, {MODEL} preset on gloo (tp=dp=ep=1): {args.pp_prompts} prompts x "
          f"{args.pp_tokens} new tokens, greedy, fp32 ==")
    rows = []
    for r in runs:
        if "error" in r and "stages" not in r:
            continue
        first = True
        for s in r["stages"]:
            lead = ([f"PP={r['pp']}", r["micro_batches"], f"{r['wall_s']:.2f}", f"{r['tokens_per_s']:.1f}",
                     f"{r.get('same_as_one_process', '?')}/{args.pp_prompts}"] if first else ["", "", "", "", ""])
            rows.append(lead + [s["stage"], f"{s['compute_s']:.3f}", f"{s['wait_s']:.3f}",
                                f"{s['idle_ticks']} of {s['ticks']}", f"{100 * s['idle_ticks'] / s['ticks']:.0f}%"])
            first = False
    procs = sorted({r["pp"] for r in runs})
    print("   " + "; ".join(measured(p, f": {p} processes x 1 thread") for p in procs))
    print(table(["layout", "M", "wall s", "tokens/s", "same as 1 proc", "stage", "compute s", "wait s",
                 "idle ticks", "idle"], rows))
    print("wall s = Engine.generate on rank 0, from [stats] (process start-up and model building excluded).\n"
          f"Note: this machine has {os.cpu_count()} cores, so with PP processes the stages share them and wall\n"
          "time does not show the overlap that one GPU per stage would give; the idle-tick fraction\n"
          "is what shows the schedule (M=1: each stage works one tick in PP; M=PP: every tick).")
    for r in runs:
        if "error" in r:
            print(f"ERROR PP={r['pp']} M={r['micro_batches']}: {r['error']}\n  command: {r['cmd']}")


# ------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one timed run offline; PP runs on 16 x 32")
    ap.add_argument("--json", metavar="OUT", help="also write the figures to this JSON file")
    ap.add_argument("--seed", type=int, default=0, help="weights and prompts")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per torchrun run")
    args = ap.parse_args(argv)
    args.new_tokens = 64
    args.repeats = 1 if args.quick else 3
    args.pp_prompts, args.pp_tokens = (16, 32) if args.quick else (32, 64)

    t_start = time.perf_counter()
    print(f"moerun benchmark, {datetime.date.today()}, {cpu_model()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; load average at start {load_avg()}")
    model = build_model(MODEL, dtype=torch.float32, device="cpu", seed=args.seed)
    print(f"model: {MODEL} preset ({model.cfg.num_params() / 1e6:.1f}M params, fp32, seed {args.seed})")

    try:
        off = offline(args, model)
        print_offline(off)
    except Exception as e:  # keep going to the pipeline runs; exit 1 at the end
        off = {"error": f"{type(e).__name__}: {e}"}
        print(f"\nERROR offline throughput: {off['error']}")
    runs = pipeline(args, model)
    print_pipeline(args, runs)

    failed = [r for r in runs if "error" in r] + ([off] if "error" in off else [])
    elapsed = time.perf_counter() - t_start
    print(f"\nbenchmark took {elapsed:.0f}s; load average at end {load_avg()}")
    if args.json:
        out = {"date": str(datetime.date.today()), "cpu": cpu_model(), "cores": os.cpu_count(),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "quick": args.quick,
               "offline": off, "pipeline": runs, "elapsed_s": elapsed}
        Path(args.json).write_text(json.dumps(out, indent=2))
    if failed:
        print(f"{len(failed)} run(s) failed (see ERROR lines above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
