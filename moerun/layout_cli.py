"""``moerun layout``: validate a TP x PP x EP x DP layout and print who holds what.

    moerun layout --model seed-30b --world 16 --tp 8 --ep 8 --pp 2 --dp 1
    moerun layout --model /ckpt --world 8 --tp 2 --pp 2 --ep 4 --dp 2 --json
    moerun layout --model tiny --world 4 --ep 4 --dp 4 --redundant-experts 4 --eplb-load load.json

With ``--redundant-experts R`` each EP rank holds (E + R) / ep physical experts (the
"experts" column lists physical slots; the counts include the copies); with
``--eplb-load`` it also prints the measured load's balance, contiguous and placed.

The per-rank parameter counts come from building each rank's model shard on the meta
device (nothing allocated), so they are exactly what the runtime will hold.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from . import args as cli_args
from . import eplb
from .comm import Comm
from .config import ModelConfig
from .dtypes import DTYPE_BYTES
from .model import MoEModel
from .parallel import LayoutError, ParallelConfig


def shard_params(cfg: ModelConfig, par: ParallelConfig, rank: int) -> int:
    """Parameters rank ``rank`` holds (and loaded buffers: a router's correction bias),
    counted on a meta-device build of its shard."""
    with torch.device("meta"):
        m = MoEModel(cfg, Comm(par, rank), par.stage_layers(cfg.num_layers)[par.coord(rank).pp])
    loaded = sum(b.numel() for mod in m.modules() for name, b in mod.named_buffers(recurse=False)
                 if name not in mod._non_persistent_buffers_set)  # not the RoPE tables computed at build
    return sum(p.numel() for p in m.parameters()) + loaded


def rank_table(cfg: ModelConfig, par: ParallelConfig, dtype_bytes: int = 2) -> list[dict]:
    stages = par.stage_layers(cfg.num_layers)
    rows = []
    for r in range(par.world_size):
        c = par.coord(r)
        experts = par.experts_of(c.ep_rank, cfg.num_experts)
        n = shard_params(cfg, par, r)
        rows.append({"rank": r, "pp": c.pp, "dp": c.dp, "tp": c.tp, "ep_group": c.ep_group, "ep_rank": c.ep_rank,
                     "ep_group_ranks": par.ep_group_ranks(c.pp, c.ep_group),
                     "layers": [stages[c.pp].start, stages[c.pp].stop - 1],
                     "experts": [experts.start, experts.stop - 1], "params": n, "bytes": n * dtype_bytes})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moerun layout", description=__doc__,
                                 formatter_class=cli_args.HelpFormatter)
    ap.add_argument("--model", default="tiny", help="preset name or checkpoint directory")
    ap.add_argument("--world", type=int, required=True, help="number of processes (GPUs)")
    cli_args.add_layout_args(ap, timeout=False)
    ap.add_argument("--dtype", choices=list(DTYPE_BYTES), default="bfloat16", help="for the byte counts")
    ap.add_argument("--eplb-load", metavar="FILE", help="an expert-load file: print its balance on this layout")
    ap.add_argument("--gpus-per-node", type=int, default=None, help="with --eplb-load: hierarchical placement")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        cfg = ModelConfig.load(args.model)
    except ValueError as e:
        print(f"moerun layout: error: {e}", file=sys.stderr)
        return 2
    par = cli_args.parallel_config(args)
    try:
        par.validate(cfg, args.world)
    except LayoutError as e:
        if args.json:
            print(json.dumps({"valid": False, "errors": e.problems,
                              "valid_layouts": [vars(s) for s in e.suggestions]}))
        else:
            print(f"moerun layout: {e}", file=sys.stderr)
        return 2
    balance = None
    if args.eplb_load:
        try:
            load = eplb.read_load(args.eplb_load, cfg)
            placement = eplb.plan(load, par.ep, par.redundant_experts, args.gpus_per_node)
        except ValueError as e:
            print(f"moerun layout: error: {e}", file=sys.stderr)
            return 2
        balance = {"contiguous": eplb.layer_balance(load, None, par.ep) if cfg.num_experts % par.ep == 0 else None,
                   "placed": eplb.layer_balance(load, placement, par.ep)}
    rows = rank_table(cfg, par, DTYPE_BYTES[args.dtype])
    if args.json:
        print(json.dumps({"valid": True, "layout": vars(par), "world_size": args.world,
                          "params_total": cfg.num_params(), "ranks": rows, "expert_balance": balance}))
        return 0
    reps = par.dp * par.tp // par.ep
    print(f"{args.model}: {cfg.num_params() / 1e9:.3f}B params; {par} on {args.world} ranks; "
          f"experts replicated {reps}x per stage; "
          f"{(cfg.num_experts + par.redundant_experts) // par.ep} physical experts per EP rank; bytes as {args.dtype}")
    print(f"{'rank':>4} {'pp':>3} {'dp':>3} {'tp':>3} {'ep grp':>6} {'ep rk':>5}  {'layers':>9}  "
          f"{'experts':>9}  {'params':>14}  {'GiB':>8}")
    for r in rows:
        print(f"{r['rank']:>4} {r['pp']:>3} {r['dp']:>3} {r['tp']:>3} {r['ep_group']:>6} {r['ep_rank']:>5}  "
              f"{'%d-%d' % tuple(r['layers']):>9}  {'%d-%d' % tuple(r['experts']):>9}  {r['params']:>14,}  "
              f"{r['bytes'] / 2**30:>8.2f}")
    if balance is not None:
        c = "n/a" if balance["contiguous"] is None else f"{balance['contiguous']:.1%}"
        print(f"expert balance of {args.eplb_load} (mean / max tokens per EP rank, mean over MoE layers, "
              f"projected): contiguous {c}, placed by moerun.eplb {balance['placed']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
