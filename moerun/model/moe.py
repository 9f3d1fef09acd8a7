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
and the Triton kernels read any strides. This rank holds experts
``[expert_start, expert_start + E_local)``.

The block runs on this TP rank's share of the tokens (see ``moerun.comm``), so the
router, the shared expert and the dense MLP are replicated, not TP-split.

Shape legend: t = this rank's tokens, H = hidden, E = experts, K = top-k, F = expert FFN,
R = rows received from the EP group.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..comm import Comm
from ..config import ModelConfig
from ..profile import NULL_PROFILER
from ..weights_spec import DEINTERLEAVE, TensorSpec, rows
from .layers import Linear

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
        mine = comm.experts(E)
        self.num_local, self.expert_start = len(mine), mine.start
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

    def route(self, x_tH: torch.Tensor):
        cfg = self.cfg
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
        if self.comm.ep_size == 1:
            with prof.phase("experts"):
                out = kernels.fused_moe(x_tH, self.w13, self.w2, weights_tK, ids_tK, act=self.act())
            prof.note_activation(x_tH, out)
        else:
            out = self._expert_parallel(x_tH, weights_tK, ids_tK, prof)
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
        comm, E = self.comm, self.cfg.num_experts
        with prof.phase("dispatch"):
            owner_E = kernels.contiguous_expert_ranks(E, comm.ep_size, x_tH.device)
            send, send_splits, meta = kernels.dispatch(x_tH, ids_tK, weights_tK, owner_E, num_ranks=comm.ep_size)
            send_splits = [int(n) for n in send_splits]
        with prof.phase("ep_all_to_all"):
            recv_splits = comm.ep_exchange_counts(torch.tensor(send_splits)).tolist()
            recv_RH = comm.ep_all_to_all(send, send_splits, recv_splits)
            recv_ids_R = comm.ep_all_to_all(meta.expert_of_row, send_splits, recv_splits)
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
        for j in range(0 if cfg.model_type in _FUSED_EXPERTS else self.num_local):
            e = f"{prefix}.experts.{self.expert_start + j}"
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
        mine = rows(range(self.expert_start, self.expert_start + self.num_local))
        s = [TensorSpec(f"{prefix}.gate_up_proj", (E, H, 2 * Fw), self.w13.transpose(1, 2), mine, DEINTERLEAVE),
             TensorSpec(f"{prefix}.down_proj", (E, Fw, H), self.w2.transpose(1, 2), mine)]
        if self.w13_bias is not None:
            s += [TensorSpec(f"{prefix}.gate_up_proj_bias", (E, 2 * Fw), self.w13_bias, mine, DEINTERLEAVE),
                  TensorSpec(f"{prefix}.down_proj_bias", (E, H), self.w2_bias, mine)]
        return s
