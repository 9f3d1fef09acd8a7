"""``impl="torch"``'s fast path (``torch._grouped_mm`` on CPU) equals the readable
reference and a float64 computation, on fresh random inputs."""
import importlib

import pytest
import torch

fm = importlib.import_module("moerun.kernels.fused_moe")


@pytest.mark.parametrize("T, K, E, local", [(0, 2, 8, (0, 8)), (1, 2, 8, (0, 8)), (37, 3, 8, (0, 8)),
                                            (20, 8, 8, (0, 8)), (29, 2, 16, (4, 4))])
def test_torch_path_equals_reference_and_float64(T, K, E, local):
    start, n = local
    H, F = 24, 40
    x = torch.randn(T, H)
    w13, w2 = torch.randn(n, 2 * F, H) * 0.2, torch.randn(n, H, F) * 0.2
    weights = torch.rand(T, K)
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).to(torch.int32) if T else \
        torch.zeros(0, K, dtype=torch.int32)
    out = fm.torch_fused_moe(x, w13, w2, weights, ids, expert_start=start)
    ref = fm.reference_fused_moe(x, w13, w2, weights, ids, expert_start=start)
    want = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            e = int(ids[t, k]) - start
            if 0 <= e < n:
                gu = w13[e].double() @ x[t].double()
                want[t] += weights[t, k].double() * (w2[e].double() @ (torch.nn.functional.silu(gu[:F]) * gu[F:]))
    assert out.shape == (T, H) and not out.isnan().any()
    if T:
        assert (out - ref).abs().max().item() <= 1e-5
        assert (out.double() - want).abs().max().item() <= 1e-4
