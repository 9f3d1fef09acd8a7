"""Tune fused_moe tile sizes on this GPU and write them to kernels/configs/.

    python scripts/tune_fused_moe.py                     # seed-30b: E=64 H=1024 F=9472, EP 1
    python scripts/tune_fused_moe.py --ep 8 --tokens 1 16 256 4096
    python scripts/tune_fused_moe.py --E 8 --H 4096 --F 14336 --dtype float16

For each token count T it times every candidate tile config (CUDA events, median) on the
input fused_moe gets in the runtime, keeps the fastest, and writes one JSON per (E_local, F,
H, dtype, device name): the file fused_moe looks for (see kernels/moe_config.py). With
--ep 1 that is T tokens routed top-k over all E experts; with --ep > 1 it is T received
rows, each for one of the E/EP local experts (top-1), as after the dispatch. Candidates
that fail to compile (e.g. too much shared memory) are skipped. Needs a CUDA GPU; without
one it says so and exits 0.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
try:
    from moerun.kernels import MoeTileConfig, fused_moe, moe_config
except ImportError:  # run from a checkout without `pip install -e .`
    from kernels import MoeTileConfig, fused_moe, moe_config

from bench_kernels import make_problem, time_ms  # noqa: E402  (same folder)


def candidates(num_tokens: int, top_k: int, E: int):
    """A modest grid: small BLOCK_M for decode, larger tiles when experts get many rows."""
    rows_per_expert = max(1, num_tokens * top_k // E)
    block_ms = [m for m in (16, 32, 64, 128) if m <= max(16, 2 * rows_per_expert)]
    for m, n, kb, g, w, s in itertools.product(block_ms, (32, 64, 128), (64, 128), (1, 8),
                                               (4, 8), (3, 4)):
        if m == 128 and n == 128 and kb == 128:
            continue  # always out of shared memory with two accumulators
        yield MoeTileConfig(BLOCK_M=m, BLOCK_N=n, BLOCK_K=kb, GROUP_M=g, num_warps=w,
                            num_stages=s)


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
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_fused_moe.py needs a CUDA GPU and none is visible; nothing was tuned.")
        return 0
    dtype = getattr(torch, args.dtype)
    E_local = args.E // args.ep
    device = torch.device("cuda")
    path = moe_config.config_path(E_local, args.F, args.H, dtype, moe_config.device_key(device))
    table = dict(moe_config._load(path) or {})
    for T in args.tokens:
        if args.ep == 1:
            prob = make_problem(T, args.E, E_local, args.H, args.F, args.top_k, dtype, device)
        else:
            prob = make_problem(T, E_local, E_local, args.H, args.F, 1, dtype, device)
        best = None
        for cfg in candidates(T, args.top_k if args.ep == 1 else 1, E_local):
            try:
                ms = time_ms(lambda: fused_moe(*prob, impl="triton", config=cfg), args.iters,
                             warmup=2)
            except Exception as exc:  # compile failure / out of resources: skip the config
                print(f"  T={T} skip {cfg}: {type(exc).__name__}")
                continue
            if best is None or ms < best[0]:
                best = (ms, cfg)
        if best is None:
            print(f"T={T}: no candidate ran; keeping the default")
            continue
        print(f"T={T}: {best[0]:.3f} ms (measured) with {best[1]}")
        table[T] = best[1]
        moe_config.save_configs(path, table)  # save as we go: tuning takes a while
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
