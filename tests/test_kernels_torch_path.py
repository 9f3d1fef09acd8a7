"""``impl="torch"``'s PyTorch fast paths on CPU (the gather-GEMV for few slots per expert,
``torch._grouped_mm`` otherwise) equal the readable reference and a float64 computation,
on fresh random inputs, for both expert memory layouts. The C kernel, which takes the few-
slot cases first where it is built, is switched off here (tests/test_kernels_cpu_ext.py
covers it)."""
import importlib

import pytest
import torch

fm = importlib.import_module("moerun.kernels.fused_moe")


@pytest.fixture(autouse=True)
def no_c_kernel(monkeypatch):
    monkeypatch.setattr(fm.cpu_ext, "available", lambda: False)


def experts(n, H, F, layout):
    """w13 [n, 2F, H] and w2 [n, H, F]; "k_major" memory as the model stores them."""
    if layout == "k_major":
        return (torch.randn(n, H, 2 * F) * 0.2).transpose(1, 2), (torch.randn(n, F, H) * 0.2).transpose(1, 2)
    return torch.randn(n, 2 * F, H) * 0.2, torch.randn(n, H, F) * 0.2


@pytest.mark.parametrize("layout, path", [("standard", None), ("standard", "grouped"), ("k_major", None),
                                          ("k_major", "gemv"), ("k_major", "grouped")])
@pytest.mark.parametrize("T, K, E, local", [(0, 2, 8, (0, 8)), (1, 2, 8, (0, 8)), (37, 3, 8, (0, 8)),
                                            (20, 8, 8, (0, 8)), (29, 2, 16, (4, 4))])
def test_torch_path_equals_reference_and_float64(T, K, E, local, path, layout, monkeypatch):
    start, n = local
    H, F = 24, 40
    gemv_calls = []
    real = fm._gather_gemv
    monkeypatch.setattr(fm, "_gather_gemv", lambda *a: gemv_calls.append(1) or real(*a))
    x = torch.randn(T, H)
    w13, w2 = experts(n, H, F, layout)
    weights = torch.rand(T, K)
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).to(torch.int32) if T else \
        torch.zeros(0, K, dtype=torch.int32)
    out = fm.torch_fused_moe(x, w13, w2, weights, ids, expert_start=start, path=path)
    ref = fm.reference_fused_moe(x, w13, w2, weights, ids, expert_start=start)
    want = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            e = int(ids[t, k]) - start
            if 0 <= e < n:
                gu = w13[e].double() @ x[t].double()
                want[t] += weights[t, k].double() * (w2[e].double() @ (torch.nn.functional.silu(gu[:F]) * gu[F:]))
    assert out.shape == (T, H) and not out.isnan().any()
    # the gather-GEMV runs on K-major weights with tokens, unless grouped_mm is asked for
    # (every case here has fewer slots per expert than GEMV_MAX_SLOTS_PER_EXPERT)
    assert bool(gemv_calls) == (T > 0 and layout == "k_major" and path != "grouped")
    if T:
        assert (out - ref).abs().max().item() <= 1e-5
        assert (out.double() - want).abs().max().item() <= 1e-4


def test_auto_choice_follows_slots_per_expert(monkeypatch):
    """Few slots per expert: gather-GEMV; many (a long prefill): grouped_mm."""
    calls = []
    real = fm._gather_gemv
    monkeypatch.setattr(fm, "_gather_gemv", lambda *a: calls.append(1) or real(*a))
    E, K, H, F = 4, 2, 8, 16
    w13, w2 = experts(E, H, F, "k_major")
    for T, gemv in ((1, True), (fm.GEMV_MAX_SLOTS_PER_EXPERT * E // K - 1, True),
                    (fm.GEMV_MAX_SLOTS_PER_EXPERT * E // K, False)):
        calls.clear()
        ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).to(torch.int32)
        x, w = torch.randn(T, H), torch.rand(T, K)
        out = fm.torch_fused_moe(x, w13, w2, w, ids)
        assert bool(calls) == gemv, T
        assert (out - fm.reference_fused_moe(x, w13, w2, w, ids)).abs().max().item() <= 1e-5


def test_auto_choice_takes_grouped_mm_for_large_experts(monkeypatch):
    """Experts above GEMV_MAX_EXPERT_BYTES: grouped_mm even at one slot per expert (it reads
    each expert once; the gather-GEMV once per slot)."""
    calls = []
    real = fm._gather_gemv
    monkeypatch.setattr(fm, "_gather_gemv", lambda *a: calls.append(1) or real(*a))
    E, K, H, F = 4, 2, 8, 16
    w13, w2 = experts(E, H, F, "k_major")
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(3)]).to(torch.int32)
    x, w = torch.randn(3, H), torch.rand(3, K)
    for limit, gemv in ((3 * H * F * 4, True), (3 * H * F * 4 - 1, False)):  # these experts are 3*H*F fp32
        calls.clear()
        monkeypatch.setattr(fm, "GEMV_MAX_EXPERT_BYTES", limit)
        out = fm.torch_fused_moe(x, w13, w2, w, ids)
        assert bool(calls) == gemv, limit
        assert (out - fm.reference_fused_moe(x, w13, w2, w, ids)).abs().max().item() <= 1e-5


def test_bad_path_is_refused():
    x, w = torch.randn(3, 8), torch.rand(3, 2)
    ids = torch.tensor([[0, 1], [1, 2], [2, 3]], dtype=torch.int32)
    w13, w2 = experts(4, 8, 16, "standard")
    with pytest.raises(ValueError, match="K-major"):
        fm.torch_fused_moe(x, w13, w2, w, ids, path="gemv")
    with pytest.raises(ValueError, match="path='ext' needs the CPU expert kernel"):
        fm.torch_fused_moe(x, w13, w2, w, ids, path="ext")
    with pytest.raises(ValueError, match="path='fast'"):
        fm.torch_fused_moe(x, w13, w2, w, ids, path="fast")


def test_gather_gemv_rows_are_per_slot_expert_products():
    """Row n is x[n] @ W[e[n]] (W[e] = the table's rows [e*K, (e+1)*K)), repeats included."""
    E, Kd, N = 5, 12, 9
    table = torch.randn(E * Kd, 7)
    x = torch.randn(N, Kd)
    e = torch.tensor([4, 0, 0, 2, 4, 4, 1, 3, 2])
    want = torch.stack([x[n].double() @ table[e[n] * Kd:(e[n] + 1) * Kd].double() for n in range(N)])
    assert (fm._gather_gemv(x, table, e).double() - want).abs().max().item() <= 1e-5


def test_model_stores_experts_k_major():
    """The model's expert parameters have the memory the gather-GEMV reads."""
    from moerun.build import build_model
    m = build_model("tiny", layers=range(1), seed=0)
    moe = m.layers[0].mlp
    assert moe.w13.shape[1:] == (2 * m.cfg.moe_ffn, m.cfg.hidden_size)
    assert fm._k_major(moe.w13) is not None and fm._k_major(moe.w2) is not None
