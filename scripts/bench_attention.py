"""Benchmark paged attention on a CUDA GPU: the Triton kernel against the PyTorch path it
replaces there (KVCache.read's index_select gather of whole blocks, then one
scaled_dot_product_attention with the bool causal mask and enable_gqa).

    python scripts/bench_attention.py            # seed-30b heads: 16 query, 4 KV, D = 64, bf16
    python scripts/bench_attention.py --iters 50

Cases: decode (one new token per sequence) at B = 1, 8, 64 sequences of 512 and 4096 cached
tokens, and prefill chunks. Every figure is measured in this run with CUDA events (median
of --iters), on the device printed in the header, next to its copy peak (a big
device-to-device copy, read + write bytes) measured the same way. KV GB/s counts the
minimum bytes: each sequence's K and V once. max_rel_err is the kernel against the PyTorch
path. Without a GPU it says so and exits 0.

Shape legend: B = sequences, T = new tokens, N = heads, D = head dim.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

try:
    import moerun  # noqa: F401  (installed: pip install -e .)
except ImportError:  # a checkout without it: moerun from the root
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from moerun.kernels import paged_attention  # noqa: E402
from moerun.kvcache import KVCache  # noqa: E402
from moerun.model import AttnMeta  # noqa: E402

from bench_kernels import copy_peak_gbps, time_ms  # noqa: E402  (same folder)

# (label, sequences, cached tokens each, new tokens each)
CASES = [("decode", 1, 512, 1), ("decode", 1, 4096, 1), ("decode", 8, 512, 1),
         ("decode", 8, 4096, 1), ("decode", 64, 512, 1), ("decode", 64, 4096, 1),
         ("prefill", 1, 0, 2048), ("chunk", 4, 2048, 512)]


def torch_path(q_TND, cache: KVCache, meta: AttnMeta, window: int = 0):
    """What moerun.model.attention does without the kernel (the SDPA path)."""
    k_BLND, v_BLND = cache.read(0, meta.table_BP, meta.max_len)
    B, N, D = len(meta.lens), q_TND.shape[1], q_TND.shape[2]
    q = q_TND.view(B, meta.max_new, N, D).transpose(1, 2)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k_BLND.transpose(1, 2), v_BLND.transpose(1, 2), attn_mask=meta.mask(window),
        enable_gqa=N != k_BLND.shape[2])
    return out.transpose(1, 2).reshape(-1, N, D)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention.py needs a CUDA GPU and none is visible; nothing was measured.")
        return 0
    dtype, dev, bs = torch.bfloat16, torch.device("cuda"), args.block_size
    Nq, Nkv, D = args.heads, args.kv_heads, args.head_dim
    name = torch.cuda.get_device_name()
    peak = copy_peak_gbps(args.iters)
    print(f"# paged attention, measured on {name}, {datetime.date.today()}, torch {torch.__version__}")
    print(f"# {Nq} query heads, {Nkv} KV heads, D={D}, block {bs}, bf16; d2d copy peak "
          f"{peak:.0f} GB/s (read + write), measured")
    cols = ("case", "B", "cached", "new", "impl", "ms", "KV GB/s", "%copy_peak", "max_rel_err")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    gen = torch.Generator().manual_seed(0)
    for label, B, ctx, new in CASES:
        per_seq = -(-(ctx + new) // bs)
        cache = KVCache(1, B * per_seq + 1, bs, Nkv, D, dtype, dev)
        cache.k[0].normal_()
        cache.v[0].normal_()
        perm = (torch.randperm(B * per_seq, generator=gen) + 1).tolist()  # scattered blocks
        tables = [perm[b * per_seq:(b + 1) * per_seq] for b in range(B)]
        meta = AttnMeta.build(tables, [ctx] * B, [new] * B, bs, dev)
        q_TND = torch.randn(B * new, Nq, D, device=dev, dtype=dtype)
        kv_bytes = 2 * B * (ctx + new) * Nkv * D * q_TND.element_size()
        impls = {
            "triton": lambda: paged_attention(q_TND, cache.k[0], cache.v[0], meta.table_BP,
                                              meta.cu_q(), meta.pos_T, scale=D ** -0.5,
                                              max_q=new, max_kv=ctx + new),
            "torch sdpa": lambda: torch_path(q_TND, cache, meta),
        }
        want = impls["torch sdpa"]().float()
        for impl, fn in impls.items():
            try:
                ms = time_ms(fn, args.iters)
                got = fn().float()
            except Exception as exc:  # e.g. out of memory for the gathered copy
                print(f"| {label} | {B} | {ctx} | {new} | {impl} | skipped: "
                      f"{type(exc).__name__}: {str(exc)[:80]} |")
                continue
            err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
            gbps = kv_bytes / ms / 1e6
            print(f"| {label} | {B} | {ctx} | {new} | {impl} | {ms:.3f} | {gbps:.0f} | "
                  f"{100 * gbps / peak:.0f}% | {err:.1e} |")
    print(f"# all figures measured on {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
