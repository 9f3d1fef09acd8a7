"""The command-line flag groups every entry point shares, and their parsing into the
settings the layers below take. Each flag is declared once here; ``moerun generate``,
``moerun serve``, ``moerun layout``, ``moerun plan`` and the benchmarks add the groups
they need and pass the resulting dataclasses down, never the argparse ``Namespace``.

    ap = argparse.ArgumentParser(formatter_class=HelpFormatter)
    add_model_args(ap); add_layout_args(ap); add_engine_args(ap); add_sampling_args(ap)
    add_eplb_args(ap)
    args = ap.parse_args(argv)
    opts, par, eplb = model_options(args), parallel_config(args), eplb_options(args)
    ecfg, sp = engine_config(args), sampling_params(args)

No torch here: a command that only validates or plans stays light.
"""
from __future__ import annotations

import argparse

from .dtypes import RUN_DTYPES
from .options import KERNEL_IMPLS, EngineConfig, EPLBOptions, ModelOptions, SamplingParams
from .parallel import ParallelConfig

AXES = (("tp", "tensor"), ("pp", "pipeline"), ("ep", "expert"), ("dp", "data"))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Module docstrings as descriptions, and every flag's default in --help."""


def add_model_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("model")
    g.add_argument("--model", default="tiny", help="checkpoint directory or preset name")
    g.add_argument("--dtype", choices=RUN_DTYPES, default=None,
                   help="weights and activations (default: float32 on CPU, bfloat16 on GPU)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--weights-seed", type=int, default=0, help="seed of a preset's random weights")
    g.add_argument("--kernels", choices=KERNEL_IMPLS, default="auto",
                   help="auto = Triton on CUDA, PyTorch references on CPU")


def add_layout_args(ap: argparse.ArgumentParser, default: int | None = 1, timeout: bool = True,
                    title: str = "layout (under torchrun; tp*pp*dp = processes)") -> None:
    """``--tp --pp --ep --dp`` (and ``--timeout``). ``default=None`` lets a caller tell a
    flag that was not given from one that was (the planner overrides a strategy file)."""
    g = ap.add_argument_group(title)
    for axis, what in AXES:
        g.add_argument(f"--{axis}", type=int, default=default, help=f"{what}-parallel degree")
    g.add_argument("--redundant-experts", type=int, default=default and 0, metavar="R",
                   help="physical experts beyond E per EP group, copies of hot experts (moerun.eplb; "
                        "(E + R) %% ep == 0)")
    if timeout:
        g.add_argument("--timeout", type=float, default=180.0,
                       help="seconds a collective may wait before a dead peer becomes an error")


def add_engine_args(ap: argparse.ArgumentParser) -> None:
    d = EngineConfig()
    g = ap.add_argument_group("engine")
    g.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens,
                   help="tokens one micro-batch step may compute (prefill chunks + decodes)")
    g.add_argument("--kv-cache-gb", type=float, default=d.kv_cache_gb,
                   help="KV cache per rank (default: 256 MiB on CPU, 90%% of free GPU memory)")
    g.add_argument("--block-size", type=int, default=d.block_size, help="tokens per KV cache block")
    g.add_argument("--micro-batches", type=int, default=d.micro_batches,
                   help="micro-batches per replica (default: pp)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs: every step runs eagerly (graphs are off on CPU, under EP > 1 and "
                        "with --profile)")
    g.add_argument("--cuda-graph-max-bs", type=int, default=d.cuda_graph_max_bs,
                   help="largest decode batch replayed from a CUDA graph (buckets 1, 2, 4, ... up to it)")
    g.add_argument("--profile", action="store_true",
                   help="profile every rank: phase times per step, expert load, memory (see moerun.profile)")
    g.add_argument("--profile-out", metavar="DIR", default=None,
                   help="write the profile's summary.json and trace.json (Perfetto) here; implies --profile")


def add_eplb_args(ap: argparse.ArgumentParser, load_out: bool = True) -> None:
    g = ap.add_argument_group("expert-parallel load balancing (moerun.eplb)")
    g.add_argument("--eplb-load", metavar="FILE", default=None,
                   help="place experts at start-up from this expert-load file (--expert-load-out, or a "
                        "--profile-out summary.json)")
    g.add_argument("--eplb-interval", type=int, metavar="N", default=None,
                   help="re-plan the placement every N steps from the measured load and move expert weights")
    g.add_argument("--eplb-window", type=int, metavar="N", default=None,
                   help="steps of load a re-plan reads (default: the interval)")
    g.add_argument("--gpus-per-node", type=int, default=None,
                   help="ranks per node: hierarchical placement when EP spans nodes")
    if load_out:
        g.add_argument("--expert-load-out", metavar="FILE", default=None,
                       help="write the run's token-slots per expert and layer here (a --eplb-load file)")


def add_sampling_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the model's EOS token")
    g.add_argument("--seed", type=int, default=None,
                   help="sampling seed of every request (default: a fresh random seed per request)")
    g.add_argument("--stop", action="append", default=[],
                   help="stop at this text, which is left out of the output (repeatable)")


def model_options(args) -> ModelOptions:
    return ModelOptions(model=args.model, dtype=args.dtype, device=args.device, weights_seed=args.weights_seed,
                        kernels=args.kernels)


def parallel_config(args) -> ParallelConfig:
    return ParallelConfig(**{axis: getattr(args, axis) for axis, _ in AXES},
                          redundant_experts=getattr(args, "redundant_experts", None) or 0)


def eplb_options(args) -> EPLBOptions:
    return EPLBOptions(load_file=args.eplb_load, interval=args.eplb_interval, window=args.eplb_window,
                       gpus_per_node=args.gpus_per_node, load_out=getattr(args, "expert_load_out", None))


def engine_config(args) -> EngineConfig:
    return EngineConfig(max_batch_tokens=args.max_batch_tokens, kv_cache_gb=args.kv_cache_gb,
                        block_size=args.block_size, micro_batches=args.micro_batches,
                        profile=args.profile or args.profile_out is not None, enforce_eager=args.enforce_eager,
                        cuda_graph_max_bs=args.cuda_graph_max_bs)


def sampling_params(args, max_new_tokens: int | None = None) -> SamplingParams:
    """The command line's sampling; ``max_new_tokens`` overrides --max-new-tokens (a
    prompts file may give one per prompt)."""
    return SamplingParams(max_new_tokens=max_new_tokens or args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos)
