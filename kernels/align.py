"""Align: group the token-slots by expert, padded so each GEMM block holds one expert.

    sorted_slots, block_expert, num_padded = moe_align(ids_TK, num_experts=64, block_m=16)

A slot is one (token, choice) pair, numbered ``slot = t * K + k`` (the flat index into
ids_TK). The grouped GEMM walks ``sorted_slots`` in blocks of ``block_m`` rows:

- ``sorted_slots`` [R] int32: the slots of local expert 0 in slot order, padded with the
  sentinel ``T * K`` up to a multiple of block_m, then expert 1, ...; every position from
  ``num_padded`` on is the sentinel too. R = (T*K + min(E_local, T*K) * (block_m - 1))
  // block_m * block_m, an upper bound known without reading the ids (no host sync).
- ``block_expert`` [R // block_m] int32: the LOCAL expert index (id - expert_start) of each
  block, -1 for blocks past ``num_padded``; kernels skip those.
- ``num_padded`` [1] int32 tensor on the ids' device: the used length of sorted_slots.

Expert parallelism: with ``expert_start`` / ``num_local_experts`` only the ids in
[expert_start, expert_start + num_local_experts) are kept; the other slots are dropped.
Sentinel rows and dropped slots must never be written to an output; readers mask on
``slot < T * K``. The order inside an expert is ascending slot order in both impls.

Triton path, no atomics, so the output is deterministic:
- up to ``ONE_LAUNCH_MAX_SLOTS`` slots (decode, short prefills): one program does it all
  in one launch: sentinel fill, counts, the padded layout, then the scatter, walking the
  slots in chunks and carrying per-expert running counts between chunks. A barrier
  separates the sentinel stores from the scatter stores, which other warps may issue to
  the same addresses.
- more slots: three kernels over blocks of slots: (1) per-block expert counts, (2) one
  program scans them into the padded expert offsets, the per-block bases (a buffer of
  their own: scanning counts in place let some warps overwrite counts that other warps
  had yet to read) and block_expert, (3) every slot writes itself to
  offset[e] + base[block, e] + (its rank among earlier same-expert slots of its block).

Shape legend: T = tokens, K = top-k, E = experts (local), R = padded rows, B = GEMM blocks.
"""
from __future__ import annotations

import torch

from ._common import alloc, check_2d, check_index, jit, next_pow2, resolve_impl, tl, triton

_BLOCK_S = 128  # slots per program in the count and scatter kernels (per chunk in one launch)
# Slot counts up to this take the single-launch kernel (T <= 512 tokens at top-2): one
# program walks at most 8 chunks twice, about what the two launches it saves cost (an
# estimate, not yet measured on a GPU; scripts/bench_kernels.py times the whole layer).
ONE_LAUNCH_MAX_SLOTS = 1024


def max_padded_rows(num_slots: int, num_local_experts: int, block_m: int) -> int:
    """Length of sorted_slots: a bound on sum_e ceil(count_e / block_m) * block_m."""
    busy = min(num_local_experts, num_slots)  # only experts that got a slot add a pad
    return (num_slots + busy * (block_m - 1)) // block_m * block_m


def _check_args(ids_TK, num_experts, block_m, expert_start, num_local_experts):
    check_2d("ids_TK", ids_TK, "[tokens, top_k] expert ids")
    check_index("ids_TK", ids_TK)
    if num_experts < 1:
        raise ValueError(f"num_experts={num_experts} must be >= 1")
    if block_m < 1:
        raise ValueError(f"block_m={block_m} must be >= 1 (the GEMM's BLOCK_M)")
    num_local = num_experts - expert_start if num_local_experts is None else num_local_experts
    if not (0 <= expert_start and num_local >= 1 and expert_start + num_local <= num_experts):
        raise ValueError(
            f"local experts [{expert_start}, {expert_start + num_local}) must lie inside "
            f"[0, num_experts={num_experts}); pass expert_start = rank * E_local and "
            "num_local_experts = E_local")
    return num_local


def reference_moe_align(ids_TK, num_experts, block_m, *, expert_start=0, num_local_experts=None):
    """The readable definition (same outputs as the Triton path, bit for bit)."""
    num_local = _check_args(ids_TK, num_experts, block_m, expert_start, num_local_experts)
    device = ids_TK.device
    num_slots = ids_TK.numel()
    local_S = ids_TK.reshape(-1).long() - expert_start
    keep_S = (local_S >= 0) & (local_S < num_local)
    key_S = torch.where(keep_S, local_S, num_local)  # dropped slots sort after every expert
    counts_E = torch.bincount(key_S, minlength=num_local + 1)[:num_local]
    padded_E = (counts_E + block_m - 1) // block_m * block_m
    start_E = torch.cumsum(padded_E, 0) - padded_E       # padded offset of each expert
    first_E = torch.cumsum(counts_E, 0) - counts_E       # unpadded offset in the sort
    order_S = torch.argsort(key_S, stable=True)[: int(keep_S.sum())]
    expert_S = key_S[order_S]
    rank_S = torch.arange(order_S.numel(), device=device) - first_E[expert_S]

    num_rows = max_padded_rows(num_slots, num_local, block_m)
    sorted_slots = torch.full((num_rows,), num_slots, dtype=torch.int32, device=device)
    sorted_slots[start_E[expert_S] + rank_S] = order_S.to(torch.int32)
    num_padded = padded_E.sum().reshape(1)
    block_start_B = torch.arange(num_rows // block_m, device=device) * block_m
    # The expert of a block is the number of experts whose padded range ends at or before it.
    block_expert = (torch.cumsum(padded_E, 0)[None, :] <= block_start_B[:, None]).sum(1)
    block_expert = torch.where(block_start_B < num_padded, block_expert, -1)
    return sorted_slots, block_expert.to(torch.int32), num_padded.to(torch.int32)


@jit
def _count_kernel(ids_ptr, counts_ptr, S, expert_start, E,
                  BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr):
    # counts[pid, e] = number of slots of this block routed to local expert e
    pid = tl.program_id(0)
    slots_S = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    cols_E = tl.arange(0, BLOCK_E)
    local_S = tl.load(ids_ptr + slots_S, mask=slots_S < S, other=-1).to(tl.int32) - expert_start
    hits_SE = (local_S[:, None] == cols_E[None, :]).to(tl.int32)
    tl.store(counts_ptr + pid * E + cols_E, tl.sum(hits_SE, axis=0), mask=cols_E < E)


@jit
def _scan_kernel(counts_ptr, base_ptr, start_ptr, block_expert_ptr, num_padded_ptr,
                 num_slot_blocks, num_gemm_blocks, E, block_m,
                 BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr):
    # A single program. base[b, e] = the exclusive prefix of counts[:, e] over slot blocks
    # (the base of block b inside expert e), then the experts are laid out padded.
    cols_E = tl.arange(0, BLOCK_E)
    mask_E = cols_E < E
    total_E = tl.zeros((BLOCK_E,), tl.int32)
    for b in range(0, num_slot_blocks):
        c_E = tl.load(counts_ptr + b * E + cols_E, mask=mask_E, other=0)
        tl.store(base_ptr + b * E + cols_E, total_E, mask=mask_E)
        total_E += c_E
    start_E = _layout(total_E, mask_E, block_expert_ptr, num_padded_ptr, num_gemm_blocks,
                      block_m, BLOCK_E, BLOCK_B)
    tl.store(start_ptr + cols_E, start_E, mask=mask_E)


@jit
def _layout(total_E, mask_E, block_expert_ptr, num_padded_ptr, num_gemm_blocks, block_m,
            BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr):
    # From the per-expert slot counts: stores num_padded and the expert of every GEMM
    # block, returns the padded start row of each expert.
    padded_E = (total_E + block_m - 1) // block_m * block_m
    end_E = tl.cumsum(padded_E, axis=0)
    num_padded = tl.sum(padded_E, axis=0)
    tl.store(num_padded_ptr, num_padded)
    ended_E = tl.where(mask_E, end_E, 2147483647)  # padding columns never count as "ended"
    for b0 in range(0, num_gemm_blocks, BLOCK_B):
        blocks_B = b0 + tl.arange(0, BLOCK_B)
        row_B = blocks_B * block_m
        expert_B = tl.sum((ended_E[None, :] <= row_B[:, None]).to(tl.int32), axis=1)
        expert_B = tl.where(row_B < num_padded, expert_B, -1)
        tl.store(block_expert_ptr + blocks_B, expert_B, mask=blocks_B < num_gemm_blocks)
    return end_E - padded_E


@jit
def _scatter_kernel(ids_ptr, base_ptr, start_ptr, sorted_ptr, S, expert_start, E,
                    BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    lanes_S = tl.arange(0, BLOCK_S)
    slots_S = pid * BLOCK_S + lanes_S
    local_S = tl.load(ids_ptr + slots_S, mask=slots_S < S, other=-1).to(tl.int32) - expert_start
    keep_S = (local_S >= 0) & (local_S < E)
    # rank of each slot among the earlier slots of this block with the same expert
    same_SS = (local_S[:, None] == local_S[None, :]) & (lanes_S[None, :] < lanes_S[:, None])
    rank_S = tl.sum(same_SS.to(tl.int32), axis=1)
    safe_S = tl.where(keep_S, local_S, 0)
    start_S = tl.load(start_ptr + safe_S, mask=keep_S, other=0)
    base_S = tl.load(base_ptr + pid * E + safe_S, mask=keep_S, other=0)
    tl.store(sorted_ptr + start_S + base_S + rank_S, slots_S, mask=keep_S)


@jit
def _align_one_launch_kernel(ids_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr, S,
                             num_rows, num_gemm_blocks, expert_start, E, block_m,
                             BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr,
                             BLOCK_B: tl.constexpr):
    # A single program, for few slots: everything moe_align returns, in one launch.
    lanes_S = tl.arange(0, BLOCK_S)
    cols_E = tl.arange(0, BLOCK_E)
    mask_E = cols_E < E
    for r0 in range(0, num_rows, BLOCK_S):  # the sentinel everywhere (the fill, fused)
        rows_S = r0 + lanes_S
        tl.store(sorted_ptr + rows_S, tl.zeros((BLOCK_S,), tl.int32) + S, mask=rows_S < num_rows)
    total_E = tl.zeros((BLOCK_E,), tl.int32)
    for s0 in range(0, S, BLOCK_S):
        slots_S = s0 + lanes_S
        local_S = tl.load(ids_ptr + slots_S, mask=slots_S < S, other=-1).to(tl.int32) - expert_start
        keep_S = (local_S >= 0) & (local_S < E)
        total_E += tl.sum(((local_S[:, None] == cols_E[None, :]) & keep_S[:, None]).to(tl.int32),
                          axis=0)
    start_E = _layout(total_E, mask_E, block_expert_ptr, num_padded_ptr, num_gemm_blocks,
                      block_m, BLOCK_E, BLOCK_B)
    # Other warps' sentinel stores may target the rows the slots go to: order them first.
    tl.debug_barrier()
    seen_E = tl.zeros((BLOCK_E,), tl.int32)  # slots of each expert in earlier chunks
    for s0 in range(0, S, BLOCK_S):
        slots_S = s0 + lanes_S
        local_S = tl.load(ids_ptr + slots_S, mask=slots_S < S, other=-1).to(tl.int32) - expert_start
        keep_S = (local_S >= 0) & (local_S < E)
        hits_SE = ((local_S[:, None] == cols_E[None, :]) & keep_S[:, None]).to(tl.int32)
        same_SS = (local_S[:, None] == local_S[None, :]) & (lanes_S[None, :] < lanes_S[:, None])
        rank_S = tl.sum(same_SS.to(tl.int32), axis=1)
        base_S = tl.sum(hits_SE * (start_E + seen_E)[None, :], axis=1)
        tl.store(sorted_ptr + base_S + rank_S, slots_S, mask=keep_S)
        seen_E += tl.sum(hits_SE, axis=0)


def moe_align(ids_TK: torch.Tensor, num_experts: int, block_m: int, *, expert_start: int = 0,
              num_local_experts: int | None = None, impl: str | None = None):
    """Group slots by expert with per-expert padding to block_m (see the module docstring).

    num_experts: the global expert count E; num_local_experts defaults to
    num_experts - expert_start. Returns (sorted_slots [R] int32, block_expert [R//block_m]
    int32 local ids or -1, num_padded [1] int32 tensor).
    """
    num_local = _check_args(ids_TK, num_experts, block_m, expert_start, num_local_experts)
    if resolve_impl(impl, ids_TK.device) == "torch":
        return reference_moe_align(ids_TK, num_experts, block_m, expert_start=expert_start,
                                   num_local_experts=num_local)
    device = ids_TK.device
    ids_S = ids_TK.reshape(-1).contiguous()
    num_slots = ids_S.numel()
    num_rows = max_padded_rows(num_slots, num_local, block_m)
    num_gemm_blocks = num_rows // block_m
    num_slot_blocks = triton.cdiv(num_slots, _BLOCK_S)
    block_expert = alloc((num_gemm_blocks,), torch.int32, device)
    num_padded = alloc((1,), torch.int32, device)
    BLOCK_E = next_pow2(num_local)
    if num_slots <= ONE_LAUNCH_MAX_SLOTS:
        sorted_slots = alloc((num_rows,), torch.int32, device)
        _align_one_launch_kernel[(1,)](ids_S, sorted_slots, block_expert, num_padded, num_slots,
                                       num_rows, num_gemm_blocks, expert_start, num_local,
                                       block_m, BLOCK_S=_BLOCK_S, BLOCK_E=BLOCK_E, BLOCK_B=64)
        return sorted_slots, block_expert, num_padded
    sorted_slots = torch.full((num_rows,), num_slots, dtype=torch.int32, device=device)
    counts = alloc((num_slot_blocks, num_local), torch.int32, device)
    base = alloc((num_slot_blocks, num_local), torch.int32, device)
    start_E = alloc((num_local,), torch.int32, device)
    _count_kernel[(num_slot_blocks,)](ids_S, counts, num_slots, expert_start, num_local,
                                      BLOCK_S=_BLOCK_S, BLOCK_E=BLOCK_E)
    _scan_kernel[(1,)](counts, base, start_E, block_expert, num_padded, num_slot_blocks,
                       num_gemm_blocks, num_local, block_m, BLOCK_E=BLOCK_E, BLOCK_B=64)
    _scatter_kernel[(num_slot_blocks,)](ids_S, base, start_E, sorted_slots, num_slots,
                                        expert_start, num_local, BLOCK_S=_BLOCK_S)
    return sorted_slots, block_expert, num_padded
