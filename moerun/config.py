"""ModelConfig: the one description of a MoE model that every part of moerun reads.

Built from a Hugging Face ``config.json`` (model_type ``olmoe``, ``mixtral``,
``qwen2_moe``, ``qwen3_moe``, ``glm4_moe``, ``dots1``, ``minimax_m2``, ``gpt_oss``;
transformers 4 ``rope_theta`` / ``rope_scaling`` and transformers 5 ``rope_parameters``
spellings both accepted) or from a preset in ``configs/models/``.

    cfg = ModelConfig.load("tiny")            # preset name
    cfg = ModelConfig.load("/path/to/ckpt")   # directory holding config.json
    cfg.num_params()                          # exact parameter count, no allocation

Family differences are reduced to a few fields (``qk_norm``, ``qkv_bias``, ``o_bias``,
``norm_topk_prob``, ``shared_expert_ffn``, ``moe_layers``, ``sliding_windows``, the router's
``scoring`` options, ``rotary_dim``, GPT-OSS's ``router_bias``, ``expert_bias``,
``expert_act``, ``attn_sinks``, and the ``rope_*`` scaling fields) so the model code never
branches on ``model_type``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from .configs import CONFIG_DIR  # configs/, shipped as moerun.configs
from .hf_config import EXPERT_ACTS, ROPE_TYPES, SUPPORTED_TYPES, fields_from_hf, to_hf

SCORINGS = ("softmax", "sigmoid", "topk_softmax")  # kernels.route

PRESET_DIR = CONFIG_DIR / "models"


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    moe_ffn: int  # width of one routed expert's SwiGLU FFN
    dense_ffn: int = 0  # width of the dense MLP in layers that have no experts
    shared_expert_ffn: int = 0  # width of the always-on shared expert(s) (0 = none)
    norm_topk_prob: bool = False  # renormalise the top-k routing weights to sum to 1
    qk_norm: str = "none"  # "none" | "full" (OLMoE, over the projection) | "head" (Qwen3-MoE)
    qkv_bias: bool = False
    o_bias: bool = False
    clip_qkv: float | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    moe_layers: tuple[bool, ...] = ()  # per layer: routed experts (True) or dense MLP
    sliding_windows: tuple[int, ...] = ()  # per layer: attention window, 0 = full causal
    # The router (kernels.route): "softmax" over all experts, or "sigmoid" scores (DeepSeek-V3,
    # GLM-4.5, dots.llm1, MiniMax-M2) chosen on score + e_score_correction_bias (score_bias),
    # group-limited to the topk_group best of n_group groups, the weights times routed_scaling.
    scoring: str = "softmax"
    score_bias: bool = False
    n_group: int = 1
    topk_group: int = 1
    routed_scaling: float = 1.0
    shared_expert_gated: bool = True  # Qwen2-MoE's sigmoid(gate(x)) * shared(x); False: plain sum
    rotary_dim: int = 0  # dims of each head RoPE rotates (the first ones); 0 = head_dim
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # GPT-OSS's pieces, each off by default (its router: scoring = "topk_softmax", over the top-k logits)
    router_bias: bool = False  # the router linear has a bias
    expert_bias: bool = False  # experts' gate-up [2F] and down [H] projections have biases
    expert_act: str = "silu"  # "silu": silu(gate) * up; "swiglu_oai": the clamped SwiGLU (kernels.ExpertAct)
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    attn_sinks: bool = False  # a learned per-head logit joins every attention softmax
    # RoPE scaling (moerun.model.rope): the type and its numbers (unused ones keep defaults)
    rope_type: str = "default"  # default | linear | llama3 | yarn
    rope_factor: float = 1.0
    rope_original_max_position: int = 0  # original_max_position_embeddings (0 = max_position_embeddings)
    rope_beta_fast: float = 32.0  # yarn
    rope_beta_slow: float = 1.0  # yarn
    rope_mscale: float = 0.0  # yarn (0 = not given)
    rope_mscale_all_dim: float = 0.0  # yarn (0 = not given)
    rope_truncate: bool = True  # yarn: floor / ceil the correction range
    rope_attention_factor: float | None = None  # yarn: given explicitly (None = from factor and mscale)
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    name: str = ""

    def __post_init__(self):
        _check_types(self)
        if not self.moe_layers:
            object.__setattr__(self, "moe_layers", (True,) * self.num_layers)
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (0,) * self.num_layers)
        if not self.rotary_dim:
            object.__setattr__(self, "rotary_dim", self.head_dim)
        problems = self.problems()
        if problems:
            raise ValueError(
                f"inconsistent model config {self.name or self.model_type!r}: " + "; ".join(problems)
            )

    def problems(self) -> list[str]:
        p = []
        if self.model_type not in SUPPORTED_TYPES:
            p.append(f"model_type {self.model_type!r} is not one of {', '.join(SUPPORTED_TYPES)}")
        for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, f) < 1:
                p.append(f"{f} = {getattr(self, f)} must be >= 1")
        if self.num_kv_heads >= 1 and self.num_heads % self.num_kv_heads:
            p.append(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                     f"num_key_value_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            p.append(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.rotary_dim % 2 or not 2 <= self.rotary_dim <= self.head_dim:
            p.append(f"rotary dim ({self.rotary_dim}, head_dim x partial_rotary_factor) must be even and "
                     f"in 2..head_dim ({self.head_dim})")
        p += self._router_problems()
        if any(self.moe_layers):
            if self.num_experts < 1 or self.moe_ffn < 1:
                p.append(f"MoE layers need num_experts >= 1 and an expert FFN width >= 1 "
                         f"(got {self.num_experts}, {self.moe_ffn})")
            if not 1 <= self.top_k <= max(self.num_experts, 1):
                p.append(f"num_experts_per_tok ({self.top_k}) must be in 1..num_experts ({self.num_experts})")
        if not all(self.moe_layers) and self.dense_ffn < 1:
            p.append("dense (mlp_only) layers need intermediate_size >= 1")
        if len(self.moe_layers) != self.num_layers or len(self.sliding_windows) != self.num_layers:
            p.append(f"per-layer lists must have num_hidden_layers ({self.num_layers}) entries")
        if self.qk_norm not in ("none", "full", "head"):
            p.append(f"qk_norm {self.qk_norm!r} is not none|full|head")
        if self.scoring not in SCORINGS:
            p.append(f"scoring {self.scoring!r} is not one of {', '.join(SCORINGS)}")
        if self.expert_act not in EXPERT_ACTS:
            p.append(f"expert_act {self.expert_act!r} is not one of {', '.join(EXPERT_ACTS)}")
        if self.rope_type not in ROPE_TYPES:
            p.append(f"rope type {self.rope_type!r} is not one of {', '.join(ROPE_TYPES)}")
        elif self.rope_type != "default" and self.rope_factor <= 0:
            p.append(f"rope factor ({self.rope_factor}) must be > 0")
        if self.rope_type == "llama3" and self.rope_low_freq_factor == self.rope_high_freq_factor:
            p.append("llama3 rope needs low_freq_factor != high_freq_factor")
        bad_eos = [e for e in self.eos_token_ids if not 0 <= e < self.vocab_size]
        if bad_eos:
            p.append(f"eos_token_id {bad_eos} outside the vocabulary (0..{self.vocab_size - 1})")
        return p

    def _router_problems(self) -> list[str]:
        p = []  # scoring's own value is checked in problems()
        if self.score_bias and self.scoring != "sigmoid":
            p.append("e_score_correction_bias (score_bias) needs sigmoid scoring")
        if self.routed_scaling <= 0:
            p.append(f"routed_scaling_factor ({self.routed_scaling}) must be > 0")
        if self.n_group < 1 or (self.num_experts >= 1 and self.num_experts % self.n_group):
            p.append(f"n_group ({self.n_group}) must be >= 1 and divide num_experts ({self.num_experts})")
        elif not 1 <= self.topk_group <= self.n_group:
            p.append(f"topk_group ({self.topk_group}) must be in 1..n_group ({self.n_group})")
        elif self.n_group > 1 and self.scoring != "sigmoid":
            p.append("group-limited routing (n_group > 1) needs sigmoid scoring")
        elif any(self.moe_layers) and self.topk_group * (self.num_experts // self.n_group) < self.top_k:
            p.append(f"topk_group ({self.topk_group}) groups of {self.num_experts // self.n_group} experts hold "
                     f"fewer than num_experts_per_tok ({self.top_k}) experts; raise topk_group")
        return p

    # ----------------------------------------------------------------- loading
    @staticmethod
    def load(model: str | Path) -> "ModelConfig":
        """A preset name (``tiny``, ``seed-30b``) or a directory / path of a config.json."""
        path = Path(model)
        if path.is_dir():
            path = path / "config.json"
        elif not path.exists():
            path = PRESET_DIR / f"{model}.json"
            if not path.exists():
                raise ValueError(
                    f"model {str(model)!r} is neither a directory with config.json nor a preset; "
                    f"presets: {', '.join(list_presets())}"
                )
        if not path.exists():
            raise ValueError(f"{path} not found: a checkpoint directory must hold config.json")
        raw = _read_json(path)
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        gen = path.with_name("generation_config.json")
        if gen.is_file():  # transformers' generate stops at these EOS ids: so does moerun
            eos = _read_json(gen).get("eos_token_id")
            if eos is not None:
                raw = {**raw, "eos_token_id": eos}
        return ModelConfig.from_hf(raw, name=str(model))

    @staticmethod
    def from_hf(raw: dict, name: str = "") -> "ModelConfig":
        """From a Hugging Face config.json (see ``moerun.hf_config``)."""
        return ModelConfig(**fields_from_hf(raw, name))

    def to_hf(self) -> dict:
        """The config.json that transformers reads back as this model."""
        return to_hf(self)

    # ------------------------------------------------------------------ sizes
    # The one set of parameter-count formulas: the whole model, and (for the planner) the
    # shard a rank holds, given the heads and experts it owns (moerun.parallel says which).
    def attn_matmul_params(self, q_heads: int | None = None, kv_heads: int | None = None) -> int:
        """q, k, v (column-parallel) and o (row-parallel) weights of ``q_heads`` query and
        ``kv_heads`` KV heads (None = all): the weights a token's attention multiplies by."""
        q = (self.num_heads if q_heads is None else q_heads) * self.head_dim
        kv = (self.num_kv_heads if kv_heads is None else kv_heads) * self.head_dim
        return self.hidden_size * (q + 2 * kv) + q * self.hidden_size

    def attn_params(self, q_heads: int | None = None, kv_heads: int | None = None) -> int:
        """One layer's attention holding ``q_heads`` / ``kv_heads`` heads (None = all). q/k/v
        biases and an OLMoE "full" q/k-norm scale with the heads held (they are sharded with
        their columns); the o bias and a per-head ("head") q/k-norm are whole on every shard."""
        hd = self.head_dim
        q = (self.num_heads if q_heads is None else q_heads) * hd
        kv = (self.num_kv_heads if kv_heads is None else kv_heads) * hd
        n = self.attn_matmul_params(q_heads, kv_heads)
        if self.qkv_bias:
            n += q + 2 * kv
        if self.o_bias:
            n += self.hidden_size
        if self.qk_norm == "full":
            n += q + kv
        elif self.qk_norm == "head":
            n += 2 * hd
        if self.attn_sinks:  # one logit per query head, sharded with the heads
            n += self.num_heads if q_heads is None else q_heads
        return n

    def expert_params(self) -> int:
        """One routed expert: gate, up and down projections (and their biases)."""
        n = 3 * self.hidden_size * self.moe_ffn
        return n + 2 * self.moe_ffn + self.hidden_size if self.expert_bias else n

    def norm_params(self) -> int:
        """A layer's two RMSNorms (before attention, before the MLP)."""
        return 2 * self.hidden_size

    def router_params(self, layer: int) -> int:
        """The router of a MoE layer (E x H, + E with a bias, + the E-entry
        e_score_correction_bias when it has one); a dense layer has none."""
        if not self.moe_layers[layer]:
            return 0
        E = self.num_experts
        return E * self.hidden_size + (E if self.router_bias else 0) + (E if self.score_bias else 0)

    def mlp_params(self, layer: int) -> int:
        """What is not routed: a dense layer's SwiGLU MLP, or a MoE layer's shared expert(s)
        (with Qwen2-MoE's one-output gate when gated; 0 without one)."""
        H = self.hidden_size
        if not self.moe_layers[layer]:
            return 3 * H * self.dense_ffn
        if not self.shared_expert_ffn:
            return 0
        return 3 * H * self.shared_expert_ffn + (H if self.shared_expert_gated else 0)

    def layer_params(self, layer: int) -> int:
        n = self.attn_params() + self.norm_params() + self.router_params(layer) + self.mlp_params(layer)
        if self.moe_layers[layer]:
            n += self.num_experts * self.expert_params()
        return n

    def num_params(self) -> int:
        emb = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else emb
        return emb + head + self.hidden_size + sum(self.layer_params(i) for i in range(self.num_layers))

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


def _read_json(path: Path):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or replace the file") from None


def _check_types(cfg: "ModelConfig") -> None:
    """A config.json field of the wrong type (e.g. "hidden_size": "64") named, before any
    arithmetic on it fails obscurely."""
    bad = []
    for f in dataclasses.fields(cfg):
        v, hint = getattr(cfg, f.name), str(f.type)
        if hint == "int" and (type(v) is not int):
            bad.append(f"{f.name} = {v!r} must be an integer")
        elif hint == "float" and (isinstance(v, bool) or not isinstance(v, (int, float))):
            bad.append(f"{f.name} = {v!r} must be a number")
        elif hint == "bool" and not isinstance(v, bool):
            bad.append(f"{f.name} = {v!r} must be true or false")
    if bad:
        raise ValueError(f"config {cfg.name or cfg.model_type!r}: " + "; ".join(bad))


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))
