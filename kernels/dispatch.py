"""Dispatch / combine: pack token-slots per destination EP rank, and sum them back.

These wrap the expert-parallel all-to-all; they never call torch.distributed:

    send_buf, send_splits, meta = dispatch(x_TH, ids_TK, weights_TK, ranks_of_experts,
                                           num_ranks=ep)
    # caller: exchange send_splits -> recv_splits, then all_to_all_single the rows (and
    # meta.expert_of_row, so each receiver knows the expert of every row), run the local
    # experts on the received rows (weight 1, top-1), send the outputs back the same way:
    out_TH = combine(recv_back, meta)   # recv_back: [T*K, H], same row order as send_buf

- ``ranks_of_experts`` [E] int (any device): the EP rank that owns each expert
  (``contiguous_expert_ranks(E, ep)`` for the usual block layout).
- ``send_buf`` [T*K, H] (x's dtype): one row per slot (slot = t*K + k), ordered by
  destination rank, then by expert id, then by slot.
- ``send_splits``: a Python list of ``num_ranks`` ints, rows per destination rank, ready for
  ``all_to_all_single``. Producing it syncs with the device (the all-to-all needs it on the
  host anyway). ``num_ranks=None`` means ranks_of_experts.max() + 1.
  ``host_splits=False`` keeps them on the device instead (an int64 tensor [num_ranks],
  num_ranks required) and skips the host-side range checks, for a caller whose ids are
  valid by construction that exchanges the counts on the device first and copies them to
  the host once (the MoE layer: one sync per layer).
- ``meta``: a DispatchMeta, what combine needs.
- ``combine`` returns out[t] = sum_k weights[t, k] * recv_back[row of slot (t, k)],
  accumulated in float32, in x's dtype.

Shape legend: T = tokens, K = top-k, S = T*K slots (= rows of send_buf), H = hidden,
E = experts, R = EP ranks.
"""
from __future__ import annotations

import dataclasses

import torch

from ._common import alloc, check_float, check_index, check_routed, jit, resolve_impl
from ._common import pre_round_bf16, round_bf16_by_hand, tl, triton
from .align import moe_align


@dataclasses.dataclass(frozen=True)
class DispatchMeta:
    row_of_slot_TK: torch.Tensor  # [T, K] int32: the send_buf row carrying slot (t, k)
    expert_of_row: torch.Tensor   # [S] int32: global expert id of each send_buf row
    weights_TK: torch.Tensor      # [T, K] float32 routing weights, applied by combine
    send_splits: list[int] | torch.Tensor  # rows per destination rank (as returned by dispatch)
    num_tokens: int               # T
    hidden: int                   # H
    dtype: torch.dtype            # x's dtype, the dtype combine returns


def contiguous_expert_ranks(num_experts: int, num_ranks: int, device=None) -> torch.Tensor:
    """ranks_of_experts for the block layout: rank r owns experts [r*E/R, (r+1)*E/R)."""
    if num_ranks < 1 or num_experts % num_ranks:
        raise ValueError(f"num_experts={num_experts} must be divisible by the EP size "
                         f"num_ranks={num_ranks}; pick an EP size that divides it")
    per_rank = num_experts // num_ranks
    return (torch.arange(num_experts, device=device) // per_rank).to(torch.int32)


def _check_dispatch(x_TH, ids_TK, weights_TK, ranks_of_experts, num_ranks):
    check_routed(x_TH, weights_TK, ids_TK)
    if ids_TK.shape != weights_TK.shape or ids_TK.shape[0] != x_TH.shape[0]:
        raise ValueError(f"ids_TK {tuple(ids_TK.shape)} and weights_TK "
                         f"{tuple(weights_TK.shape)} must both be [T={x_TH.shape[0]}, K]")
    if ranks_of_experts.dim() != 1 or ranks_of_experts.numel() < 1:
        raise ValueError("ranks_of_experts must be a 1-D int tensor [E]: the EP rank of each "
                         f"expert; got shape {tuple(ranks_of_experts.shape)}")
    check_index("ranks_of_experts", ranks_of_experts)
    if ids_TK.device != x_TH.device or weights_TK.device != x_TH.device:
        raise ValueError(f"x_TH, ids_TK, weights_TK must be on one device; got {x_TH.device}, "
                         f"{ids_TK.device}, {weights_TK.device}")
    if num_ranks is not None and num_ranks < 1:
        raise ValueError(f"num_ranks={num_ranks} must be >= 1 (the EP size)")


def _splits_and_checks(ids_S, ranks_E, num_ranks, host_splits=True):
    """Rows per rank, plus the range checks, in ONE device-to-host transfer; with
    ``host_splits=False`` the rows per rank as a device tensor, no transfer, no checks."""
    E = ranks_E.numel()
    if not host_splits:
        if num_ranks is None:
            raise ValueError("dispatch(host_splits=False) needs num_ranks (the EP size)")
        rank_S = ranks_E.long()[ids_S.long()]
        return torch.bincount(rank_S, minlength=num_ranks)[:num_ranks], rank_S
    bad_ids = ((ids_S < 0) | (ids_S >= E)).any().reshape(1).long()
    rank_S = ranks_E.long()[ids_S.long().clamp(0, E - 1)]
    R = num_ranks if num_ranks is not None else int(ranks_E.max()) + 1
    rank_range = torch.stack([ranks_E.min(), ranks_E.max()]).long()
    splits_R = torch.bincount(rank_S.clamp(0, R - 1), minlength=R)[:R]
    host = torch.cat([splits_R, bad_ids, rank_range]).tolist()
    if host[R]:
        raise ValueError(f"ids_TK holds expert ids outside [0, E={E}) (E = len(ranks_of_experts))")
    if host[R + 1] < 0 or host[R + 2] >= R:
        raise ValueError(f"ranks_of_experts must lie in [0, num_ranks={R}); got "
                         f"[{host[R + 1]}, {host[R + 2]}]")
    return host[:R], rank_S


def reference_dispatch(x_TH, ids_TK, weights_TK, ranks_of_experts, *, num_ranks=None, host_splits=True):
    """The readable definition: a stable sort of the slots by (rank, expert)."""
    _check_dispatch(x_TH, ids_TK, weights_TK, ranks_of_experts, num_ranks)
    ranks_of_experts = ranks_of_experts.to(x_TH.device)
    T, K = ids_TK.shape
    ids_S = ids_TK.reshape(-1)
    send_splits, rank_S = _splits_and_checks(ids_S, ranks_of_experts, num_ranks, host_splits)
    slot_of_row = torch.argsort(rank_S * ranks_of_experts.numel() + ids_S.long(), stable=True)
    row_of_slot = torch.empty_like(slot_of_row)
    row_of_slot[slot_of_row] = torch.arange(slot_of_row.numel(), device=x_TH.device)
    meta = DispatchMeta(row_of_slot.to(torch.int32).reshape(T, K),
                        ids_S[slot_of_row].to(torch.int32), weights_TK.float(), send_splits,
                        T, x_TH.shape[1], x_TH.dtype)
    return x_TH[slot_of_row // K], send_splits, meta


def reference_combine(recv_back, meta: DispatchMeta):
    """The readable definition: gather each slot's row, weight it, sum over k in float32."""
    _check_combine(recv_back, meta)
    rows_TKH = recv_back[meta.row_of_slot_TK.long()].float()
    return (rows_TKH * meta.weights_TK[..., None]).sum(dim=1).to(meta.dtype)


@jit
def _pack_kernel(x_ptr, ids_ptr, slot_of_row_ptr, send_ptr, row_of_slot_ptr, expert_of_row_ptr,
                 S, H, top_k, stride_xt, stride_st,
                 BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    # send[r] = x[slot_of_row[r] // K]; the first column block also writes the index maps.
    rows_R = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok_R = rows_R < S
    slot_R = tl.load(slot_of_row_ptr + rows_R, mask=row_ok_R, other=0).to(tl.int64)
    h_H = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_RH = row_ok_R[:, None] & (h_H[None, :] < H)
    vals_RH = tl.load(x_ptr + (slot_R // top_k)[:, None] * stride_xt + h_H[None, :], mask=mask_RH)
    tl.store(send_ptr + rows_R.to(tl.int64)[:, None] * stride_st + h_H[None, :], vals_RH,
             mask=mask_RH)
    if tl.program_id(1) == 0:
        tl.store(row_of_slot_ptr + slot_R, rows_R, mask=row_ok_R)
        expert_R = tl.load(ids_ptr + slot_R, mask=row_ok_R, other=0)
        tl.store(expert_of_row_ptr + rows_R, expert_R.to(tl.int32), mask=row_ok_R)


@jit
def _combine_kernel(recv_ptr, row_of_slot_ptr, weights_ptr, out_ptr, T, H, top_k,
                    stride_rr, stride_ot, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                    ROUND_BF16: tl.constexpr):
    t_T = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h_H = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_ok_T = t_T < T
    mask_TH = t_ok_T[:, None] & (h_H[None, :] < H)
    acc_TH = tl.zeros((BLOCK_T, BLOCK_H), tl.float32)
    for j in range(0, top_k):
        slot_T = t_T.to(tl.int64) * top_k + j
        row_T = tl.load(row_of_slot_ptr + slot_T, mask=t_ok_T, other=0).to(tl.int64)
        w_T = tl.load(weights_ptr + slot_T, mask=t_ok_T, other=0.0)
        rows_TH = tl.load(recv_ptr + row_T[:, None] * stride_rr + h_H[None, :], mask=mask_TH,
                          other=0.0)
        acc_TH += rows_TH.to(tl.float32) * w_T[:, None]
    tl.store(out_ptr + t_T.to(tl.int64)[:, None] * stride_ot + h_H[None, :],
             pre_round_bf16(acc_TH, ROUND_BF16).to(out_ptr.dtype.element_ty), mask=mask_TH)


def dispatch(x_TH: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
             ranks_of_experts: torch.Tensor, *, num_ranks: int | None = None,
             impl: str | None = None, host_splits: bool = True):
    """Pack slots by destination rank. Returns (send_buf [T*K, H], send_splits list[int]
    of length num_ranks (a device tensor with host_splits=False), meta DispatchMeta). See
    the module docstring."""
    if resolve_impl(impl, x_TH.device) == "torch":
        return reference_dispatch(x_TH, ids_TK, weights_TK, ranks_of_experts,
                                  num_ranks=num_ranks, host_splits=host_splits)
    _check_dispatch(x_TH, ids_TK, weights_TK, ranks_of_experts, num_ranks)
    ranks_of_experts = ranks_of_experts.to(x_TH.device)  # may live on the CPU: E ints
    T, K = ids_TK.shape
    H = x_TH.shape[1]
    E = ranks_of_experts.numel()
    device = x_TH.device
    ids_S = ids_TK.reshape(-1).contiguous()
    send_splits, _ = _splits_and_checks(ids_S, ranks_of_experts, num_ranks, host_splits)
    # Number the experts rank-major; a grouping by that key (block_m = 1: no padding) is
    # the send order. Only E-sized glue here; the per-slot work runs in the kernels.
    order_E = torch.argsort(ranks_of_experts.long() * E + torch.arange(E, device=device))
    key_of_expert = torch.empty_like(order_E)
    key_of_expert[order_E] = torch.arange(E, device=device)
    slot_of_row, _, _ = moe_align(key_of_expert[ids_TK.long()], E, 1, impl="triton")
    send_buf = alloc((T * K, H), x_TH.dtype, device)
    row_of_slot = alloc((T, K), torch.int32, device)
    expert_of_row = alloc((T * K,), torch.int32, device)
    if T > 0:
        if x_TH.stride(1) != 1:
            x_TH = x_TH.contiguous()
        BLOCK_R, BLOCK_H = 16, min(1024, triton.next_power_of_2(H))
        grid = (triton.cdiv(T * K, BLOCK_R), triton.cdiv(H, BLOCK_H))
        _pack_kernel[grid](x_TH, ids_S, slot_of_row, send_buf, row_of_slot, expert_of_row,
                           T * K, H, K, x_TH.stride(0), send_buf.stride(0),
                           BLOCK_R=BLOCK_R, BLOCK_H=BLOCK_H)
    meta = DispatchMeta(row_of_slot, expert_of_row, weights_TK.float(), send_splits, T, H,
                        x_TH.dtype)
    return send_buf, send_splits, meta


def _check_combine(recv_back, meta):
    if not isinstance(meta, DispatchMeta):
        raise ValueError(f"meta must be the DispatchMeta that dispatch returned, got {type(meta)}")
    check_float("recv_back", recv_back)
    S = meta.row_of_slot_TK.numel()
    if tuple(recv_back.shape) != (S, meta.hidden):
        raise ValueError(f"recv_back must be [T*K={S}, H={meta.hidden}] in send_buf's row order "
                         f"(the expert outputs sent back); got {tuple(recv_back.shape)}")


def combine(recv_back: torch.Tensor, meta: DispatchMeta, *, impl: str | None = None):
    """out_TH[t] = sum_k weights[t, k] * recv_back[row of (t, k)], float32 sum, x's dtype."""
    if resolve_impl(impl, recv_back.device) == "torch":
        return reference_combine(recv_back, meta)
    _check_combine(recv_back, meta)
    T, H = meta.num_tokens, meta.hidden
    K = meta.row_of_slot_TK.shape[1]
    out_TH = alloc((T, H), meta.dtype, recv_back.device)
    if T > 0:
        if recv_back.stride(1) != 1:
            recv_back = recv_back.contiguous()
        weights_S = meta.weights_TK.reshape(-1).contiguous()
        BLOCK_T, BLOCK_H = 4, min(1024, triton.next_power_of_2(H))
        grid = (triton.cdiv(T, BLOCK_T), triton.cdiv(H, BLOCK_H))
        _combine_kernel[grid](recv_back, meta.row_of_slot_TK, weights_S, out_TH, T, H, K,
                              recv_back.stride(0), out_TH.stride(0),
                              BLOCK_T=BLOCK_T, BLOCK_H=BLOCK_H,
                              ROUND_BF16=round_bf16_by_hand(meta.dtype))
    return out_TH
