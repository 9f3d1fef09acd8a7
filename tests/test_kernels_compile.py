"""Compile every Triton kernel for an H100 (sm_90) without a GPU: the interpreter accepts
code that the real compiler rejects, so this catches GPU-only breakage on CPU CI.

    python -m pytest tests/test_kernels_compile.py -q

The compile runs in a subprocess without TRITON_INTERPRET (interpreted kernels cannot be
compiled), with the specialisations a real launch gets (16-aligned pointers, unit strides),
for the default decode and prefill tiles in bf16 / fp16 / fp32 (each GEMM its own, GEMM2 split
at decode), on the layout the model launches (experts K-major: unit stride along N), and
checks that each kernel fits in an H100's shared memory.
"""
import os
import subprocess
import sys

import pytest

SM90_SHARED_BYTES = 232448  # 227 KiB per block on H100


def compile_all() -> None:
    import importlib

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mods = {m: importlib.import_module(f"moerun.kernels.{m}")
            for m in ("router", "align", "fused_moe", "dispatch", "moe_config", "attention")}
    target = GPUTarget("cuda", 90, 32)
    tl_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

    def build(fn, ptrs, constexprs, num_warps=4, num_stages=3, scalars=None):
        sig, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in constexprs:
                sig[name] = "constexpr"
            elif name in (scalars or {}):
                sig[name] = scalars[name]
            elif name in ("alpha", "limit", "scaling"):
                sig[name] = "fp32"
            elif name.endswith("_ptr"):
                sig[name] = "*" + ptrs.get(name, "i32")
                attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                sig[name] = "i64" if name == "stride_we" else "i32"
                if name.startswith("stride") or name in ("F", "H"):
                    attrs[(i,)] = [["tt.divisibility", 16]]
        kernel = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=target,
                                options=dict(num_warps=num_warps, num_stages=num_stages))
        assert kernel.metadata.shared <= SM90_SHARED_BYTES, (fn.__name__, constexprs)

    for scoring, bias, grouped in ((0, False, False), (1, True, True), (1, False, False), (2, False, False)):
        build(mods["router"]._route_kernel, {"logits_ptr": "bf16", "bias_ptr": "fp32", "weights_ptr": "fp32"},
              dict(SCORING=scoring, HAS_BIAS=bias, GROUPED=grouped, RENORMALIZE=True,
                   BLOCK_T=16, BLOCK_E=256, BLOCK_K=8))
    build(mods["align"]._count_kernel, {}, dict(BLOCK_S=128, BLOCK_E=64))
    build(mods["align"]._scan_kernel, {}, dict(BLOCK_E=64, BLOCK_B=64))
    build(mods["align"]._align_one_launch_kernel, {}, dict(BLOCK_S=128, BLOCK_E=64, BLOCK_B=64))
    build(mods["align"]._scatter_kernel, {"ids_ptr": "i64"}, dict(BLOCK_S=128))
    fm, dp = mods["fused_moe"], mods["dispatch"]
    for dtype, dt in tl_name.items():
        for num_tokens in (1, 4096):  # decode and prefill defaults, seed-30b's experts
            cfg = mods["moe_config"].default_config(num_tokens, 2, 64, dtype, False, F=9472,
                                                    H=1024, num_sms=132)
            for bias, oai in ((False, False), (True, True)):  # plain, and the GPT-OSS epilogues
                for kernel, c, ptrs, unit in (
                        (fm._gemm1_swiglu_kernel, cfg,
                         {"x_ptr": dt, "w13_ptr": dt, "inter_ptr": dt, "b13_ptr": dt},
                         dict(stride_xh=1, stride_wn=1, HAS_BIAS=bias, SWIGLU_OAI=oai)),  # w13 stored [E, H, 2F]
                        (fm._gemm2_weighted_kernel, cfg.for_gemm2(),
                         {"inter_ptr": dt, "w2_ptr": dt, "y_ptr": "fp32", "weights_ptr": "fp32", "b2_ptr": dt},
                         dict(stride_wh=1, HAS_BIAS=bias))):  # w2 [E, H, F] stored [E, F, H]
                    tiles = dict(BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, BLOCK_K=c.BLOCK_K,
                                 GROUP_M=c.GROUP_M, IEEE_F32=dtype == torch.float32,
                                 ROUND_BF16=False, **unit)
                    build(kernel, ptrs, tiles, num_warps=c.num_warps, num_stages=c.num_stages)
        build(fm._topk_sum_kernel, {"y_ptr": "fp32", "out_ptr": dt},
              dict(BLOCK_T=4, BLOCK_H=1024, ROUND_BF16=False))
        build(dp._pack_kernel, {"x_ptr": dt, "send_ptr": dt}, dict(BLOCK_R=16, BLOCK_H=1024))
        build(dp._combine_kernel, {"recv_ptr": dt, "weights_ptr": "fp32", "out_ptr": dt},
              dict(BLOCK_T=4, BLOCK_H=1024, ROUND_BF16=False))
    at = mods["attention"]
    for dt, shapes in (("bf16", ((4, 1, 64), (4, 512, 64), (8, 1, 128), (8, 256, 128))),
                       ("fp16", ((4, 1, 64),)), ("fp32", ((4, 512, 64),))):
        for G, max_q, D in shapes:  # seed-30b's heads (G = 4, D = 64) and G = 8, D = 128
            BLOCK_Q, BLOCK_M, BLOCK_N = at._tiles(G, max_q, D)
            build(at._paged_attention_kernel,
                  {"q_ptr": dt, "k_ptr": dt, "v_ptr": dt, "out_ptr": dt, "pos_ptr": "i64",
                   "sinks_ptr": "fp32"},
                  dict(BLOCK_SIZE=16, G=G, BLOCK_Q=BLOCK_Q, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                       BLOCK_D=D, HAS_SINKS=max_q == 1, SPLIT=max_q == 1, IEEE_F32=dt == "fp32",
                       ROUND_BF16=False),
                  num_warps=4, num_stages=2,
                  scalars={"qk_scale": "fp32", "table_ptr": "*i64", "part_ptr": "*fp32",
                           "ml_ptr": "*fp32"})
        build(at._merge_splits_kernel, {"part_ptr": "fp32", "ml_ptr": "fp32", "out_ptr": dt},
              dict(BLOCK_H=32, BLOCK_D=128, ROUND_BF16=False))
    print("compiled all kernels for sm_90")


def test_kernels_compile_for_sm90():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no ASTSource / GPUTarget API to compile offline")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences a triton 3.9 warning
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "compiled all kernels" in proc.stdout


if __name__ == "__main__":
    compile_all()
