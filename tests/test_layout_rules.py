"""Layout validation: every rule has its message; ``moerun layout`` prints the rank table;
each rank reads only its own share of a checkpoint."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from moerun.comm import Comm
from moerun.config import ModelConfig
from moerun.layout_cli import rank_table, shard_params
from moerun.model import MoEModel
from moerun.parallel import LayoutError, ParallelConfig, valid_layouts
from moerun.weights import load_checkpoint

TINY = ModelConfig.load("tiny")  # 16 layers, 64 experts, 4 heads, 2 KV heads


@pytest.mark.parametrize("layout, world, message", [
    ((2, 2, 1, 1), 8, r"world size: tp\*pp\*dp = 2\*2\*1 = 4 processes, but the world has 8"),
    ((2, 1, 8, 2), 4, r"expert parallelism: ep \(8\) must divide a stage's dp\*tp = 2\*2 = 4 ranks"),
    ((1, 1, 3, 3), 3, r"experts: num_experts \(64\) must be divisible by ep \(3\)"),
    ((8, 1, 1, 1), 8, r"attention heads: num_heads \(4\) must be divisible by tp \(8\)"),
    ((1, 17, 1, 1), 17, r"pipeline: pp \(17\) must be between 1 and num_layers \(16\)"),
    ((0, 1, 1, 1), 1, r"tp = 0 must be a positive integer"),
])
def test_each_rule_is_named(layout, world, message):
    tp, pp, ep, dp = layout
    with pytest.raises(LayoutError, match=message) as e:
        ParallelConfig(tp=tp, pp=pp, ep=ep, dp=dp).validate(TINY, world)
    for s in e.value.suggestions:  # every suggestion is itself valid
        assert s.problems(TINY, world) == []


def test_kv_heads_rule():
    cfg = TINY.replace(num_heads=12, num_kv_heads=4)
    with pytest.raises(LayoutError, match=r"KV heads: num_kv_heads \(4\) must be divisible by tp \(6\), "
                                          r"or tp a multiple of it"):
        ParallelConfig(tp=6).validate(cfg, 6)
    assert ParallelConfig(tp=8).problems(TINY.replace(num_heads=8), 8) == []  # tp 8 > 2 KV heads


def test_all_rules_listed_at_once_and_alternatives():
    seed = ModelConfig.load("seed-30b")
    with pytest.raises(LayoutError) as e:
        ParallelConfig(tp=4, ep=16, pp=4, dp=2).validate(seed, 16)
    assert len(e.value.problems) == 2
    assert "valid layouts for this model and world size: TP16" in str(e.value)
    assert ParallelConfig(tp=8, ep=8, pp=2, dp=1).problems(seed, 16) == []


def test_valid_layouts_are_exactly_the_valid_ones():
    found = set(valid_layouts(TINY, 8))
    brute = {ParallelConfig(tp=t, pp=p, ep=e, dp=d) for t in range(1, 9) for p in range(1, 9) for e in range(1, 9)
             for d in range(1, 9) if not ParallelConfig(tp=t, pp=p, ep=e, dp=d).problems(TINY, 8)}
    assert found == brute and ParallelConfig(tp=2, pp=2, ep=4, dp=2) in found


def test_stage_layers_uneven_and_coords():
    par = ParallelConfig(tp=2, pp=3, ep=2, dp=2)
    assert [(r.start, r.stop) for r in par.stage_layers(16)] == [(0, 6), (6, 11), (11, 16)]
    coords = [par.coord(r) for r in range(par.world_size)]
    assert [(c.pp, c.dp, c.tp) for c in coords[:4]] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]
    assert par.ep_group_ranks(2, 1) == [10, 11] and coords[11].ep_rank == 1


def test_layout_table_params_add_up():
    """Shards add up to the whole model: TP-split tensors once per replica, experts once
    per EP group, replicated tensors once per rank that holds them."""
    par = ParallelConfig(tp=2, pp=2, ep=2, dp=2)
    rows = rank_table(TINY, par, 4)
    H, V, L, E = 128, 512, 16, 64
    attn = TINY.attn_params()
    norms, router = 2 * H, E * H
    # per replica (dp) the TP pair holds attention + embedding/head once; experts are held
    # once per EP group (dp*tp/ep = 2 groups per stage); norms/router by all 4 ranks of a stage.
    total = sum(r["params"] for r in rows)
    want = (par.dp * (L * attn + 2 * V * H)  # TP-split: once per DP replica
            + 2 * L * E * TINY.expert_params()  # experts: once per EP group, two groups per stage
            + 4 * L * (norms + router)  # replicated on the 4 ranks of the layer's stage
            + 4 * H)  # final norm on the 4 last-stage ranks
    assert total == want
    assert rows[5]["experts"] == [32, 63] and rows[5]["layers"] == [8, 15]


def test_layout_cli_json_and_error():
    p = subprocess.run([sys.executable, "-m", "moerun.cli", "layout", "--model", "seed-30b", "--world", "16",
                        "--tp", "8", "--ep", "8", "--pp", "2", "--json"], capture_output=True, text=True)
    out = json.loads(p.stdout)
    assert out["valid"] and len(out["ranks"]) == 16 and out["params_total"] == 29_904_897_024
    p = subprocess.run([sys.executable, "-m", "moerun.cli", "layout", "--model", "seed-30b", "--world", "16",
                        "--tp", "4", "--ep", "16", "--pp", "4", "--dp", "2"], capture_output=True, text=True)
    assert p.returncode == 2 and "world size" in p.stderr and "expert parallelism" in p.stderr


@pytest.mark.parametrize("family, layout", [("olmoe", (4, 1, 2, 1)), ("qwen2_moe", (2, 3, 4, 2)),
                                            ("glm4_moe", (2, 1, 4, 2))])
def test_each_rank_reads_only_its_share(family, layout, hf_checkpoint):
    """Load every rank's shard in this process (loading needs no collectives) and count
    the bytes read against a bound computed from the checkpoint's own tensor sizes."""
    from safetensors import safe_open

    path, _ = hf_checkpoint(family)
    cfg = ModelConfig.load(path)
    tp, pp, ep, dp = layout
    par = ParallelConfig(tp=tp, pp=pp, ep=ep, dp=dp)
    with safe_open(path / "model.safetensors", "pt") as f:
        sizes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    nbytes = {k: 4 * torch.Size(s).numel() for k, s in sizes.items()}
    full = sum(nbytes.values())
    for rank in range(par.world_size):
        c = par.coord(rank)
        layers = par.stage_layers(cfg.num_layers)[c.pp]
        model = MoEModel(cfg, Comm(par, rank), layers)
        read = load_checkpoint(model, path).bytes_read
        mine = par.experts_of(c.ep_rank, cfg.num_experts)
        bound = 0
        for k, b in nbytes.items():
            parts = k.split(".")
            if k.startswith("model.layers."):
                if int(parts[2]) not in layers:
                    continue
                if ".experts." in k:
                    bound += b if int(parts[parts.index("experts") + 1]) in mine else 0
                elif "self_attn" in k and "proj" in k:  # TP-split (a KV head replicated when tp > kv)
                    bound += -(-b // min(tp, cfg.num_kv_heads)) if ("k_proj" in k or "v_proj" in k) else -(-b // tp)
                else:
                    bound += b  # norms, router, shared expert, dense MLP: replicated
            elif k in ("model.embed_tokens.weight", "lm_head.weight"):
                held = (c.pp == 0 and k.startswith("model.embed")) or (c.pp == pp - 1)
                bound += -(-b // tp) if held else 0
            elif c.pp == pp - 1:
                bound += b
        assert read <= bound, (rank, read, bound)
        assert read == 4 * shard_params(cfg, par, rank)  # exactly what the rank holds
        assert read < full


def test_layout_cli_reads_a_gpt_oss_checkpoint(hf_checkpoint):
    """`moerun layout` on a GPT-OSS checkpoint: its parameter count (sinks, router and expert
    biases included) equals transformers' model, and the EP ranks split the experts."""
    path, hf = hf_checkpoint("gpt_oss")
    p = subprocess.run([sys.executable, "-m", "moerun.cli", "layout", "--model", str(path), "--world", "4",
                        "--tp", "2", "--ep", "4", "--dp", "2", "--json"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["valid"] and out["params_total"] == sum(t.numel() for t in hf.parameters())
    assert [r["experts"] for r in out["ranks"]] == [[0, 1], [2, 3], [4, 5], [6, 7]]
