"""Benchmark the fused MoE kernel against a per-expert PyTorch loop and torch's grouped GEMM.

    python scripts/bench_kernels.py            # seed-30b expert shapes, T = 1 .. 16384
    python scripts/bench_kernels.py --quick    # a few token counts, EP 1 and 8
    python scripts/bench_kernels.py --cpu      # the CPU table (also what runs without a GPU)
    python scripts/bench_kernels.py --router   # route()'s modes, Triton vs torch (GPU only)

CPU (no CUDA GPU, or --cpu): the torch paths of ``fused_moe`` in float32 on the ``tiny``
preset's expert shapes (E = 64, H = 128, F = 256, top-2; ``--cpu-shape cpu-1024``: H = F =
1024, 4 layers): the per-expert loop, ``torch._grouped_mm``, the gather-GEMV, the automatic
choice and the C kernel (``kernels/csrc/moe_cpu.c``, when it builds), over a stack of 16
layers' experts (as in a forward pass, so weights come from memory, not cache), next to the
memory bandwidth this CPU reaches streaming the same bytes (a sum over them), all timed
with perf_counter in this run (median of --iters passes over the 16 layers).

GPU: E = 64 experts, H = 1024,
F = 9472, top-2, bf16. EP = 1: T tokens routed top-2 over the 64 experts. EP in {4, 8, 16}:
what one rank computes after the dispatch all-to-all when the EP group serves T tokens:
ceil(2T / EP) received rows, each for one of its E/EP local experts (top-1, weight 1), which
is how the MoE layer calls fused_moe under expert parallelism.

Every figure is measured in this run with CUDA events (median of --iters), on the device
printed in the header, next to the device's own matmul peak (a big bf16 torch.matmul) and
copy peak (a big device-to-device copy) measured the same way. FLOPs count the local slots
only (6 * H * F per slot); bytes are the minimum moved: the weights of the experts that got
a slot, the gathered activations, the intermediate and the output.

Router (--router, GPU only; without one it prints that nothing was measured): ``route`` in
each family's mode on its expert count (softmax E=128 top-8 renormalised; sigmoid + bias
E=160 top-8 scaled; group-limited sigmoid E=256, 8 groups keep 4, top-8; top-k-then-softmax
E=128 top-4), float32 logits, Triton against the torch reference, CUDA events (median of
--iters), with the bytes read and written (logits, bias, weights, ids) per second.

Shape legend: T = tokens, E = experts, K = top-k, H = hidden, F = expert FFN width.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch

try:
    from moerun.kernels import cpu_ext, fused_moe, reference_moe_loop, route
    from moerun.kernels.fused_moe import torch_fused_moe
except ImportError:  # run from a checkout without `pip install -e .`: kernels/ from the root
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from kernels import cpu_ext, fused_moe, reference_moe_loop, route
    from kernels.fused_moe import torch_fused_moe


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


def graph_time_ms(fn, iters: int, reps: int = 10) -> float:
    """Median milliseconds of one fn() replayed from a CUDA graph holding ``reps`` calls, so
    launch overhead is what a graph-captured step pays, not the Python of each launch. Falls
    back to ``time_ms`` when fn cannot be captured."""
    try:
        fn()  # compile and allocate outside the capture
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                fn()
    except Exception:  # not capturable (e.g. a host sync inside): time it eagerly
        torch.cuda.synchronize()
        return time_ms(fn, iters)
    return time_ms(graph.replay, iters, warmup=2) / reps


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
    """T rows routed top-k over E experts, of which the first E_local are this rank's.
    The experts are K-major in memory, as the model stores them (moerun.model.moe)."""
    x_TH = torch.randn(T, H, device=device, dtype=dtype)
    w13_EFH = (torch.randn(E_local, H, 2 * F, device=device, dtype=dtype) / H**0.5).transpose(1, 2)
    w2_EHF = (torch.randn(E_local, F, H, device=device, dtype=dtype) / F**0.5).transpose(1, 2)
    ids_TK = torch.topk(torch.rand(T, E, device=device), k, dim=1).indices.to(torch.int32)
    weights_TK = torch.softmax(torch.randn(T, k, device=device), dim=1)
    return x_TH, w13_EFH, w2_EHF, weights_TK, ids_TK


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


def cpu_time_ms(fn, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def cpu_main(args) -> int:
    """The CPU table: fused_moe's torch paths on the tiny preset's shapes (module docstring)."""
    E, H, F, k, layers = (64, 1024, 1024, 2, 4) if args.cpu_shape == "cpu-1024" else (64, 128, 256, 2, 16)
    tokens = args.tokens or ([1, 32, 512] if args.quick else [1, 8, 32, 128, 512, 2048])
    iters = 3 if args.quick else min(args.iters, 7)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               "unknown cpu")
    stack = [make_problem(1, E, E, H, F, k, torch.float32, "cpu")[1:3] for _ in range(layers)]
    weight_bytes = sum(w.numel() * 4 for ws in stack for w in ws)
    flat = [w.transpose(1, 2).contiguous().view(-1) for ws in stack for w in ws]
    stream_gbps = weight_bytes / cpu_time_ms(lambda: [f.sum() for f in flat], iters) / 1e6
    print(f"# fused MoE torch paths, measured on cpu ({cpu}, {torch.get_num_threads()} threads), "
          f"{datetime.date.today()}, torch {torch.__version__}")
    print(f"# E={E} H={H} F={F} top-{k} float32, {layers} layers' experts ({weight_bytes / 2**20:.0f} MiB); "
          f"streaming them (a sum) measured {stream_gbps:.1f} GB/s")
    print(f"# ms = one pass over the {layers} layers; GB/s = bytes of the experts that got a slot / time")
    impls = {"torch loop (per expert)": reference_moe_loop,
             "torch._grouped_mm": lambda *a: torch_fused_moe(*a, path="grouped"),
             "gather-GEMV": lambda *a: torch_fused_moe(*a, path="gemv"),
             "fused_moe impl=torch (auto)": lambda *a: fused_moe(*a, impl="torch")}
    if cpu_ext.available():
        impls["C kernel (csrc/moe_cpu.c)"] = lambda *a: torch_fused_moe(*a, path="ext")
    else:
        print(f"# the C kernel is not available ({cpu_ext.unavailable_reason()}): its row is skipped")
    cols = ("T", "slots/expert", "impl", f"ms ({layers} layers)", "GB/s", "% of stream", "vs loop", "max_rel_err")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for T in tokens:
        x, _, _, w, ids = make_problem(T, E, E, H, F, k, torch.float32, "cpu")
        touched = int(torch.unique(ids).numel())
        nbytes = layers * touched * 3 * H * F * 4
        ref = reference_moe_loop(x, *stack[0], w, ids)
        base = None
        for label, fn in impls.items():
            ms = cpu_time_ms(lambda: [fn(x, w13, w2, w, ids) for w13, w2 in stack], iters)
            base = base or ms
            err = (fn(x, *stack[0], w, ids) - ref).abs().max() / ref.abs().max().clamp_min(1e-6)
            gb = nbytes / ms / 1e6
            print(f"| {T} | {T * k / E:.2f} | {label} | {ms:.2f} | {gb:.1f} | {100 * gb / stream_gbps:.0f}% | "
                  f"{base / ms:.2f}x | {err.item():.1e} |")
    print(f"# all figures measured on cpu ({cpu}); max_rel_err is vs the per-expert loop")
    return 0


# (label, E, k, route options): each family's router as the model calls it
ROUTER_MODES = [
    ("softmax renorm (Qwen3-MoE)", 128, 8, dict(scoring="softmax", renormalize=True)),
    ("sigmoid+bias scaled (GLM-4.5)", 160, 8, dict(scoring="sigmoid", renormalize=True, scaling=2.5, bias=True)),
    ("sigmoid groups 8/4 (DeepSeek-V3)", 256, 8, dict(scoring="sigmoid", renormalize=True, scaling=2.5,
                                                      bias=True, num_groups=8, topk_groups=4)),
    ("topk_softmax (GPT-OSS)", 128, 4, dict(scoring="topk_softmax")),
]


def router_main(args) -> int:
    """The router table (module docstring); GPU only."""
    if not torch.cuda.is_available():
        print("# no CUDA GPU visible: the router table was not measured (it needs a GPU)")
        return 0
    tokens = args.tokens or ([1, 64, 1024, 8192] if args.quick else [1, 16, 128, 1024, 4096, 16384])
    iters = 5 if args.quick else args.iters
    name = torch.cuda.get_device_name()
    print(f"# route(), measured on {name}, {datetime.date.today()}, torch {torch.__version__}; float32 logits")
    cols = ("mode", "E", "K", "T", "impl", "us", "GB/s", "ids equal", "max_abs_err")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for label, E, k, opts in ROUTER_MODES:
        opts = dict(opts)
        if opts.pop("bias", False):
            opts["bias_E"] = 0.1 * torch.randn(E, device="cuda")
        for T in tokens:
            logits_TE = 2 * torch.randn(T, E, device="cuda")
            nbytes = T * E * 4 + T * k * 8 + (E * 4 if "bias_E" in opts else 0)
            w_ref, ids_ref = route(logits_TE, k, impl="torch", **opts)
            for impl in ("triton", "torch"):
                ms = time_ms(lambda: route(logits_TE, k, impl=impl, **opts), iters)
                w, ids = route(logits_TE, k, impl=impl, **opts)
                same = float((ids == ids_ref).all(1).float().mean())
                print(f"| {label} | {E} | {k} | {T} | {impl} | {ms * 1e3:.1f} | {nbytes / ms / 1e6:.1f} | "
                      f"{100 * same:.2f}% | {(w - w_ref).abs().max().item():.1e} |")
    print(f"# all figures measured on {name}; ids equal / max_abs_err are vs the torch reference "
          "(rows whose choice is a float32 near-tie may differ)")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="T in {1, 64, 1024, 8192}, EP 1 and 8")
    p.add_argument("--tokens", type=int, nargs="*", help="token counts (default 1..16384)")
    p.add_argument("--ep", type=int, nargs="*", help="EP sizes (default 1 4 8 16)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-loop", action="store_true", help="skip the per-expert loop baseline")
    p.add_argument("--cpu", action="store_true", help="the CPU table even when a GPU is visible")
    p.add_argument("--cpu-shape", choices=("tiny", "cpu-1024"), default="tiny",
                   help="the CPU table's expert shapes: the tiny preset's (16 layers) or cpu-1024's (4 layers)")
    p.add_argument("--router", action="store_true", help="the router table (route() modes; GPU only)")
    args = p.parse_args(argv)
    if args.router:
        return router_main(args)
    if args.cpu or not torch.cuda.is_available():
        if not args.cpu:
            print("# no CUDA GPU visible: the GPU table was not measured; running the CPU table")
        return cpu_main(args)
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
                impls["_grouped_mm"] = lambda: torch_fused_moe(*prob, path="grouped")
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
