"""Benchmark the fused MoE kernel against a per-expert PyTorch loop and torch's grouped GEMM.

    python scripts/bench_kernels.py            # seed-30b expert shapes, T = 1 .. 16384
    python scripts/bench_kernels.py --quick    # a few token counts, EP 1 and 8

Needs a CUDA GPU; without one it says so and exits 0. Shapes: E = 64 experts, H = 1024,
F = 9472, top-2, bf16. EP = 1: T tokens routed top-2 over the 64 experts. EP in {4, 8, 16}:
what one rank computes after the dispatch all-to-all when the EP group serves T tokens:
ceil(2T / EP) received rows, each for one of its E/EP local experts (top-1, weight 1), which
is how the MoE layer calls fused_moe under expert parallelism.

Every figure is measured in this run with CUDA events (median of --iters), on the device
printed in the header, next to the device's own matmul peak (a big bf16 torch.matmul) and
copy peak (a big device-to-device copy) measured the same way. FLOPs count the local slots
only (6 * H * F per slot); bytes are the minimum moved: the weights of the experts that got
a slot, the gathered activations, the intermediate and the output.

Shape legend: T = tokens, E = experts, K = top-k, H = hidden, F = expert FFN width.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
try:
    from moerun.kernels import fused_moe, reference_moe_loop
except ImportError:  # run from a checkout without `pip install -e .`
    from kernels import fused_moe, reference_moe_loop


def time_ms(fn, iters: int, warmup: int = 3) -> float:
    """Median milliseconds of fn() over iters runs, CUDA events around each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def matmul_peak_tflops(iters: int, n: int = 8192) -> float:
    """A big bf16 torch.matmul, as the device's attainable matmul peak."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n**3 / (time_ms(lambda: a @ b, iters) * 1e-3) / 1e12


def copy_peak_gbps(iters: int, nbytes: int = 1 << 30) -> float:
    """A big device-to-device copy, as the attainable bandwidth (read + write bytes)."""
    src = torch.empty(nbytes, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    return 2 * nbytes / (time_ms(lambda: dst.copy_(src), iters) * 1e-3) / 1e9


def make_problem(T, E, E_local, H, F, k, dtype, device):
    """T rows routed top-k over E experts, of which the first E_local are this rank's."""
    x_TH = torch.randn(T, H, device=device, dtype=dtype)
    w13_EFH = torch.randn(E_local, 2 * F, H, device=device, dtype=dtype) / H**0.5
    w2_EHF = torch.randn(E_local, H, F, device=device, dtype=dtype) / F**0.5
    ids_TK = torch.topk(torch.rand(T, E, device=device), k, dim=1).indices.to(torch.int32)
    weights_TK = torch.softmax(torch.randn(T, k, device=device), dim=1)
    return x_TH, w13_EFH, w2_EHF, weights_TK, ids_TK


def grouped_mm_moe(x_TH, w13_EFH, w2_EHF, weights_TK, ids_TK):
    """The same layer with torch._grouped_mm: sort slots by expert, two grouped GEMMs."""
    E, F = w13_EFH.shape[0], w13_EFH.shape[1] // 2
    K = ids_TK.shape[1]
    ids_S = ids_TK.reshape(-1).long()
    local_S = ids_S < E  # rank 0's slice: experts [0, E)
    order = torch.argsort(torch.where(local_S, ids_S, E), stable=True)
    counts_E = torch.bincount(ids_S[local_S], minlength=E)
    order = order[: int(counts_E.sum())]
    offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
    x_NH = x_TH[order // K]
    gu_N2F = torch._grouped_mm(x_NH, w13_EFH.transpose(1, 2), offs=offs_E)
    h_NF = torch.nn.functional.silu(gu_N2F[:, :F]) * gu_N2F[:, F:]
    y_NH = torch._grouped_mm(h_NF, w2_EHF.transpose(1, 2), offs=offs_E)
    y_NH = y_NH.float() * weights_TK.reshape(-1)[order, None]
    out_TH = torch.zeros(x_TH.shape, dtype=torch.float32, device=x_TH.device)
    out_TH.index_add_(0, order // K, y_NH)
    return out_TH.to(x_TH.dtype)


def work(x_TH, w13_EFH, ids_TK):
    """(local slots, FLOPs, minimum bytes) of one call."""
    E, F2, H = w13_EFH.shape
    elt = x_TH.element_size()
    ids_S = ids_TK.reshape(-1)
    slots = int((ids_S < E).sum())
    touched = int(torch.unique(ids_S[ids_S < E]).numel())
    flops = slots * 6 * H * (F2 // 2)
    nbytes = (touched * 3 * (F2 // 2) * H * elt + slots * (H * elt + F2 * elt + 2 * H * 4)
              + 2 * x_TH.numel() * elt)
    return slots, flops, nbytes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="T in {1, 64, 1024, 8192}, EP 1 and 8")
    p.add_argument("--tokens", type=int, nargs="*", help="token counts (default 1..16384)")
    p.add_argument("--ep", type=int, nargs="*", help="EP sizes (default 1 4 8 16)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-loop", action="store_true", help="skip the per-expert loop baseline")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU and none is visible; nothing was measured.")
        return 0
    E, H, F, k, dtype = 64, 1024, 9472, 2, torch.bfloat16
    tokens = args.tokens or ([1, 64, 1024, 8192] if args.quick else [2**i for i in range(15)])
    eps = args.ep or ([1, 8] if args.quick else [1, 4, 8, 16])
    iters = 5 if args.quick else args.iters
    name = torch.cuda.get_device_name()
    peak_tflops, peak_gbps = matmul_peak_tflops(iters), copy_peak_gbps(iters)
    print(f"# fused MoE, measured on {name}, {datetime.date.today()}, torch {torch.__version__}")
    print(f"# measured peaks on {name}: bf16 matmul {peak_tflops:.1f} TFLOP/s, "
          f"d2d copy {peak_gbps:.0f} GB/s (read + write)")
    print(f"# E={E} H={H} F={F} top-{k} {str(dtype)[6:]}; EP>1: one rank's received rows "
          "(ceil(T*k/EP), top-1 over E/EP local experts)")
    has_grouped = hasattr(torch, "_grouped_mm")
    if not has_grouped:
        print("# torch._grouped_mm is absent in this torch: grouped-GEMM column skipped")
    cols = ("EP", "E_loc", "T", "rows", "impl", "ms", "TFLOP/s", "%mm_peak", "GB/s", "%copy_peak",
            "max_rel_err")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for ep in eps:
        E_local = E // ep
        for T in tokens:
            if ep == 1:
                prob = make_problem(T, E, E, H, F, k, dtype, "cuda")
            else:  # the rows this rank receives: top-1 over its own experts
                prob = make_problem(-(-T * k // ep), E_local, E_local, H, F, 1, dtype, "cuda")
            slots, flops, nbytes = work(prob[0], prob[1], prob[4])
            ours = fused_moe(*prob, impl="triton")
            impls = {"triton": lambda: fused_moe(*prob, impl="triton")}
            if not args.no_loop:
                impls["torch loop"] = lambda: reference_moe_loop(*prob)
            if has_grouped:
                impls["_grouped_mm"] = lambda: grouped_mm_moe(*prob)
            for label, fn in impls.items():
                try:
                    ms = time_ms(fn, iters)
                    out = fn().float()
                except Exception as exc:  # e.g. _grouped_mm unsupported on this device
                    print(f"| {ep} | {E_local} | {T} | {slots} | {label} | skipped: "
                          f"{type(exc).__name__}: {str(exc)[:80]} |")
                    continue
                err = ((out - ours.float()).abs().max() / ours.float().abs().max().clamp_min(1e-6))
                tf, gb = flops / ms / 1e9, nbytes / ms / 1e6
                print(f"| {ep} | {E_local} | {T} | {slots} | {label} | {ms:.3f} | {tf:.1f} | "
                      f"{100 * tf / peak_tflops:.0f}% | {gb:.0f} | {100 * gb / peak_gbps:.0f}% | "
                      f"{err.item():.1e} |")
    print(f"# all figures measured on {name}; max_rel_err is vs the triton output")
    return 0


if __name__ == "__main__":
    sys.exit(main())
