"""Checkpoints: save/load round trips through transformers, sharded files, and a clear
error for every kind of broken checkpoint or config."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import edited_copy
from moerun.config import ModelConfig
from moerun.build import build_model, forward_logits
from moerun.weights import CheckpointError, full_model_shapes, save_checkpoint


def logits_of(model, ids):
    return forward_logits(model, [ids])[0]


def small_preset(**kw) -> ModelConfig:
    return ModelConfig.load("tiny").replace(num_layers=2, num_experts=8, moe_layers=(), sliding_windows=(), **kw)


def test_seed_30b_param_count_without_allocating():
    cfg = ModelConfig.load("seed-30b")
    H, V, E, Fw, L = 1024, 32000, 64, 9472, 16
    attn = H * 16 * 64 + 2 * H * 4 * 64 + 16 * 64 * H
    per_layer = attn + 2 * H + E * H + E * 3 * H * Fw
    expected = 2 * V * H + H + L * per_layer
    assert cfg.num_params() == expected == 29_904_897_024
    shapes = full_model_shapes(cfg)  # built on the meta device: nothing allocated
    assert sum(torch.Size(s).numel() for s in shapes.values()) == expected


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "glm4_moe", "dots1", "minimax_m2", "gpt_oss"])
def test_save_load_round_trip_through_transformers(family, hf_checkpoint, tmp_path):
    import transformers

    path, hf = hf_checkpoint(family)
    ours = build_model(str(path))
    save_checkpoint(ours, tmp_path / "out")
    again = build_model(str(tmp_path / "out"))
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, ours.cfg.vocab_size, (9,)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
        assert (hf2(torch.tensor([ids])).logits[0] - ref).abs().max() <= 1e-5
    assert (logits_of(again, ids) - ref).abs().max() <= 1e-4


def test_preset_saved_loads_in_transformers(tmp_path):
    import transformers

    cfg = small_preset()
    ours = build_model("tiny", cfg=cfg, seed=3)
    save_checkpoint(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = [256, 72, 105, 33]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (logits_of(ours, ids) - ref).abs().max() <= 1e-4


def test_sharded_checkpoint_with_index(hf_checkpoint, tmp_path):
    path, hf = hf_checkpoint("olmoe")
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ids = [5, 6, 7, 8]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (logits_of(build_model(str(tmp_path)), ids) - ref).abs().max() <= 1e-4


def test_missing_tensor_is_named(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("mixtral")
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    d = edited_copy(path, tmp_path / "ck", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\).*experts\.3\.w2\.weight \[64, 48\]"):
        build_model(str(d))


def test_unexpected_tensor_is_named(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("mixtral")
    d = edited_copy(path, tmp_path / "ck", lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(1\): model\.layers\.0\.extra\.weight"):
        build_model(str(d))


def test_misshaped_tensor_is_named(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("qwen3_moe")
    name = "model.layers.2.self_attn.k_proj.weight"
    d = edited_copy(path, tmp_path / "ck", lambda t: t.update({name: torch.zeros(40, 64)}))
    with pytest.raises(CheckpointError, match=r"mis-shaped.*k_proj\.weight: expected \[48, 64\], found \[40, 64\]"):
        build_model(str(d))


def test_no_safetensors_files(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("mixtral")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no \\*.safetensors files"):
        build_model(str(tmp_path))


@pytest.mark.parametrize("edit, message", [
    ({"model_type": "llama"}, "model_type 'llama' is not supported"),
    ({"num_key_value_heads": 3}, r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"),
    ({"num_experts_per_tok": 9}, r"num_experts_per_tok \(9\) must be in 1..num_experts \(8\)"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}},
     "rope type 'dynamic' is not supported; moerun reads the rope types default, linear, llama3, yarn"),
    ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, "rope type 'longrope' is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 0}}, "rope type 'yarn' needs a positive 'factor'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0}},
     "needs low_freq_factor and high_freq_factor"),
    ({"vocab_size": None}, "missing required field 'vocab_size'"),
])
def test_bad_config_is_rejected(edit, message, hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("mixtral")
    raw = json.loads((path / "config.json").read_text())
    raw.update(edit)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=message):
        ModelConfig.load(tmp_path)


@pytest.mark.parametrize("edit, message", [
    ({"layer_types": ["sliding_attention", "full_attention"]}, "layer_types has 2 entries, num_hidden_layers is 3"),
    ({"layer_types": ["sliding_attention", "chunked_attention", "full_attention"]},
     r"layer_types \['chunked_attention'\] are not supported"),
    ({"sliding_window": None}, "sliding_attention layers but sliding_window is not set"),
    ({"swiglu_limit": "7"}, "swiglu_limit = '7' must be a number"),
])
def test_bad_gpt_oss_config_is_rejected(edit, message, hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("gpt_oss")
    raw = {**json.loads((path / "config.json").read_text()), **edit}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=message):
        ModelConfig.load(tmp_path)


def test_both_rope_spellings():
    base = json.loads(open(ModelConfig.load.__globals__["PRESET_DIR"] / "tiny.json").read())
    v4 = {**base, "rope_theta": 12345.0}
    v5 = {**{k: v for k, v in base.items() if k != "rope_theta"},
          "rope_parameters": {"rope_type": "default", "rope_theta": 12345.0}}
    assert ModelConfig.from_hf(v4).rope_theta == ModelConfig.from_hf(v5).rope_theta == 12345.0


def test_unknown_preset():
    with pytest.raises(ValueError, match="neither a directory with config.json nor a preset; presets: cpu-1024, seed-30b, tiny"):
        ModelConfig.load("nope")
