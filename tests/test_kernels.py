"""Kernels: router top-k, align, dispatch / combine, impl selection, configs, bad input.

Each Triton kernel is checked against its PyTorch reference AND a float64 (or exact)
computation, on tiny shapes, under the Triton interpreter when there is no GPU:

    python -m pytest tests/test_kernels.py -q

fused_moe has its own file, tests/test_kernels_fused_moe.py.
Shape legend: T = tokens, E = experts, K = top-k, H = hidden.
"""
import random

import pytest
import torch

from kernel_env import DEVICE, needs_triton

import moerun.kernels as K
from moerun.kernels import _common, align, moe_config
# Each test runs the Triton kernel and, for the checks that need no triton, the reference.
IMPLS = [pytest.param("triton", marks=needs_triton), "torch"]


def routing(T, E, k, unused=()):
    """Distinct expert ids per token (like a router), never choosing the `unused` experts."""
    scores_TE = torch.rand(T, E, device=DEVICE)
    scores_TE[:, list(unused)] = -1.0
    ids_TK = torch.topk(scores_TE, k, dim=1).indices.to(torch.int32)
    return torch.rand(T, k, device=DEVICE) + 0.1, ids_TK


# ---------------------------------------------------------------- router
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T,E,k", [(0, 8, 2), (1, 8, 2), (37, 8, 3), (5, 6, 6), (9, 64, 8),
                                   (3, 1, 1)])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_topk_softmax(seed, impl, T, E, k, renormalize, dtype):
    if dtype == torch.float32:
        logits_TE = 3 * torch.randn(T, E, device=DEVICE)
    else:  # bf16 / fp16 round randn into ties; use distinct values k/8 (exact in both)
        perm_TE = torch.stack([torch.randperm(E, device=DEVICE) for _ in range(T)]) if T else \
            torch.empty(0, E, device=DEVICE)
        logits_TE = ((perm_TE - E / 2) / 8).to(dtype)
    w_TK, ids_TK = K.topk_softmax(logits_TE, k, renormalize, impl=impl)
    w_ref, ids_ref = K.reference_topk_softmax(logits_TE, k, renormalize)
    assert w_TK.dtype == torch.float32 and ids_TK.dtype == torch.int32
    assert torch.equal(ids_TK, ids_ref), f"seed={seed}"
    torch.testing.assert_close(w_TK, w_ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"seed={seed} {m}")
    p64_TE = torch.softmax(logits_TE.double(), dim=1)
    w64, ids64 = torch.topk(p64_TE, k, dim=1)
    if renormalize:
        w64 = w64 / w64.sum(1, keepdim=True)
    assert torch.equal(ids_TK.long(), ids64), f"seed={seed}"
    torch.testing.assert_close(w_TK.double(), w64, rtol=1e-5, atol=1e-6,
                               msg=lambda m: f"seed={seed} {m}")
    assert bool((w_TK[:, :-1] >= w_TK[:, 1:]).all()), f"not descending, seed={seed}"


@needs_triton
def test_topk_softmax_ties_pick_lower_id(seed):
    logits_TE = torch.zeros(3, 6, device=DEVICE)
    logits_TE[1, 4] = logits_TE[1, 2] = 1.0
    w_TK, ids_TK = K.topk_softmax(logits_TE, 3, False, impl="triton")
    assert ids_TK.tolist() == [[0, 1, 2], [2, 4, 0], [0, 1, 2]]
    torch.testing.assert_close(w_TK[0], torch.full((3,), 1 / 6, device=DEVICE))


# ---------------------------------------------------------------- align
def check_align_invariants(ids_TK, block_m, start, num_local, out, seed):
    """What the grouped GEMM relies on, independent of the reference."""
    sorted_slots, block_expert, num_padded = (t.cpu() for t in out)
    S = ids_TK.numel()
    local_S = ids_TK.reshape(-1).long().cpu() - start
    n = int(num_padded)
    assert sorted_slots.numel() % block_m == 0 and n % block_m == 0, f"seed={seed}"
    assert bool((sorted_slots[n:] == S).all()), f"tail not sentinel, seed={seed}"
    kept = sorted_slots[sorted_slots < S].long()
    expect = torch.nonzero((local_S >= 0) & (local_S < num_local)).flatten()
    assert torch.equal(kept.sort().values, expect), f"slots lost/duplicated, seed={seed}"
    for b, e in enumerate(block_expert.tolist()):
        rows = sorted_slots[b * block_m:(b + 1) * block_m]
        if b * block_m >= n:
            assert e == -1, f"seed={seed}"
            continue
        real = rows[rows < S].long()
        assert bool((local_S[real] == e).all()), f"block {b} mixes experts, seed={seed}"
        assert bool((real[1:] > real[:-1]).all()), f"not in slot order, seed={seed}"
    counts = torch.bincount(local_S[(local_S >= 0) & (local_S < num_local)], minlength=num_local)
    assert n == int(((counts + block_m - 1) // block_m * block_m).sum()), f"seed={seed}"


@pytest.mark.parametrize("impl,launches", [  # "three": the kernels larger slot counts take
    pytest.param("triton", "one", marks=needs_triton),
    pytest.param("triton", "three", marks=needs_triton), ("torch", "-")])
@pytest.mark.parametrize("T,E,k,unused", [(0, 4, 2, ()), (1, 8, 2, ()), (33, 8, 2, (3,)),
                                          (7, 5, 5, ()), (150, 6, 2, (0, 5))])
@pytest.mark.parametrize("block_m", [1, 4, 16])
@pytest.mark.parametrize("local", [None, (2, 3)])
def test_moe_align(seed, monkeypatch, impl, launches, T, E, k, unused, block_m, local):
    if launches == "three":
        monkeypatch.setattr(align, "ONE_LAUNCH_MAX_SLOTS", 0)
    _, ids_TK = routing(T, E, k, unused)
    start, num_local = local if local else (0, E)
    if local and E < 5:
        start, num_local = 1, E - 1
    out = K.moe_align(ids_TK, E, block_m, expert_start=start, num_local_experts=num_local,
                      impl=impl)
    ref = K.reference_moe_align(ids_TK, E, block_m, expert_start=start,
                                num_local_experts=num_local)
    for a, b in zip(out, ref):
        assert a.dtype == torch.int32 and torch.equal(a, b), f"seed={seed}"
    check_align_invariants(ids_TK, block_m, start, num_local, out, seed)


@pytest.mark.skipif(DEVICE != "cuda", reason="stress test of the compiled kernels: needs a GPU "
                    "(the interpreter runs one thread per program and cannot show races)")
@pytest.mark.parametrize("launches", ["one", "three"])
def test_moe_align_stress_gpu(seed, monkeypatch, launches):
    """Thousands of random routings, small and large, against the reference bit for bit:
    a missing barrier shows up as a slot in the wrong expert's block."""
    if launches == "three":
        monkeypatch.setattr(align, "ONE_LAUNCH_MAX_SLOTS", 0)
    gen = random.Random(seed)
    for trial in range(3000):
        T = gen.choice([1, 2, 3, 8, 17, 64, 100, 256, 511, 700, 2048])
        E = gen.choice([1, 4, 8, 16, 60, 64, 128, 256])
        k = gen.randint(1, min(E, 8))
        block_m = gen.choice([1, 16, 32, 64, 128])
        start = gen.randrange(E)
        num_local = gen.randint(1, E - start)
        _, ids_TK = routing(T, E, k)
        if gen.random() < 0.3:  # skewed: most slots on a few experts (long per-expert runs)
            ids_TK = torch.randint(0, max(1, E // 8), (T, k), device=DEVICE, dtype=torch.int32)
        out = K.moe_align(ids_TK, E, block_m, expert_start=start, num_local_experts=num_local,
                          impl="triton")
        ref = K.reference_moe_align(ids_TK, E, block_m, expert_start=start,
                                    num_local_experts=num_local)
        for a, b in zip(out, ref):
            assert torch.equal(a, b), (f"seed={seed} trial={trial} T={T} E={E} k={k} "
                                       f"block_m={block_m} local=[{start}, {start + num_local})")


# ---------------------------------------------------------------- dispatch / combine
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T,E,k,R,unused", [(0, 4, 2, 2, ()), (1, 8, 2, 4, ()),
                                            (21, 8, 3, 4, (2, 3)), (6, 4, 4, 1, ())])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "shuffled"])
def test_dispatch_combine(seed, impl, T, E, k, R, unused, dtype, layout):
    H = 40
    x_TH = torch.randn(T, H, device=DEVICE).to(dtype)
    weights_TK, ids_TK = routing(T, E, k, unused)
    ranks_E = K.contiguous_expert_ranks(E, R, device=DEVICE)
    if layout == "shuffled":
        ranks_E = ranks_E[torch.randperm(E, device=DEVICE)]
    send, splits, meta = K.dispatch(x_TH, ids_TK, weights_TK, ranks_E, num_ranks=R, impl=impl)
    send_ref, splits_ref, meta_ref = K.reference_dispatch(x_TH, ids_TK, weights_TK, ranks_E,
                                                          num_ranks=R)
    assert splits == splits_ref and len(splits) == R and sum(splits) == T * k, f"seed={seed}"
    assert torch.equal(send, send_ref), f"seed={seed}"
    assert torch.equal(meta.row_of_slot_TK, meta_ref.row_of_slot_TK), f"seed={seed}"
    assert torch.equal(meta.expert_of_row, meta_ref.expert_of_row), f"seed={seed}"
    # exact properties: each row is its slot's token, rows go rank by rank, experts ascend
    row_TK = meta.row_of_slot_TK.long()
    assert torch.equal(send[row_TK.reshape(-1)],
                       x_TH.repeat_interleave(k, 0)), f"seed={seed}"
    assert torch.equal(meta.expert_of_row[row_TK.reshape(-1)], ids_TK.reshape(-1)), f"seed={seed}"
    rank_of_row = ranks_E[meta.expert_of_row.long()].long()
    assert torch.equal(rank_of_row, torch.repeat_interleave(
        torch.arange(R, device=DEVICE), torch.tensor(splits, device=DEVICE))), f"seed={seed}"
    # combine: pretend each expert returned a different row (scale by its id + 1)
    back = (send.float() * (meta.expert_of_row[:, None] + 1)).to(dtype)
    out = K.combine(back, meta, impl=impl)
    assert out.dtype == dtype and out.shape == (T, H)
    torch.testing.assert_close(out, K.reference_combine(back, meta), rtol=1e-6, atol=1e-6,
                               msg=lambda m: f"seed={seed} {m}")
    y_TKH = back.double()[row_TK]
    exp64 = (y_TKH * weights_TK.double()[..., None]).sum(1)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), exp64, rtol=tol, atol=tol,
                               msg=lambda m: f"seed={seed} {m}")


# ---------------------------------------------------------------- impl choice, configs
def test_impl_selection():
    cpu = torch.device("cpu")
    try:
        K.set_default_impl("torch")
        assert _common.resolve_impl(None, cpu) == "torch"
        K.set_default_impl("auto")
        assert _common.resolve_impl(None, cpu) == "torch"
        assert _common.resolve_impl("auto", torch.device("cuda")) == (
            "triton" if K.HAS_TRITON else "torch")
        if K.INTERPRETED:
            K.set_default_impl("triton")
            assert _common.resolve_impl(None, cpu) == "triton"
        with pytest.raises(ValueError, match="unknown kernel impl"):
            K.set_default_impl("cuda")
        with pytest.raises(ValueError, match="unknown kernel impl"):
            K.topk_softmax(torch.randn(2, 4), 2, True, impl="fast")
    finally:
        K.set_default_impl("auto")


def test_tile_configs(tmp_path):
    path = tmp_path / "E=4,F=8,H=16,dtype=bfloat16,device=X.json"
    small = K.MoeTileConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64)
    big = K.MoeTileConfig(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8)
    moe_config.save_configs(path, {1: small, 256: big})
    table = moe_config._load(path)
    assert moe_config.nearest_config(table, 2) == small
    assert moe_config.nearest_config(table, 4096) == big
    path.write_text('{"1": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_Q": 1}}')
    moe_config._load.cache_clear()
    with pytest.raises(ValueError, match="unknown fused_moe config keys"):
        moe_config._load(path)
    with pytest.raises(ValueError, match="power of two"):
        K.MoeTileConfig(BLOCK_M=24, BLOCK_N=32, BLOCK_K=32)
    cfg = moe_config.get_config(8, 2, 4, 8, 16, torch.bfloat16, torch.device("cpu"), True)
    assert cfg.BLOCK_M == 16
    # GEMM2's own tiles: saved nested, loaded back equal, BLOCK_M shared with GEMM1
    two = K.MoeTileConfig(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, gemm2=K.MoeTileConfig(
        BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_stages=5, SPLIT_K=4))
    moe_config.save_configs(path, {1: two, 256: big})
    table = moe_config._load(path)
    assert table[1] == two and table[1].for_gemm2().SPLIT_K == 4 and table[256].for_gemm2() == big
    with pytest.raises(ValueError, match="BLOCK_M=16"):
        K.MoeTileConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, gemm2=big)
    with pytest.raises(ValueError, match="SPLIT_K belongs"):
        K.MoeTileConfig(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, SPLIT_K=2, gemm2=big)
    # untuned decode tiles on a GPU: GEMM2 narrow, deeper, split until ~2 programs per SM
    dec = moe_config.default_config(1, 2, 64, torch.bfloat16, False, F=9472, H=1024, num_sms=132)
    g2 = dec.for_gemm2()
    assert g2.BLOCK_N == 32 and g2.num_stages > dec.num_stages and g2.SPLIT_K > 1
    programs = min(1 * 2, 64) * (1024 // g2.BLOCK_N) * g2.SPLIT_K
    assert 2 * 132 <= programs < 4 * 132
    assert moe_config.default_config(1, 2, 64, torch.bfloat16, False, F=64, H=1024,
                                     num_sms=132).for_gemm2().SPLIT_K == 1  # F too short


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("impl", IMPLS)
def test_bad_input_raises(impl):
    logits = torch.randn(3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="top-k"):
        K.topk_softmax(logits, 5, True, impl=impl)
    with pytest.raises(ValueError, match="top-k"):
        K.topk_softmax(logits, 0, True, impl=impl)
    with pytest.raises(ValueError, match="2-D"):
        K.topk_softmax(logits[0], 1, True, impl=impl)
    with pytest.raises(ValueError, match="float32"):
        K.topk_softmax(logits.long(), 1, True, impl=impl)
    ids = torch.zeros(3, 2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="block_m"):
        K.moe_align(ids, 4, 0, impl=impl)
    with pytest.raises(ValueError, match="local experts"):
        K.moe_align(ids, 4, 16, expert_start=2, num_local_experts=3, impl=impl)
    with pytest.raises(ValueError, match="int32 or int64"):
        K.moe_align(ids.float(), 4, 16, impl=impl)
    x = torch.randn(3, 8, device=DEVICE)
    w = torch.rand(3, 2, device=DEVICE)
    ranks = K.contiguous_expert_ranks(4, 2, device=DEVICE)
    with pytest.raises(ValueError, match="outside"):
        K.dispatch(x, ids + 4, w, ranks, impl=impl)
    with pytest.raises(ValueError, match="must both be"):
        K.dispatch(x, ids[:2], w, ranks, impl=impl)
    with pytest.raises(ValueError, match="ranks_of_experts must lie"):
        K.dispatch(x, ids, w, ranks, num_ranks=1, impl=impl)
    _, _, meta = K.dispatch(x, ids, w, ranks, impl=impl)
    with pytest.raises(ValueError, match="recv_back must be"):
        K.combine(torch.randn(5, 8, device=DEVICE), meta, impl=impl)
    with pytest.raises(ValueError, match="divisible"):
        K.contiguous_expert_ranks(6, 4)
