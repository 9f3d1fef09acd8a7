"""A decode step's whole decoder stack in one C call on CPU float32 (``decode_layers_f32`` in
kernels/csrc/moe_cpu.c): the same arithmetic as ``DecoderLayer.forward`` op by op (the same C
kernels for norms, RoPE, attention, router and experts, the same BLAS sgemm for the dense
projections), without the ~40 Python-level operations per layer in between. On the tiny
preset those cost as much as the layers' arithmetic.

    fused = FusedDecodeCPU(model)          # once; checks what the model is
    h = fused.run(h_TH, cos, sin, meta, cache, prof)   # None: this step does not qualify

A model qualifies when every layer of the stage is a routed MoE with softmax routing, silu
experts without biases or shared experts, plain attention (no q/k norm, clipping or sinks),
float32 on the CPU, at TP 1 and EP 1 (PP is fine: each stage runs its layers), with the C
library and an sgemm available. A step qualifies when it is decode-sized (at most
``CPU_KERNEL_MAX_NEW`` new tokens per sequence and fewer than ``GEMV_MAX_SLOTS_PER_EXPERT``
slots per expert, where the C experts kernel is the one the layer path takes too), the
Triton kernels are not asked for (``kernels.set_default_impl``), no gradient is recorded, no expert load is being counted, no replicas are placed and no
rebalancer runs. ``MOERUN_FUSED_DECODE=0`` switches it off, and so does
``model.set_fused_cpu(False)`` for one model. Everything else takes the layer path, unchanged.

Shape legend: T = new tokens, H = hidden, L = layers, K = top-k.
"""
from __future__ import annotations

import ctypes
import os

import torch

from .. import kernels
from ..kernels import cpu_ext
from ..kernels.fused_moe import GEMV_MAX_SLOTS_PER_EXPERT
from ..profile import NULL_PROFILER
from .attention import CPU_KERNEL_MAX_NEW
from .moe import MoE

_PHASE_NAMES = ("norm", "qkv", "attention", "o_proj", "router", "experts")  # the C enum's order
_F, _I, _P = ctypes.c_float, ctypes.c_int64, ctypes.c_void_p


class LayerArgs(ctypes.Structure):
    _fields_ = [(n, _P) for n in ("in_norm", "post_norm", "wqkv", "bqkv", "wo", "bo", "wg", "bg", "w13", "w2",
                                  "kc", "vc")] + [("window", _I)]


class StepArgs(ctypes.Structure):
    _fields_ = ([(n, _P) for n in ("h", "x", "qkv", "attn", "a", "out", "route_w", "route_ids", "cos", "sin",
                                   "slot", "table", "cu_q", "pos")]
                + [(n, _I) for n in ("T", "H", "Nq", "Nkv", "D", "R", "E", "K", "F", "B", "P", "max_len",
                                     "block_size", "renorm")]
                + [("eps", _F), ("scale", _F), ("scaling", _F), ("pad_", _F),
                   ("mark_t", _P), ("mark_ph", _P), ("nmarks", _I)])


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _f32_cpu_contiguous(*ts) -> bool:
    return all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()) for t in ts)


def why_not(model) -> str | None:
    """Why the model cannot take the fused path (None: it can)."""
    if os.environ.get("MOERUN_FUSED_DECODE", "1") == "0":
        return "off (MOERUN_FUSED_DECODE=0)"
    comm, cfg = model.comm, model.cfg
    if comm.tp_size != 1 or comm.ep_size != 1:
        return "TP or EP > 1"
    if not len(model.layers):
        return "no layers"
    if cfg.scoring != "softmax" or cfg.n_group != 1:
        return f"router scoring {cfg.scoring!r} (the fused step has softmax top-k)"
    if cfg.qk_norm != "none" or cfg.clip_qkv is not None:
        return "q/k norm or qkv clipping in attention"
    if not cpu_ext.available() or cpu_ext.sgemm() is None:
        return f"C kernels or sgemm unavailable ({cpu_ext.unavailable_reason() or 'no sgemm symbol'})"
    for layer in model.layers:
        mlp, att = layer.mlp, layer.self_attn
        if not isinstance(mlp, MoE) or mlp.shared_expert is not None or mlp.w13_bias is not None \
                or mlp.w2_bias is not None or cfg.expert_act != "silu":
            return "a layer without plain routed silu experts"
        if att.sinks is not None or not att.o_proj.add_bias or att.num_heads % att.num_kv_heads \
                or att.num_heads // att.num_kv_heads > 64:
            return "attention sinks, or a TP-split output projection"
        if not _f32_cpu_contiguous(layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                                   att.qkv_proj.weight, att.qkv_proj.bias, att.o_proj.weight, att.o_proj.bias,
                                   mlp.gate.weight, mlp.gate.bias):
            return "weights not contiguous float32 on the CPU"
        if not cpu_ext.supports(torch.empty(0, cfg.hidden_size), mlp.w13, mlp.w2, mlp.act()):
            return "expert weights not in the C kernel's layout"
        if mlp.num_local > cpu_ext.MAX_ROUTED_EXPERTS:
            return "too many experts"
    return None


class FusedDecodeCPU:
    """The fused path of one model (stage). The layers' tensors are collected once; the C
    table of their addresses (and the KV cache's) is rebuilt whenever one of them moved (a
    ``.data`` swap, a new cache), which one tuple of addresses per step detects. A parameter
    replaced by a new object after the first forward is not seen: ``model.set_fused_cpu(True)``
    collects them again."""

    def __init__(self, model):
        self.model = model
        self.reason = why_not(model)
        if self.reason is not None:
            return
        cfg = model.cfg
        self.mlps = [layer.mlp for layer in model.layers]
        self.tensors = []  # per layer, LayerArgs' tensors in its field order (None: no bias)
        for layer in model.layers:
            att, mlp = layer.self_attn, layer.mlp
            self.tensors += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                             att.qkv_proj.weight, att.qkv_proj.bias, att.o_proj.weight, att.o_proj.bias,
                             mlp.gate.weight, mlp.gate.bias, mlp.w13, mlp.w2]
        self.windows = [layer.self_attn.window for layer in model.layers]
        att0 = model.layers[0].self_attn
        self.Nq, self.Nkv, self.D = att0.num_heads, att0.num_kv_heads, cfg.head_dim
        self.E, self.K, self.F, self.H = self.mlps[0].num_local, cfg.top_k, cfg.moe_ffn, cfg.hidden_size
        self.max_tokens = -(-GEMV_MAX_SLOTS_PER_EXPERT * self.E // self.K)  # T * K < 24 E
        self._key = None
        self._table = None

    @property
    def enabled(self) -> bool:
        return self.reason is None

    def qualifies(self, h_TH, cos, sin, meta, cache) -> bool:
        T = h_TH.shape[0]
        if not self.enabled or T == 0 or T >= self.max_tokens or meta.max_new > CPU_KERNEL_MAX_NEW:
            return False
        if torch.is_grad_enabled() or self.model.rebalancer is not None or kernels.uses_triton(h_TH.device):
            return False  # (the Triton kernels are asked for: kernels.set_default_impl("triton"))
        if not _f32_cpu_contiguous(h_TH, cos, sin) or cos.dim() != 2 or cos.shape[0] != T \
                or cos.shape[1] % 2 or cos.shape[1] > self.D:
            return False
        if any(m.load_E is not None or not m.replica_map.identity for m in self.mlps):
            return False
        k0 = cache.k[0]
        return (k0.dtype == torch.float32 and k0.dim() == 4 and k0.shape[2] == self.Nkv and k0.shape[3] == self.D
                and all(c.is_contiguous() and c.shape == k0.shape for c in cache.k + cache.v))

    def _layer_table(self, cache):
        ptrs = [None if t is None else t.data_ptr() for t in self.tensors]
        key = (tuple(ptrs), tuple(c.data_ptr() for c in cache.k), tuple(c.data_ptr() for c in cache.v))
        if key != self._key:
            L, n = len(self.windows), len(ptrs) // len(self.windows)
            table = (LayerArgs * L)()
            for j in range(L):
                table[j] = LayerArgs(*ptrs[j * n:(j + 1) * n], key[1][j], key[2][j], self.windows[j])
            self._key, self._table = key, table
        return self._table

    def run(self, h_TH, cos, sin, meta, cache, prof=NULL_PROFILER) -> torch.Tensor | None:
        """The stage's layers on ``h_TH`` (the embedding's or the previous stage's output):
        the new hidden states [T, H], or None when this step does not qualify."""
        if not self.qualifies(h_TH, cos, sin, meta, cache):
            return None
        cfg = self.model.cfg
        T, H, D, K, L = h_TH.shape[0], self.H, self.D, self.K, len(self.mlps)
        Q, KV = self.Nq * D, self.Nkv * D
        h = h_TH.clone()
        scratch = torch.empty(T * (3 * H + 2 * Q + 2 * KV), dtype=torch.float32)
        x, qkv, attn, a, out = scratch.split([T * H, T * (Q + 2 * KV), T * Q, T * H, T * H])
        route_w = torch.empty(L, T, K, dtype=torch.float32)
        route_ids = torch.empty(L, T, K, dtype=torch.int64)
        table = meta.table_BP.contiguous()
        cu = meta.cu_q().long()
        marks_t = marks_ph = None
        if prof.enabled:
            marks_t = torch.empty(7 * L + 1, dtype=torch.float64)  # 7 phases a layer, one end
            marks_ph = torch.empty(7 * L + 1, dtype=torch.int64)
        step = StepArgs(h.data_ptr(), x.data_ptr(), qkv.data_ptr(), attn.data_ptr(), a.data_ptr(), out.data_ptr(),
                        route_w.data_ptr(), route_ids.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                        meta.slot_T.data_ptr(), table.data_ptr(), cu.data_ptr(), meta.pos_T.data_ptr(),
                        T, H, self.Nq, self.Nkv, D, cos.shape[1], self.E, K, self.F, table.shape[0],
                        table.shape[1], meta.max_len, cache.k[0].shape[1], int(bool(cfg.norm_topk_prob)),
                        cfg.rms_norm_eps, D ** -0.5, cfg.routed_scaling, 0.0,
                        _ptr(marks_t), _ptr(marks_ph), 0)
        rc = cpu_ext.decode_layers(step, self._layer_table(cache), L)
        if rc != 0:
            raise MemoryError(f"the fused CPU decode step could not allocate its scratch (rc {rc}, T={T})")
        for m in self.mlps:
            m.steps += 1
        if prof.enabled:
            for m, ids in zip(self.mlps, route_ids):
                prof.count_experts(m.layer, ids, cfg.num_experts)
            n = step.nmarks
            prof.external_marks(marks_t[:n].tolist(), [_PHASE_NAMES[p] if p >= 0 else None
                                                       for p in marks_ph[:n].tolist()])
            prof.note_activation(h, scratch, route_w, route_ids)
        return h
