"""Tune fused_moe tile sizes on this GPU and write them to kernels/configs/.

    python scripts/tune_fused_moe.py                     # seed-30b: E=64 H=1024 F=9472, EP 1
    python scripts/tune_fused_moe.py --ep 8 --tokens 1 16 256 4096
    python scripts/tune_fused_moe.py --E 8 --H 4096 --F 14336 --dtype float16
    python scripts/tune_fused_moe.py --grid quick --tokens 1 64 4096   # minutes, not hours

For each token count T it tunes the two GEMMs in turn, on the input fused_moe gets in the
runtime: first GEMM1's tiles (gate-up, N = 2F, reduction H) with GEMM2 on fixed tiles, then,
with the best GEMM1 kept, GEMM2's own tiles (down, N = H, reduction F: the opposite shape)
including split-K, which at small T gives the down projection enough programs to fill the
SMs. Each candidate is timed as a whole fused_moe call replayed from a CUDA graph (median of
--iters replays of 10 calls), as a graph-captured decode step runs it. The fastest pair is
written to one JSON per (E_local, F, H, dtype, device name): the file fused_moe looks for
(see kernels/moe_config.py). With --ep 1 that is T tokens routed top-k over all E experts;
with --ep > 1 it is T received rows, each for one of the E/EP local experts (top-1), as
after the dispatch. Candidates that fail to compile (e.g. too much shared memory) are
skipped. Needs a CUDA GPU; without one it says so and exits 0.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

try:
    from moerun.kernels import MoeTileConfig, fused_moe, moe_config
except ImportError:  # run from a checkout without `pip install -e .`: kernels/ from the root
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from kernels import MoeTileConfig, fused_moe, moe_config

from bench_kernels import graph_time_ms, make_problem  # noqa: E402  (same folder)

SHARED_BYTES = 227 * 1024  # per block on H100 / H200


def _fits(m: int, n: int, kb: int, stages: int, b_tiles: int, elt: int = 2) -> bool:
    """The pipelined A and B tiles fit in shared memory (b_tiles = 2 for gate + up)."""
    return stages * (m * kb + b_tiles * kb * n) * elt <= SHARED_BYTES


def block_ms(num_tokens: int, top_k: int, E: int, grid: str):
    rows_per_expert = max(1, num_tokens * top_k // E)
    ms = [m for m in (16, 32, 64, 128) if m <= max(16, 2 * rows_per_expert)]
    return ms[-2:] if grid == "quick" else ms


def gemm1_candidates(num_tokens: int, top_k: int, E: int, grid: str):
    """GEMM1 tiles; GEMM2 rides on fixed tiles of the same BLOCK_M while these are timed."""
    decode = num_tokens * top_k <= 4 * E
    if grid == "quick":
        space = ((64, 128), (64, 128), (1,) if decode else (8,), (4,), (3,))
    else:
        space = ((32, 64, 128, 256), (32, 64, 128, 256), (1,) if decode else (1, 4, 8, 16),
                 (4, 8), (2, 3, 4, 5))
    for m in block_ms(num_tokens, top_k, E, grid):
        for n, kb, g, w, s in itertools.product(*space):
            if _fits(m, n, kb, s, 2):
                fixed2 = MoeTileConfig(BLOCK_M=m, BLOCK_N=64, BLOCK_K=64, num_stages=3)
                yield MoeTileConfig(BLOCK_M=m, BLOCK_N=n, BLOCK_K=kb, GROUP_M=g, num_warps=w,
                                    num_stages=s, gemm2=fixed2)


def gemm2_candidates(best1: MoeTileConfig, num_tokens: int, top_k: int, E: int, F: int,
                     grid: str):
    """GEMM2 tiles under the chosen GEMM1 (same BLOCK_M): narrow N, deeper pipelines and
    split-K for small T."""
    m = best1.BLOCK_M
    decode = num_tokens * top_k <= 4 * E
    splits = ((1, 2, 4, 8) + (() if grid == "quick" else (16,))) if decode else (1, 2)
    if grid == "quick":
        splits = splits if decode else (1,)
        space = ((32, 64, 128), (128,), (1,) if decode else (8,), (4,), (4,))
    else:
        space = ((16, 32, 64, 128, 256), (32, 64, 128, 256), (1,) if decode else (1, 4, 8, 16),
                 (4, 8), (2, 3, 4, 5, 6))
    for n, kb, g, w, s in itertools.product(*space):
        for split in splits:
            if _fits(m, n, kb, s, 1) and F // split >= kb:
                gemm2 = MoeTileConfig(BLOCK_M=m, BLOCK_N=n, BLOCK_K=kb, GROUP_M=g, num_warps=w,
                                      num_stages=s, SPLIT_K=split)
                yield MoeTileConfig(**{**best1.to_dict(), "gemm2": gemm2})


def fastest(prob, cfgs, iters: int, T: int):
    best = None
    for cfg in cfgs:
        try:
            ms = graph_time_ms(lambda: fused_moe(*prob, impl="triton", config=cfg), iters)
        except Exception as exc:  # compile failure / out of resources: skip the config
            print(f"  T={T} skip {cfg}: {type(exc).__name__}")
            continue
        if best is None or ms < best[0]:
            best = (ms, cfg)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--E", type=int, default=64, help="experts in the model")
    p.add_argument("--H", type=int, default=1024)
    p.add_argument("--F", type=int, default=9472)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--ep", type=int, default=1, help="EP size: tune E/EP local experts")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tokens", type=int, nargs="*",
                   default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--grid", choices=["full", "quick"], default="full",
                   help="candidate grid: full (hours on one GPU) or quick (minutes)")
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_fused_moe.py needs a CUDA GPU and none is visible; nothing was tuned.")
        return 0
    if args.E % args.ep:
        p.error(f"--ep {args.ep} must divide --E {args.E}")
    dtype = getattr(torch, args.dtype)
    E_local = args.E // args.ep
    device = torch.device("cuda")
    path = moe_config.config_path(E_local, args.F, args.H, dtype, moe_config.device_key(device))
    table = dict(moe_config._load(path) or {})
    top_k = args.top_k if args.ep == 1 else 1
    print(f"# tuning on {torch.cuda.get_device_name()}: E_local={E_local} H={args.H} F={args.F} "
          f"top-{top_k} {args.dtype}, grid {args.grid}; times measured (CUDA graph replays)")
    for T in args.tokens:
        prob = make_problem(T, args.E if args.ep == 1 else E_local, E_local, args.H, args.F,
                            top_k, dtype, device)
        default = moe_config.get_config(T, top_k, E_local, args.F, args.H, dtype, device, False)
        base = fastest(prob, [moe_config.default_config(
            T, top_k, E_local, dtype, False, F=args.F, H=args.H,
            num_sms=torch.cuda.get_device_properties(device).multi_processor_count)],
            args.iters, T)
        best1 = fastest(prob, gemm1_candidates(T, top_k, E_local, args.grid), args.iters, T)
        if best1 is None:
            print(f"T={T}: no GEMM1 candidate ran; keeping {default}")
            continue
        best = fastest(prob, gemm2_candidates(best1[1], T, top_k, E_local, args.F, args.grid),
                       args.iters, T) or best1
        if base is not None and base[0] <= best[0]:
            best = base  # the untuned tiles won: keep them
        note = f" (untuned default: {base[0]:.3f} ms)" if base else ""
        print(f"T={T}: {best[0]:.3f} ms (measured){note} with {best[1]}")
        table[T] = best[1]
        moe_config.save_configs(path, table)  # save as we go: tuning takes a while
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
