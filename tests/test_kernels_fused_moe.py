"""fused_moe: the Triton kernels against the PyTorch reference and a float64 computation.

    python -m pytest tests/test_kernels_fused_moe.py -q

Runs under the Triton interpreter when there is no GPU, on tiny shapes whose sizes are not
multiples of the tiles (interpreter tiles: BLOCK_M=16, BLOCK_N=32, BLOCK_K=32).
Shape legend: T = tokens, E = experts, K = top-k, H = hidden, F = expert FFN width.
"""

import pytest
import torch

from kernel_env import DEVICE, needs_triton

import moerun.kernels as K
# |error| <= TOL * max|expected|: vs float64, and kernel vs reference (same roundings)
TOL_F64 = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
TOL_REF = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 2e-3}


def make_case(T, E, k, H, F, dtype, unused=()):
    x_TH = torch.randn(T, H, device=DEVICE).to(dtype)
    w13_EFH = (torch.randn(E, 2 * F, H, device=DEVICE) / H**0.5).to(dtype)
    w2_EHF = (torch.randn(E, H, F, device=DEVICE) / F**0.5).to(dtype)
    scores_TE = torch.rand(T, E, device=DEVICE)
    scores_TE[:, list(unused)] = -1.0
    ids_TK = torch.topk(scores_TE, k, dim=1).indices.to(torch.int32)
    weights_TK = torch.rand(T, k, device=DEVICE) + 0.1
    return x_TH, w13_EFH, w2_EHF, weights_TK, ids_TK


def moe_float64(x_TH, w13_EFH, w2_EHF, weights_TK, ids_TK, expert_start=0):
    """Dense per-slot computation in float64 (gathers each slot's expert weights)."""
    E, F = w13_EFH.shape[0], w13_EFH.shape[1] // 2
    local_TK = ids_TK.long() - expert_start
    keep_TK = (local_TK >= 0) & (local_TK < E)
    e_TK = local_TK.clamp(0, E - 1)
    gu_TKF = torch.einsum("tkfh,th->tkf", w13_EFH.double()[e_TK], x_TH.double())
    h_TKF = torch.nn.functional.silu(gu_TKF[..., :F]) * gu_TKF[..., F:]
    y_TKH = torch.einsum("tkhf,tkf->tkh", w2_EHF.double()[e_TK], h_TKF)
    return (y_TKH * (weights_TK.double() * keep_TK)[..., None]).sum(1)


def assert_near(got, want, tol, what, seed):
    scale = max(want.abs().max().item(), 1e-3) if want.numel() else 1.0
    err = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
    assert not torch.isnan(got).any(), f"{what}: NaN in output (unwritten rows?), seed={seed}"
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} * {scale:.3g}, seed={seed}"


def run_and_check(seed, case, dtype, expert_start=0, config=None):
    x_TH, w13_EFH, w2_EHF, weights_TK, ids_TK = case
    E = w13_EFH.shape[0]
    out = K.fused_moe(x_TH, w13_EFH, w2_EHF, weights_TK, ids_TK, expert_start=expert_start,
                      num_local_experts=E, impl="triton", config=config)
    assert out.dtype == dtype and out.shape == x_TH.shape, f"seed={seed}"
    ref = K.fused_moe(x_TH, w13_EFH, w2_EHF, weights_TK, ids_TK, expert_start=expert_start,
                      num_local_experts=E, impl="torch")
    want64 = moe_float64(x_TH, w13_EFH, w2_EHF, weights_TK, ids_TK, expert_start)
    assert_near(out, ref, TOL_REF[dtype], "triton vs reference", seed)
    assert_near(out, want64, TOL_F64[dtype], "triton vs float64", seed)
    assert_near(ref, want64, TOL_F64[dtype], "reference vs float64", seed)
    return out


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,k,H,F,unused", [
    (0, 4, 2, 40, 24, ()),         # no tokens
    (1, 8, 2, 40, 24, ()),         # decode: one token
    (37, 8, 2, 40, 24, (3, 5)),    # experts with no tokens
    (9, 4, 4, 72, 48, ()),         # k = E: every expert chosen; several K and N tiles
    (70, 3, 2, 24, 40, ()),        # several M blocks per expert
])
def test_fused_moe(seed, dtype, T, E, k, H, F, unused):
    run_and_check(seed, make_case(T, E, k, H, F, dtype, unused), dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("start,num_local", [(2, 3), (6, 2)])
def test_fused_moe_expert_parallel_slice(seed, dtype, start, num_local):
    x_TH, w13_all, w2_all, weights_TK, ids_TK = make_case(23, 8, 2, 40, 24, dtype)
    w13 = w13_all[start:start + num_local]
    w2 = w2_all[start:start + num_local]
    out = run_and_check(seed, (x_TH, w13, w2, weights_TK, ids_TK), dtype, expert_start=start)
    local_TK = ids_TK.long() - start
    none_local_T = ~((local_TK >= 0) & (local_TK < num_local)).any(1)
    assert bool((out[none_local_T] == 0).all()), f"tokens with no local expert != 0, seed={seed}"
    # the EP slices of all ranks add up to the full layer
    full = K.fused_moe(x_TH, w13_all, w2_all, weights_TK, ids_TK, impl="triton").float()
    parts = sum(K.fused_moe(x_TH, w13_all[s:s + 2], w2_all[s:s + 2], weights_TK, ids_TK,
                            expert_start=s, num_local_experts=2, impl="triton").float()
                for s in range(0, 8, 2))
    assert_near(parts, full, 2 * TOL_REF[dtype], "sum of EP slices vs full", seed)


@needs_triton
def test_fused_moe_strided_weights_and_tiles(seed):
    """Non-contiguous weights / activations and a tile config with GROUP_M > 1."""
    dtype = torch.float32
    x_TH, w13, w2, weights_TK, ids_TK = make_case(45, 4, 2, 40, 24, dtype)
    w13_t = w13.transpose(1, 2).contiguous().transpose(1, 2)  # [E, 2F, H], H not stride 1
    x_wide = torch.randn(45, 80, device=DEVICE)[:, ::2]
    x_wide.copy_(x_TH)
    cfg = K.MoeTileConfig(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_stages=1)
    run_and_check(seed, (x_wide, w13_t, w2, weights_TK, ids_TK), dtype, config=cfg)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,F,split", [(1, 72, 3), (5, 40, 4), (30, 24, 2)])
def test_fused_moe_gemm2_tiles_and_split_k(seed, dtype, T, F, split):
    """GEMM2 with tiles of its own and its F reduction split (F = 40, split 4 at
    BLOCK_K = 16 leaves the last split empty: it must write zeros, not garbage)."""
    gemm2 = K.MoeTileConfig(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_stages=1, SPLIT_K=split)
    cfg = K.MoeTileConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_stages=1, gemm2=gemm2)
    run_and_check(seed, make_case(T, 6, 2, 40, F, dtype), dtype, config=cfg)
    # no gemm2 tiles: SPLIT_K of the one config applies to GEMM2
    one = K.MoeTileConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, num_stages=1, SPLIT_K=split)
    run_and_check(seed, make_case(T, 6, 2, 40, F, dtype), dtype, config=one)


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=needs_triton), "torch"])
def test_expert_parallel_round_trip(seed, impl):
    """dispatch -> all-to-all -> fused_moe on the received rows -> back -> combine, with the
    all-to-all emulated in one process: equals the whole layer on each rank's tokens."""
    R, E, k, H, F, dtype = 4, 8, 2, 40, 24, torch.float32
    _, w13, w2, _, _ = make_case(0, E, k, H, F, dtype)
    ranks_E = K.contiguous_expert_ranks(E, R, device=DEVICE)
    per_rank = E // R
    cases = [make_case(T, E, k, H, F, dtype) for T in (5, 0, 9, 1)]  # tokens of each rank
    sent = [K.dispatch(x, ids, w, ranks_E, num_ranks=R, impl=impl) for x, _, _, w, ids in cases]

    def chunk(src, dst, t):  # rows that rank src sends to rank dst
        start = sum(sent[src][1][:dst])
        return t[start:start + sent[src][1][dst]]

    back = [[None] * R for _ in range(R)]  # back[src][dst]: rows dst returns to src
    for dst in range(R):
        recv_NH = torch.cat([chunk(src, dst, sent[src][0]) for src in range(R)])
        recv_ids = torch.cat([chunk(src, dst, sent[src][2].expert_of_row) for src in range(R)])
        ones_N1 = torch.ones(recv_NH.shape[0], 1, device=DEVICE)
        y_NH = K.fused_moe(recv_NH, w13[dst * per_rank:(dst + 1) * per_rank],
                           w2[dst * per_rank:(dst + 1) * per_rank], ones_N1, recv_ids[:, None],
                           expert_start=dst * per_rank, num_local_experts=per_rank, impl=impl)
        for src, part in enumerate(torch.split(y_NH, [sent[s][1][dst] for s in range(R)])):
            back[src][dst] = part
    for src, (x, _, _, w, ids) in enumerate(cases):
        out = K.combine(torch.cat(back[src]), sent[src][2], impl=impl)
        assert_near(out, moe_float64(x, w13, w2, w, ids), TOL_F64[dtype], f"rank {src}", seed)


@pytest.mark.parametrize("dtype", DTYPES)
def test_references_match_float64(seed, dtype):
    """Needs no triton: the readable definition and the benchmark's loop are right."""
    case = make_case(19, 6, 2, 40, 24, dtype, unused=(1,))
    want64 = moe_float64(*case)
    assert_near(K.reference_fused_moe(*case), want64, TOL_F64[dtype], "reference", seed)
    assert_near(K.reference_moe_loop(*case), want64, 2 * TOL_F64[dtype], "loop", seed)
    x_TH, w13, w2, weights_TK, ids_TK = case
    local = K.reference_fused_moe(x_TH, w13[2:5], w2[2:5], weights_TK, ids_TK, expert_start=2)
    assert_near(local, moe_float64(x_TH, w13[2:5], w2[2:5], weights_TK, ids_TK, 2),
                TOL_F64[dtype], "reference EP slice", seed)
    empty = make_case(0, 6, 2, 40, 24, dtype)
    assert K.fused_moe(*empty, impl="torch").shape == (0, 40)


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=needs_triton), "torch"])
def test_fused_moe_bad_input(impl):
    x, w13, w2, w, ids = make_case(3, 4, 2, 8, 4, torch.float32)
    with pytest.raises(ValueError, match="expert weights do not fit"):
        K.fused_moe(x, w13[:, :7], w2, w, ids, impl=impl)
    with pytest.raises(ValueError, match="expert weights do not fit"):
        K.fused_moe(x, w13, w2.transpose(1, 2), w, ids, impl=impl)
    with pytest.raises(ValueError, match="one dtype"):
        K.fused_moe(x.half(), w13, w2, w, ids, impl=impl)
    with pytest.raises(ValueError, match="must both be"):
        K.fused_moe(x, w13, w2, w[:, :1], ids, impl=impl)
    with pytest.raises(ValueError, match="num_local_experts"):
        K.fused_moe(x, w13, w2, w, ids, expert_start=4, num_local_experts=2, impl=impl)
    with pytest.raises(ValueError, match="int32 or int64"):
        K.fused_moe(x, w13, w2, w, ids.float(), impl=impl)
    with pytest.raises(ValueError, match=r"\[E, 2F, H\]"):
        K.fused_moe(x, w13[0], w2, w, ids, impl=impl)


@pytest.mark.skipif(DEVICE != "cuda", reason="the GPU's default tiles: needs a GPU")
@pytest.mark.parametrize("T", [1, 3, 8, 300])
def test_fused_moe_gpu_default_tiles(seed, T):
    """The untuned GPU tiles at model-like sizes (decode: GEMM2 narrow and split-K, chosen
    from the SM count) on the K-major experts the model stores."""
    E, k, H, F, dtype = 64, 2, 1024, 2048, torch.bfloat16
    x_TH, w13, w2, weights_TK, ids_TK = make_case(T, E, k, H, F, dtype)
    w13 = w13.transpose(1, 2).contiguous().transpose(1, 2)  # [E, 2F, H] stored [E, H, 2F]
    w2 = w2.transpose(1, 2).contiguous().transpose(1, 2)  # [E, H, F] stored [E, F, H]
    if T == 1:
        from moerun.kernels import moe_config
        cfg = moe_config.get_config(T, k, E, F, H, dtype, x_TH.device, False)
        assert cfg.for_gemm2().SPLIT_K > 1 or moe_config.config_path(
            E, F, H, dtype, moe_config.device_key(x_TH.device)).is_file()
    run_and_check(seed, (x_TH, w13, w2, weights_TK, ids_TK), dtype)
