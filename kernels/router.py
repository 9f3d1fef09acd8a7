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
  already in them), then a softmax over those k (GPT-OSS); ``renormalize`` changes nothing.

Scores are float32 whatever the logits dtype. Ids come back by descending choice score
(for softmax, the probability). With ``renormalize`` the k weights are rescaled to sum to 1
(Mixtral / Qwen3-MoE ``norm_topk_prob``); without it they are the raw scores (OLMoE,
Qwen2-MoE).

Ties: the Triton kernel takes the lower expert id among equal choice scores, and the lower
group id among equal group scores. The references use ``torch.topk``, whose order among
equal values is unspecified (on CPU it is not the lower id), as Hugging Face's routers do;
a tie gives the same weights either way, but may name other experts.

Triton: one kernel, ``_route_kernel``, for every mode (constexpr flags; one program owns
whole rows): the scores, the group mask, K rounds of argmax, the weights stored once.

Shape legend: T = tokens, E = experts, K = top-k.
"""
from __future__ import annotations

import torch

from ._common import alloc, check_2d, check_float, jit, next_pow2, resolve_impl, tl, triton


def reference_topk_softmax(logits_TE: torch.Tensor, k: int, renormalize: bool):
    """The readable definition: float32 softmax, torch.topk, optional renormalisation
    (ties: as torch.topk orders them; the kernel takes the lower id)."""
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    weights_TK, ids_TK = torch.topk(probs_TE, k, dim=-1, sorted=True)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return weights_TK, ids_TK.to(torch.int32)


SCORINGS = ("softmax", "sigmoid", "topk_softmax")  # the kernel's SCORING is the index here


@jit
def _route_kernel(logits_ptr, bias_ptr, weights_ptr, ids_ptr, T, E, K, stride_lt,
                  num_groups, topk_groups, group_size, scaling,
                  SCORING: tl.constexpr, HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr,
                  RENORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    # One program owns BLOCK_T whole rows: the scores, the group choice and the top-k all
    # need every column. score_TE is what becomes a weight, choice_TE what the top-k ranks.
    rows_T = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols_E = tl.arange(0, BLOCK_E)
    row_ok_T = rows_T < T
    col_ok_E = cols_E < E
    open_TE = row_ok_T[:, None] & col_ok_E[None, :]  # experts still free to be chosen
    logits_TE = tl.load(logits_ptr + rows_T.to(tl.int64)[:, None] * stride_lt + cols_E[None, :],
                        mask=open_TE, other=0.0).to(tl.float32)
    if SCORING == 0:  # softmax over the E experts; rows past T get a finite max (no NaN)
        max_T = tl.where(row_ok_T, tl.max(tl.where(open_TE, logits_TE, float("-inf")), axis=1), 0.0)
        exp_TE = tl.where(open_TE, tl.exp(logits_TE - max_T[:, None]), 0.0)
        score_TE = exp_TE / tl.where(row_ok_T, tl.sum(exp_TE, axis=1), 1.0)[:, None]
        choice_TE = score_TE
    elif SCORING == 1:  # sigmoid; the correction bias only steers the choice
        score_TE = 1.0 / (1.0 + tl.exp(-logits_TE))
        choice_TE = score_TE
        if HAS_BIAS:
            choice_TE += tl.load(bias_ptr + cols_E, mask=col_ok_E, other=0.0).to(tl.float32)[None, :]
    else:  # top-k of the logits themselves, softmax over the k afterwards
        score_TE = logits_TE
        choice_TE = logits_TE

    if GROUPED:
        # A group's score is the sum of its two best choice scores (one if it has one
        # expert); the topk_groups best groups stay open, ties to the lower group id.
        group_E = cols_E // group_size
        gscore_TE = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
        for g in range(0, num_groups):
            in_TE = open_TE & (group_E == g)[None, :]
            work_TE = tl.where(in_TE, choice_TE, float("-inf"))
            top1_T = tl.max(work_TE, axis=1)
            pos1_T = tl.min(tl.where(in_TE & (work_TE == top1_T[:, None]), cols_E[None, :], BLOCK_E), axis=1)
            top2_T = tl.max(tl.where(cols_E[None, :] == pos1_T[:, None], float("-inf"), work_TE), axis=1)
            top2_T = tl.where(group_size > 1, top2_T, 0.0)
            gscore_TE = tl.where((group_E == g)[None, :], (top1_T + top2_T)[:, None], gscore_TE)
        left_TE = open_TE
        keep_TE = open_TE & (cols_E < 0)[None, :]  # all False
        for _ in range(0, topk_groups):
            best_T = tl.max(tl.where(left_TE, gscore_TE, float("-inf")), axis=1)
            pick_T = tl.min(tl.where(left_TE & (gscore_TE == best_T[:, None]), group_E[None, :],
                                     num_groups), axis=1)
            hit_TE = group_E[None, :] == pick_T[:, None]
            keep_TE = keep_TE | (hit_TE & open_TE)
            left_TE = left_TE & (group_E[None, :] != pick_T[:, None])
        open_TE = keep_TE

    # Top-k by K rounds of argmax over the open experts, ties to the lower id; the chosen
    # ids and their scores collect in [BLOCK_T, BLOCK_K] tiles, stored once at the end.
    k_K = tl.arange(0, BLOCK_K)
    ids_TK = tl.zeros((BLOCK_T, BLOCK_K), tl.int32)
    top_TK = tl.zeros((BLOCK_T, BLOCK_K), tl.float32)
    for j in range(0, K):
        work_TE = tl.where(open_TE, choice_TE, float("-inf"))
        best_T = tl.max(work_TE, axis=1)
        pick_T = tl.min(tl.where(open_TE & (work_TE == best_T[:, None]), cols_E[None, :], BLOCK_E), axis=1)
        hit_TE = cols_E[None, :] == pick_T[:, None]
        score_T = tl.max(tl.where(hit_TE, score_TE, float("-inf")), axis=1)
        ids_TK = tl.where(k_K[None, :] == j, pick_T[:, None], ids_TK)
        top_TK = tl.where(k_K[None, :] == j, score_T[:, None], top_TK)
        open_TE = open_TE & (cols_E[None, :] != pick_T[:, None])

    k_ok_K = k_K < K
    if SCORING == 2:  # the first pick is the row's max; rows past T chose nothing (-inf)
        max_T = tl.where(row_ok_T, tl.max(tl.where(k_ok_K[None, :], top_TK, float("-inf")), axis=1), 0.0)
        exp_TK = tl.where(k_ok_K[None, :], tl.exp(top_TK - max_T[:, None]), 0.0)
        top_TK = exp_TK / tl.where(row_ok_T, tl.sum(exp_TK, axis=1), 1.0)[:, None]
    elif RENORMALIZE:
        sum_T = tl.sum(tl.where(k_ok_K[None, :], top_TK, 0.0), axis=1)
        if SCORING == 1:
            sum_T += 1e-20
        top_TK = top_TK / tl.where(row_ok_T, sum_T, 1.0)[:, None]
    out_TK = rows_T.to(tl.int64)[:, None] * K + k_K[None, :]
    out_ok_TK = row_ok_T[:, None] & k_ok_K[None, :]
    tl.store(weights_ptr + out_TK, top_TK * scaling, mask=out_ok_TK)
    tl.store(ids_ptr + out_TK, ids_TK, mask=out_ok_TK)


def _launch_route(logits_TE, k, scoring, renormalize, bias_E, num_groups, topk_groups, scaling):
    """Run _route_kernel on checked arguments: (weights_TK float32, ids_TK int32)."""
    T, E = logits_TE.shape
    weights_TK = alloc((T, k), torch.float32, logits_TE.device)
    ids_TK = alloc((T, k), torch.int32, logits_TE.device)
    if T == 0:
        return weights_TK, ids_TK
    if logits_TE.stride(1) != 1:
        logits_TE = logits_TE.contiguous()
    groups = num_groups if topk_groups is None else topk_groups
    grouped = num_groups > 1 and groups < num_groups
    if bias_E is not None and bias_E.stride(0) != 1:
        bias_E = bias_E.contiguous()
    BLOCK_E = next_pow2(E)
    # Keep a program's tile near 4K elements: many rows per program for small E.
    BLOCK_T = max(1, min(next_pow2(T), 4096 // BLOCK_E))
    grid = (triton.cdiv(T, BLOCK_T),)
    _route_kernel[grid](logits_TE, bias_E if bias_E is not None else logits_TE, weights_TK, ids_TK,
                        T, E, k, logits_TE.stride(0), num_groups, groups, E // num_groups, float(scaling),
                        SCORING=SCORINGS.index(scoring), HAS_BIAS=bias_E is not None, GROUPED=grouped,
                        RENORMALIZE=bool(renormalize), BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E,
                        BLOCK_K=next_pow2(k))
    return weights_TK, ids_TK


def reference_route(logits_TE: torch.Tensor, k: int, *, scoring: str = "softmax", renormalize: bool = False,
                    bias_E: torch.Tensor | None = None, num_groups: int = 1, topk_groups: int | None = None,
                    scaling: float = 1.0):
    """The readable definition of ``route`` (module docstring), float32 throughout.
    Ids come back ordered by descending choice score (ties: as torch.topk orders them)."""
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
        check_float("bias_E", bias_E)
        if bias_E.device != logits_TE.device:
            raise ValueError(f"bias_E is on {bias_E.device} but logits_TE on {logits_TE.device}; move it")
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
    if resolve_impl(impl, logits_TE.device) == "torch":
        return reference_route(logits_TE, k, scoring=scoring, renormalize=renormalize, bias_E=bias_E,
                               num_groups=num_groups, topk_groups=topk_groups, scaling=scaling)
    return _launch_route(logits_TE, k, scoring, renormalize, bias_E, num_groups, topk_groups, scaling)


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

    return _launch_route(logits_TE, k, "softmax", renormalize, None, 1, None, 1.0)
