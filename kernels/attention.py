"""Paged attention: queries of B sequences against K/V read straight from the paged cache.

    out_TND = paged_attention(q_TND, k_cache, v_cache, table_BP, cu_q_B1, pos_T,
                              scale=D ** -0.5, window=0, max_q=max_new)

The cache is ``[num_blocks, block_size, N_kv, D]`` per layer (moerun.kvcache): position p
of sequence b lives in block ``table_BP[b, p // block_size]`` at row ``p % block_size``.
Sequence b's new tokens are rows ``[cu_q_B1[b], cu_q_B1[b + 1])`` of q; token t sits at
position ``pos_T[t]`` and attends to the keys at positions j with ``j <= pos_T[t]`` (causal,
over the cached and the new tokens alike, which must already be written) and, when
``window > 0``, ``pos_T[t] - j < window``. One call serves decode (one token per sequence),
chunked prefill and any mix (varlen). Query head h reads KV head ``h // (N_q / N_kv)``
(GQA / MQA); K and V are never repeated.

``sinks_N`` (optional, [N_q]): one extra logit per query head in the softmax denominator
with no value (GPT-OSS attention sinks), in the units of the scaled scores.

Numerics: scores, the running max / sum and the output accumulate in float32 (exp2 with
the scale folded in); the output is cast to q's dtype.

Triton path: one program per (sequence, tile of BLOCK_Q of its new tokens, KV head). Its
BLOCK_M rows are the tile's tokens times the G query heads that share the KV head, so one
K/V tile read from the cache serves all of them (GQA packing; decode fills a tile with the
G heads of one token). The program walks the keys [lo, max position of the tile] in
BLOCK_N steps (lo = 0, or the window's start), gathering each key's block from the block
table, with an online softmax. Tiles past a sequence's tokens return at once, so
``max_q`` (the grid) may exceed every sequence's count.

Split-KV (decode with few sequences: B x N_kv programs would leave most SMs idle): with
``num_splits`` > 1 each tile's key range is cut into that many equal pieces (on the device,
from the tile's own positions), each program writes its unnormalised float32 output and
its running max and sum, and a second kernel merges the pieces in a fixed order
(deterministic). ``num_splits=None`` picks it on CUDA from the grid, the SM count and
``max_kv`` (the longest sequence, a host int the caller knows). Any num_splits gives the
right result for any lengths (the pieces are cut on the device), so a CUDA graph may
replay the value it captured while the sequences grow.

Shape legend: T = new tokens, B = sequences, P = blocks per block table, N = heads
(N_q query, N_kv KV), D = head dim, G = N_q / N_kv, M = rows of a tile (tokens x G),
Kn = keys of a step.
"""
from __future__ import annotations

import functools
import math

import torch

from ._common import alloc, check_float, dot, jit, next_pow2, pre_round_bf16, resolve_impl
from ._common import round_bf16_by_hand, INTERPRETED, tl, triton

_LOG2E = 1.4426950408889634


def _check(q_TND, k_cache, v_cache, table_BP, cu_q_B1, pos_T, scale, window, sinks_N):
    if q_TND.dim() != 3:
        raise ValueError(f"q must be [T, N_q, D], got shape {tuple(q_TND.shape)}")
    check_float("q", q_TND)
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError("k_cache and v_cache must both be [num_blocks, block_size, N_kv, D] "
                         f"(one layer of KVCache), got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    T, Nq, D = q_TND.shape
    Nkv = k_cache.shape[2]
    if k_cache.shape[3] != D:
        raise ValueError(f"head dim of q ({D}) and of the cache ({k_cache.shape[3]}) differ")
    if Nkv < 1 or Nq % Nkv:
        raise ValueError(f"N_q={Nq} query heads must be a multiple of N_kv={Nkv} KV heads")
    if k_cache.dtype != q_TND.dtype or v_cache.dtype != q_TND.dtype:
        raise ValueError(f"q ({q_TND.dtype}) and the cache ({k_cache.dtype}, {v_cache.dtype}) "
                         "must share one dtype: cast q or build the cache in the model dtype")
    for name, t in (("table_BP", table_BP), ("cu_q_B1", cu_q_B1), ("pos_T", pos_T)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
    if table_BP.dim() != 2:
        raise ValueError(f"table_BP must be [B, P] block ids, got shape {tuple(table_BP.shape)}")
    if cu_q_B1.shape != (table_BP.shape[0] + 1,):
        raise ValueError(f"cu_q_B1 must be [B + 1] = [{table_BP.shape[0] + 1}] (row offsets of "
                         f"each sequence's tokens, 0 first), got {tuple(cu_q_B1.shape)}")
    if pos_T.shape != (T,):
        raise ValueError(f"pos_T must be [T] = [{T}] token positions, got {tuple(pos_T.shape)}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale={scale!r} must be a positive finite number (e.g. D ** -0.5)")
    if window < 0:
        raise ValueError(f"window={window} must be >= 0 (0 = no sliding window)")
    if sinks_N is not None and sinks_N.shape != (Nq,):
        raise ValueError(f"sinks_N must be [N_q] = [{Nq}] (one logit per query head), "
                         f"got {tuple(sinks_N.shape)}")
    devices = {t.device for t in (q_TND, k_cache, v_cache, table_BP, cu_q_B1, pos_T)}
    if len(devices) != 1:
        raise ValueError(f"all paged_attention inputs must be on one device, got {devices}")


def reference_paged_attention(q_TND, k_cache, v_cache, table_BP, cu_q_B1, pos_T, *, scale,
                              window=0, sinks_N=None):
    """The readable definition: per sequence, gather its K/V blocks, repeat KV heads, mask,
    softmax (with the sink logit when given) in float32 (float64 for float64 inputs)."""
    T, Nq, D = q_TND.shape
    block_size, Nkv = k_cache.shape[1], k_cache.shape[2]
    G = Nq // Nkv
    acc_dtype = torch.promote_types(q_TND.dtype, torch.float32)
    out_TND = torch.zeros(T, Nq, D, dtype=acc_dtype, device=q_TND.device)
    cu = cu_q_B1.tolist()
    for b in range(table_BP.shape[0]):
        rows = slice(cu[b], cu[b + 1])
        if cu[b + 1] <= cu[b]:
            continue
        qpos_n = pos_T[rows].long()
        L = int(qpos_n.max()) + 1
        blocks = table_BP[b, : -(-L // block_size)].long()
        k_LND = k_cache[blocks].reshape(-1, Nkv, D)[:L].to(acc_dtype).repeat_interleave(G, dim=1)
        v_LND = v_cache[blocks].reshape(-1, Nkv, D)[:L].to(acc_dtype).repeat_interleave(G, dim=1)
        s_NnL = torch.einsum("tnd,lnd->ntl", q_TND[rows].to(acc_dtype), k_LND) * scale
        kpos_L = torch.arange(L, device=q_TND.device)
        visible_nL = kpos_L[None, :] <= qpos_n[:, None]
        if window:
            visible_nL &= qpos_n[:, None] - kpos_L[None, :] < window
        s_NnL = s_NnL.masked_fill(~visible_nL[None], float("-inf"))
        if sinks_N is not None:
            sink_Nn1 = sinks_N.to(acc_dtype)[:, None, None].expand(-1, s_NnL.shape[1], 1)
            p_NnL = torch.softmax(torch.cat([s_NnL, sink_Nn1], dim=-1), dim=-1)[..., :L]
        else:
            p_NnL = torch.softmax(s_NnL, dim=-1)
        out_TND[rows] = torch.einsum("ntl,lnd->tnd", p_NnL, v_LND)
    return out_TND.to(q_TND.dtype)


@jit
def _paged_attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, table_ptr, cu_q_ptr, pos_ptr, sinks_ptr,
                            part_ptr, ml_ptr, qk_scale, window, num_q_tiles, num_splits, D,
                            stride_qt, stride_qn, stride_kb, stride_kr, stride_kn,
                            stride_vb, stride_vr, stride_vn, stride_ot, stride_on, stride_tb,
                            stride_ps, stride_pt, stride_ms, stride_mt,
                            BLOCK_SIZE: tl.constexpr, G: tl.constexpr, BLOCK_Q: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            HAS_SINKS: tl.constexpr, SPLIT: tl.constexpr, IEEE_F32: tl.constexpr,
                            ROUND_BF16: tl.constexpr):
    # SPLIT: program_id(2) takes piece program_id(2) of the key range and writes partials
    # (part: unnormalised output, ml: running max and sum) for _merge_splits_kernel
    seq = tl.program_id(0) // num_q_tiles
    tile = tl.program_id(0) % num_q_tiles
    kv_head = tl.program_id(1)
    q_lo = tl.load(cu_q_ptr + seq).to(tl.int32)
    q_hi = tl.load(cu_q_ptr + seq + 1).to(tl.int32)
    tok0 = q_lo + tile * BLOCK_Q
    if tok0 >= q_hi:
        return
    rows_M = tl.arange(0, BLOCK_M)
    tok_M = tok0 + rows_M // G
    row_ok_M = (rows_M // G < BLOCK_Q) & (tok_M < q_hi)
    head_M = kv_head * G + rows_M % G
    d_D = tl.arange(0, BLOCK_D)
    d_ok_D = d_D < D
    pos_M = tl.load(pos_ptr + tok_M, mask=row_ok_M, other=0).to(tl.int32)
    q_ptrs = (q_ptr + tok_M.to(tl.int64)[:, None] * stride_qt + head_M[:, None] * stride_qn
              + d_D[None, :])
    q_MD = tl.load(q_ptrs, mask=row_ok_M[:, None] & d_ok_D[None, :], other=0.0)
    hi = tl.max(tl.where(row_ok_M, pos_M, 0), axis=0) + 1  # keys [lo, hi) cover the tile
    first = tl.min(tl.where(row_ok_M, pos_M, 2147483647), axis=0)
    lo = tl.where(window > 0, tl.maximum(first - window + 1, 0) // BLOCK_N * BLOCK_N, 0)
    piece = tl.program_id(2)
    if SPLIT:  # this program's piece of [lo, hi), whole BLOCK_N steps; late pieces may be empty
        chunk = tl.cdiv(tl.cdiv(hi - lo, num_splits), BLOCK_N) * BLOCK_N
        lo = lo + piece * chunk
        hi = tl.minimum(hi, lo + chunk)
    m_M = tl.full((BLOCK_M,), -1.0e30, tl.float32)
    l_M = tl.zeros((BLOCK_M,), tl.float32)
    if HAS_SINKS:  # the sink is a key of logit sink and value 0: it starts the running sums
        sink_M = tl.load(sinks_ptr + head_M, mask=row_ok_M, other=0.0).to(tl.float32) * 1.4426950408889634
        m_M = tl.where(piece == 0, sink_M, m_M)  # counted once, in the first piece
        l_M = tl.where(piece == 0, 1.0, l_M)
    acc_MD = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    table_row = table_ptr + seq.to(tl.int64) * stride_tb
    for n0 in range(lo, hi, BLOCK_N):
        key_N = n0 + tl.arange(0, BLOCK_N)
        key_ok_N = key_N < hi
        block_N = tl.load(table_row + key_N // BLOCK_SIZE, mask=key_ok_N, other=0).to(tl.int64)
        row_N = (key_N % BLOCK_SIZE).to(tl.int64)
        kv_mask = key_ok_N[:, None] & d_ok_D[None, :]
        k_ND = tl.load(k_ptr + block_N[:, None] * stride_kb + row_N[:, None] * stride_kr
                       + kv_head * stride_kn + d_D[None, :], mask=kv_mask, other=0.0)
        s_MN = dot(q_MD, tl.trans(k_ND), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), IEEE_F32)
        s_MN = s_MN * qk_scale  # log2 units
        visible_MN = (key_N[None, :] <= pos_M[:, None]) & key_ok_N[None, :]
        if window > 0:
            visible_MN = visible_MN & (pos_M[:, None] - key_N[None, :] < window)
        s_MN = tl.where(visible_MN, s_MN, float("-inf"))
        m_new_M = tl.maximum(m_M, tl.max(s_MN, axis=1))
        alpha_M = tl.exp2(m_M - m_new_M)
        p_MN = tl.exp2(s_MN - m_new_M[:, None])
        l_M = l_M * alpha_M + tl.sum(p_MN, axis=1)
        v_ND = tl.load(v_ptr + block_N[:, None] * stride_vb + row_N[:, None] * stride_vr
                       + kv_head * stride_vn + d_D[None, :], mask=kv_mask, other=0.0)
        if IEEE_F32:  # p stays float32
            acc_MD = dot(p_MN, v_ND, acc_MD * alpha_M[:, None], IEEE_F32)
        else:  # p in the cache dtype for the tensor cores, float32 accumulation
            acc_MD = dot(p_MN.to(v_ND.dtype), v_ND, acc_MD * alpha_M[:, None], IEEE_F32)
        m_M = m_new_M
    if SPLIT:
        at_M = piece.to(tl.int64) * stride_ps + tok_M.to(tl.int64) * stride_pt + head_M * D
        tl.store(part_ptr + at_M[:, None] + d_D[None, :], acc_MD,
                 mask=row_ok_M[:, None] & d_ok_D[None, :])
        ml_M = piece.to(tl.int64) * stride_ms + tok_M.to(tl.int64) * stride_mt + head_M * 2
        tl.store(ml_ptr + ml_M, m_M, mask=row_ok_M)
        tl.store(ml_ptr + ml_M + 1, l_M, mask=row_ok_M)
    else:
        out_MD = acc_MD / tl.where(l_M > 0, l_M, 1.0)[:, None]  # l = 0 only on rows not stored
        out_ptrs = (out_ptr + tok_M.to(tl.int64)[:, None] * stride_ot + head_M[:, None] * stride_on
                    + d_D[None, :])
        tl.store(out_ptrs, pre_round_bf16(out_MD, ROUND_BF16).to(out_ptr.dtype.element_ty),
                 mask=row_ok_M[:, None] & d_ok_D[None, :])


@jit
def _merge_splits_kernel(part_ptr, ml_ptr, out_ptr, num_splits, Nq, D,
                         stride_ps, stride_pt, stride_ms, stride_mt, stride_ot, stride_on,
                         BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, ROUND_BF16: tl.constexpr):
    # One program per token: every head's pieces, rescaled to the common max, in piece order.
    tok = tl.program_id(0).to(tl.int64)
    h_H = tl.arange(0, BLOCK_H)
    d_D = tl.arange(0, BLOCK_D)
    h_ok_H = h_H < Nq
    mask_HD = h_ok_H[:, None] & (d_D < D)[None, :]
    ml_H = ml_ptr + tok * stride_mt + h_H * 2  # piece 0; pointers step by whole pieces
    max_H = tl.full((BLOCK_H,), -1.0e30, tl.float32)
    for _ in range(0, num_splits):
        max_H = tl.maximum(max_H, tl.load(ml_H, mask=h_ok_H, other=-1.0e30))
        ml_H += stride_ms
    ml_H = ml_ptr + tok * stride_mt + h_H * 2
    part_HD = part_ptr + tok * stride_pt + h_H[:, None] * D + d_D[None, :]
    sum_H = tl.zeros((BLOCK_H,), tl.float32)
    acc_HD = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
    for _ in range(0, num_splits):
        w_H = tl.exp2(tl.load(ml_H, mask=h_ok_H, other=-1.0e30) - max_H)
        sum_H += w_H * tl.load(ml_H + 1, mask=h_ok_H, other=0.0)
        acc_HD += w_H[:, None] * tl.load(part_HD, mask=mask_HD, other=0.0)
        ml_H += stride_ms
        part_HD += stride_ps
    out_HD = acc_HD / tl.where(sum_H > 0, sum_H, 1.0)[:, None]
    tl.store(out_ptr + tok * stride_ot + h_H[:, None] * stride_on + d_D[None, :],
             pre_round_bf16(out_HD, ROUND_BF16).to(out_ptr.dtype.element_ty), mask=mask_HD)


def _tiles(G: int, max_q: int, D: int):
    """(BLOCK_Q, BLOCK_M, BLOCK_N): tile rows = tokens x G heads, at least 16 (tl.dot)."""
    most = 16 if INTERPRETED else (128 if D <= 64 else 64)
    BLOCK_M = min(max(16, next_pow2(G * max_q)), max(most, next_pow2(G)))
    BLOCK_Q = max(1, BLOCK_M // G)
    BLOCK_N = 16 if INTERPRETED else (64 if D <= 128 else 32)
    return BLOCK_Q, BLOCK_M, BLOCK_N


_MIN_KEYS_PER_SPLIT = 256  # a piece shorter than this costs more to merge than it saves


@functools.lru_cache(maxsize=16)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(programs: int, num_sms: int, max_kv: int | None) -> int:
    """Pieces per key range: double while the grid is under two programs per SM and each
    piece keeps at least _MIN_KEYS_PER_SPLIT keys of the longest sequence (at most 16)."""
    splits = 1
    while (splits < 16 and programs * splits < 2 * num_sms
           and (max_kv is None or max_kv >= 2 * splits * _MIN_KEYS_PER_SPLIT)):
        splits *= 2
    return splits


def paged_attention(q_TND: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    table_BP: torch.Tensor, cu_q_B1: torch.Tensor, pos_T: torch.Tensor, *,
                    scale: float, window: int = 0, sinks_N: torch.Tensor | None = None,
                    max_q: int | None = None, max_kv: int | None = None,
                    num_splits: int | None = None, impl: str | None = None) -> torch.Tensor:
    """out_TND (q's dtype): causal paged attention of each new token (module docstring).

    max_q: the most new tokens of one sequence (sizes the grid; None reads it from cu_q_B1,
    a host sync). max_kv: the longest sequence's length, for choosing num_splits (None: not
    known). num_splits: split-KV pieces, None = chosen on CUDA, 1 under the interpreter.
    impl: None / "auto" / "triton" / "torch" as for every kernel.
    """
    _check(q_TND, k_cache, v_cache, table_BP, cu_q_B1, pos_T, scale, window, sinks_N)
    if resolve_impl(impl, q_TND.device) == "torch":
        return reference_paged_attention(q_TND, k_cache, v_cache, table_BP, cu_q_B1, pos_T,
                                         scale=scale, window=window, sinks_N=sinks_N)
    T, Nq, D = q_TND.shape
    B, Nkv = table_BP.shape[0], k_cache.shape[2]
    G = Nq // Nkv
    out_TND = alloc((T, Nq, D), q_TND.dtype, q_TND.device)
    if T == 0 or B == 0:
        return out_TND
    if max_q is None:
        max_q = int((cu_q_B1[1:] - cu_q_B1[:-1]).max())
    if max_q < 1:
        raise ValueError(f"max_q={max_q}: pass the most new tokens of one sequence (>= 1)")
    if q_TND.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("q and the caches need a contiguous head dim (stride 1 on D)")
    table_BP = table_BP.contiguous()
    BLOCK_Q, BLOCK_M, BLOCK_N = _tiles(G, max_q, D)
    num_q_tiles = triton.cdiv(max_q, BLOCK_Q)
    if num_splits is None:
        num_splits = 1 if q_TND.device.type != "cuda" else choose_num_splits(
            B * num_q_tiles * Nkv, _num_sms(q_TND.device), max_kv)
    if num_splits < 1:
        raise ValueError(f"num_splits={num_splits} must be >= 1 (or None to choose)")
    sinks = sinks_N.float().contiguous() if sinks_N is not None else q_TND  # unread if no sinks
    ieee = q_TND.dtype == torch.float32 or INTERPRETED
    BLOCK_D = max(16, next_pow2(D))
    rounding = round_bf16_by_hand(q_TND.dtype)
    split = num_splits > 1
    if split:  # float32 partials: unnormalised output and (max, sum) per piece, token, head
        part_PTND = alloc((num_splits, T, Nq, D), torch.float32, q_TND.device)
        ml_PTN2 = alloc((num_splits, T, Nq, 2), torch.float32, q_TND.device)
    else:
        part_PTND = ml_PTN2 = out_TND  # unused
    grid = (B * num_q_tiles, Nkv, num_splits)
    _paged_attention_kernel[grid](
        q_TND, k_cache, v_cache, out_TND, table_BP, cu_q_B1, pos_T, sinks, part_PTND, ml_PTN2,
        float(scale) * _LOG2E, int(window), num_q_tiles, num_splits, D,
        q_TND.stride(0), q_TND.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out_TND.stride(0),
        out_TND.stride(1), table_BP.stride(0),
        T * Nq * D, Nq * D, T * Nq * 2, Nq * 2,
        BLOCK_SIZE=k_cache.shape[1], G=G, BLOCK_Q=BLOCK_Q, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D, HAS_SINKS=sinks_N is not None, SPLIT=split, IEEE_F32=ieee,
        ROUND_BF16=rounding, num_warps=4, num_stages=2)
    if split:
        _merge_splits_kernel[(T,)](
            part_PTND, ml_PTN2, out_TND, num_splits, Nq, D, T * Nq * D, Nq * D, T * Nq * 2,
            Nq * 2, out_TND.stride(0), out_TND.stride(1), BLOCK_H=next_pow2(Nq),
            BLOCK_D=BLOCK_D, ROUND_BF16=rounding)
    return out_TND
