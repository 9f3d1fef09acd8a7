"""GLM-4.5 (glm4_moe), dots.llm1 (dots1) and MiniMax-M2 (minimax_m2): their config.json
read into ModelConfig's family-free fields, bad router options named, FP8 block-scaled
weights read rank by rank, MTP layers skipped, and ``moerun layout`` on their checkpoints.
(Logits and greedy tokens against transformers: test_model_hf.py; torchrun layouts:
test_layouts.py.)"""
from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open

from conftest import COMMON, FAMILIES, FP8_BLOCK, edited_copy
from moerun.build import build_model, forward_logits
from moerun.comm import Comm
from moerun.config import ModelConfig
from moerun.layout_cli import main as layout_main, shard_params
from moerun.model import MoEModel
from moerun.parallel import ParallelConfig
from moerun.weights import CheckpointError, load_checkpoint


def test_config_fields_follow_config_json(hf_checkpoint):
    for family in ("glm4_moe", "dots1", "minimax_m2"):
        raw = {**COMMON, **FAMILIES[family]}
        cfg = ModelConfig.load(hf_checkpoint(family)[0])
        L, hd = raw["num_hidden_layers"], raw["head_dim"] if "head_dim" in raw else 64 // 4
        assert (cfg.scoring, cfg.score_bias) == ("sigmoid", True), family
        assert cfg.num_experts == raw.get("n_routed_experts", raw.get("num_local_experts"))
        if family == "minimax_m2":
            assert cfg.norm_topk_prob and cfg.qk_norm == "full" and cfg.shared_expert_ffn == 0
            assert cfg.rotary_dim == raw["rotary_dim"] and (cfg.n_group, cfg.routed_scaling) == (1, 1.0)
            assert cfg.moe_layers == (True,) * L
            continue
        k = raw["first_k_dense_replace"]
        assert cfg.moe_layers == tuple(i >= k for i in range(L)) and cfg.dense_ffn == raw["intermediate_size"]
        assert cfg.shared_expert_ffn == raw["n_shared_experts"] * raw["moe_intermediate_size"]
        assert not cfg.shared_expert_gated and cfg.qk_norm == "head" and cfg.qkv_bias
        assert (cfg.n_group, cfg.topk_group) == (raw["n_group"], raw["topk_group"])
        assert (cfg.routed_scaling, cfg.norm_topk_prob) == (raw["routed_scaling_factor"], raw["norm_topk_prob"])
        if family == "glm4_moe":
            assert cfg.rotary_dim == int(hd * raw["partial_rotary_factor"]) < hd and not cfg.o_bias
            assert cfg.sliding_windows == (0,) * L
        else:  # dots1 rotates the whole head; its layers from max_window_layers on slide
            assert cfg.rotary_dim == hd and cfg.o_bias
            assert cfg.sliding_windows == tuple(raw["sliding_window"] if i >= raw["max_window_layers"] else 0
                                                for i in range(L))


def test_glm4_defaults_match_transformers():
    """A GLM-4.5 config.json without the optional fields: transformers' defaults (half
    rotary, one shared expert, one dense layer, renormalised top-k)."""
    import transformers

    raw = {"model_type": "glm4_moe", **COMMON, "n_routed_experts": 8, "num_experts_per_tok": 2,
           "moe_intermediate_size": 16, "intermediate_size": 40}
    hf = transformers.Glm4MoeConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    cfg = ModelConfig.from_hf(raw)
    hd = 64 // 4
    assert cfg.rotary_dim == int(hd * hf.rope_parameters["partial_rotary_factor"])
    assert cfg.shared_expert_ffn == hf.n_shared_experts * 16
    assert cfg.moe_layers == tuple(i >= hf.first_k_dense_replace for i in range(3))
    assert cfg.norm_topk_prob == hf.norm_topk_prob and cfg.routed_scaling == hf.routed_scaling_factor


@pytest.mark.parametrize("edit, message", [
    ({"n_group": 3}, r"n_group \(3\) must be >= 1 and divide num_experts \(8\)"),
    ({"topk_group": 5}, r"topk_group \(5\) must be in 1..n_group \(4\)"),
    ({"topk_group": 1}, r"topk_group \(1\) groups of 2 experts hold fewer than num_experts_per_tok \(3\)"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.3}},
     r"rotary dim \(9, head_dim x partial_rotary_factor\) must be even"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.5}},
     r"partial_rotary_factor = 1.5 must be a number in \(0, 1\]"),
    ({"routed_scaling_factor": "2.5"}, r"routed_scaling = '2.5' must be a number"),
    ({"routed_scaling_factor": 0}, r"routed_scaling_factor \(0\) must be > 0"),
    ({"n_group": "4"}, r"n_group = '4' must be an integer"),
    ({"n_routed_experts": None}, "none of num_experts, num_local_experts, n_routed_experts"),
])
def test_bad_router_config_is_rejected(edit, message, hf_checkpoint, tmp_path):
    raw = json.loads((hf_checkpoint("glm4_moe")[0] / "config.json").read_text())
    raw.update(edit)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=message):
        ModelConfig.load(tmp_path)


def test_mtp_layers_are_skipped_with_one_log_line(hf_checkpoint, caplog):
    path, _ = hf_checkpoint("glm4_moe")
    cfg = ModelConfig.load(path)
    with safe_open(path / "model.safetensors", "pt") as f:
        mtp = [k for k in f.keys() if k.startswith(f"model.layers.{cfg.num_layers}.")]
    assert mtp  # the fixture's file holds the MTP layer
    with caplog.at_level(logging.INFO, logger="moerun"):
        build_model(str(path))
    lines = [r.getMessage() for r in caplog.records if "multi-token-prediction" in r.getMessage()]
    assert len(lines) == 1 and f"skipping {len(mtp)} tensors of layer(s) {cfg.num_layers}" in lines[0]


def test_fp8_checkpoint_is_fp8_and_its_scales_matter(hf_checkpoint):
    """The FP8 file holds e4m3 weights with block scales, and the model read from it differs
    from the unquantized one (so matching transformers on the dequantized weights, as
    test_model_hf does, checks the dequantization)."""
    path, hf_deq = hf_checkpoint("glm4_moe-fp8")
    with safe_open(path / "model.safetensors", "pt") as f:
        fp8 = [k for k in f.keys() if f.get_slice(k).get_dtype() == "F8_E4M3"]
        assert fp8 and all(k + "_scale_inv" in f.keys() for k in fp8)
        assert "lm_head.weight" in fp8 and f.get_slice("lm_head.weight").get_shape()[0] > FP8_BLOCK
    ids = [5, 17, 3, 99, 42, 8]
    fp8_logits = forward_logits(build_model(str(path)), [ids])[0]
    plain_logits = forward_logits(build_model(str(hf_checkpoint("glm4_moe")[0])), [ids])[0]
    with torch.no_grad():
        ref = hf_deq(torch.tensor([ids])).logits[0]
    assert (fp8_logits - ref).abs().max() <= 1e-4
    assert (fp8_logits - plain_logits).abs().max() > 1e-3


def test_fp8_ranks_read_only_their_slices(hf_checkpoint):
    """Under TP 2 x EP 2 every rank's weights equal its slice of the one-process model
    (vocab rows 80..160 straddle the 128-row block boundary), and a rank reads fewer
    bytes than the file holds."""
    path, _ = hf_checkpoint("glm4_moe-fp8")
    cfg = ModelConfig.load(path)
    whole = build_model(str(path))
    full = {s.name: s for s in whole.specs()}
    par = ParallelConfig(tp=2, ep=2)
    file_bytes = (path / "model.safetensors").stat().st_size
    for rank in range(par.world_size):
        shard = MoEModel(cfg, Comm(par, rank))
        read = load_checkpoint(shard, path).bytes_read
        assert 0 < read < 0.75 * file_bytes
        for s in shard.specs():
            want = full[s.name].dest
            want = want[s.index] if s.index else want
            assert torch.equal(s.dest, want), (rank, s.name)


def test_fp8_weight_without_its_scales_is_named(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("glm4_moe-fp8")
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    d = edited_copy(path, tmp_path / "ck", lambda t: t.pop(name + "_scale_inv"))
    with pytest.raises(CheckpointError, match=r"experts\.2\.up_proj\.weight: F8_E4M3 without its block scales "
                                              r"model\.layers\.1\.mlp\.experts\.2\.up_proj\.weight_scale_inv"):
        build_model(str(d))


def test_fp8_misshaped_scales_are_named(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("glm4_moe-fp8")
    name = "lm_head.weight_scale_inv"  # [2, 1] for a [160, 64] weight
    d = edited_copy(path, tmp_path / "ck", lambda t: t.update({name: torch.ones(1, 1)}))
    with pytest.raises(CheckpointError, match=r"lm_head\.weight_scale_inv: expected \[2, 1\] float \(128x128 "
                                              r"blocks of \[160, 64\]\), found \[1, 1\] F32"):
        build_model(str(d))


@pytest.mark.parametrize("family", ["glm4_moe", "dots1", "minimax_m2"])
def test_layout_cli_shows_the_checkpoint(family, hf_checkpoint, capsys):
    path, hf = hf_checkpoint(family)
    assert layout_main(["--model", str(path), "--world", "4", "--tp", "2", "--ep", "4", "--dp", "2",
                        "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    cfg = ModelConfig.load(path)
    # every parameter and loaded buffer of transformers' model (its MTP layer is not in it)
    hf_total = sum(p.numel() for p in hf.parameters()) + sum(b.numel() for n, b in hf.named_buffers()
                                                              if n.endswith("e_score_correction_bias"))
    assert out["valid"] and out["params_total"] == cfg.num_params() == hf_total
    par = ParallelConfig(tp=2, ep=4, dp=2)
    assert [r["params"] for r in out["ranks"]] == [shard_params(cfg, par, r) for r in range(4)]
