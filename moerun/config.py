"""ModelConfig: the one description of a MoE model that every part of moerun reads.

Built from a Hugging Face ``config.json`` (model_type ``olmoe``, ``mixtral``,
``qwen2_moe``, ``qwen3_moe``; transformers 4 ``rope_theta`` and transformers 5
``rope_parameters`` spellings both accepted) or from a preset in ``configs/models/``.

    cfg = ModelConfig.load("tiny")            # preset name
    cfg = ModelConfig.load("/path/to/ckpt")   # directory holding config.json
    cfg.num_params()                          # exact parameter count, no allocation

Family differences are reduced to a few fields (``qk_norm``, ``qkv_bias``, ``o_bias``,
``norm_topk_prob``, ``shared_expert_ffn``, ``moe_layers``, ``sliding_windows``) so the
model code never branches on ``model_type``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .configs import CONFIG_DIR  # configs/, shipped as moerun.configs

log = logging.getLogger("moerun")

SUPPORTED_TYPES = ("olmoe", "mixtral", "qwen2_moe", "qwen3_moe")

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
    shared_expert_ffn: int = 0  # Qwen2-MoE's always-on expert (0 = none)
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
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""

    def __post_init__(self):
        if not self.moe_layers:
            object.__setattr__(self, "moe_layers", (True,) * self.num_layers)
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (0,) * self.num_layers)
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
        bad_eos = [e for e in self.eos_token_ids if not 0 <= e < self.vocab_size]
        if bad_eos:
            p.append(f"eos_token_id {bad_eos} outside the vocabulary (0..{self.vocab_size - 1})")
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
        with open(path) as f:
            raw = json.load(f)
        return ModelConfig.from_hf(raw, name=str(model))

    @staticmethod
    def from_hf(raw: dict, name: str = "") -> "ModelConfig":
        mt = raw.get("model_type")
        if mt not in SUPPORTED_TYPES:
            raise ValueError(
                f"model_type {mt!r} is not supported; moerun reads {', '.join(SUPPORTED_TYPES)}"
            )
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (SwiGLU experts need 'silu')")
        L = _req(raw, "num_hidden_layers")
        H = _req(raw, "hidden_size")
        nh = _req(raw, "num_attention_heads")
        nkv = raw.get("num_key_value_heads") or nh
        hd = raw.get("head_dim") or H // nh
        if mt != "qwen3_moe" and raw.get("head_dim") is None and H % nh:
            raise ValueError(f"hidden_size ({H}) is not divisible by num_attention_heads ({nh})")
        E = raw.get("num_experts", raw.get("num_local_experts"))
        if E is None:
            raise ValueError("config.json has neither num_experts nor num_local_experts")
        kw = dict(
            model_type=mt, name=name, vocab_size=_req(raw, "vocab_size"), hidden_size=H,
            num_layers=L, num_heads=nh, num_kv_heads=nkv, head_dim=hd, num_experts=E,
            top_k=_req(raw, "num_experts_per_tok"), rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(raw), tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            bos_token_id=raw.get("bos_token_id"), eos_token_ids=_eos(raw.get("eos_token_id"), raw["vocab_size"]),
        )
        if mt == "olmoe":
            kw.update(moe_ffn=_req(raw, "intermediate_size"), qk_norm="full",
                      qkv_bias=bool(raw.get("attention_bias", False)),
                      o_bias=bool(raw.get("attention_bias", False)), clip_qkv=raw.get("clip_qkv"),
                      norm_topk_prob=bool(raw.get("norm_topk_prob", False)))
        elif mt == "mixtral":
            sw = raw.get("sliding_window") or 0
            kw.update(moe_ffn=_req(raw, "intermediate_size"), norm_topk_prob=True,
                      sliding_windows=(sw,) * L)
        else:  # qwen2_moe, qwen3_moe
            step = raw.get("decoder_sparse_step", 1) or 1
            only = set(raw.get("mlp_only_layers") or [])
            moe = tuple(i not in only and E > 0 and (i + 1) % step == 0 for i in range(L))
            kw.update(moe_ffn=_req(raw, "moe_intermediate_size"), dense_ffn=raw.get("intermediate_size", 0),
                      moe_layers=moe, norm_topk_prob=bool(raw.get("norm_topk_prob", False)))
            if mt == "qwen2_moe":
                kw.update(qkv_bias=bool(raw.get("qkv_bias", True)),
                          shared_expert_ffn=raw.get("shared_expert_intermediate_size", 0),
                          sliding_windows=_qwen2_windows(raw, L))
            else:
                bias = bool(raw.get("attention_bias", False))
                sw = raw.get("sliding_window") if raw.get("use_sliding_window", False) else 0
                kw.update(qk_norm="head", qkv_bias=bias, o_bias=bias, sliding_windows=(sw or 0,) * L)
        return ModelConfig(**kw)

    def to_hf(self) -> dict:
        """The config.json that transformers reads back as the same model."""
        common = {
            "model_type": self.model_type, "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim,
            "num_experts_per_tok": self.top_k, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) > 1
            else (self.eos_token_ids[0] if self.eos_token_ids else None),
            "architectures": [_ARCH[self.model_type]],
        }
        if self.model_type == "olmoe":
            common.update(num_experts=self.num_experts, intermediate_size=self.moe_ffn, clip_qkv=self.clip_qkv,
                          attention_bias=self.qkv_bias, norm_topk_prob=self.norm_topk_prob)
        elif self.model_type == "mixtral":
            sw = self.sliding_windows[0] if self.sliding_windows else 0
            common.update(num_local_experts=self.num_experts, intermediate_size=self.moe_ffn,
                          sliding_window=sw or None)
        else:
            common.update(num_experts=self.num_experts, moe_intermediate_size=self.moe_ffn,
                          intermediate_size=self.dense_ffn or self.moe_ffn, norm_topk_prob=self.norm_topk_prob,
                          decoder_sparse_step=1,
                          mlp_only_layers=[i for i, m in enumerate(self.moe_layers) if not m])
            if self.model_type == "qwen2_moe":
                common.update(qkv_bias=self.qkv_bias, shared_expert_intermediate_size=self.shared_expert_ffn,
                              use_sliding_window=False, sliding_window=None)
            else:
                common.update(attention_bias=self.qkv_bias, use_sliding_window=False, sliding_window=None)
        return common

    # ------------------------------------------------------------------ sizes
    def attn_params(self) -> int:
        H, hd = self.hidden_size, self.head_dim
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        n = H * (q + 2 * kv) + q * H
        if self.qkv_bias:
            n += q + 2 * kv
        if self.o_bias:
            n += H
        if self.qk_norm == "full":
            n += q + kv
        elif self.qk_norm == "head":
            n += 2 * hd
        return n

    def expert_params(self) -> int:
        """One routed expert: gate, up and down projections."""
        return 3 * self.hidden_size * self.moe_ffn

    def layer_params(self, layer: int) -> int:
        H = self.hidden_size
        n = self.attn_params() + 2 * H  # two RMSNorms
        if self.moe_layers[layer]:
            n += self.num_experts * H + self.num_experts * self.expert_params()
            if self.shared_expert_ffn:
                n += 3 * H * self.shared_expert_ffn + H
        else:
            n += 3 * H * self.dense_ffn
        return n

    def num_params(self) -> int:
        emb = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else emb
        return emb + head + self.hidden_size + sum(self.layer_params(i) for i in range(self.num_layers))

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


_ARCH = {"olmoe": "OlmoeForCausalLM", "mixtral": "MixtralForCausalLM",
         "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def _req(raw: dict, key: str):
    if raw.get(key) is None:
        raise ValueError(f"config.json is missing required field {key!r}")
    return raw[key]


def _eos(v, vocab_size: int) -> tuple[int, ...]:
    ids = () if v is None else tuple(v) if isinstance(v, (list, tuple)) else (int(v),)
    # transformers' own small test configs carry e.g. OLMoE's eos 50279 with a vocab of
    # a few hundred: such an id can never be sampled, so it is dropped, with a warning.
    outside = [i for i in ids if not 0 <= i < vocab_size]
    if outside:
        log.warning("eos_token_id %s is outside the vocabulary (%d tokens) and is ignored", outside, vocab_size)
    return tuple(i for i in ids if 0 <= i < vocab_size)


def _rope_theta(raw: dict) -> float:
    rp = raw.get("rope_parameters")  # transformers 5
    scaling = raw.get("rope_scaling")  # transformers 4
    if isinstance(rp, dict):
        kind = rp.get("rope_type", rp.get("type", "default"))
        theta = rp.get("rope_theta", raw.get("rope_theta", 10000.0))
    else:
        kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        theta = raw.get("rope_theta", 10000.0)
    if kind != "default":
        raise ValueError(f"rope type {kind!r} is not supported (only 'default' RoPE); "
                         "remove rope_scaling or use a checkpoint without it")
    return float(theta)


def _qwen2_windows(raw: dict, L: int) -> tuple[int, ...]:
    sw = raw.get("sliding_window") or 0
    types = raw.get("layer_types")
    if types is None:  # transformers 4: derived the same way transformers 5 derives layer_types
        use = raw.get("use_sliding_window", False)
        mwl = raw.get("max_window_layers", L)
        types = ["sliding_attention" if use and (i + 1) % 2 and i < mwl else "full_attention"
                 for i in range(L)]
    if len(types) != L:
        raise ValueError(f"layer_types has {len(types)} entries, num_hidden_layers is {L}")
    return tuple(sw if t == "sliding_attention" else 0 for t in types)
