"""The MoE decoder: wiring only. One class serves every family and every layout: a
pipeline stage builds the layers ``layers`` of the model, plus the embedding if it is
the first stage and the final norm and LM head if it is the last.

    model = MoEModel(cfg)                                   # whole model, one process
    model = MoEModel(cfg, comm, layers=range(8, 16))        # last stage of PP=2

Shape legend: T = new tokens of the batch, t = this TP rank's share, H = hidden, V = vocab.
"""
from __future__ import annotations

import torch
from torch import nn

from ..comm import Comm
from ..config import ModelConfig
from ..profile import NULL_PROFILER
from ..weights_spec import TensorSpec
from .attention import Attention, AttnMeta
from .cpu_fused import FusedDecodeCPU
from .layers import LMHead, RMSNorm, VocabParallelEmbedding, rope_cos_sin
from .moe import MoE, DenseMLP
from .rope import rope_parameters


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, comm: Comm, layer: int, dtype=None):
        super().__init__()
        self.comm = comm
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, comm, layer, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MoE(cfg, comm, layer, dtype) if cfg.moe_layers[layer] else DenseMLP(
            cfg.hidden_size, cfg.dense_ffn, dtype)
        self.moe_prefix = "block_sparse_moe" if cfg.model_type in ("mixtral", "minimax_m2") else "mlp"

    def forward(self, h_TH, cos, sin, meta: AttnMeta, cache, local_layer: int, prof=NULL_PROFILER) -> torch.Tensor:
        T = h_TH.shape[0]
        with prof.phase("norm"):
            x_TH = self.input_layernorm(h_TH)
        a_TH = self.self_attn(x_TH, cos, sin, meta, cache, local_layer, prof)
        with prof.phase("tp_collective"):
            a_tH = self.comm.tp_reduce_scatter_tokens(a_TH)  # sum over TP, keep 1/tp of tokens
        mine = self.comm.token_rows(T)
        with prof.phase("norm"):  # residual add + RMSNorm (one fused op in most engines)
            h_tH, x_tH = self.post_attention_layernorm.add_forward(h_TH[mine.start:mine.stop], a_tH)
        h_tH = h_tH + self.mlp(x_tH, prof)
        with prof.phase("tp_collective"):
            return self.comm.tp_all_gather_tokens(h_tH, T)

    def specs(self, prefix: str) -> list[TensorSpec]:
        mlp_prefix = f"{prefix}.{self.moe_prefix if isinstance(self.mlp, MoE) else 'mlp'}"
        return (self.input_layernorm.specs(f"{prefix}.input_layernorm.weight")
                + self.self_attn.specs(f"{prefix}.self_attn")
                + self.post_attention_layernorm.specs(f"{prefix}.post_attention_layernorm.weight")
                + self.mlp.specs(mlp_prefix))


class MoEModel(nn.Module):
    def __init__(self, cfg: ModelConfig, comm: Comm | None = None, layers: range | None = None,
                 dtype=torch.float32):
        super().__init__()
        self.cfg, self.comm = cfg, comm or Comm()
        self.layer_ids = layers if layers is not None else range(cfg.num_layers)
        self.is_first = self.layer_ids.start == 0
        self.is_last = self.layer_ids.stop == cfg.num_layers
        self.dtype = dtype
        self.rebalancer = None  # dynamic EPLB (moerun.model.rebalance), stepped by the worker
        H = cfg.hidden_size
        inv_freq, self.rope_attention_factor = rope_parameters(cfg, cfg.rotary_dim)  # float32, on the CPU
        self.register_buffer("rope_inv_freq", inv_freq.to(torch.get_default_device()), persistent=False)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, H, self.comm, dtype) if self.is_first else None
        self.layers = nn.ModuleList(DecoderLayer(cfg, self.comm, i, dtype) for i in self.layer_ids)
        if self.is_last:
            self.norm = RMSNorm(H, cfg.rms_norm_eps, dtype)
            share = self.embed_tokens if cfg.tie_word_embeddings and self.is_first else None
            self.lm_head = LMHead(cfg.vocab_size, H, self.comm, share, dtype)
            # a tied head on a stage without the embedding loads the embedding's tensor
            self.lm_head_name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"

    def forward(self, x, positions_T: torch.Tensor, meta: AttnMeta, cache,
                logits_rows: torch.Tensor | None = None, prof=NULL_PROFILER) -> torch.Tensor:
        """``x``: token ids [T] on the first stage, hidden states [T, H] after it.
        Returns hidden states [T, H], or on the last stage logits [R, V] of the rows
        ``logits_rows`` (all rows when None). ``prof``: the rank's profiler
        (``moerun.profile``); the default does nothing."""
        if self.is_first:
            with prof.phase("embedding"):
                h = self.embed_tokens(x, prof)
        else:
            h = x
        with prof.phase("qkv"):  # the rotary tables every layer's q and k use
            cos, sin = rope_cos_sin(positions_T, self.rope_inv_freq, h.dtype, self.rope_attention_factor)
        fused = self._fused_cpu.run(h, cos, sin, meta, cache, prof) if self._fused_cpu is not None else None
        if fused is not None:  # CPU float32 decode: the whole stack in one C call (moerun.model.cpu_fused)
            h = fused
        else:
            for j, layer in enumerate(self.layers):
                h = layer(h, cos, sin, meta, cache, j, prof)
        if not self.is_last:
            return h
        with prof.phase("lm_head"):
            if logits_rows is not None:
                h = h[logits_rows]
            return self.lm_head(self.norm(h), prof).float()

    def set_fused_cpu(self, enabled: bool) -> None:
        """Let CPU decode steps take the fused C stack (the default where the model
        qualifies), or keep every step on the layer path."""
        self.__dict__["_fused"] = None if enabled else False

    @property
    def _fused_cpu(self) -> FusedDecodeCPU | None:
        """The fused CPU decode path, built at the first forward (the weights are loaded by
        then); None where the model cannot take it."""
        f = self.__dict__.get("_fused")
        if f is None:
            f = FusedDecodeCPU(self) if self.rope_inv_freq.device.type == "cpu" else False
            self.__dict__["_fused"] = f
        return f if f and f.enabled else None

    def specs(self) -> list[TensorSpec]:
        s = self.embed_tokens.specs("model.embed_tokens.weight") if self.is_first else []
        for i, layer in zip(self.layer_ids, self.layers):
            s += layer.specs(f"model.layers.{i}")
        if self.is_last:
            s += self.norm.specs("model.norm.weight") + self.lm_head.specs(self.lm_head_name)
        return s
