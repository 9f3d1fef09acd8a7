"""Grouped-query attention with heads split over TP, q/k norms, RoPE and a KV cache.

``AttnMeta`` describes one forward: the new tokens of B sequences concatenated into T
rows. Its tensors are views of one int64 buffer that reached the device in one
non-blocking copy (``AttnMeta.build``). When the kernels run Triton (CUDA, or
``set_default_impl("triton")`` under the interpreter), ``kernels.paged_attention`` reads K/V
straight from the cache's blocks (varlen, GQA without repeating K/V). On CPU, steps of at
most ``CPU_KERNEL_MAX_NEW`` new tokens per sequence (decode, short chunks) go to the C
kernel of ``kernels.cpu_ext`` (the same semantics, in place on the cache, float32), when it
is built; otherwise queries are scattered into a padded ``[B, Nq, ...]`` block so one
``scaled_dot_product_attention`` call per layer serves prefill, decode and any mix, under a
mask built on the device from ``starts_B`` and ``lens_B``.

Shape legend: T = new tokens, B = sequences, P = blocks per block table, Nq = most new
tokens of one sequence, L = longest cached length, N = heads (local), D = head dim.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..comm import Comm
from ..config import ModelConfig
from ..profile import NULL_PROFILER
from ..weights_spec import TensorSpec, rows
from .layers import FusedLinear, Linear, RMSNorm, apply_rope

cpu_ext = kernels.cpu_ext
# On CPU, steps whose sequences add at most this many tokens each (decode, short prefill
# chunks) run attention in the C kernel (kernels/csrc/moe_cpu.c: K/V read in place from the
# cache); longer prefills keep PyTorch's SDPA on the gathered blocks.
CPU_KERNEL_MAX_NEW = 64


@dataclass
class AttnMeta:
    slot_T: torch.Tensor  # flat KV cache slot each new token is written to
    pos_T: torch.Tensor  # position of each new token
    table_BP: torch.Tensor  # each sequence's block table, padded with block 0 (masked)
    pad_index_T: torch.Tensor  # where each token sits in the flat [B * Nq] query block
    starts_B: torch.Tensor  # first new position of each sequence (int64, on the device)
    lens_B: torch.Tensor  # new tokens of each sequence (int64, on the device)
    starts: list[int]  # the same two on the host (shapes, batch size)
    lens: list[int]
    max_new: int
    max_len: int
    uniform: bool  # every sequence has max_new new tokens: the query block needs no padding
    ids_T: torch.Tensor | None = None  # the step's token ids, when ``build`` was given them
    rows_R: torch.Tensor | None = None  # the rows whose logits are sampled, when given
    _masks: dict = field(default_factory=dict)
    _cu_q: torch.Tensor | None = None

    @staticmethod
    def build(block_tables: list[list[int]], starts: list[int], lens: list[int], block_size: int,
              device, ids: list[int] | None = None, rows: list[int] | None = None) -> "AttnMeta":
        """New tokens ``[start, start + len)`` of each sequence; its KV lives in the blocks
        of its block table. ``ids`` (the new tokens' ids) and ``rows`` (the rows to sample)
        travel in the same copy. Every int of the step is laid out on the host in one int64
        buffer (pinned on CUDA) and reaches the device in one non-blocking copy; the
        tensors are views of it."""
        B, T = len(lens), sum(lens)
        max_new = max(lens, default=0)
        max_len = max((s + n for s, n in zip(starts, lens)), default=0)
        nblk = max(-(-max_len // block_size), 1)  # the blocks that hold positions [0, max_len)
        pos, slot, pad, table = [], [], [], []
        for b, (table_b, s, n) in enumerate(zip(block_tables, starts, lens)):
            pos.extend(range(s, s + n))
            pad.extend(range(b * max_new, b * max_new + n))
            for i in range(s // block_size, -(-(s + n) // block_size)):  # the blocks the new tokens fill
                lo, hi = max(s, i * block_size), min(s + n, (i + 1) * block_size)
                base = table_b[i] * block_size - i * block_size
                slot.extend(range(base + lo, base + hi))
            t = list(table_b[:nblk])
            table.extend(t + [0] * (nblk - len(t)))
        sizes = (len(ids or ()), T, T, T, B, B, len(rows or ()), B * nblk)
        dev = to_device([ids or (), slot, pos, pad, starts, lens, rows or (), table], device)
        ids_T, slot_T, pos_T, pad_T, starts_B, lens_B, rows_R, table_flat = dev.split(sizes)
        return AttnMeta(slot_T, pos_T, table_flat.view(B, nblk), pad_T, starts_B, lens_B, list(starts), list(lens),
                        max_new, max_len, all(n == max_new for n in lens),
                        ids_T if ids is not None else None, rows_R if rows is not None else None)

    def mask(self, window: int) -> torch.Tensor:
        """[B, 1, Nq, L] bool, True = may attend: causal, within the sequence, in the window.
        Built on the device from ``starts_B`` and ``lens_B`` (no host data)."""
        if window not in self._masks:
            dev = self.pos_T.device
            starts = self.starts_B[:, None, None]
            lens = self.lens_B[:, None, None]
            j = torch.arange(self.max_new, device=dev)[None, :, None]
            kpos = torch.arange(self.max_len, device=dev)[None, None, :]
            qpos = starts + j
            m = (kpos <= qpos) & (j < lens)
            if window:
                m &= qpos - kpos < window
            m[:, :, 0] |= ~(j < lens)[:, :, 0]  # padded query rows: attend to one key, not NaN
            self._masks[window] = m[:, None]
        return self._masks[window]


    def cu_q(self) -> torch.Tensor:
        """[B + 1] int32 on the tokens' device: sequence b's new tokens are rows
        [cu_q[b], cu_q[b + 1]) (what the paged kernel takes): the running sum of ``lens_B``,
        once per forward, without a host sync."""
        if self._cu_q is None:
            self._cu_q = torch.nn.functional.pad(self.lens_B.cumsum(0), (1, 0)).to(torch.int32)
        return self._cu_q


def to_device(parts, device) -> torch.Tensor:
    """The int sequences ``parts`` concatenated as one int64 tensor on ``device``: built once on
    the host (pinned when the device is a GPU) and copied with ``non_blocking=True``, so
    the host never waits for the device here. On the CPU the host tensor is the result."""
    device = torch.device(device)
    flat = [v for p in parts for v in p]
    if device.type != "cuda":
        return torch.tensor(flat, dtype=torch.long)
    host = torch.tensor(flat, dtype=torch.long, pin_memory=True)
    return host.to(device, non_blocking=True)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, comm: Comm, layer: int, dtype=None):
        super().__init__()
        r, D = comm.tp_rank, cfg.head_dim
        self.cfg, self.comm, self.window = cfg, comm, cfg.sliding_windows[layer]
        heads, kv_heads = comm.q_heads(cfg.num_heads), comm.kv_heads(cfg.num_kv_heads)
        self.num_heads, self.num_kv_heads = len(heads), len(kv_heads)
        # more TP ranks than KV heads: each rank holds one replicated KV head
        self.kv_replicas = comm.kv_replicas(cfg.num_kv_heads)
        q_part = range(heads.start * D, heads.stop * D)
        kv_part = range(kv_heads.start * D, kv_heads.stop * D)
        H, Q, KV = cfg.hidden_size, cfg.num_heads * D, cfg.num_kv_heads * D
        self.q_part, self.kv_part = q_part, kv_part
        # q, k and v in one matmul; the checkpoint's q_proj / k_proj / v_proj fill its rows
        self.qkv_proj = FusedLinear(H, [("q_proj", Q, q_part), ("k_proj", KV, kv_part), ("v_proj", KV, kv_part)],
                                    bias=cfg.qkv_bias, dtype=dtype)
        self.o_proj = Linear(Q, H, bias=cfg.o_bias, in_part=q_part, add_bias=r == 0, dtype=dtype)
        if cfg.qk_norm == "full":
            self.q_norm = RMSNorm(len(q_part), cfg.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(len(kv_part), cfg.rms_norm_eps, dtype)
        elif cfg.qk_norm == "head":
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps, dtype)
        self.heads = heads
        # GPT-OSS: a learned logit per query head joins the softmax (TP-sliced with the heads)
        self.sinks = nn.Parameter(torch.zeros(len(heads), dtype=dtype)) if cfg.attn_sinks else None

    def _full_norm_stats(self, replicas: int, full: int, prof):
        """Sum of squares over the whole (TP-split) projection, counting replicas once."""
        if self.comm.tp_size == 1:
            return None

        def total(sq_T1):
            with prof.phase("tp_collective"):
                parts = self.comm.tp_all_gather_last(sq_T1)  # [T, tp]
            return parts[:, ::replicas].sum(-1, keepdim=True), full
        return total

    def forward(self, x_TH, cos_TD, sin_TD, meta: AttnMeta, cache, layer: int, prof=NULL_PROFILER) -> torch.Tensor:
        """Returns this rank's partial output [T, H]; the caller sums it over TP."""
        cfg, T, D = self.cfg, x_TH.shape[0], self.cfg.head_dim
        if T == 0:  # an idle DP replica still runs the layer for the MoE all-to-alls
            return x_TH.new_zeros(0, cfg.hidden_size)
        with prof.phase("qkv"):
            q, k, v = self.qkv_proj(x_TH)
            if cfg.qk_norm == "full":
                q = self.q_norm(q, self._full_norm_stats(1, cfg.num_heads * D, prof))
                k = self.k_norm(k, self._full_norm_stats(self.kv_replicas, cfg.num_kv_heads * D, prof))
            if cfg.clip_qkv is not None:
                q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
            q = q.view(T, self.num_heads, D)
            k = k.view(T, self.num_kv_heads, D)
            v = v.view(T, self.num_kv_heads, D)
            if cfg.qk_norm == "head":
                q, k = self.q_norm(q), self.k_norm(k)
            if not cpu_ext.rope_qk_(q, k, cos_TD, sin_TD):  # CPU float32: in place, one C call
                q, k = apply_rope(q, cos_TD, sin_TD), apply_rope(k, cos_TD, sin_TD)
        if kernels.uses_triton(x_TH.device):
            with prof.phase("attention"):
                cache.write(layer, meta.slot_T, k, v)
                out = kernels.paged_attention(q, cache.k[layer], cache.v[layer], meta.table_BP,
                                              meta.cu_q(), meta.pos_T, scale=D ** -0.5,
                                              window=self.window, sinks_N=self.sinks, max_q=meta.max_new,
                                              max_kv=meta.max_len)
                prof.note_activation(x_TH, q, k, v, out)
            with prof.phase("o_proj"):
                return self.o_proj(out.view(T, self.num_heads * D))
        if meta.max_new <= CPU_KERNEL_MAX_NEW and cpu_ext.attention_supports(q, cache.k[layer], cache.v[layer], self.sinks) \
                and cpu_ext.available():
            with prof.phase("attention"):  # the C kernel: writes k, v into the cache, reads it in place
                out = cpu_ext.paged_attention(q, cache.k[layer], cache.v[layer], meta.table_BP, meta.cu_q(),
                                              meta.pos_T, meta.max_len, scale=D ** -0.5, window=self.window,
                                              sinks_N=self.sinks, write=(meta.slot_T, k, v))
                prof.note_activation(x_TH, q, k, v, out)
            with prof.phase("o_proj"):
                return self.o_proj(out.view(T, self.num_heads * D))
        with prof.phase("attention"):
            cache.write(layer, meta.slot_T, k, v)
            k_BLND, v_BLND = cache.read(layer, meta.table_BP, meta.max_len)
            prof.note_activation(x_TH, q, k, v, k_BLND, v_BLND)
            B = len(meta.lens)
            if meta.uniform:  # every sequence has max_new new tokens (e.g. all decode): no padding
                q_pad = q
            else:
                q_pad = q.new_zeros(B * meta.max_new, self.num_heads, D)
                q_pad[meta.pad_index_T] = q
            mask = meta.mask(self.window)
            if self.sinks is not None:
                k_BLND, v_BLND, mask = self._with_sink(k_BLND, v_BLND, mask, q.dtype)
            out = F.scaled_dot_product_attention(
                q_pad.view(B, meta.max_new, self.num_heads, D).transpose(1, 2),
                k_BLND.transpose(1, 2), v_BLND.transpose(1, 2),
                attn_mask=mask, enable_gqa=self.num_heads != self.num_kv_heads,
            )  # [B, N, Nq, D]
            out = out.transpose(1, 2).reshape(B * meta.max_new, self.num_heads * D)
        with prof.phase("o_proj"):
            return self.o_proj(out if meta.uniform else out[meta.pad_index_T])

    def _with_sink(self, k_BLND, v_BLND, mask_B1QL, dtype):
        """One zero key and value appended, and a float mask whose last column is each head's
        sink logit: q . 0 + sink joins the softmax's denominator and adds nothing to the output."""
        B, L, Nkv, D = k_BLND.shape
        zeros = k_BLND.new_zeros(B, 1, Nkv, D)
        Q = mask_B1QL.shape[2]
        bias_B1QL = torch.zeros(mask_B1QL.shape, dtype=dtype, device=k_BLND.device).masked_fill(
            ~mask_B1QL, float("-inf"))
        sink_BNQ1 = self.sinks.to(dtype)[None, :, None, None].expand(B, self.num_heads, Q, 1)
        mask = torch.cat((bias_B1QL.expand(B, self.num_heads, Q, L), sink_BNQ1), dim=-1)
        return torch.cat((k_BLND, zeros), 1), torch.cat((v_BLND, zeros), 1), mask

    def specs(self, prefix: str) -> list[TensorSpec]:
        s = self.qkv_proj.specs(prefix) + self.o_proj.specs(f"{prefix}.o_proj")
        if self.sinks is not None:
            s.append(TensorSpec(f"{prefix}.sinks", (self.cfg.num_heads,), self.sinks, rows(self.heads)))
        cfg, D = self.cfg, self.cfg.head_dim
        if cfg.qk_norm == "full":
            s += self.q_norm.specs(f"{prefix}.q_norm.weight", cfg.num_heads * D, self.q_part)
            s += self.k_norm.specs(f"{prefix}.k_norm.weight", cfg.num_kv_heads * D, self.kv_part)
        elif cfg.qk_norm == "head":
            s += self.q_norm.specs(f"{prefix}.q_norm.weight") + self.k_norm.specs(f"{prefix}.k_norm.weight")
        return s
