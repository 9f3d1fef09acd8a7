"""``moerun plan``: check a layout and project it on a hardware spec, search layouts, or check claims.

    moerun plan --strategy baseline --hardware seed --gpus 16
    moerun plan --model tiny --hardware cpu --gpus 8 --tp 2 --pp 2 --ep 4 --dp 2 --json
    moerun plan --model seed-30b --hardware seed --gpus 16 --search --max-tpot-ms 50
    moerun plan --claims seed [--measured m.json] [--json]   # configs/claims/seed.toml
    moerun plan --model tiny --hardware cpu --gpus 4 --ep 4 --dp 4 --redundant-experts 4 --expert-load load.json

(``python -m moerun.plan.cli`` is the same command.) Exit codes: 0 valid (or a search /
claims table printed), 2 invalid layout (every broken rule listed; with --json the object
is still printed, with "valid": false) or a bad flag or file, as every moerun command.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from ..args import HelpFormatter, add_layout_args
from ..config import ModelConfig
from ..dtypes import DTYPE_BYTES
from ..parallel import ParallelConfig
from .claims import ClaimsFile, check, load_measured
from .format import format_balance, format_claims, format_plan, format_search
from .hardware import HardwareSpec
from .planner import expert_balance, make_plan, search
from .strategy import Strategy, Workload


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moerun plan", description=__doc__.split("\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--model", help="preset name (tiny, seed-30b) or checkpoint directory "
                                    "(default: the strategy's model)")
    ap.add_argument("--hardware", help="preset in configs/hardware/ or a .toml path "
                                       "(default: the strategy's hardware)")
    ap.add_argument("--gpus", type=int, help="GPUs (processes) available "
                                             "(default: the strategy's, else the hardware's count)")
    ap.add_argument("--strategy", help="preset in configs/strategies/ or a .toml path")
    add_layout_args(ap, default=None, timeout=False, title="layout (overrides the strategy's)")
    ap.add_argument("--micro-batches", type=int, help="pipeline micro-batches per replica (default: pp)")
    wl = ap.add_argument_group("workload (overrides the strategy's [workload])")
    wl.add_argument("--concurrency", type=int, help="concurrent sequences in the whole deployment")
    wl.add_argument("--prompt-len", type=int)
    wl.add_argument("--output-len", type=int)
    wl.add_argument("--dtype", choices=list(DTYPE_BYTES))
    el = ap.add_argument_group("measured expert load (moerun.eplb)")
    el.add_argument("--expert-load", metavar="FILE", help="an expert-load file (--expert-load-out, or a "
                    "--profile-out summary.json): project the balance and step time from it")
    el.add_argument("--eplb", action="store_true", help="with --expert-load: place experts by moerun.eplb "
                    "(implied by --redundant-experts > 0)")
    el.add_argument("--gpus-per-node", type=int, help="with --expert-load: hierarchical placement")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--search", action="store_true", help="rank every valid layout by projected throughput")
    ap.add_argument("--max-tpot-ms", type=float, help="with --search: keep layouts under this TPOT")
    ap.add_argument("--top", type=int, default=10, help="with --search: how many to print (default 10)")
    ap.add_argument("--claims", metavar="NAME", help="check a claims file (configs/claims/NAME.toml) "
                                                    "and print its table; other options are ignored")
    ap.add_argument("--measured", help="with --claims: JSON file of measured values "
                                       "(format: moerun.plan.claims)")
    return ap


def resolve(args) -> tuple[ModelConfig, HardwareSpec, int, ParallelConfig, Workload]:
    """Combine a strategy (if any) with the flags; flags win. ValueError names what is missing."""
    strat = Strategy.load(args.strategy) if args.strategy else None
    model_name = args.model or (strat.model if strat else "")
    hw_name = args.hardware or (strat.hardware if strat else "")
    if not model_name:
        raise ValueError("no model: pass --model NAME_OR_DIR (or a --strategy that names one)")
    if not hw_name:
        raise ValueError("no hardware: pass --hardware NAME_OR_TOML (or a --strategy that names one)")
    model, hw = ModelConfig.load(model_name), HardwareSpec.load(hw_name)
    gpus = args.gpus or (strat.gpus if strat else 0) or hw.num_gpus
    if not gpus:
        raise ValueError(f"no GPU count: pass --gpus N (hardware {hw.name} is a device type, not a cluster)")
    layout = strat.layout if strat else ParallelConfig()
    layout = dataclasses.replace(layout, **{a: getattr(args, a) for a in ("tp", "pp", "ep", "dp", "redundant_experts")
                                            if getattr(args, a) is not None})
    workload = strat.workload if strat else Workload()
    over = {k: getattr(args, k) for k in ("concurrency", "prompt_len", "output_len", "dtype")
            if getattr(args, k) is not None}
    if over:
        workload = dataclasses.replace(workload, note="given on the command line", **over)
    return model, hw, gpus, layout, workload


def claims_main(args) -> int:
    """Check a claims file and print its table (or, with --json, one object)."""
    cf = ClaimsFile.load(args.claims)
    mf = load_measured(args.measured) if args.measured else None
    source = mf.source if mf else ""
    results = check(cf, mf.values, mf.measured_as) if mf else check(cf)
    if args.json:
        print(json.dumps({"name": cf.name, "source": cf.source, "tolerance": cf.tolerance,
                          "measured_source": source or None, "measured_as": mf.measured_as if mf else {},
                          "results": [dataclasses.asdict(r) for r in results]}, indent=1))
    else:
        print(format_claims(cf, results, source, mf.measured_as if mf else None))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.gpus is not None and args.gpus < 1:
            raise ValueError(f"--gpus {args.gpus} must be >= 1")
        if args.top < 1:
            raise ValueError(f"--top {args.top} must be >= 1")
        if args.claims:
            return claims_main(args)
        model, hw, gpus, layout, workload = resolve(args)
        if args.micro_batches is not None and args.micro_batches < 1:
            raise ValueError(f"--micro-batches {args.micro_batches} must be >= 1")
        if args.search:
            reps = search(model, hw, gpus, workload, args.micro_batches, args.max_tpot_ms)
            if args.json:
                print(json.dumps({"label": f"projected (roofline on {hw.name})", "gpus": gpus,
                                  "results": [r.to_json() for r in reps[:args.top]]}, indent=1))
            else:
                print(format_search(reps, args.top, model, hw, gpus, workload, args.max_tpot_ms))
            return 0
        balance = None
        if args.expert_load and not layout.problems(model, gpus):
            balance = expert_balance(model, layout, args.expert_load, args.eplb, args.gpus_per_node)
        elif args.eplb or args.gpus_per_node:
            if not args.expert_load:
                raise ValueError("--eplb and --gpus-per-node need --expert-load FILE (a measured load)")
        rep = make_plan(model, layout, hw, gpus, workload, args.micro_batches, balance and balance["used"])
    except ValueError as e:  # a bad flag or file: the same exit code as every moerun command
        print(f"moerun plan: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**rep.to_json(), "expert_load": balance}, indent=1))
    else:
        print(format_plan(rep))
        if balance is not None:
            print(format_balance(balance))
    return 0 if rep.valid else 2


if __name__ == "__main__":
    sys.exit(main())
