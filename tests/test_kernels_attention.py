"""Paged attention: the Triton kernel against its PyTorch reference and a float64
computation that looks each key up position by position, under the Triton interpreter when
there is no GPU:

    python -m pytest tests/test_kernels_attention.py -q

Shape legend: T = new tokens, B = sequences, P = blocks per table, N = heads, D = head dim.
"""
import math

import pytest
import torch

from kernel_env import DEVICE, needs_triton

import moerun.kernels as K

IMPLS = [pytest.param("triton", marks=needs_triton), "torch"]


def make_case(starts, lens, Nq, Nkv, D, block_size, dtype, spare_blocks=3):
    """A cache with random contents (every slot, so unread garbage is real), each sequence's
    blocks drawn at random from the pool, and its new tokens at [start, start + len)."""
    B = len(lens)
    need = [-(-(s + n) // block_size) for s, n in zip(starts, lens)]
    P = max(need + [1])
    num_blocks = sum(need) + spare_blocks
    perm = torch.randperm(num_blocks).tolist()
    table_BP = torch.zeros(B, P, dtype=torch.int32)
    used = 0
    for b, n in enumerate(need):
        table_BP[b, :n] = torch.tensor(perm[used:used + n], dtype=torch.int32)
        used += n
    k_cache = torch.randn(num_blocks, block_size, Nkv, D).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, Nkv, D).to(dtype)
    T = sum(lens)
    q_TND = torch.randn(T, Nq, D).to(dtype)
    cu_q_B1 = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()) if B else [0],
                           dtype=torch.int32)
    pos_T = torch.tensor([p for s, n in zip(starts, lens) for p in range(s, s + n)], dtype=torch.long)
    return [t.to(DEVICE) for t in (q_TND, k_cache, v_cache, table_BP, cu_q_B1, pos_T)]


def float64_attention(q_TND, k_cache, v_cache, table_BP, cu_q_B1, pos_T, scale, window, sinks_N):
    """Token by token, key by key through the block table, in float64."""
    T, Nq, D = q_TND.shape
    bs, Nkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(T, Nq, D, dtype=torch.float64)
    cu = cu_q_B1.tolist()
    for b in range(len(cu) - 1):
        for t in range(cu[b], cu[b + 1]):
            p = int(pos_T[t])
            keys = [j for j in range(p + 1) if not window or p - j < window]
            rows = [(int(table_BP[b, j // bs]), j % bs) for j in keys]
            for h in range(Nq):
                kvh = h // (Nq // Nkv)
                k = torch.stack([k_cache[blk, r, kvh] for blk, r in rows]).double().cpu()
                v = torch.stack([v_cache[blk, r, kvh] for blk, r in rows]).double().cpu()
                s = k @ q_TND[t, h].double().cpu() * scale
                if sinks_N is not None:
                    s = torch.cat([s, sinks_N[h].double().cpu().reshape(1)])
                w = torch.softmax(s, 0)[: len(keys)]
                out[t, h] = w @ v
    return out


CASES = {  # name: (starts, lens)
    "decode": ([5, 0, 40, 17], [1, 1, 1, 1]),
    "prefill": ([0, 0], [21, 6]),
    "chunked": ([0, 9, 30, 3], [9, 4, 1, 18]),
    "empty_and_single": ([4, 0, 0, 11], [0, 1, 0, 2]),
}
HEADS = {"gqa": (4, 2), "mqa": (4, 1), "mha": (2, 2), "g3": (6, 2)}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("heads,block_size,window,D", [
    ("gqa", 16, 0, 16), ("mqa", 32, 0, 16), ("mha", 16, 5, 24), ("g3", 32, 0, 16),
    ("gqa", 32, 7, 16)])
def test_paged_attention(seed, impl, case, heads, block_size, window, D):
    starts, lens = CASES[case]
    Nq, Nkv = HEADS[heads]
    args = make_case(starts, lens, Nq, Nkv, D, block_size, torch.float32)
    scale = D ** -0.5
    out = K.paged_attention(*args, scale=scale, window=window, max_q=max(lens), impl=impl)
    ref = K.reference_paged_attention(*args, scale=scale, window=window)
    assert out.shape == args[0].shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5, msg=lambda m: f"seed={seed} {m}")
    exact = float64_attention(*args, scale, window, None)
    torch.testing.assert_close(out.double().cpu(), exact, rtol=2e-5, atol=2e-5,
                               msg=lambda m: f"seed={seed} {m}")


@needs_triton
@pytest.mark.parametrize("case", ["decode", "chunked", "empty_and_single"])
@pytest.mark.parametrize("num_splits,window", [(2, 0), (3, 9), (7, 0)])
def test_paged_attention_split_kv(seed, case, num_splits, window):
    """Split-KV: the key range cut in pieces merged by a second kernel; more pieces than
    key steps leaves some empty (they must add nothing)."""
    starts, lens = CASES[case]
    args = make_case(starts, lens, 4, 2, 16, 16, torch.float32)
    out = K.paged_attention(*args, scale=0.25, window=window, max_q=max(lens),
                            num_splits=num_splits, impl="triton")
    whole = K.paged_attention(*args, scale=0.25, window=window, max_q=max(lens), num_splits=1,
                              impl="triton")
    torch.testing.assert_close(out, whole, rtol=2e-5, atol=2e-5, msg=lambda m: f"seed={seed} {m}")
    exact = float64_attention(*args, 0.25, window, None)
    torch.testing.assert_close(out.double().cpu(), exact, rtol=2e-5, atol=2e-5,
                               msg=lambda m: f"seed={seed} {m}")


def test_choose_num_splits():
    # few programs, long sequences: split up to about two programs per SM
    assert K.attention.choose_num_splits(4, 132, 32768) == 16
    assert K.attention.choose_num_splits(64, 132, 32768) == 8
    # a full grid, or sequences too short to share: no split
    assert K.attention.choose_num_splits(512, 132, 32768) == 1
    assert K.attention.choose_num_splits(4, 132, 300) == 1
    assert K.attention.choose_num_splits(4, 132, 1024) == 4  # pieces of 256 keys


@pytest.mark.parametrize("impl,num_splits", [pytest.param("triton", 1, marks=needs_triton),
                                             pytest.param("triton", 2, marks=needs_triton),
                                             ("torch", None)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_paged_attention_low_precision_and_sinks(seed, impl, num_splits, dtype):
    starts, lens = CASES["chunked"]
    args = make_case(starts, lens, 4, 2, 32, 16, dtype)
    sinks_N = torch.randn(4, device=DEVICE)
    scale = 32 ** -0.5
    out = K.paged_attention(*args, scale=scale, window=6, sinks_N=sinks_N, max_q=max(lens) + 3,
                            num_splits=num_splits, impl=impl)
    assert out.dtype == dtype
    exact = float64_attention(*args, scale, 6, sinks_N)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=3e-3, atol=3e-3)
    torch.testing.assert_close(out.double().cpu(), exact, **tol, msg=lambda m: f"seed={seed} {m}")
    ref = K.reference_paged_attention(*args, scale=scale, window=6, sinks_N=sinks_N)
    torch.testing.assert_close(out, ref, **tol, msg=lambda m: f"seed={seed} {m}")
    # a sink takes probability mass from every key: the output shrinks toward zero
    plain = float64_attention(*args, scale, 6, None)
    assert exact.norm() < plain.norm()


@pytest.mark.parametrize("impl", IMPLS)
def test_paged_attention_no_tokens(impl):
    args = make_case([3, 0], [0, 0], 4, 2, 16, 16, torch.float32)
    out = K.paged_attention(*args, scale=0.25, max_q=1, impl=impl)
    assert out.shape == (0, 4, 16)


@pytest.mark.parametrize("impl", IMPLS)
def test_paged_attention_bad_input(impl):
    q, k, v, table, cu, pos = make_case([0], [3], 4, 2, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple of N_kv"):
        K.paged_attention(q[:, :3], k, v, table, cu, pos, scale=0.25, impl=impl)
    with pytest.raises(ValueError, match="share one dtype"):
        K.paged_attention(q.half(), k, v, table, cu, pos, scale=0.25, impl=impl)
    with pytest.raises(ValueError, match=r"cu_q_B1 must be \[B \+ 1\]"):
        K.paged_attention(q, k, v, table, cu[:1], pos, scale=0.25, impl=impl)
    with pytest.raises(ValueError, match="pos_T must be"):
        K.paged_attention(q, k, v, table, cu, pos[:2], scale=0.25, impl=impl)
    with pytest.raises(ValueError, match="scale"):
        K.paged_attention(q, k, v, table, cu, pos, scale=math.nan, impl=impl)
    with pytest.raises(ValueError, match="window"):
        K.paged_attention(q, k, v, table, cu, pos, scale=0.25, window=-1, impl=impl)
    with pytest.raises(ValueError, match="sinks_N"):
        K.paged_attention(q, k, v, table, cu, pos, scale=0.25, sinks_N=torch.zeros(3), impl=impl)
    with pytest.raises(ValueError, match="head dim"):
        K.paged_attention(q[..., :8], k, v, table, cu, pos, scale=0.25, impl=impl)


@pytest.mark.skipif(DEVICE != "cuda", reason="compiled tiles at model sizes: needs a GPU")
@pytest.mark.parametrize("Nq,Nkv,D", [(16, 4, 64), (32, 8, 128), (8, 1, 64)])
@pytest.mark.parametrize("case", [([1000, 17, 3000], [1, 1, 1]), ([0, 700], [300, 64])])
@pytest.mark.parametrize("num_splits", [None, 1, 8])
def test_paged_attention_gpu_model_sizes(seed, Nq, Nkv, D, case, num_splits):
    """The tiles a GPU launches (BLOCK_M up to 128, BLOCK_N 64, split-KV) at model head
    sizes, bf16, against the float32 reference."""
    starts, lens = case
    args = make_case(starts, lens, Nq, Nkv, D, 16, torch.bfloat16)
    max_kv = max(s + n for s, n in zip(starts, lens))
    out = K.paged_attention(*args, scale=D ** -0.5, window=0, max_q=max(lens), max_kv=max_kv,
                            num_splits=num_splits, impl="triton")
    ref = K.reference_paged_attention(*[a.float() if a.is_floating_point() else a for a in args],
                                      scale=D ** -0.5)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2,
                               msg=lambda m: f"seed={seed} {m}")


cpu_ext = K.cpu_ext
needs_c_kernel = pytest.mark.skipif(not cpu_ext.available(), reason=f"no C kernel: {cpu_ext.unavailable_reason()}")


@needs_c_kernel
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("heads,block_size,window,D,sinks", [
    ("gqa", 16, 0, 16, False), ("mqa", 32, 0, 16, True), ("mha", 16, 5, 24, False), ("g3", 32, 0, 16, False),
    ("gqa", 32, 7, 16, True), ("gqa", 16, 0, 37, False)])
def test_cpu_c_attention_equals_reference_and_float64(seed, case, heads, block_size, window, D, sinks):
    """The CPU C kernel (kernels/csrc/moe_cpu.c) on the same cases: it first writes the step's
    new K/V into their slots, then attends; the references read the cache written by hand."""
    starts, lens = CASES[case]
    Nq, Nkv = HEADS[heads]
    q, k_cache, v_cache, table, cu_q, pos = (t.cpu() for t in make_case(starts, lens, Nq, Nkv, D, block_size,
                                                                         torch.float32))
    T = q.shape[0]
    slot = torch.tensor([int(table[b, p // block_size]) * block_size + p % block_size
                         for b, (s, n) in enumerate(zip(starts, lens)) for p in range(s, s + n)], dtype=torch.long)
    k_new, v_new = torch.randn(T, Nkv, D), torch.randn(T, Nkv, D)
    sinks_N = torch.randn(Nq) if sinks else None
    scale = D ** -0.5
    kc, vc = k_cache.clone(), v_cache.clone()
    max_len = max((s + n for s, n in zip(starts, lens)), default=0)
    out = cpu_ext.paged_attention(q, kc, vc, table, cu_q, pos, max_len, scale=scale, window=window,
                                  sinks_N=sinks_N, write=(slot, k_new, v_new))
    k_cache.view(-1, Nkv, D)[slot] = k_new
    v_cache.view(-1, Nkv, D)[slot] = v_new
    assert torch.equal(kc, k_cache) and torch.equal(vc, v_cache)  # the write, and nothing else
    args = (q, k_cache, v_cache, table, cu_q, pos)
    ref = K.reference_paged_attention(*args, scale=scale, window=window, sinks_N=sinks_N)
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5, msg=lambda m: f"seed={seed} {m}")
    exact = float64_attention(*args, scale, window, sinks_N)
    torch.testing.assert_close(out.double(), exact, rtol=2e-5, atol=2e-5, msg=lambda m: f"seed={seed} {m}")


@needs_c_kernel
def test_cpu_c_attention_support_rules():
    q = torch.randn(3, 4, 16)
    cache = torch.randn(5, 16, 2, 16)
    assert cpu_ext.attention_supports(q, cache, cache.clone())
    assert not cpu_ext.attention_supports(q.double(), cache.double(), cache.double())
    assert not cpu_ext.attention_supports(q, cache.transpose(0, 1), cache.transpose(0, 1))
    assert not cpu_ext.attention_supports(torch.randn(3, 3, 16), cache, cache.clone())  # 3 heads over 2 KV heads
