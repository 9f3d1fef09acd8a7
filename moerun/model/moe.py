"""The MoE block: replicated router, experts held as stacked tensors, and the dispatch
seam where expert parallelism's all-to-all sits. Also the dense SwiGLU MLP (Qwen's
``mlp_only_layers``, GLM-4.5's and dots.llm1's dense first layers), Qwen2-MoE's gated
shared expert and the ungated shared experts of GLM-4.5 / dots.llm1.

The router runs ``kernels.route`` with the config's scoring: softmax, or sigmoid scores
(float32 logits) chosen with the float32 ``e_score_correction_bias`` buffer, group-limited
and scaled.

Experts are the parameters ``w13 [E_local, 2F, H]`` (gate rows, then up rows) and
``w2 [E_local, H, F]`` (down), the shapes the fused kernels take. Their memory is K-major
(``w13.transpose(1, 2)`` is a contiguous ``[E_local, H, 2F]``, ``w2``'s is ``[E_local, F, H]``):
the CPU path streams an expert's reduction rows as one table (``fused_moe``'s gather-GEMV),
and the Triton kernels read any strides. This rank holds physical experts
``[expert_start, expert_start + E_local)`` of its EP group's ``P = E + R``; physical slot p
holds a copy of logical expert ``phys[p]`` (``moerun.eplb``; with R = 0 and no measured
load, ``phys[p] = p``). The router picks logical experts; ``ReplicaMap`` turns each
token-slot into one of its expert's physical replicas before dispatch, so the kernels
only ever see physical ids.

Under EP the per-rank row counts are exchanged on the device and copied to the host once
per layer, and each row's physical expert id travels in an extra column of the rows
(its int32 bits viewed as x's dtype), so one all-to-all carries both.

The block runs on this TP rank's share of the tokens (see ``moerun.comm``), so the
router, the shared expert and the dense MLP are replicated, not TP-split.

Shape legend: t = this rank's tokens, H = hidden, E = experts, K = top-k, F = expert FFN,
P = physical experts, S = t*K slots, R = rows received from the EP group, C = id columns.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import eplb, kernels
from ..comm import Comm
from ..config import ModelConfig
from ..profile import NULL_PROFILER
from ..weights_spec import DEINTERLEAVE, TensorSpec, rows
from .layers import Linear
from .placement import ReplicaMap

# HF tensor names of one expert's (gate, up, down) projections, by family.
_EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2"), "minimax_m2": ("w1", "w3", "w2")}
# where the router's correction bias sits, relative to the MoE block (default: in the gate)
_BIAS_NAMES = {"minimax_m2": "e_score_correction_bias"}
_DEFAULT_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
# Families that store all experts as fused 3-D tensors (gate/up columns interleaved), and
# their router's name.
_FUSED_EXPERTS = {"gpt_oss"}
_ROUTER_NAMES = {"gpt_oss": "router"}


class DenseMLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, ffn: int, dtype=None):
        super().__init__()
        self.gate_proj = Linear(hidden, ffn, dtype=dtype)
        self.up_proj = Linear(hidden, ffn, dtype=dtype)
        self.down_proj = Linear(ffn, hidden, dtype=dtype)

    def forward(self, x_tH: torch.Tensor, prof=NULL_PROFILER) -> torch.Tensor:
        with prof.phase("dense_mlp"):
            return self.down_proj(F.silu(self.gate_proj(x_tH)) * self.up_proj(x_tH))

    def specs(self, prefix: str) -> list[TensorSpec]:
        return [s for n in ("gate_proj", "up_proj", "down_proj") for s in getattr(self, n).specs(f"{prefix}.{n}")]


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, comm: Comm, layer: int, dtype=None):
        super().__init__()
        self.cfg, self.comm, self.layer = cfg, comm, layer  # layer: the global index (expert load per layer)
        E, H, Fw = cfg.num_experts, cfg.hidden_size, cfg.moe_ffn
        mine = comm.experts(E)  # this rank's physical slots
        self.num_local, self.expert_start = len(mine), mine.start
        self.set_placement(comm.physical_experts(layer, E))
        self.load_E: torch.Tensor | None = None  # token-slots per logical expert, once count_load() is on
        self.steps = 0  # forward calls: the replica spreading's rotation
        self.rows_received = 0  # EP: rows this rank's experts computed (measured balance)
        self.gate = Linear(H, E, bias=cfg.router_bias, dtype=dtype)  # the router, replicated
        self.w13 = nn.Parameter(torch.empty(self.num_local, H, 2 * Fw, dtype=dtype).transpose(1, 2))
        self.w2 = nn.Parameter(torch.empty(self.num_local, Fw, H, dtype=dtype).transpose(1, 2))
        # chooses experts only (sigmoid scoring); float32 like the scores it is added to
        self.register_buffer("e_score_correction_bias",
                             torch.zeros(E, dtype=torch.float32) if cfg.score_bias else None)
        # GPT-OSS: expert biases (gate then up, like w13's rows) and the clamped SwiGLU
        self.w13_bias = nn.Parameter(torch.zeros(self.num_local, 2 * Fw, dtype=dtype)) if cfg.expert_bias else None
        self.w2_bias = nn.Parameter(torch.zeros(self.num_local, H, dtype=dtype)) if cfg.expert_bias else None
        self.shared_expert = DenseMLP(H, cfg.shared_expert_ffn, dtype) if cfg.shared_expert_ffn else None
        gated = cfg.shared_expert_ffn and cfg.shared_expert_gated
        self.shared_expert_gate = Linear(H, 1, dtype=dtype) if gated else None

    def set_placement(self, phys: tuple[int, ...]) -> None:
        """Physical slot -> logical expert of this EP group (the weights must follow)."""
        E, ep = self.cfg.num_experts, self.comm.ep_size
        eplb.check_placement(phys, E, ep)
        assert len(phys) == self.num_local * ep, "placement and comm disagree on E + R"
        self.phys = tuple(phys)
        self.local_logical = self.phys[self.expert_start:self.expert_start + self.num_local]
        device = self.gate.weight.device if hasattr(self, "gate") else None
        self.replica_map = ReplicaMap(self.phys, E, device)
        self.owner_P = kernels.contiguous_expert_ranks(len(phys), ep, device)

    def count_load(self) -> None:
        """Count the token-slots routed to each logical expert from now on (``load_E``)."""
        if self.load_E is None:
            self.load_E = torch.zeros(self.cfg.num_experts, dtype=torch.int64, device=self.gate.weight.device)

    def route(self, x_tH: torch.Tensor):
        cfg = self.cfg
        if cfg.scoring == "softmax" and cfg.n_group == 1 and not torch.is_grad_enabled():
            # CPU float32: the router linear, softmax and top-k in one C call (None: not taken)
            fast = kernels.cpu_ext.route_softmax(x_tH, self.gate.weight, self.gate.bias, cfg.top_k,
                                                 cfg.norm_topk_prob, cfg.routed_scaling)
            if fast is not None:
                return fast
        if cfg.scoring == "sigmoid":  # float32 logits: near-equal scores choose the reference's experts
            bias = self.gate.bias.float() if self.gate.bias is not None else None
            logits_tE = F.linear(x_tH.float(), self.gate.weight.float(), bias)
        else:
            logits_tE = self.gate(x_tH)
        return kernels.route(logits_tE, cfg.top_k, scoring=cfg.scoring, renormalize=cfg.norm_topk_prob,
                             bias_E=self.e_score_correction_bias, num_groups=cfg.n_group,
                             topk_groups=cfg.topk_group, scaling=cfg.routed_scaling)  # [t, K] f32, int32

    def act(self) -> kernels.ExpertAct:
        """The experts' activation and biases, as every fused_moe call takes them: under EP the
        receiving rank runs them with weight 1 and ``combine`` weights the whole output, the
        down bias included."""
        cfg = self.cfg
        return kernels.ExpertAct(kind=cfg.expert_act, alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit,
                                 w13_bias=self.w13_bias, w2_bias=self.w2_bias)

    def forward(self, x_tH: torch.Tensor, prof=NULL_PROFILER) -> torch.Tensor:
        with prof.phase("router"):
            weights_tK, ids_tK = self.route(x_tH)
        prof.count_experts(self.layer, ids_tK, self.cfg.num_experts)
        if self.load_E is not None:
            self.load_E += torch.bincount(ids_tK.reshape(-1).long(), minlength=self.cfg.num_experts)
        pids_tK = self.replica_map(ids_tK, self.steps + self.comm.ep_rank)  # logical -> physical
        self.steps += 1
        if self.comm.ep_size == 1:
            with prof.phase("experts"):
                out = kernels.fused_moe(x_tH, self.w13, self.w2, weights_tK, pids_tK, act=self.act())
            prof.note_activation(x_tH, out)
        else:
            out = self._expert_parallel(x_tH, weights_tK, pids_tK, prof)
        if self.shared_expert is not None:
            with prof.phase("dense_mlp"):
                shared_tH = self.shared_expert(x_tH)
                if self.shared_expert_gate is not None:
                    shared_tH = torch.sigmoid(self.shared_expert_gate(x_tH)) * shared_tH
                out = out + shared_tH
        return out

    def _expert_parallel(self, x_tH, weights_tK, ids_tK, prof) -> torch.Tensor:
        """The seam: dispatch token-slots to the EP ranks owning their experts, run the
        local experts on what arrives, send the results back and combine."""
        comm, ep, H = self.comm, self.comm.ep_size, x_tH.shape[1]
        with prof.phase("dispatch"):
            send, splits_dev, meta = kernels.dispatch(x_tH, ids_tK, weights_tK, self.owner_P, num_ranks=ep,
                                                      host_splits=False)
            send_SX = with_ids(send, meta.expert_of_row)  # [S, H + C]
        with prof.phase("ep_all_to_all"):
            recv_dev = comm.ep_exchange_counts(splits_dev)
            counts = torch.cat([splits_dev, recv_dev.to(splits_dev.device)]).tolist()  # the one sync
            send_splits, recv_splits = counts[:ep], counts[ep:]
            recv_RX = comm.ep_all_to_all(send_SX, send_splits, recv_splits)
            recv_RH, recv_ids_R = recv_RX[:, :H], ids_of(recv_RX, H)
        self.rows_received += recv_RH.shape[0]
        prof.count_rows(self.layer, recv_RH.shape[0])
        with prof.phase("experts"):
            ones_R1 = torch.ones(recv_RH.shape[0], 1, dtype=torch.float32, device=x_tH.device)
            y_RH = kernels.fused_moe(recv_RH, self.w13, self.w2, ones_R1, recv_ids_R[:, None],
                                     expert_start=self.expert_start, num_local_experts=self.num_local,
                                     act=self.act())
        prof.note_activation(x_tH, send, recv_RH, y_RH)
        with prof.phase("ep_all_to_all"):
            back = comm.ep_all_to_all(y_RH, recv_splits, send_splits)
        with prof.phase("combine"):
            return kernels.combine(back, meta)

    def specs(self, prefix: str) -> list[TensorSpec]:
        cfg, Fw, H = self.cfg, self.cfg.moe_ffn, self.cfg.hidden_size
        gate_n, up_n, down_n = _EXPERT_NAMES.get(cfg.model_type, _DEFAULT_EXPERT_NAMES)
        s = self.gate.specs(f"{prefix}.{_ROUTER_NAMES.get(cfg.model_type, 'gate')}")
        if self.e_score_correction_bias is not None:
            name = f"{prefix}.{_BIAS_NAMES.get(cfg.model_type, 'gate.e_score_correction_bias')}"
            s.append(TensorSpec(name, (cfg.num_experts,), self.e_score_correction_bias))
        if cfg.model_type in _FUSED_EXPERTS:
            s += self._fused_specs(f"{prefix}.experts")
        for j, logical in enumerate(() if cfg.model_type in _FUSED_EXPERTS else self.local_logical):
            e = f"{prefix}.experts.{logical}"  # each physical slot reads its logical expert
            s += [TensorSpec(f"{e}.{gate_n}.weight", (Fw, H), self.w13[j, :Fw]),
                  TensorSpec(f"{e}.{up_n}.weight", (Fw, H), self.w13[j, Fw:]),
                  TensorSpec(f"{e}.{down_n}.weight", (H, Fw), self.w2[j])]
            if self.w13_bias is not None:
                s += [TensorSpec(f"{e}.{gate_n}.bias", (Fw,), self.w13_bias[j, :Fw]),
                      TensorSpec(f"{e}.{up_n}.bias", (Fw,), self.w13_bias[j, Fw:]),
                      TensorSpec(f"{e}.{down_n}.bias", (H,), self.w2_bias[j])]
        if self.shared_expert_gate is not None:  # Qwen2-MoE
            s += self.shared_expert.specs(f"{prefix}.shared_expert")
            s += self.shared_expert_gate.specs(f"{prefix}.shared_expert_gate")
        elif self.shared_expert is not None:  # GLM-4.5, dots.llm1: n_shared_experts fused into one MLP
            s += self.shared_expert.specs(f"{prefix}.shared_experts")
        return s

    def _fused_specs(self, prefix: str) -> list[TensorSpec]:
        """GPT-OSS's fused experts: ``gate_up_proj [E, H, 2F]`` (gate / up columns interleaved)
        and ``down_proj [E, F, H]``, with biases ``[E, 2F]`` / ``[E, H]``; a rank reads its
        experts' rows and de-interleaves them into w13's gate-then-up layout."""
        E, Fw, H = self.cfg.num_experts, self.cfg.moe_ffn, self.cfg.hidden_size
        s = []
        for j, n, logical in _runs(self.local_logical):  # slots j..j+n hold logical experts logical..+n
            mine, slots = rows(range(logical, logical + n)), slice(j, j + n)
            s += [TensorSpec(f"{prefix}.gate_up_proj", (E, H, 2 * Fw), self.w13.transpose(1, 2)[slots], mine,
                             DEINTERLEAVE),
                  TensorSpec(f"{prefix}.down_proj", (E, Fw, H), self.w2.transpose(1, 2)[slots], mine)]
            if self.w13_bias is not None:
                s += [TensorSpec(f"{prefix}.gate_up_proj_bias", (E, 2 * Fw), self.w13_bias[slots], mine, DEINTERLEAVE),
                      TensorSpec(f"{prefix}.down_proj_bias", (E, H), self.w2_bias[slots], mine)]
        return s

    def expert_tensors(self) -> list[torch.Tensor]:
        """Every per-physical-slot tensor, [P_local, ...] views (what moving an expert moves)."""
        return [self.w13.data.transpose(1, 2), self.w2.data.transpose(1, 2)] + [
            b.data for b in (self.w13_bias, self.w2_bias) if b is not None]


def _runs(logical: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(first slot, length, first logical expert) of each run of consecutive logical ids."""
    out = []
    for j, e in enumerate(logical):
        if out and out[-1][2] + out[-1][1] == e:
            out[-1] = (out[-1][0], out[-1][1] + 1, out[-1][2])
        else:
            out.append((j, 1, e))
    return out


def with_ids(rows_SH: torch.Tensor, ids_S: torch.Tensor) -> torch.Tensor:
    """Rows with their int32 expert ids appended as C columns of the rows' dtype (the
    ids' bits, not their values: an all-to-all copies bytes). [S, H] -> [S, H + C]."""
    C = 1 if rows_SH.dtype.itemsize >= 4 else 4 // rows_SH.dtype.itemsize  # an 8-byte dtype carries int64 ids
    ids_SC = _ids_as(ids_S, rows_SH.dtype).reshape(rows_SH.shape[0], C)
    return torch.cat([rows_SH, ids_SC], dim=1)


def ids_of(rows_RX: torch.Tensor, hidden: int) -> torch.Tensor:
    """The expert ids ``with_ids`` appended after column ``hidden``: [R] int32."""
    cols = rows_RX[:, hidden:].contiguous()
    ids = cols.view(torch.int64) if cols.element_size() == 8 else cols.view(torch.int32)
    return ids.reshape(-1).to(torch.int32)


def _ids_as(ids_S: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    ids = ids_S.to(torch.int64 if dtype.itemsize == 8 else torch.int32).contiguous()
    return ids.view(dtype)
