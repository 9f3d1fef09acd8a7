"""The Hugging Face translation of ``ModelConfig``: config.json fields in, config.json out.

Each family spells the same facts differently (``num_experts`` / ``num_local_experts`` /
``n_routed_experts``, ``rope_theta`` / ``rope_parameters``, ``mlp_only_layers`` /
``first_k_dense_replace``, ``layer_types``, ``partial_rotary_factor`` / ``rotary_dim``); this module
turns them into ``ModelConfig``'s few family-free fields and back. It imports nothing of
moerun: ``moerun.config`` calls it.

    kw = fields_from_hf(json.load(open("config.json")))   # ModelConfig(**kw)
    raw = to_hf(cfg)                                       # what save_checkpoint writes
"""
from __future__ import annotations

import logging

log = logging.getLogger("moerun")

SUPPORTED_TYPES = ("olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "glm4_moe", "dots1", "minimax_m2", "gpt_oss")
# the families with DeepSeek-V3's router: sigmoid scores, e_score_correction_bias, groups
SIGMOID_ROUTED = ("glm4_moe", "dots1", "minimax_m2")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # the math: moerun.model.rope
EXPERT_ACTS = ("silu", "swiglu_oai")
# transformers' defaults when config.json gives no rope_theta / no RoPE parameters
_DEFAULT_THETA = {"gpt_oss": 150000.0, "minimax_m2": 5e6}
_DEFAULT_ROPE = {"gpt_oss": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                             "truncate": False, "original_max_position_embeddings": 4096}}


# config.json fields that must be integers when present (their arithmetic comes first)
INT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "num_experts", "num_local_experts", "num_experts_per_tok", "intermediate_size",
              "moe_intermediate_size", "shared_expert_intermediate_size", "decoder_sparse_step",
              "max_position_embeddings", "sliding_window", "max_window_layers", "n_routed_experts",
              "n_shared_experts", "n_group", "topk_group", "first_k_dense_replace", "rotary_dim",
              "num_nextn_predict_layers", "original_max_position_embeddings")


def fields_from_hf(raw: dict, name: str = "") -> dict:
    """ModelConfig's fields from a Hugging Face config.json (a dict); ValueError names what is wrong."""
    bad = [f"{k} = {raw[k]!r} must be an integer" for k in INT_FIELDS
           if raw.get(k) is not None and type(raw[k]) is not int]
    if bad:
        raise ValueError("config.json: " + "; ".join(bad))
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
    E = raw.get("num_experts", raw.get("num_local_experts", raw.get("n_routed_experts")))
    if E is None:
        raise ValueError("config.json has none of num_experts, num_local_experts, n_routed_experts")
    kw = dict(
        model_type=mt, name=name, vocab_size=_req(raw, "vocab_size"), hidden_size=H,
        num_layers=L, num_heads=nh, num_kv_heads=nkv, head_dim=hd, num_experts=E,
        top_k=_req(raw, "num_experts_per_tok"), rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rotary_dim=_rotary_dim(raw, mt, hd), tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        bos_token_id=raw.get("bos_token_id"), eos_token_ids=_eos(raw.get("eos_token_id"), raw["vocab_size"]),
        **_rope(raw, mt),
    )
    if mt == "olmoe":
        kw.update(moe_ffn=_req(raw, "intermediate_size"), qk_norm="full",
                  qkv_bias=bool(raw.get("attention_bias", False)),
                  o_bias=bool(raw.get("attention_bias", False)), clip_qkv=raw.get("clip_qkv"),
                  norm_topk_prob=bool(raw.get("norm_topk_prob", False)))
    elif mt == "gpt_oss":
        bias = bool(raw.get("attention_bias", True))
        kw.update(moe_ffn=_req(raw, "intermediate_size"), qkv_bias=bias, o_bias=bias,
                  sliding_windows=_layer_type_windows(raw, L), scoring="topk_softmax", router_bias=True,
                  expert_bias=True, expert_act="swiglu_oai", swiglu_alpha=_num(raw, "swiglu_alpha", 1.702),
                  swiglu_limit=_num(raw, "swiglu_limit", 7.0), attn_sinks=True)
    elif mt == "mixtral":
        sw = raw.get("sliding_window") or 0
        kw.update(moe_ffn=_req(raw, "intermediate_size"), norm_topk_prob=True,
                  sliding_windows=(sw,) * L)
    elif mt in SIGMOID_ROUTED:
        kw.update(_sigmoid_routed(raw, mt, L))
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
    return kw


def _sigmoid_routed(raw: dict, mt: str, L: int) -> dict:
    """glm4_moe, dots1, minimax_m2: DeepSeek-V3's router (sigmoid scores, a correction bias
    that only chooses, groups, scaling); GLM-4.5 and dots.llm1 add ungated shared experts
    (``n_shared_experts * moe_intermediate_size`` wide) and dense first layers."""
    kw = dict(scoring="sigmoid", score_bias=True)
    if mt == "minimax_m2":  # its router always renormalises; no groups, no scaling, no shared expert
        return {**kw, "moe_ffn": _req(raw, "intermediate_size"), "norm_topk_prob": True, "qk_norm": "full"}
    glm = mt == "glm4_moe"
    moe_ffn = _req(raw, "moe_intermediate_size")
    k = raw.get("first_k_dense_replace", 1 if glm else 0) or 0
    bias = bool(raw.get("attention_bias", False))
    kw.update(moe_ffn=moe_ffn, dense_ffn=raw.get("intermediate_size") or 0, moe_layers=tuple(i >= k for i in range(L)),
              shared_expert_ffn=(raw.get("n_shared_experts", 1 if glm else 0) or 0) * moe_ffn,
              shared_expert_gated=False, n_group=raw.get("n_group") or 1, topk_group=raw.get("topk_group") or 1,
              routed_scaling=raw.get("routed_scaling_factor", 1.0),
              norm_topk_prob=bool(raw.get("norm_topk_prob", glm)), qkv_bias=bias)
    if glm:
        kw.update(qk_norm="head" if raw.get("use_qk_norm", False) else "none")
    else:  # dots1: per-head q/k norm always, o_proj biased with the rest, sliding layers by layer_types
        if raw.get("layer_types") is None:  # transformers' Dots1Config derives them so
            mwl = raw.get("max_window_layers", L)
            raw = {**raw, "layer_types": ["sliding_attention" if raw.get("sliding_window") is not None and i >= mwl
                                          else "full_attention" for i in range(L)]}
        kw.update(qk_norm="head", o_bias=bias, sliding_windows=_qwen2_windows(raw, L))
    return kw


def _rotary_dim(raw: dict, mt: str, hd: int) -> int:
    """Dims of each head that RoPE rotates (the first ones): transformers' int(head_dim *
    partial_rotary_factor) for GLM-4.5 (default 0.5) and MiniMax-M2 (or its ``rotary_dim``);
    the whole head for every other family."""
    if mt not in ("glm4_moe", "minimax_m2"):
        return hd
    rp = raw.get("rope_parameters") if isinstance(raw.get("rope_parameters"), dict) else {}
    factor = rp.get("partial_rotary_factor", raw.get("partial_rotary_factor"))
    if factor is None and mt == "minimax_m2" and raw.get("rotary_dim") is not None:
        return raw["rotary_dim"]
    if factor is None:
        factor = 0.5 if mt == "glm4_moe" else 1.0
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
        raise ValueError(f"partial_rotary_factor = {factor!r} must be a number in (0, 1]")
    return int(hd * factor)


def to_hf(cfg) -> dict:
    """The config.json that transformers reads back as the same ``ModelConfig``."""
    common = {
        "model_type": cfg.model_type, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "num_experts_per_tok": cfg.top_k, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": _rope_to_hf(cfg),
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "hidden_act": "silu",
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1
        else (cfg.eos_token_ids[0] if cfg.eos_token_ids else None),
        "architectures": [_ARCH[cfg.model_type]],
    }
    if cfg.model_type in SIGMOID_ROUTED:
        common.update(_sigmoid_routed_to_hf(cfg))
    elif cfg.model_type == "olmoe":
        common.update(num_experts=cfg.num_experts, intermediate_size=cfg.moe_ffn, clip_qkv=cfg.clip_qkv,
                      attention_bias=cfg.qkv_bias, norm_topk_prob=cfg.norm_topk_prob)
    elif cfg.model_type == "gpt_oss":
        windows = {w for w in cfg.sliding_windows if w}
        common.update(num_local_experts=cfg.num_experts, intermediate_size=cfg.moe_ffn,
                      attention_bias=cfg.qkv_bias, swiglu_alpha=cfg.swiglu_alpha, swiglu_limit=cfg.swiglu_limit,
                      sliding_window=windows.pop() if windows else None,
                      layer_types=["sliding_attention" if w else "full_attention" for w in cfg.sliding_windows])
    elif cfg.model_type == "mixtral":
        sw = cfg.sliding_windows[0] if cfg.sliding_windows else 0
        common.update(num_local_experts=cfg.num_experts, intermediate_size=cfg.moe_ffn,
                      sliding_window=sw or None)
    else:
        common.update(num_experts=cfg.num_experts, moe_intermediate_size=cfg.moe_ffn,
                      intermediate_size=cfg.dense_ffn or cfg.moe_ffn, norm_topk_prob=cfg.norm_topk_prob,
                      decoder_sparse_step=1,
                      mlp_only_layers=[i for i, m in enumerate(cfg.moe_layers) if not m])
        if cfg.model_type == "qwen2_moe":
            common.update(qkv_bias=cfg.qkv_bias, shared_expert_intermediate_size=cfg.shared_expert_ffn,
                          use_sliding_window=False, sliding_window=None)
        else:
            common.update(attention_bias=cfg.qkv_bias, use_sliding_window=False, sliding_window=None)
    return common


def _sigmoid_routed_to_hf(cfg) -> dict:
    factor = cfg.rotary_dim / cfg.head_dim
    rope = {**_rope_to_hf(cfg), "partial_rotary_factor": factor}
    if cfg.model_type == "minimax_m2":
        return dict(num_local_experts=cfg.num_experts, intermediate_size=cfg.moe_ffn, rotary_dim=cfg.rotary_dim,
                    rope_parameters=rope)
    k = cfg.moe_layers.index(True) if any(cfg.moe_layers) else cfg.num_layers
    if cfg.moe_layers != tuple(i >= k for i in range(cfg.num_layers)):
        raise ValueError(f"{cfg.model_type} has dense layers only first (first_k_dense_replace); "
                         f"moe_layers {cfg.moe_layers} cannot be written")
    if cfg.shared_expert_ffn % cfg.moe_ffn or cfg.shared_expert_gated:
        raise ValueError(f"{cfg.model_type}'s shared experts are ungated and n_shared_experts x "
                         f"moe_intermediate_size wide; shared_expert_ffn {cfg.shared_expert_ffn} is not a "
                         f"multiple of moe_ffn {cfg.moe_ffn}")
    out = dict(n_routed_experts=cfg.num_experts, moe_intermediate_size=cfg.moe_ffn,
               intermediate_size=cfg.dense_ffn or cfg.moe_ffn, first_k_dense_replace=k,
               n_shared_experts=cfg.shared_expert_ffn // cfg.moe_ffn, n_group=cfg.n_group,
               topk_group=cfg.topk_group, routed_scaling_factor=cfg.routed_scaling,
               norm_topk_prob=cfg.norm_topk_prob, attention_bias=cfg.qkv_bias)
    if cfg.model_type == "glm4_moe":
        return {**out, "use_qk_norm": cfg.qk_norm == "head", "rope_parameters": rope, "num_nextn_predict_layers": 0}
    if cfg.rotary_dim != cfg.head_dim:
        raise ValueError(f"dots1 rotates the whole head; rotary_dim {cfg.rotary_dim} != head_dim {cfg.head_dim} "
                         "cannot be written")
    windows = [w for w in cfg.sliding_windows if w]
    if len(set(windows)) > 1:
        raise ValueError(f"dots1 has one sliding_window; sliding_windows {cfg.sliding_windows} cannot be written")
    return {**out, "sliding_window": windows[0] if windows else None, "max_window_layers": cfg.num_layers,
            "layer_types": ["sliding_attention" if w else "full_attention" for w in cfg.sliding_windows]}


_ARCH = {"olmoe": "OlmoeForCausalLM", "mixtral": "MixtralForCausalLM",
         "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
         "glm4_moe": "Glm4MoeForCausalLM", "dots1": "Dots1ForCausalLM", "minimax_m2": "MiniMaxM2ForCausalLM",
         "gpt_oss": "GptOssForCausalLM"}


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


def _num(d: dict, key: str, default, where: str = "config.json"):
    v = d.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{where}: {key} = {v!r} must be a number")
    return float(v)


def _rope(raw: dict, mt: str) -> dict:
    """ModelConfig's rope_* fields from ``rope_parameters`` (transformers 5) or ``rope_scaling``
    (transformers 4, with a top-level ``rope_theta``), as transformers reads them."""
    rp, scaling = raw.get("rope_parameters"), raw.get("rope_scaling")
    params = scaling if isinstance(scaling, dict) else rp if isinstance(rp, dict) else None
    if params is None:
        params = _DEFAULT_ROPE.get(mt, {})
    nested = sorted(k for k, v in params.items() if isinstance(v, dict))
    if nested:
        raise ValueError(f"RoPE parameters per layer type ({', '.join(nested)}) are not supported: "
                         "moerun reads one rope_parameters dict for all layers")
    theta = params.get("rope_theta", raw.get("rope_theta", _DEFAULT_THETA.get(mt, 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope type {kind!r} is not supported; moerun reads the rope types "
                         f"{', '.join(ROPE_TYPES)}: use a checkpoint with one of them")
    where = "rope_parameters" if params is rp else "rope_scaling" if params is scaling else f"{mt}'s default RoPE"
    out = dict(rope_theta=_num({"rope_theta": theta}, "rope_theta", 10000.0), rope_type=kind)
    if kind == "default":
        return out
    max_pos = raw.get("max_position_embeddings", 4096)
    original = params.get("original_max_position_embeddings", raw.get("original_max_position_embeddings", max_pos))
    if kind != "linear" and (type(original) is not int or original < 1):
        raise ValueError(f"{where}: original_max_position_embeddings = {original!r} must be a positive integer")
    factor = _num(params, "factor", None, where)
    if factor is None or factor <= 0:
        raise ValueError(f"{where}: rope type {kind!r} needs a positive 'factor'")
    out.update(rope_factor=factor)
    if kind == "llama3":
        low, high = (_num(params, k, None, where) for k in ("low_freq_factor", "high_freq_factor"))
        if low is None or high is None or low == high:
            raise ValueError(f"{where}: rope type 'llama3' needs low_freq_factor and high_freq_factor, "
                             f"different (got {low}, {high})")
        out.update(rope_original_max_position=original, rope_low_freq_factor=low, rope_high_freq_factor=high)
    elif kind == "yarn":
        truncate = params.get("truncate", True)
        if not isinstance(truncate, bool):
            raise ValueError(f"{where}: truncate = {truncate!r} must be true or false")
        out.update(rope_original_max_position=original, rope_truncate=truncate,
                   rope_beta_fast=_num(params, "beta_fast", 0.0, where) or 32.0,
                   rope_beta_slow=_num(params, "beta_slow", 0.0, where) or 1.0,
                   rope_mscale=_num(params, "mscale", 0.0, where),
                   rope_mscale_all_dim=_num(params, "mscale_all_dim", 0.0, where),
                   rope_attention_factor=_num(params, "attention_factor", None, where))
    return out


def _rope_to_hf(cfg) -> dict:
    out = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type != "default":
        out["factor"] = cfg.rope_factor
    if cfg.rope_type in ("llama3", "yarn"):
        out["original_max_position_embeddings"] = cfg.rope_original_max_position or cfg.max_position_embeddings
    if cfg.rope_type == "llama3":
        out.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor)
    elif cfg.rope_type == "yarn":
        out.update(beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow, truncate=cfg.rope_truncate)
        out.update({k: v for k, v in (("mscale", cfg.rope_mscale), ("mscale_all_dim", cfg.rope_mscale_all_dim)) if v})
        if cfg.rope_attention_factor is not None:
            out["attention_factor"] = cfg.rope_attention_factor
    return out


def _layer_type_windows(raw: dict, L: int) -> tuple[int, ...]:
    """GPT-OSS: ``layer_types`` (default: sliding on even layers, full on odd, as transformers
    derives it) with one ``sliding_window``."""
    sw = raw.get("sliding_window") or 0
    types = raw.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(L)]
    if len(types) != L:
        raise ValueError(f"layer_types has {len(types)} entries, num_hidden_layers is {L}")
    bad = sorted({t for t in types if t not in ("sliding_attention", "full_attention")})
    if bad:
        raise ValueError(f"layer_types {bad} are not supported (sliding_attention or full_attention)")
    if sw < 1 and "sliding_attention" in types:
        raise ValueError("layer_types names sliding_attention layers but sliding_window is not set (>= 1)")
    return tuple(sw if t == "sliding_attention" else 0 for t in types)


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
