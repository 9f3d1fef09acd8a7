"""fused_moe with ExpertAct: the Triton epilogues (expert biases, GPT-OSS's clamped SwiGLU)
against the PyTorch reference and a float64 loop over the token-slots.

    python -m pytest tests/test_kernels_expert_act.py -q

Runs under the Triton interpreter when there is no GPU, on tiny shapes that are not
multiples of the tiles. The clamp limit is small enough that the clamps engage (checked).
Shape legend: T = tokens, E = experts, K = top-k, H = hidden, F = expert FFN width.
"""
import importlib

import pytest
import torch

from kernel_env import DEVICE, needs_triton
from test_kernels_fused_moe import make_case as plain_case

import moerun.kernels as K
# |error| <= TOL * max|expected| (as tests/test_kernels_fused_moe.py)
TOL_F64 = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
TOL_REF = {torch.float32: 1e-5, torch.bfloat16: 8e-3}
ALPHA, LIMIT = 1.702, 0.9


def make_case(T, E, k, H, F, dtype, kind, biases, unused=()):
    """test_kernels_fused_moe's case, plus the biases named in ``biases`` and the ExpertAct."""
    x_TH, w13_EFH, w2_EHF, weights_TK, ids_TK = plain_case(T, E, k, H, F, dtype, unused)
    b13 = (0.5 * torch.randn(E, 2 * F, device=DEVICE)).to(dtype) if "w13" in biases else None
    b2 = (0.5 * torch.randn(E, H, device=DEVICE)).to(dtype) if "w2" in biases else None
    act = K.ExpertAct(kind=kind, alpha=ALPHA, limit=LIMIT, w13_bias=b13, w2_bias=b2)
    return x_TH, w13_EFH, w2_EHF, weights_TK, ids_TK, act


def moe_float64(x_TH, w13_EFH, w2_EHF, weights_TK, ids_TK, act, expert_start=0):
    """Each kept token-slot in float64, one at a time: bias, activation, down bias, weight.
    Also how often the clamps engaged (gate > limit, |up| > limit)."""
    E, F = w13_EFH.shape[0], w13_EFH.shape[1] // 2
    out = torch.zeros(x_TH.shape, dtype=torch.float64)
    clamped = [0, 0]
    for t in range(x_TH.shape[0]):
        for j in range(ids_TK.shape[1]):
            e = int(ids_TK[t, j]) - expert_start
            if not 0 <= e < E:
                continue
            gu = w13_EFH[e].double().cpu() @ x_TH[t].double().cpu()
            if act.w13_bias is not None:
                gu = gu + act.w13_bias[e].double().cpu()
            gate, up = gu[:F], gu[F:]
            if act.kind == "silu":
                h = gate * torch.sigmoid(gate) * up
            else:
                clamped[0] += int((gate > act.limit).sum())
                clamped[1] += int((up.abs() > act.limit).sum())
                gate, up = gate.clamp(max=act.limit), up.clamp(-act.limit, act.limit)
                h = gate * torch.sigmoid(act.alpha * gate) * (up + 1)
            y = w2_EHF[e].double().cpu() @ h
            if act.w2_bias is not None:
                y = y + act.w2_bias[e].double().cpu()
            out[t] += float(weights_TK[t, j]) * y
    return out, clamped


def assert_near(got, want, tol, what, seed):
    got, want = got.double().cpu(), want.double().cpu()
    scale = max(want.abs().max().item(), 1e-3) if want.numel() else 1.0
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert not torch.isnan(got).any(), f"{what}: NaN in output (unwritten rows?), seed={seed}"
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} * {scale:.3g}, seed={seed}"


def run_and_check(seed, case, dtype, expert_start=0, config=None):
    x_TH, w13, w2, weights_TK, ids_TK, act = case
    E = w13.shape[0]
    kw = dict(expert_start=expert_start, num_local_experts=E, act=act, config=config)
    out = K.fused_moe(x_TH, w13, w2, weights_TK, ids_TK, impl="triton", **kw)
    assert out.dtype == dtype and out.shape == x_TH.shape, f"seed={seed}"
    ref = K.reference_fused_moe(x_TH, w13, w2, weights_TK, ids_TK, expert_start=expert_start, act=act)
    want64, clamped = moe_float64(x_TH, w13, w2, weights_TK, ids_TK, act, expert_start)
    assert_near(out, ref, TOL_REF[dtype], "triton vs reference", seed)
    assert_near(out, want64, TOL_F64[dtype], "triton vs float64", seed)
    assert_near(ref, want64, TOL_F64[dtype], "reference vs float64", seed)
    if act.kind == "swiglu_oai" and x_TH.shape[0] > 4:
        assert min(clamped) > 0, f"the clamps never engaged: {clamped}, seed={seed}"
    return out


DTYPES = [torch.float32, torch.bfloat16]
ACTS = [("silu", ("w13", "w2")), ("swiglu_oai", ()), ("swiglu_oai", ("w13", "w2")),
        ("swiglu_oai", ("w2",)), ("silu", ("w13",))]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,biases", ACTS, ids=lambda v: v if isinstance(v, str) else "+".join(v) or "nobias")
@pytest.mark.parametrize("T,E,k,H,F,unused", [
    (0, 4, 2, 40, 24, ()),         # no tokens
    (1, 8, 2, 40, 24, ()),         # decode: one token
    (37, 8, 2, 40, 24, (3, 5)),    # experts with no tokens: their biases must not appear
    (9, 4, 4, 72, 48, ()),         # k = E; several K and N tiles
])
def test_fused_moe_expert_act(seed, dtype, kind, biases, T, E, k, H, F, unused):
    run_and_check(seed, make_case(T, E, k, H, F, dtype, kind, biases, unused), dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("start,num_local", [(2, 3), (6, 2)])
def test_fused_moe_expert_act_parallel_slice(seed, dtype, start, num_local):
    """An EP rank's experts with their bias rows; the slices of all ranks add up."""
    x_TH, w13, w2, weights_TK, ids_TK, act = make_case(23, 8, 2, 40, 24, dtype, "swiglu_oai", ("w13", "w2"))

    def part(s, n):
        return K.ExpertAct(kind=act.kind, alpha=act.alpha, limit=act.limit,
                           w13_bias=act.w13_bias[s:s + n], w2_bias=act.w2_bias[s:s + n])

    sl = slice(start, start + num_local)
    out = run_and_check(seed, (x_TH, w13[sl], w2[sl], weights_TK, ids_TK, part(start, num_local)), dtype,
                        expert_start=start)
    local_TK = ids_TK.long() - start
    none_local_T = ~((local_TK >= 0) & (local_TK < num_local)).any(1)
    assert none_local_T.any(), f"no token without a local expert, seed={seed}"
    assert bool((out[none_local_T] == 0).all()), f"tokens with no local expert != 0 (bias leaked), seed={seed}"
    full = K.fused_moe(x_TH, w13, w2, weights_TK, ids_TK, impl="triton", act=act).float()
    parts = sum(K.fused_moe(x_TH, w13[s:s + 2], w2[s:s + 2], weights_TK, ids_TK, expert_start=s,
                            num_local_experts=2, impl="triton", act=part(s, 2)).float()
                for s in range(0, 8, 2))
    assert_near(parts, full, 2 * TOL_REF[dtype], "sum of EP slices vs full", seed)


@needs_triton
@pytest.mark.parametrize("split", [2, 3])
def test_fused_moe_expert_act_split_k(seed, split):
    """GEMM2's F reduction split over programs: the down bias is added once (by the first
    split), before the routing weight, whatever the split count (3 leaves one split empty)."""
    gemm2 = K.MoeTileConfig(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_stages=1, SPLIT_K=split)
    cfg = K.MoeTileConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_stages=1, gemm2=gemm2)
    run_and_check(seed, make_case(9, 6, 2, 40, 40, torch.float32, "swiglu_oai", ("w13", "w2")),
                  torch.float32, config=cfg)


@needs_triton
def test_fused_moe_expert_act_strided_bias(seed):
    """Bias rows with a column stride (a view of a wider tensor) are read right."""
    x_TH, w13, w2, weights_TK, ids_TK, act = make_case(13, 4, 2, 40, 24, torch.float32, "swiglu_oai", ())
    wide13 = torch.randn(4, 48, 2, device=DEVICE)[:, :, 0]
    wide2 = torch.randn(4, 40, 3, device=DEVICE)[:, :, 1]
    act = K.ExpertAct(kind="swiglu_oai", alpha=ALPHA, limit=LIMIT, w13_bias=wide13, w2_bias=wide2)
    run_and_check(seed, (x_TH, w13, w2, weights_TK, ids_TK, act), torch.float32)


def test_expert_act_reference_matches_float64(seed):
    """Needs no triton: the torch paths (reference and the CPU fast path) are right."""
    for kind, biases in ACTS:
        x_TH, w13, w2, weights_TK, ids_TK, act = make_case(19, 6, 2, 40, 24, torch.float32, kind, biases)
        want64, _ = moe_float64(x_TH, w13, w2, weights_TK, ids_TK, act)
        for name, got in (("reference", K.reference_fused_moe(x_TH, w13, w2, weights_TK, ids_TK, act=act)),
                          ("torch", K.fused_moe(x_TH, w13, w2, weights_TK, ids_TK, impl="torch", act=act))):
            assert_near(got, want64, TOL_F64[torch.float32], f"{name} {kind} {biases}", seed)


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=needs_triton), "torch"])
def test_expert_act_bad_input(impl):
    x_TH, w13, w2, weights_TK, ids_TK, _ = make_case(3, 4, 2, 8, 4, torch.float32, "silu", ())
    bad = [
        (K.ExpertAct(kind="gelu"), "activation 'gelu' is not one of"),
        (K.ExpertAct(w13_bias=torch.zeros(4, 4, device=DEVICE)), r"w13_bias must be \[4, 8\]"),
        (K.ExpertAct(w2_bias=torch.zeros(4, 8, dtype=torch.bfloat16, device=DEVICE)), "w2_bias must be"),
    ]
    for act, message in bad:
        with pytest.raises(ValueError, match=message):
            K.fused_moe(x_TH, w13, w2, weights_TK, ids_TK, impl=impl, act=act)


@needs_triton
def test_expert_act_runs_the_triton_kernels(seed, monkeypatch):
    """Biases and swiglu_oai take the Triton path (impl="auto" on a GPU), not the torch one."""
    fm = importlib.import_module("moerun.kernels.fused_moe")

    def torch_path(*args, **kwargs):
        raise AssertionError("the torch path ran")

    monkeypatch.setattr(fm, "torch_fused_moe", torch_path)
    x_TH, w13, w2, weights_TK, ids_TK, act = make_case(5, 4, 2, 40, 24, torch.float32, "swiglu_oai", ("w13", "w2"))
    out = K.fused_moe(x_TH, w13, w2, weights_TK, ids_TK, act=act, impl="auto" if DEVICE == "cuda" else "triton")
    assert_near(out, moe_float64(x_TH, w13, w2, weights_TK, ids_TK, act)[0], TOL_F64[torch.float32], "triton", seed)
