"""Fused MoE experts: grouped gate-up GEMM with SwiGLU, grouped down GEMM with the routing
weight, then the sum over the top-k choices.

    out_TH = fused_moe(x_TH, w13_EFH, w2_EHF, weights_TK, ids_TK)
    # expert parallel: this rank holds experts [start, start + E_local)
    out_TH = fused_moe(x_TH, w13_local, w2_local, weights_TK, ids_TK,
                       expert_start=start, num_local_experts=E_local)

For each token t and choice k with e = ids[t, k] (kept only if e is a local expert):
    out[t] += weights[t, k] * w2[e] @ (silu(gate[e] @ x[t]) * (up[e] @ x[t]))
where w13[e] = [gate (F rows); up (F rows)] (HF gate_proj / Mixtral w1, then up_proj / w3)
and w2[e] = down_proj. A token with no local choice gets zeros.

Variants (GPT-OSS): ``w13_bias [E, 2F]`` (gate then up) and ``w2_bias [E, H]`` are added
after their GEMMs, so the down bias is weighted by the routing weight like the rest of the
expert's output; ``activation="swiglu_oai"`` is the clamped SwiGLU
    g = min(gate, limit); u = clamp(up, -limit, limit); h = g * sigmoid(alpha * g) * (u + 1)
(``alpha``, ``limit`` from the checkpoint's config; ``activation="silu"`` is silu(gate) * up).

Numerics: products accumulate in float32; the SwiGLU activation is stored in x's dtype (as a
bf16 model would); each slot's weighted output is kept in float32 and the top-k sum is
float32, cast to x's dtype at the end. float32 GEMMs use IEEE fp32 (no TF32).
Pointer offsets are int64 wherever a row index multiplies a stride.

Triton path: moe_align groups the slots by expert (padding never reaches the output: rows
with the sentinel slot are masked), then three kernels: _gemm1_swiglu -> inter_SF,
_gemm2_weighted -> y_PSH (P = SPLIT_K float32 partials of the F reduction),
_topk_sum -> out_TH (sums the top-k slots and the partials). Each GEMM has its own tiles
from moe_config (the down projection's shape is the opposite of gate-up's). The variants are
constexpr flags of the GEMM epilogues (HAS_BIAS, SWIGLU_OAI): GEMM1 adds the gate/up bias
to its float32 accumulators before the activation, GEMM2 (its first split only) adds the
down bias before the routing-weight multiply; without them the kernels compile to the plain
SwiGLU's code.

Shape legend: T = tokens, K = top-k, S = T*K slots, E = local experts, H = hidden,
F = expert FFN width, M/N/Kb = tile rows / columns / reduction.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from . import cpu_ext, moe_config
from ._common import INTERPRETED, alloc, check_routed, dot, jit, resolve_impl
from ._common import pre_round_bf16, round_bf16_by_hand, tl, triton
from .align import moe_align


def _slots_by_expert(ids_TK, expert_start: int, num_local: int):
    """Token-slots (s = t * K + k) routed to a local expert, sorted by expert (stable), the
    local expert of each and the number of slots of each local expert:
    (slots_N, experts_N, counts_E)."""
    local_S = ids_TK.reshape(-1).long() - expert_start
    slots_N = torch.nonzero((local_S >= 0) & (local_S < num_local), as_tuple=True)[0]
    slots_N = slots_N[torch.argsort(local_S[slots_N], stable=True)]
    experts_N = local_S[slots_N]
    return slots_N, experts_N, torch.bincount(experts_N, minlength=num_local)


ACTIVATIONS = ("silu", "swiglu_oai")


@dataclasses.dataclass(frozen=True)
class ExpertAct:
    """How an expert turns its gate-up GEMM into the down GEMM's input, and its biases."""
    kind: str = "silu"  # "silu": silu(gate) * up; "swiglu_oai": GPT-OSS's clamped form
    alpha: float = 1.702
    limit: float = 7.0
    w13_bias: torch.Tensor | None = None  # [E, 2F]
    w2_bias: torch.Tensor | None = None   # [E, H]

    def glu(self, gate_up_NF2: torch.Tensor, F: int) -> torch.Tensor:
        gate, up = gate_up_NF2[:, :F], gate_up_NF2[:, F:]
        if self.kind == "silu":
            return torch.nn.functional.silu(gate) * up
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return gate * torch.sigmoid(gate * self.alpha) * (up + 1)

    @property
    def plain(self) -> bool:
        return self.kind == "silu" and self.w13_bias is None and self.w2_bias is None


PLAIN = ExpertAct()


def _expert_loop(x_TH, w13_EFH, w2_EHF, weights_TK, ids_TK, expert_start, compute_dtype, act=PLAIN):
    """Group the token-slots by expert (one sort), run each local expert's SwiGLU FFN on
    its contiguous rows, and add the weighted rows back to their tokens in one pass."""
    T, H = x_TH.shape
    E, F = w13_EFH.shape[0], w13_EFH.shape[1] // 2
    K = ids_TK.shape[1]
    slots_N, _, counts_E = _slots_by_expert(ids_TK, expert_start, E)
    counts = counts_E.tolist()
    x_NH = x_TH[slots_N // K].to(compute_dtype)
    y_NH = torch.empty((slots_N.numel(), H), dtype=torch.float32, device=x_TH.device)
    b13 = act.w13_bias.to(compute_dtype) if act.w13_bias is not None else None
    b2 = act.w2_bias.to(compute_dtype) if act.w2_bias is not None else None
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = slice(start, start + n)
        gate_up = torch.nn.functional.linear(x_NH[rows], w13_EFH[e].to(compute_dtype),
                                             b13[e] if b13 is not None else None)
        h_NF = act.glu(gate_up, F).to(x_TH.dtype).to(compute_dtype)
        y_NH[rows] = torch.nn.functional.linear(h_NF, w2_EHF[e].to(compute_dtype),
                                                b2[e] if b2 is not None else None).float()
        start += n
    y_NH *= weights_TK.reshape(-1)[slots_N].float()[:, None]
    out_TH = torch.zeros((T, H), dtype=torch.float32, device=x_TH.device)
    out_TH.index_add_(0, slots_N // K, y_NH)
    return out_TH.to(x_TH.dtype)


def reference_fused_moe(x_TH, w13_EFH, w2_EHF, weights_TK, ids_TK, *, expert_start=0, act: ExpertAct = PLAIN):
    """The readable definition: loop over local experts, matmuls in float32, the SwiGLU
    activation rounded to x's dtype like the kernel stores it, float32 top-k sum."""
    return _expert_loop(x_TH, w13_EFH, w2_EHF, weights_TK, ids_TK, expert_start, torch.float32, act)


# Slots per local expert below which the C kernel (or, without it, the gather-GEMV) is used on
# CPU. Gather-GEMV against torch._grouped_mm: 2.5x faster at 1 slot per expert, level at 16 and
# 0.64x at 64 (2-core AMD EPYC, fp32, E=64 H=128 F=256; `python scripts/bench_kernels.py --cpu`).
# The C kernel against the grouped path (2-core Intel Xeon, fp32, E=64, top-2): H = F = 1024
# 19.9 vs 31.0 ms at 32 tokens, 75 vs 84 ms at 512, 125 vs 108 ms at 1024 (16 and 32 slots
# per expert); H = 128, F = 256: 0.65 vs 0.93 ms at 32 tokens, 4.3 vs 4.9 ms at 512.
GEMV_MAX_SLOTS_PER_EXPERT = 24
# The AVX-512 build of the C kernel takes an expert's slots 64 at a time through register tiles
# and is ahead of grouped_mm at every size measured (2-core Intel Xeon, fp32, E = 64, top-2):
# H = 128, F = 256: 1.96 vs 4.18 ms at 32 slots per expert, 7.6 vs 14.2 at 128; H = F = 1024:
# 74 vs 87 ms at 24, 142 vs 162 at 64. There it is taken at any count.


def ext_max_slots_per_expert() -> float:
    """Slots per local expert (on average) below which ``torch_fused_moe`` takes the C kernel:
    no bound for its AVX-512 build, GEMV_MAX_SLOTS_PER_EXPERT otherwise."""
    return math.inf if cpu_ext.vector_width() == 16 else GEMV_MAX_SLOTS_PER_EXPERT


# Expert size (gate, up and down weights, bytes) above which grouped_mm wins even at one slot
# per expert: the gather-GEMV streams an expert once per slot, grouped_mm once per expert, and
# for large experts the saved bytes outweigh grouped_mm's per-call cost. 2-core Intel Xeon,
# fp32, E = 64, top-2, 32 tokens: H = F = 1024 (12 MiB) grouped 28 ms vs gather-GEMV 43 ms,
# H = F = 512 (3 MiB) 7.4 vs 8.1, H = 256 F = 512 (1.5 MiB) 2.8 vs 2.4, E = 128 top-8
# H = 512 F = 256 (1.5 MiB) 14.8 vs 11.7, the tiny preset's 0.4 MiB 1.3 vs 1.0.
GEMV_MAX_EXPERT_BYTES = 2 * 2**20


def _k_major(w_EnK: torch.Tensor):
    """w as a table of reduction rows, ``[E * K, N]`` with rows contiguous, when its memory
    is K-major (``w.transpose(1, 2)`` contiguous, the layout the model stores); else None."""
    t = w_EnK.transpose(1, 2)
    return t.reshape(-1, t.shape[2]) if t.is_contiguous() else None


def _gather_gemv(x_NK: torch.Tensor, table_XN: torch.Tensor, e_N: torch.Tensor) -> torch.Tensor:
    """Row n of the result is ``x[n] @ W[e[n]]`` where W[e] is rows ``[e*K, (e+1)*K)`` of the
    table: one ``embedding_bag`` (sum, per-sample weights = x) streams each slot's expert rows
    once, in parallel over slots, with no per-expert call and no weight copy."""
    Kd = x_NK.shape[1]
    rows_NK = e_N[:, None] * Kd + torch.arange(Kd, device=x_NK.device)
    return torch.nn.functional.embedding_bag(rows_NK, table_XN, mode="sum", per_sample_weights=x_NK)


def torch_fused_moe(x_TH, w13_EFH, w2_EHF, weights_TK, ids_TK, *, expert_start=0, path=None,
                    act: ExpertAct = PLAIN):
    """The fast path of ``impl="torch"`` on CPU float32:
    - fewer than ``ext_max_slots_per_expert()`` slots per local expert on average (decode;
      any number with the AVX-512 build) and the C kernel built (``cpu_ext``): one C call
      streams each routed expert's weights once per 64 slots;
    - else the reference's sort, then with few slots per expert, small experts
      (GEMV_MAX_EXPERT_BYTES) and K-major weights one gather-GEMV per projection
      (``_gather_gemv``), which streams the routed experts' weights once per slot;
    - otherwise one ``torch._grouped_mm`` per projection over all local experts.
    Elsewhere (another device or dtype, or no ``_grouped_mm``) it is the reference.
    ``path`` = "ext", "gemv" or "grouped" forces one (benchmarks, tests): "ext" needs the C
    kernel, "gemv" K-major weights, "grouped" a torch with ``_grouped_mm`` (e.g. bf16 on a GPU)."""
    if path not in (None, "ext", "gemv", "grouped"):
        raise ValueError(f"path={path!r}: use None (choose by slots per expert), 'ext', 'gemv' or 'grouped'")
    cpu_f32 = x_TH.device.type == "cpu" and x_TH.dtype == torch.float32
    if path == "ext" or (path is None and cpu_f32 and x_TH.shape[0] > 0
                         and x_TH.shape[0] * ids_TK.shape[1] < ext_max_slots_per_expert() * w13_EFH.shape[0]):
        if cpu_ext.supports(x_TH, w13_EFH, w2_EHF, act) and cpu_ext.available():
            return cpu_ext.moe_experts(x_TH, w13_EFH, w2_EHF, weights_TK, ids_TK, expert_start, act)
        if path == "ext":
            raise ValueError("path='ext' needs the CPU expert kernel (" + (cpu_ext.unavailable_reason() or
                             "CPU float32, K-major experts, silu or swiglu_oai, contiguous float32 biases") + ")")
    grouped = getattr(torch, "_grouped_mm", None)
    if grouped is None or x_TH.shape[0] == 0 or not (cpu_f32 or path == "grouped"):
        return reference_fused_moe(x_TH, w13_EFH, w2_EHF, weights_TK, ids_TK, expert_start=expert_start, act=act)
    T, H = x_TH.shape
    E, F = w13_EFH.shape[0], w13_EFH.shape[1] // 2
    K = ids_TK.shape[1]
    slots_N, e_N, counts_E = _slots_by_expert(ids_TK, expert_start, E)
    x_NH = x_TH[slots_N // K]
    w13_table, w2_table = _k_major(w13_EFH), _k_major(w2_EHF)
    k_major = w13_table is not None and w2_table is not None
    if path == "gemv" and not k_major:
        raise ValueError("path='gemv' needs K-major experts: w13.transpose(1, 2) and w2.transpose(1, 2) contiguous")
    expert_bytes = (w13_EFH[0].numel() + w2_EHF[0].numel()) * w13_EFH.element_size()
    few = slots_N.numel() < GEMV_MAX_SLOTS_PER_EXPERT * E and expert_bytes <= GEMV_MAX_EXPERT_BYTES
    if path == "gemv" or (path is None and k_major and few):
        def gemm(a, table, w):
            return _gather_gemv(a, table, e_N)
    else:
        ends_E = torch.cumsum(counts_E, 0).to(torch.int32)

        def gemm(a, table, w):
            return grouped(a, w.transpose(1, 2), offs=ends_E)
    gate_up = gemm(x_NH, w13_table, w13_EFH)  # [N, 2F]
    if act.w13_bias is not None:
        gate_up = gate_up + act.w13_bias[e_N]
    y_NH = gemm(act.glu(gate_up, F), w2_table, w2_EHF)
    if act.w2_bias is not None:
        y_NH = y_NH + act.w2_bias[e_N]
    y_NH = y_NH.float() * weights_TK.reshape(-1)[slots_N][:, None]
    out_TH = torch.zeros((T, H), dtype=torch.float32, device=x_TH.device)
    out_TH.index_add_(0, slots_N // K, y_NH)
    return out_TH.to(x_TH.dtype)


def reference_moe_loop(x_TH, w13_EFH, w2_EHF, weights_TK, ids_TK, *, expert_start=0):
    """The plain per-expert PyTorch loop in x's dtype (the benchmark baseline)."""
    return _expert_loop(x_TH, w13_EFH, w2_EHF, weights_TK, ids_TK, expert_start, x_TH.dtype)


@jit
def _block_ids(num_blocks_m, num_blocks_n, GROUP_M: tl.constexpr):
    # Grouped launch order: GROUP_M row blocks sweep all column blocks together (L2 reuse).
    pid = tl.program_id(0)
    per_group = GROUP_M * num_blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_blocks_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_m, (pid % per_group) // group_m


@jit
def _gemm1_swiglu_kernel(x_ptr, w13_ptr, inter_ptr, sorted_ptr, block_expert_ptr, b13_ptr,
                         num_blocks_m, S, top_k, F, H,
                         stride_xt, stride_xh, stride_we, stride_wn, stride_wh, stride_is, stride_be,
                         alpha, limit,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr, IEEE_F32: tl.constexpr, ROUND_BF16: tl.constexpr,
                         HAS_BIAS: tl.constexpr, SWIGLU_OAI: tl.constexpr):
    pid_m, pid_n = _block_ids(num_blocks_m, tl.cdiv(F, BLOCK_N), GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    slot_M = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok_M = slot_M < S  # the sentinel slot S marks padding
    tok_M = slot_M // top_k
    n_N = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok_N = n_N < F
    k_Kb = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok_M[:, None] * stride_xt + k_Kb[None, :] * stride_xh
    gate_ptrs = (w13_ptr + expert * stride_we + n_N.to(tl.int64)[None, :] * stride_wn
                 + k_Kb[:, None] * stride_wh)
    up_ptrs = gate_ptrs + F * stride_wn
    gate_MN = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    up_MN = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_ok_Kb = k_Kb < H - k0
        x_MK = tl.load(x_ptrs, mask=row_ok_M[:, None] & k_ok_Kb[None, :], other=0.0)
        w_mask = k_ok_Kb[:, None] & n_ok_N[None, :]
        gate_MN = dot(x_MK, tl.load(gate_ptrs, mask=w_mask, other=0.0), gate_MN, IEEE_F32)
        up_MN = dot(x_MK, tl.load(up_ptrs, mask=w_mask, other=0.0), up_MN, IEEE_F32)
        x_ptrs += BLOCK_K * stride_xh
        gate_ptrs += BLOCK_K * stride_wh
        up_ptrs += BLOCK_K * stride_wh
    if HAS_BIAS:  # b13[expert] = [gate bias (F); up bias (F)], added before the activation
        b_ptrs = b13_ptr + expert * stride_be + n_N
        gate_MN += tl.load(b_ptrs, mask=n_ok_N, other=0.0).to(tl.float32)[None, :]
        up_MN += tl.load(b_ptrs + F, mask=n_ok_N, other=0.0).to(tl.float32)[None, :]
    if SWIGLU_OAI:  # GPT-OSS: clamped gate and up, gate * sigmoid(alpha * gate) * (up + 1)
        gate_MN = tl.minimum(gate_MN, limit)
        up_MN = tl.minimum(tl.maximum(up_MN, -limit), limit)
        h_MN = gate_MN / (1.0 + tl.exp(-alpha * gate_MN)) * (up_MN + 1.0)
    else:
        h_MN = gate_MN / (1.0 + tl.exp(-gate_MN)) * up_MN  # SwiGLU: silu(gate) * up
    out_ptrs = inter_ptr + slot_M[:, None] * stride_is + n_N[None, :]
    tl.store(out_ptrs, pre_round_bf16(h_MN, ROUND_BF16).to(inter_ptr.dtype.element_ty),
             mask=row_ok_M[:, None] & n_ok_N[None, :])


@jit
def _gemm2_weighted_kernel(inter_ptr, w2_ptr, y_ptr, weights_ptr, sorted_ptr, block_expert_ptr, b2_ptr,
                           num_blocks_m, S, F, H, split_len,
                           stride_is, stride_we, stride_wh, stride_wf, stride_ys, stride_yp, stride_be,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_M: tl.constexpr, IEEE_F32: tl.constexpr,
                           ROUND_BF16: tl.constexpr, HAS_BIAS: tl.constexpr):
    # program_id(1) = the split: F rows [split * split_len, (split + 1) * split_len) of the
    # reduction, written to partial y[split] (split_len is a multiple of BLOCK_K)
    pid_m, pid_n = _block_ids(num_blocks_m, tl.cdiv(H, BLOCK_N), GROUP_M)
    k_begin = tl.program_id(1) * split_len
    k_end = tl.minimum(F, k_begin + split_len)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    slot_M = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok_M = slot_M < S
    n_N = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok_N = n_N < H
    k_Kb = tl.arange(0, BLOCK_K)
    a_ptrs = inter_ptr + slot_M[:, None] * stride_is + (k_begin + k_Kb)[None, :]
    b_ptrs = (w2_ptr + expert * stride_we + n_N.to(tl.int64)[None, :] * stride_wh
              + (k_begin + k_Kb)[:, None].to(tl.int64) * stride_wf)
    acc_MN = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_ok_Kb = k_Kb < k_end - k0
        a_MK = tl.load(a_ptrs, mask=row_ok_M[:, None] & k_ok_Kb[None, :], other=0.0)
        b_KN = tl.load(b_ptrs, mask=k_ok_Kb[:, None] & n_ok_N[None, :], other=0.0)
        acc_MN = dot(a_MK, b_KN, acc_MN, IEEE_F32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_wf
    if HAS_BIAS:  # the down bias belongs to the expert's output: weighted with it below; split 0 adds it
        first = (tl.program_id(1) == 0).to(tl.float32)
        acc_MN += first * tl.load(b2_ptr + expert * stride_be + n_N, mask=n_ok_N, other=0.0).to(tl.float32)[None, :]
    w_M = tl.load(weights_ptr + slot_M, mask=row_ok_M, other=0.0).to(tl.float32)
    y_ptr += tl.program_id(1).to(tl.int64) * stride_yp
    tl.store(y_ptr + slot_M[:, None] * stride_ys + n_N[None, :], acc_MN * w_M[:, None],
             mask=row_ok_M[:, None] & n_ok_N[None, :])


@jit
def _topk_sum_kernel(y_ptr, ids_ptr, out_ptr, T, H, top_k, expert_start, num_local, num_splits,
                     stride_ys, stride_yp, stride_ot, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                     ROUND_BF16: tl.constexpr):
    t_T = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h_H = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_ok_T = t_T < T
    h_ok_H = h_H < H
    acc_TH = tl.zeros((BLOCK_T, BLOCK_H), tl.float32)
    for j in range(0, top_k):
        slot_T = t_T.to(tl.int64) * top_k + j
        local_T = tl.load(ids_ptr + slot_T, mask=t_ok_T, other=-1).to(tl.int64) - expert_start
        mine_T = t_ok_T & (local_T >= 0) & (local_T < num_local)  # rows of other ranks: unset
        y_ptrs = y_ptr + slot_T[:, None] * stride_ys + h_H[None, :]
        for _ in range(0, num_splits):  # GEMM2's split-K partials, in a fixed order
            acc_TH += tl.load(y_ptrs, mask=mine_T[:, None] & h_ok_H[None, :], other=0.0)
            y_ptrs += stride_yp
    tl.store(out_ptr + t_T.to(tl.int64)[:, None] * stride_ot + h_H[None, :],
             pre_round_bf16(acc_TH, ROUND_BF16).to(out_ptr.dtype.element_ty),
             mask=t_ok_T[:, None] & h_ok_H[None, :])


def _bias_rows(bias_EN):
    """A bias [E, N] with unit column stride (what the epilogues index), or None."""
    if bias_EN is None or bias_EN.stride(1) == 1:
        return bias_EN
    return bias_EN.contiguous()


def _check_act(act: ExpertAct, w13_EFH, w2_EHF, dtype):
    if act.kind not in ACTIVATIONS:
        raise ValueError(f"activation {act.kind!r} is not one of {', '.join(ACTIVATIONS)}")
    E, F2, H = w13_EFH.shape
    for name, b, shape in (("w13_bias", act.w13_bias, (E, F2)), ("w2_bias", act.w2_bias, (E, H))):
        if b is not None and (tuple(b.shape) != shape or b.dtype != dtype or b.device != w13_EFH.device):
            raise ValueError(f"{name} must be [{shape[0]}, {shape[1]}] {dtype} on {w13_EFH.device}; got "
                             f"{list(b.shape)} {b.dtype} on {b.device}")


def _check(x_TH, w13_EFH, w2_EHF, weights_TK, ids_TK, expert_start, num_local_experts):
    check_routed(x_TH, weights_TK, ids_TK)
    T, H = x_TH.shape
    if w13_EFH.dim() != 3 or w2_EHF.dim() != 3:
        raise ValueError(f"w13 must be [E, 2F, H] and w2 [E, H, F]; got {tuple(w13_EFH.shape)} "
                         f"and {tuple(w2_EHF.shape)}")
    E, F2, H1 = w13_EFH.shape
    if F2 % 2 or H1 != H or tuple(w2_EHF.shape) != (E, H, F2 // 2):
        raise ValueError(
            f"expert weights do not fit x [T={T}, H={H}]: need w13 [E, 2F, {H}] (gate rows then "
            f"up rows) and w2 [E, {H}, F]; got w13 {tuple(w13_EFH.shape)}, "
            f"w2 {tuple(w2_EHF.shape)}")
    if w13_EFH.dtype != x_TH.dtype or w2_EHF.dtype != x_TH.dtype:
        raise ValueError(f"x, w13, w2 must share one dtype; got {x_TH.dtype}, "
                         f"{w13_EFH.dtype}, {w2_EHF.dtype}: cast the activations or weights")
    if weights_TK.shape != ids_TK.shape or weights_TK.shape[0] != T:
        raise ValueError(f"weights_TK {tuple(weights_TK.shape)} and ids_TK "
                         f"{tuple(ids_TK.shape)} must both be [T={T}, K]")
    devices = {t.device for t in (x_TH, w13_EFH, w2_EHF, weights_TK, ids_TK)}
    if len(devices) != 1:
        raise ValueError(f"all fused_moe inputs must be on one device, got {devices}")
    if num_local_experts is not None and num_local_experts != E:
        raise ValueError(f"num_local_experts={num_local_experts} but w13/w2 hold {E} experts; "
                         "pass only this rank's experts, stacked")
    if expert_start < 0:
        raise ValueError(f"expert_start={expert_start} must be >= 0")


def fused_moe(x_TH: torch.Tensor, w13_EFH: torch.Tensor, w2_EHF: torch.Tensor,
              weights_TK: torch.Tensor, ids_TK: torch.Tensor, *, expert_start: int = 0,
              num_local_experts: int | None = None, impl: str | None = None,
              config: moe_config.MoeTileConfig | None = None, act: ExpertAct = PLAIN) -> torch.Tensor:
    """out_TH (x's dtype) = sum over kept choices of weight * expert_e(x) (module docstring).

    w13_EFH [E_local, 2F, H], w2_EHF [E_local, H, F]: the experts expert_start ...
    expert_start + E_local - 1 (all experts when expert_start = 0 and E_local = E).
    ids_TK hold GLOBAL expert ids; ids outside the local range contribute nothing.
    config: tile override (the tuner uses it); None = moe_config.get_config.
    act: the activation and expert biases (``ExpertAct``; default silu(gate) * up, no bias).
    """
    _check(x_TH, w13_EFH, w2_EHF, weights_TK, ids_TK, expert_start, num_local_experts)
    _check_act(act, w13_EFH, w2_EHF, x_TH.dtype)
    if resolve_impl(impl, x_TH.device) == "torch":
        return torch_fused_moe(x_TH, w13_EFH, w2_EHF, weights_TK, ids_TK, expert_start=expert_start, act=act)
    T, H = x_TH.shape
    E, F = w13_EFH.shape[0], w13_EFH.shape[1] // 2
    top_k = ids_TK.shape[1]
    S = T * top_k
    device = x_TH.device
    out_TH = alloc((T, H), x_TH.dtype, device)
    if T == 0:
        return out_TH
    cfg = config or moe_config.get_config(T, top_k, E, F, H, x_TH.dtype, device, INTERPRETED)
    sorted_slots, block_expert, _ = moe_align(ids_TK, expert_start + E, cfg.BLOCK_M,
                                              expert_start=expert_start, num_local_experts=E,
                                              impl="triton")
    num_blocks_m = block_expert.numel()
    weights_S = weights_TK.reshape(-1)
    if weights_S.dtype != torch.float32 or not weights_S.is_contiguous():
        weights_S = weights_S.float().contiguous()
    ids_S = ids_TK.reshape(-1).contiguous()
    cfg2 = cfg.for_gemm2()
    # split_len: F rows per split, whole BLOCK_K steps; trailing empty splits write zeros
    split_len = triton.cdiv(triton.cdiv(F, cfg2.SPLIT_K), cfg2.BLOCK_K) * cfg2.BLOCK_K
    inter_SF = alloc((S, F), x_TH.dtype, device)
    y_PSH = alloc((cfg2.SPLIT_K, S, H), torch.float32, device)
    ieee = x_TH.dtype == torch.float32 or (INTERPRETED and x_TH.dtype == torch.bfloat16)

    def tiles(c):
        return dict(BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, BLOCK_K=c.BLOCK_K, GROUP_M=c.GROUP_M,
                    IEEE_F32=ieee, ROUND_BF16=round_bf16_by_hand(x_TH.dtype),
                    num_warps=c.num_warps, num_stages=c.num_stages)
    # The epilogue variants are constexpr flags: the plain SwiGLU compiles to the same code
    # with or without them; a missing bias passes the weights as a never-read pointer.
    b13, b2 = _bias_rows(act.w13_bias), _bias_rows(act.w2_bias)
    grid1 = (num_blocks_m * triton.cdiv(F, cfg.BLOCK_N),)
    _gemm1_swiglu_kernel[grid1](
        x_TH, w13_EFH, inter_SF, sorted_slots, block_expert, w13_EFH if b13 is None else b13,
        num_blocks_m, S, top_k, F, H,
        x_TH.stride(0), x_TH.stride(1), w13_EFH.stride(0), w13_EFH.stride(1), w13_EFH.stride(2),
        inter_SF.stride(0), 0 if b13 is None else b13.stride(0), float(act.alpha), float(act.limit),
        HAS_BIAS=b13 is not None, SWIGLU_OAI=act.kind == "swiglu_oai", **tiles(cfg))
    grid2 = (num_blocks_m * triton.cdiv(H, cfg2.BLOCK_N), cfg2.SPLIT_K)
    _gemm2_weighted_kernel[grid2](
        inter_SF, w2_EHF, y_PSH, weights_S, sorted_slots, block_expert, w2_EHF if b2 is None else b2,
        num_blocks_m, S, F, H, split_len,
        inter_SF.stride(0), w2_EHF.stride(0), w2_EHF.stride(1), w2_EHF.stride(2),
        y_PSH.stride(1), y_PSH.stride(0), 0 if b2 is None else b2.stride(0), HAS_BIAS=b2 is not None,
        **tiles(cfg2))
    BLOCK_T, BLOCK_H = 4, min(1024, triton.next_power_of_2(H))
    grid3 = (triton.cdiv(T, BLOCK_T), triton.cdiv(H, BLOCK_H))
    _topk_sum_kernel[grid3](y_PSH, ids_S, out_TH, T, H, top_k, expert_start, E, cfg2.SPLIT_K,
                            y_PSH.stride(1), y_PSH.stride(0), out_TH.stride(0), BLOCK_T=BLOCK_T,
                            BLOCK_H=BLOCK_H, ROUND_BF16=round_bf16_by_hand(x_TH.dtype))
    return out_TH
