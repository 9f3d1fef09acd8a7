"""GPT-OSS's expert biases through the expert-parallel seam, in one process: dispatch, each
EP rank's local experts run with weight 1 on the rows it receives, combine. The routing
weight must multiply the whole expert output, the down-projection bias included, as in
one fused_moe call over all experts."""
from __future__ import annotations

import pytest
import torch

from moerun import kernels


@pytest.mark.parametrize("ep", [2, 4])
def test_ep_seam_weights_the_down_bias(ep):
    T, H, F, E, K = 7, 16, 8, 8, 2
    x = torch.randn(T, H)
    w13, w2 = torch.randn(E, 2 * F, H) * 0.3, torch.randn(E, H, F) * 0.3
    b13, b2 = torch.randn(E, 2 * F), torch.randn(E, H) * 3  # a large down bias: an unweighted one shows
    weights, ids = kernels.route(torch.randn(T, E), K, scoring="topk_softmax")
    act = kernels.ExpertAct(kind="swiglu_oai", alpha=1.702, limit=1.0, w13_bias=b13, w2_bias=b2)
    want = kernels.fused_moe(x, w13, w2, weights, ids, act=act)

    owner = kernels.contiguous_expert_ranks(E, ep)
    send, splits, meta = kernels.dispatch(x, ids, weights, owner, num_ranks=ep)
    back, start = [], 0
    per = E // ep
    for r, n in enumerate(int(s) for s in splits):
        mine = slice(r * per, (r + 1) * per)
        rows_RH, experts_R = send[start:start + n], meta.expert_of_row[start:start + n]
        local = kernels.ExpertAct(kind="swiglu_oai", alpha=1.702, limit=1.0, w13_bias=b13[mine], w2_bias=b2[mine])
        back.append(kernels.fused_moe(rows_RH, w13[mine], w2[mine], torch.ones(n, 1), experts_R[:, None],
                                      expert_start=r * per, num_local_experts=per, act=local))
        start += n
    got = kernels.combine(torch.cat(back), meta)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    unweighted_bias = want + sum(b2[ids[:, k].long()] * (1 - weights[:, k:k + 1]) for k in range(K))
    assert not torch.allclose(got, unweighted_bias, atol=1e-2)
