"""Expert-parallel load balancing on a skewed model: the MoE step time of the busiest EP
rank and the balance (mean / max token-slots per EP rank) without EPLB, with static EPLB
(placed from a measured load) and with dynamic EPLB (re-planned during the run), in one run.

    python scripts/bench_eplb.py                       # EP 4 on 4 CPU processes (gloo)
    python scripts/bench_eplb.py --ep 4 --redundant 4 --prompts 16 --json out.json

What it does
    1. makes a skewed checkpoint (a mixtral-type model, --layers x --experts): every token
       embedding carries one constant feature and each layer's router weighs that feature
       for four experts (0.6, 0.3, 0.2, 0.15 x), so a few hot experts per layer take most
       token-slots (different ones per layer);
    2. runs the same greedy requests under torchrun (TP1 EPn DPn: one EP group, one
       replica per rank) three times: contiguous experts, R = 0, writing the measured load
       (``--expert-load-out``); static EPLB (``--eplb-load`` of that file, R redundant
       experts); dynamic EPLB (R redundant experts, ``--eplb-interval``, starting from the
       default placement);
    3. prints, per mode: the balance measured on the ranks (rows each EP rank's experts
       computed, summed over the layers: ``moerun.plan.metrics.load_balance``; and the mean
       over layers of each layer's balance; dynamic: also the balance of the rows after its
       first move, since the prefill of a run comes before any re-plan), the "experts"
       phase seconds of the busiest
       rank and of the mean rank (the profiler's phase time), the step wall of the run,
       and whether the tokens equal the contiguous run's.

All figures are measured on this machine (device and date printed); on a 2-core CPU four
processes share the cores, so the times carry that contention, the balances do not.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_skewed_checkpoint(path: Path, layers: int, experts: int, hidden: int, ffn: int, seed: int = 0) -> None:
    """A mixtral-type checkpoint whose routers favour four experts per layer."""
    import torch

    from moerun.config import ModelConfig
    from moerun.model import MoEModel
    from moerun.weights import init_random, save_checkpoint

    base = ModelConfig.load("tiny")
    cfg = ModelConfig.from_hf({**base.to_hf(), "num_hidden_layers": layers, "num_local_experts": experts,
                               "hidden_size": hidden, "intermediate_size": ffn}, name="skewed")
    model = MoEModel(cfg)
    model.requires_grad_(False)
    init_random(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    model.embed_tokens.weight[:, 0] = 0.5  # one constant feature in every token
    for layer in model.layers:
        gate = layer.mlp.gate.weight  # [E, H]
        hot = torch.randperm(experts, generator=g)[:4]
        gate[:, 0] = 0.0
        for w, e in zip((0.6, 0.3, 0.2, 0.15), hot.tolist()):
            gate[e, 0] = w
    save_checkpoint(model, path)


def worker(args) -> int:
    """One rank of one mode (under torchrun): generate, then rank 0 writes what it measured."""

    from moerun.engine import Engine, EngineConfig, follow_leader
    from moerun.mesh import gather_to_rank0
    from moerun.model.moe import MoE
    from moerun.options import EPLBOptions, ModelOptions, SamplingParams
    from moerun.parallel import ParallelConfig
    from moerun.runtime import Runtime, gather_expert_load
    from moerun import eplb

    spec = json.loads(args.worker)
    par = ParallelConfig(ep=spec["ep"], dp=spec["ep"], redundant_experts=spec["redundant"])
    eo = EPLBOptions(load_file=spec.get("load_file"), interval=spec.get("interval"),
                     load_out=spec.get("load_out"))
    rt = Runtime.create(ModelOptions(model=spec["model"], dtype="float32", device="cpu"), par, 120, eo)
    ecfg = EngineConfig(num_blocks=256, profile=True)
    sp = SamplingParams(max_new_tokens=spec["new_tokens"], ignore_eos=True)
    if rt.is_leader:
        engine = Engine(rt.model, ecfg, rt.mesh)
        t0 = time.perf_counter()
        outs = engine.generate(spec["prompts"], [sp] * len(spec["prompts"]))
        wall = time.perf_counter() - t0
        engine.shutdown()
        w = engine.worker
    else:
        w = follow_leader(rt.model, ecfg, rt.mesh)
    moes = [m for m in rt.model.modules() if isinstance(m, MoE)]
    rb = rt.model.rebalancer
    first = rb.rows_at_first_move if rb and rb.rows_at_first_move else [0] * len(moes)
    mine = {"rows": {m.layer: m.rows_received for m in moes},
            "rows_after_move": {m.layer: m.rows_received - r0 for m, r0 in zip(moes, first)} if rb else None,
            "experts_s": w.profile_report()["phases_s"]["experts"],
            "moved_bytes": rb.bytes_moved if rb else 0, "replans": rb.replans if rb else 0}
    parts = gather_to_rank0(rt.mesh, {rt.rank: mine})
    load = gather_expert_load(rt) if eo.load_out else None
    if rt.is_leader:
        if eo.load_out:
            eplb.write_load(eo.load_out, rt.cfg, load, model=spec["model"])
        with open(spec["out"], "w") as f:
            json.dump({"outputs": outs, "wall_s": wall, "ranks": parts}, f)
    return 0


def run_mode(name: str, spec: dict, tmp: Path) -> dict:
    spec = {**spec, "out": str(tmp / f"{name}.json")}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={spec['ep']}",
           f"--master_port={free_port()}", __file__, "--worker", json.dumps(spec)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if p.returncode:
        raise SystemExit(f"{name} failed:\n{p.stderr[-4000:]}")
    return json.loads(Path(spec["out"]).read_text())


def summarize(res: dict, ep: int) -> dict:
    from moerun.plan.metrics import load_balance

    ranks = {int(r): v for r, v in res["ranks"].items()}  # JSON: rank and layer keys are strings
    layers = sorted({k for v in ranks.values() for k in v["rows"]}, key=int)
    per_rank = [sum(ranks[r]["rows"][k] for k in layers) for r in range(ep)]
    per_layer = [load_balance([ranks[r]["rows"][k] for r in range(ep)]) for k in layers]
    experts = [ranks[r]["experts_s"] for r in range(ep)]
    after = None
    if ranks[0]["rows_after_move"] is not None:
        after = load_balance([sum(ranks[r]["rows_after_move"][k] for k in layers) for r in range(ep)])
    return {"balance": load_balance(per_rank), "balance_after_first_move": after,
            "layer_balance": sum(per_layer) / len(per_layer), "rows_per_rank": per_rank, "experts_s_max": max(experts), "experts_s_mean": sum(experts) / ep,
            "wall_s": res["wall_s"], "moved_bytes": sum(v["moved_bytes"] for v in ranks.values()),
            "replans": ranks[0]["replans"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    ap.add_argument("--ep", type=int, default=4)
    ap.add_argument("--redundant", type=int, default=None, help="R (default: = ep)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=1024, help="expert FFN width")
    ap.add_argument("--prompts", type=int, default=16, help="requests (spread over the ep replicas)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--interval", type=int, default=4, help="dynamic mode: re-plan every N steps")
    ap.add_argument("--json", metavar="FILE", help="write the results here")
    args = ap.parse_args()
    if args.worker:  # under torchrun: moerun's exit policy (os._exit, no teardown with gloo threads alive)
        from moerun.entry import run_command
        sys.exit(run_command("bench_eplb worker", lambda: worker(args)))
    import torch

    R = args.ep if args.redundant is None else args.redundant
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 256, (args.prompts, args.prompt_len), generator=g).tolist()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        make_skewed_checkpoint(tmp / "ckpt", args.layers, args.experts, args.hidden, args.ffn)
        base = {"model": str(tmp / "ckpt"), "ep": args.ep, "prompts": prompts, "new_tokens": args.new_tokens}
        load = str(tmp / "load.json")
        modes = {"contiguous (no EPLB)": {**base, "redundant": 0, "load_out": load},
                 f"static EPLB (R={R})": {**base, "redundant": R, "load_file": load},
                 f"dynamic EPLB (R={R}, every {args.interval} steps)": {**base, "redundant": R,
                                                                      "interval": args.interval}}
        raw = {name: run_mode(f"m{i}", spec, tmp) for i, (name, spec) in enumerate(modes.items())}
    first = next(iter(raw.values()))["outputs"]
    rows = {name: {**summarize(r, args.ep), "tokens_equal": r["outputs"] == first} for name, r in raw.items()}
    device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), gloo, {args.ep} processes"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"measured on {device}, {when}; skewed model: {args.layers} layers x {args.experts} experts (top-2, "
          f"H {args.hidden}, F {args.ffn}), "
          f"{args.prompts} requests x {args.prompt_len} prompt + {args.new_tokens} new tokens, EP {args.ep}")
    print(f"{'mode':<38} {'balance':>8} {'per-layer':>9} {'after move':>10} {'busiest experts s':>18} "
          f"{'mean experts s':>15} {'run s':>7} {'moved MB':>9} {'tokens =':>8}")
    for name, r in rows.items():
        after = "" if r["balance_after_first_move"] is None else f"{r['balance_after_first_move']:.3f}"
        print(f"{name:<38} {r['balance']:>8.3f} {r['layer_balance']:>9.3f} {after:>10} {r['experts_s_max']:>18.3f} "
              f"{r['experts_s_mean']:>15.3f} {r['wall_s']:>7.2f} {r['moved_bytes'] / 1e6:>9.2f} "
              f"{str(r['tokens_equal']):>8}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "date": when, "args": vars(args), "results": rows},
                                              indent=1))


if __name__ == "__main__":
    main()
