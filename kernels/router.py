"""Routers: from router logits to the top-k experts of each token and their weights.

    weights_TK, ids_TK = topk_softmax(logits_TE, k=2, renormalize=True)
    weights_TK, ids_TK = route(logits_TE, k, scoring="sigmoid", bias_E=b, num_groups=8,
                               topk_groups=4, renormalize=True, scaling=2.5)

``route`` covers every family's router (float32 inside whatever the logits dtype):
- ``scoring="softmax"``: softmax over all E, top-k, optional renormalisation (OLMoE,
  Mixtral, Qwen-MoE; the same as ``topk_softmax``).
- ``scoring="sigmoid"``: s = sigmoid(logits); the experts are *chosen* on s + bias_E
  (``e_score_correction_bias``), optionally group-limited: the E experts form
  ``num_groups`` equal groups, a group's score is the sum of its top-2 choice scores, only
  the ``topk_groups`` best groups compete; the weights are s of the chosen experts,
  renormalised to sum to 1 when ``renormalize`` (+1e-20), then times ``scaling``
  (``routed_scaling_factor``) (GLM-4.5, dots.llm1, MiniMax-M2, DeepSeek-V3).
- ``scoring="topk_softmax"``: top-k of the logits themselves (the router linear's bias is
  already in them), then a softmax over those k (GPT-OSS).

The softmax runs in float32 whatever the logits dtype. Weights come back in descending
order; among equal probabilities the lower expert id wins. With ``renormalize`` the k
weights are rescaled to sum to 1 (Mixtral / Qwen3-MoE ``norm_topk_prob``); without it they
are the raw softmax probabilities (OLMoE, Qwen2-MoE).

Shape legend: T = tokens, E = experts, K = top-k.
"""
from __future__ import annotations

import torch

from ._common import alloc, check_2d, check_float, jit, next_pow2, resolve_impl, tl, triton


def reference_topk_softmax(logits_TE: torch.Tensor, k: int, renormalize: bool):
    """The readable definition: float32 softmax, torch.topk, optional renormalisation."""
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    weights_TK, ids_TK = torch.topk(probs_TE, k, dim=-1, sorted=True)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return weights_TK, ids_TK.to(torch.int32)


@jit
def _topk_softmax_kernel(logits_ptr, weights_ptr, ids_ptr, T, E, K, stride_lt,
                         RENORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    # One program owns BLOCK_T whole rows: the softmax and the top-k need all E columns.
    rows_T = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols_E = tl.arange(0, BLOCK_E)
    row_ok_T = rows_T < T
    mask_TE = row_ok_T[:, None] & (cols_E[None, :] < E)
    logits_TE = tl.load(logits_ptr + rows_T.to(tl.int64)[:, None] * stride_lt + cols_E[None, :],
                        mask=mask_TE, other=float("-inf")).to(tl.float32)
    # Rows past T are all -inf; give them a finite max so they produce no NaN warnings.
    max_T = tl.where(row_ok_T, tl.max(logits_TE, axis=1), 0.0)
    exp_TE = tl.where(mask_TE, tl.exp(logits_TE - max_T[:, None]), 0.0)
    sum_T = tl.where(row_ok_T, tl.sum(exp_TE, axis=1), 1.0)
    probs_TE = exp_TE / sum_T[:, None]

    # Top-k by k rounds of argmax; a chosen column is knocked out with -1 (probs are >= 0).
    # Padding columns start at -2 so they are never chosen while a real column is left.
    scale_T = tl.full((BLOCK_T,), 1.0, tl.float32)
    if RENORMALIZE:
        work_TE = tl.where(mask_TE, probs_TE, -2.0)
        chosen_sum_T = tl.zeros((BLOCK_T,), tl.float32)
        for _ in range(0, K):
            best_T = tl.max(work_TE, axis=1)
            pick_T = tl.min(tl.where(work_TE == best_T[:, None], cols_E[None, :], BLOCK_E), axis=1)
            chosen_sum_T += best_T
            work_TE = tl.where(cols_E[None, :] == pick_T[:, None], -1.0, work_TE)
        scale_T = 1.0 / tl.where(row_ok_T, chosen_sum_T, 1.0)
    work_TE = tl.where(mask_TE, probs_TE, -2.0)
    for j in range(0, K):
        best_T = tl.max(work_TE, axis=1)
        pick_T = tl.min(tl.where(work_TE == best_T[:, None], cols_E[None, :], BLOCK_E), axis=1)
        out_offs_T = rows_T.to(tl.int64) * K + j
        tl.store(weights_ptr + out_offs_T, best_T * scale_T, mask=row_ok_T)
        tl.store(ids_ptr + out_offs_T, pick_T.to(tl.int32), mask=row_ok_T)
        work_TE = tl.where(cols_E[None, :] == pick_T[:, None], -1.0, work_TE)


SCORINGS = ("softmax", "sigmoid", "topk_softmax")


def reference_route(logits_TE: torch.Tensor, k: int, *, scoring: str = "softmax", renormalize: bool = False,
                    bias_E: torch.Tensor | None = None, num_groups: int = 1, topk_groups: int | None = None,
                    scaling: float = 1.0):
    """The readable definition of ``route`` (module docstring), float32 throughout.
    Ids come back ordered by descending choice score, ties to the lower id."""
    logits = logits_TE.float()
    if scoring == "softmax":
        weights_TK, ids_TK = reference_topk_softmax(logits, k, renormalize)
        return weights_TK * scaling if scaling != 1.0 else weights_TK, ids_TK
    if scoring == "topk_softmax":
        top_TK, ids_TK = torch.topk(logits, k, dim=-1, sorted=True)
        return torch.softmax(top_TK, dim=-1) * scaling, ids_TK.to(torch.int32)
    T, E = logits.shape
    scores_TE = torch.sigmoid(logits)
    choice_TE = scores_TE + bias_E.float() if bias_E is not None else scores_TE
    groups = topk_groups if topk_groups is not None else num_groups
    if num_groups > 1 and groups < num_groups:
        per = E // num_groups
        group_TG = choice_TE.view(T, num_groups, per).topk(min(2, per), dim=-1).values.sum(-1)
        keep_TG = torch.zeros_like(group_TG, dtype=torch.bool)
        keep_TG.scatter_(1, torch.topk(group_TG, groups, dim=-1).indices, True)
        choice_TE = choice_TE.masked_fill(~keep_TG.repeat_interleave(per, dim=1), float("-inf"))
    ids_TK = torch.topk(choice_TE, k, dim=-1, sorted=True).indices
    weights_TK = scores_TE.gather(1, ids_TK)
    if renormalize:
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
    return weights_TK * scaling, ids_TK.to(torch.int32)


def _check_route(logits_TE, k, scoring, bias_E, num_groups, topk_groups):
    check_2d("logits_TE", logits_TE, "[tokens, experts] router logits")
    check_float("logits_TE", logits_TE)
    E = logits_TE.shape[1]
    if scoring not in SCORINGS:
        raise ValueError(f"scoring={scoring!r} is not one of {', '.join(SCORINGS)}")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= E:
        raise ValueError(f"top-k k={k!r} must be an int in [1, num_experts={E}]; lower k "
                         "or check that logits_TE is [tokens, experts]")
    if bias_E is not None:
        if scoring != "sigmoid":
            raise ValueError(f"bias_E (e_score_correction_bias) is only used with scoring='sigmoid', not {scoring!r}")
        if tuple(bias_E.shape) != (E,):
            raise ValueError(f"bias_E must be [E={E}]; got {tuple(bias_E.shape)}")
    if num_groups != 1 or topk_groups not in (None, num_groups):
        if scoring != "sigmoid":
            raise ValueError("group-limited routing (num_groups > 1) needs scoring='sigmoid'")
        if num_groups < 1 or E % num_groups:
            raise ValueError(f"n_group={num_groups} must divide num_experts={E}")
        g = num_groups if topk_groups is None else topk_groups
        if not 1 <= g <= num_groups:
            raise ValueError(f"topk_group={topk_groups} must be in 1..n_group={num_groups}")
        if g * (E // num_groups) < k:
            raise ValueError(f"topk_group={g} groups of {E // num_groups} experts hold fewer than "
                             f"num_experts_per_tok={k}; raise topk_group")


def route(logits_TE: torch.Tensor, k: int, *, scoring: str = "softmax", renormalize: bool = False,
          bias_E: torch.Tensor | None = None, num_groups: int = 1, topk_groups: int | None = None,
          scaling: float = 1.0, impl: str | None = None):
    """Every router of the module docstring. logits_TE [T, E] (any float dtype), bias_E [E].
    Returns (weights_TK float32, ids_TK int32), [T, K], by descending choice score.
    impl: None (the set_default_impl default), "auto", "triton" or "torch"."""
    _check_route(logits_TE, k, scoring, bias_E, num_groups, topk_groups)
    plain = scoring == "softmax" and scaling == 1.0
    if resolve_impl(impl, logits_TE.device) == "torch" or not plain:
        if not plain and impl == "triton":
            raise NotImplementedError(f"no Triton kernel yet for scoring={scoring!r} with these options")
        return reference_route(logits_TE, k, scoring=scoring, renormalize=renormalize, bias_E=bias_E,
                               num_groups=num_groups, topk_groups=topk_groups, scaling=scaling)
    return topk_softmax(logits_TE, k, renormalize, impl=impl)


def topk_softmax(logits_TE: torch.Tensor, k: int, renormalize: bool, *, impl: str | None = None):
    """Softmax (float32) over experts, then top-k.

    logits_TE: [T, E] float32 / bfloat16 / float16 router logits.
    Returns (weights_TK float32, ids_TK int32), both [T, K], weights in descending order.
    impl: None (the set_default_impl default), "auto", "triton" or "torch".
    """
    check_2d("logits_TE", logits_TE, "[tokens, experts] router logits")
    check_float("logits_TE", logits_TE)
    T, E = logits_TE.shape
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= E:
        raise ValueError(f"top-k k={k!r} must be an int in [1, num_experts={E}]; lower k "
                         "or check that logits_TE is [tokens, experts]")
    if resolve_impl(impl, logits_TE.device) == "torch":
        return reference_topk_softmax(logits_TE, k, renormalize)

    weights_TK = alloc((T, k), torch.float32, logits_TE.device)
    ids_TK = alloc((T, k), torch.int32, logits_TE.device)
    if T == 0:
        return weights_TK, ids_TK
    if logits_TE.stride(1) != 1:
        logits_TE = logits_TE.contiguous()
    BLOCK_E = next_pow2(E)
    # Keep a program's tile near 4K elements: many rows per program for small E.
    BLOCK_T = max(1, min(next_pow2(T), 4096 // BLOCK_E))
    grid = (triton.cdiv(T, BLOCK_T),)
    _topk_softmax_kernel[grid](logits_TE, weights_TK, ids_TK, T, E, k, logits_TE.stride(0),
                               RENORMALIZE=bool(renormalize), BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E)
    return weights_TK, ids_TK
