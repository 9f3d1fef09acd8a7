"""Building blocks: RMSNorm, rotary embedding, (column/row-parallel) linear, vocab-parallel
embedding and LM head.

Each layer holds only its rank's slice of the full weight and lists, with
``specs(prefix)``, which slice of which checkpoint tensor fills it. With the default
full ranges every layer is the plain single-process layer.

Shape legend: T = tokens, H = hidden, V = vocab, D = head dim, R = rotated dims of a head.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..comm import Comm
from ..kernels import cpu_ext
from ..profile import NULL_PROFILER
from ..weights_spec import TensorSpec, cols, rows


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor, sumsq_total=None) -> torch.Tensor:
        """``sumsq_total(sq_T1) -> (sq_T1, n)`` totals the squares over ranks when the
        normalised dim is split over TP (OLMoE's q/k norm spans all heads). On CPU float32
        (contiguous, not split) one C call (``cpu_ext.add_rmsnorm``) computes the same."""
        if sumsq_total is None and x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous():
            done = cpu_ext.add_rmsnorm(x.reshape(-1, x.shape[-1]), None, self.weight, self.eps)
            if done is not None:
                return done[1].view(x.shape)
        xf = x.float()
        sq = xf.pow(2).sum(-1, keepdim=True)
        n = x.shape[-1]
        if sumsq_total is not None:
            sq, n = sumsq_total(sq)
        xf = xf * torch.rsqrt(sq / n + self.eps)
        return self.weight * xf.to(x.dtype)

    def add_forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a + b, RMSNorm(a + b)): a residual add and the norm after it, on CPU float32 in one
        C call."""
        done = cpu_ext.add_rmsnorm(a, b, self.weight, self.eps)  # None where it does not apply
        if done is not None:
            return done
        h = a + b
        return h, self(h)

    def specs(self, name: str, full: int | None = None, part: range | None = None) -> list[TensorSpec]:
        full = full or self.weight.shape[0]
        return [TensorSpec(name, (full,), self.weight, rows(part) if part else ())]


def rope_cos_sin(positions_T: torch.Tensor, inv_freq_R: torch.Tensor, dtype, attention_factor: float = 1.0):
    """cos and sin [T, 2R] of positions times ``inv_freq_R`` [R] (``moerun.model.rope``), both
    multiplied by the RoPE type's attention factor (YaRN's; 1 otherwise). 2R is the rotary dim:
    the whole head, or its first dims with a partial rotary factor (rotate-half layout,
    frequencies repeated)."""
    freqs = positions_T.float()[:, None] * inv_freq_R.to(positions_T.device, torch.float32)[None, :]  # [T, R]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, 2R]
    if attention_factor != 1.0:
        return (emb.cos() * attention_factor).to(dtype), (emb.sin() * attention_factor).to(dtype)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x_TND: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first R dims of every head; dims R..D pass unchanged."""
    R = cos_TR.shape[-1]
    if R < x_TND.shape[-1]:
        return torch.cat((apply_rope(x_TND[..., :R], cos_TR, sin_TR), x_TND[..., R:]), dim=-1)
    half = R // 2
    rot = torch.cat((-x_TND[..., half:], x_TND[..., :half]), dim=-1)
    return x_TND * cos_TR[:, None, :] + rot * sin_TR[:, None, :]


class Linear(nn.Module):
    """y = x W^T (+ b) holding rows ``out_part`` and columns ``in_part`` of the full W.

    Column-parallel: ``out_part`` is this rank's share of the outputs.
    Row-parallel: ``in_part`` is its share of the inputs; the caller sums the partial
    outputs over TP, and the bias is added on TP rank 0 only so the sum counts it once.
    """

    def __init__(self, in_full: int, out_full: int, *, bias: bool = False,
                 out_part: range | None = None, in_part: range | None = None,
                 add_bias: bool = True, dtype=None):
        super().__init__()
        self.in_full, self.out_full = in_full, out_full
        self.out_part = out_part or range(out_full)
        self.in_part = in_part or range(in_full)
        self.weight = nn.Parameter(torch.empty(len(self.out_part), len(self.in_part), dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(len(self.out_part), dtype=dtype)) if bias else None
        self.add_bias = add_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias if self.add_bias else None)

    def specs(self, prefix: str) -> list[TensorSpec]:
        out = [TensorSpec(f"{prefix}.weight", (self.out_full, self.in_full), self.weight,
                          rows(self.out_part) + cols(self.in_part)[1:])]
        if self.bias is not None:
            out.append(TensorSpec(f"{prefix}.bias", (self.out_full,), self.bias, rows(self.out_part)))
        return out


class FusedLinear(nn.Module):
    """Several column-parallel projections of one input as one matmul (q, k and v): the
    weight stacks rows ``part`` of each named full tensor; ``forward`` returns the pieces.

        FusedLinear(H, [("q_proj", Q, q_part), ("k_proj", KV, kv_part), ...], bias=False)
    """

    def __init__(self, in_full: int, outs: list[tuple[str, int, range]], *, bias: bool = False, dtype=None):
        super().__init__()
        self.in_full, self.outs = in_full, outs
        self.sizes = [len(part) for _, _, part in outs]
        self.weight = nn.Parameter(torch.empty(sum(self.sizes), in_full, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(sum(self.sizes), dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)

    def specs(self, prefix: str) -> list[TensorSpec]:
        out, row = [], 0
        for (name, full, part), n in zip(self.outs, self.sizes):
            out.append(TensorSpec(f"{prefix}.{name}.weight", (full, self.in_full), self.weight[row:row + n],
                                  rows(part)))
            if self.bias is not None:
                out.append(TensorSpec(f"{prefix}.{name}.bias", (full,), self.bias[row:row + n], rows(part)))
            row += n
        return out


class VocabParallelEmbedding(nn.Module):
    """Rows ``part`` of the embedding table; ids outside it give zeros, summed over TP."""

    def __init__(self, vocab_size: int, hidden: int, comm: Comm, dtype=None):
        super().__init__()
        self.vocab_size, self.hidden, self.comm = vocab_size, hidden, comm
        self.part = comm.vocab_rows(vocab_size)
        self.weight = nn.Parameter(torch.empty(len(self.part), hidden, dtype=dtype))

    def forward(self, ids_T: torch.Tensor, prof=NULL_PROFILER) -> torch.Tensor:
        if self.comm.tp_size == 1:
            return F.embedding(ids_T, self.weight)
        local = ids_T - self.part.start
        mine = (local >= 0) & (local < len(self.part))
        x_TH = F.embedding(local.clamp(0, max(len(self.part) - 1, 0)), self.weight) * mine[:, None]
        with prof.phase("tp_collective"):
            return self.comm.tp_all_reduce(x_TH)

    def specs(self, name: str) -> list[TensorSpec]:
        return [TensorSpec(name, (self.vocab_size, self.hidden), self.weight, rows(self.part))]


# Rows up to which the CPU LM head computes (W x^T)^T instead of x W^T: MKL then streams the
# big weight as its A operand instead of repacking it as B on every call. At H = 1024,
# V = 32000 (2-core Intel Xeon, 2026-12-02): 19 vs 25 ms at 32 rows, 4.4-5.5 vs 4.9-6.4 at
# 1 row, level at 64.
LM_HEAD_TALL_MAX_ROWS = 48
# Rows up to which the CPU LM head is one C call (``cpu_ext.linear_rows``: dot products in
# registers, threads over blocks of vocab rows). At H = 1024, V = 32000 (2-vCPU AMD EPYC,
# 2026-12-03): 21.8-23.5 vs 25-30 ms for (W x^T)^T at 32 rows; still ahead at 64.
LM_HEAD_C_MAX_ROWS = 64


class LMHead(nn.Module):
    """Vocab-parallel output projection; full logits gathered over TP."""

    def __init__(self, vocab_size: int, hidden: int, comm: Comm, tied: VocabParallelEmbedding | None,
                 dtype=None):
        super().__init__()
        self.vocab_size, self.hidden, self.comm = vocab_size, hidden, comm
        self.part = comm.vocab_rows(vocab_size)
        self.tied = tied is not None
        self.weight = tied.weight if tied is not None else nn.Parameter(
            torch.empty(len(self.part), hidden, dtype=dtype))

    def forward(self, x_TH: torch.Tensor, prof=NULL_PROFILER) -> torch.Tensor:
        cpu32 = x_TH.device.type == "cpu" and x_TH.dtype == torch.float32
        rows = x_TH.shape[0]
        logits = (cpu_ext.linear_rows(x_TH.contiguous(), self.weight)  # None: the C kernel is not available
                  if cpu32 and rows <= LM_HEAD_C_MAX_ROWS and not torch.is_grad_enabled() else None)
        if logits is None:
            logits = (torch.mm(self.weight, x_TH.t()).t().contiguous()  # [T, V/tp], W as MKL's A
                      if cpu32 and rows <= LM_HEAD_TALL_MAX_ROWS else F.linear(x_TH, self.weight))
        prof.note_activation(logits)
        if self.comm.tp_size == 1:
            return logits
        per = len(self.comm.par.vocab_rows_of(0, self.vocab_size))  # rank 0's full share: pad, gather, cut
        logits = F.pad(logits, (0, per - logits.shape[-1]))
        with prof.phase("tp_collective"):
            logits = self.comm.tp_all_gather_last(logits)
        return logits[:, : self.vocab_size]

    def specs(self, name: str) -> list[TensorSpec]:
        if self.tied:
            return []
        return [TensorSpec(name, (self.vocab_size, self.hidden), self.weight, rows(self.part))]
