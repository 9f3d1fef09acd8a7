"""RoPE scaling types: the inverse frequencies and attention factor moerun reads from a
config.json equal transformers' own (``ROPE_INIT_FUNCTIONS``) for the same config, in both
spellings (transformers 5 ``rope_parameters``, transformers 4 ``rope_scaling`` + ``rope_theta``)."""
from __future__ import annotations

import json

import pytest
import torch

from moerun.config import PRESET_DIR, ModelConfig
from moerun.model.layers import rope_cos_sin
from moerun.model.rope import rope_parameters

BASE = json.loads((PRESET_DIR / "tiny.json").read_text())  # head_dim 32, max_position_embeddings 4096

CASES = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256},
    "yarn-gpt-oss": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                     "original_max_position_embeddings": 128},
    "yarn-truncate": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
    "yarn-mscale": {"rope_type": "yarn", "factor": 40.0, "mscale": 0.707, "mscale_all_dim": 1.0,
                    "beta_fast": 16.0, "beta_slow": 2.0, "original_max_position_embeddings": 512},
    "yarn-attention-factor": {"rope_type": "yarn", "factor": 2.0, "attention_factor": 0.8,
                              "original_max_position_embeddings": 2048},
}


def transformers_rope(params: dict, theta: float):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.LlamaConfig(hidden_size=BASE["hidden_size"], num_attention_heads=BASE["num_attention_heads"],
                                   head_dim=BASE["head_dim"], max_position_embeddings=BASE["max_position_embeddings"],
                                   rope_parameters={**params, "rope_theta": theta})
    return ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, "cpu")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("spelling", ["rope_parameters", "rope_scaling"])
def test_rope_types_equal_transformers(case, spelling):
    theta = 50000.0
    params = CASES[case]
    raw = {k: v for k, v in BASE.items() if k != "rope_theta"}
    if spelling == "rope_parameters":
        raw["rope_parameters"] = {**params, "rope_theta": theta}
    else:
        raw.update(rope_theta=theta, rope_scaling=params)
    cfg = ModelConfig.from_hf(raw)
    assert cfg.rope_type == params["rope_type"]
    inv_freq, factor = rope_parameters(cfg)
    want_freq, want_factor = transformers_rope(params, theta)
    assert inv_freq.dtype == torch.float32 and inv_freq.shape == want_freq.shape
    assert torch.allclose(inv_freq, want_freq.float(), rtol=1e-6, atol=0), (inv_freq - want_freq).abs().max()
    assert factor == pytest.approx(want_factor, rel=1e-12)
    # the interpolation really changed something, so the comparison is not the default's
    assert not torch.allclose(inv_freq, rope_parameters(cfg.replace(rope_type="default"))[0])
    # and the attention factor scales cos and sin
    cos, sin = rope_cos_sin(torch.arange(5), inv_freq, torch.float32, factor)
    freqs = torch.arange(5).float()[:, None] * want_freq[None, :]
    assert torch.allclose(cos[:, :16], freqs.cos() * want_factor, atol=1e-6)
    assert torch.allclose(sin[:, 16:], freqs.sin() * want_factor, atol=1e-6)


def test_rope_fields_survive_to_hf():
    raw = {**BASE, "rope_parameters": {**CASES["yarn-mscale"], "rope_theta": 1e4}}
    cfg = ModelConfig.from_hf(raw)
    again = ModelConfig.from_hf(cfg.to_hf())
    assert again.replace(name="") == cfg.replace(name="")
    llama = ModelConfig.from_hf({**BASE, "rope_scaling": CASES["llama3"]})
    assert ModelConfig.from_hf(llama.to_hf()).replace(name="") == llama.replace(name="")


@pytest.mark.parametrize("params, message", [
    ({"rope_type": "dynamic", "factor": 2.0}, "rope type 'dynamic' is not supported"),
    ({"rope_type": "yarn", "original_max_position_embeddings": 512}, "rope type 'yarn' needs a positive 'factor'"),
    ({"rope_type": "yarn", "factor": 2.0, "truncate": "no"}, "truncate = 'no' must be true or false"),
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 0.5},
     "original_max_position_embeddings = 0.5 must be a positive integer"),
    ({"rope_type": "linear", "factor": "2"}, "factor = '2' must be a number"),
    ({"full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "linear", "factor": 2.0}},
     r"RoPE parameters per layer type \(full_attention, sliding_attention\) are not supported"),
])
def test_bad_rope_is_named(params, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf({**BASE, "rope_parameters": params})
