"""Planner tests: every expectation is computed by hand from the config numbers below.

    pytest tests/test_plan.py -q

seed-30b: V=32000 H=1024 L=16 heads=16 kv=4 hd=64 E=64 K=2 F=9472, untied.
tiny:     V=512   H=128  L=16 heads=4  kv=2 hd=32 E=64 K=2 F=256,  untied.
"""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest

from moerun.config import ModelConfig
from moerun.parallel import ParallelConfig, ceil_range, valid_layouts
from moerun.plan import HardwareSpec, Strategy, Workload, cost, make_plan, search
from moerun.plan.cli import main as plan_main

SEED = ModelConfig.load("seed-30b")
TINY = ModelConfig.load("tiny")
SEED_HW = HardwareSpec.load("seed")
WL = Workload(concurrency=256, prompt_len=1024, output_len=256, dtype="bfloat16")

# seed-30b by hand
S_ATTN = 1024 * (16 * 64 + 2 * 4 * 64) + 16 * 64 * 1024  # q,k,v + o = 2,621,440
S_EXPERT = 3 * 1024 * 9472  # 29,097,984
S_LAYER = S_ATTN + 2 * 1024 + 64 * 1024 + 64 * S_EXPERT  # attn + 2 norms + router + experts
S_TOTAL = 2 * 32000 * 1024 + 1024 + 16 * S_LAYER  # embedding + LM head + final norm + layers
# tiny by hand
T_ATTN = 128 * (4 * 32 + 2 * 2 * 32) + 4 * 32 * 128  # 49,152
T_EXPERT = 3 * 128 * 256  # 98,304
T_LAYER = T_ATTN + 2 * 128 + 64 * 128 + 64 * T_EXPERT
T_TOTAL = 2 * 512 * 128 + 128 + 16 * T_LAYER


def plan(model, tp, pp, ep, dp, gpus, hw=SEED_HW, wl=WL, m=None):
    return make_plan(model, ParallelConfig(tp=tp, pp=pp, ep=ep, dp=dp), hw, gpus, wl, m)


# ------------------------------------------------------------------ parameters and bytes
def test_param_counts_exact():
    assert S_TOTAL == 29_904_897_024 == SEED.num_params()
    assert T_TOTAL == 101_716_096 == TINY.num_params()
    one = ParallelConfig()
    assert cost.rank_params(SEED, one, 0).total == S_TOTAL
    assert cost.rank_params(TINY, one, 0).total == T_TOTAL


def test_bytes_per_rank_seed_tp8_ep8_pp2():
    rep = plan(SEED, 8, 2, 8, 1, 16)
    assert rep.valid and len(rep.per_rank) == 16
    # tp 8 > kv 4: each TP rank holds 2 q heads and ONE (replicated) KV head
    attn = 1024 * 2 * 64 + 2 * 1024 * 1 * 64 + 2 * 64 * 1024
    layer = attn + 2 * 1024 + 64 * 1024 + (64 // 8) * S_EXPERT
    first = 8 * layer + (32000 // 8) * 1024  # stage 0: layers 0-7 + embedding rows
    last = 8 * layer + 1024 + (32000 // 8) * 1024  # stage 1: layers 8-15 + final norm + LM head
    for r in rep.per_rank:
        expect = first if r.pp == 0 else last
        assert (r.params, r.bytes) == (expect, 2 * expect)
        assert len(r.experts) == 8 and len(r.kv_heads) == 1
    assert rep.per_rank[9].experts == tuple(range(8, 16))  # ep_rank 1 of stage 1
    assert rep.per_rank[0].kv_bytes_per_token == 8 * 1 * 64 * 2 * 2


def test_bytes_per_rank_tiny_tp2_ep4_pp2_dp2():
    rep = plan(TINY, 2, 2, 4, 2, 8)
    assert rep.valid
    attn = 128 * 2 * 32 + 2 * 128 * 1 * 32 + 2 * 32 * 128  # 2 q heads, 1 kv head
    layer = attn + 2 * 128 + 64 * 128 + 16 * T_EXPERT
    first, last = 8 * layer + 256 * 128, 8 * layer + 128 + 256 * 128
    assert [r.params for r in rep.per_rank] == [first] * 4 + [last] * 4
    assert [r.bytes for r in rep.per_rank] == [2 * first] * 4 + [2 * last] * 4
    # EP groups are carved from a stage's dp*tp = 4 ranks: one group of 4 per stage
    assert [(r.ep_group, r.ep_rank) for r in rep.per_rank[:4]] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    # KV room = memory - weights - reserve; float32 example checks the dtype is used
    r0 = rep.per_rank[0]
    assert r0.kv_room_bytes == int(64e9 - 4e9) - 2 * first
    assert r0.kv_tokens_max == r0.kv_room_bytes // (8 * 1 * 32 * 2 * 2)
    fp32 = plan(TINY, 2, 2, 4, 2, 8, wl=dataclasses.replace(WL, dtype="float32"))
    assert fp32.per_rank[0].bytes == 4 * first


def test_tp_beyond_kv_heads_replicates_one_kv_head():
    rep = plan(TINY, 4, 1, 4, 1, 4)  # kv 2 < tp 4
    assert rep.valid
    attn = 128 * 1 * 32 + 2 * 128 * 1 * 32 + 1 * 32 * 128
    total = 16 * (attn + 2 * 128 + 64 * 128 + 16 * T_EXPERT) + 2 * 128 * 128 + 128
    assert all(r.params == total for r in rep.per_rank)
    assert [r.kv_heads for r in rep.per_rank] == [(0,), (0,), (1,), (1,)]


def test_qwen2_shared_expert_and_dense_layer_are_replicated_over_tp():
    m = ModelConfig(model_type="qwen2_moe", vocab_size=10, hidden_size=16, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=4, num_experts=4, top_k=2, moe_ffn=8, dense_ffn=10,
                    shared_expert_ffn=6, qkv_bias=True, moe_layers=(True, False))
    par = ParallelConfig(tp=2, ep=2)
    attn = 16 * 2 * 4 + 2 * 16 * 1 * 4 + 2 * 4 * 16 + (2 * 4 + 2 * 1 * 4)  # + sharded q/k/v bias
    moe = attn + 2 * 16 + 4 * 16 + 2 * 3 * 16 * 8 + 3 * 16 * 6 + 16  # router, 2 experts, shared, gate
    dense = attn + 2 * 16 + 3 * 16 * 10  # they run on the rank's token share: whole on each TP rank
    emb = [5 * 16, 5 * 16]  # ceil(10/2) rows each
    for t in (0, 1):
        assert cost.rank_params(m, par, t).total == moe + dense + 2 * emb[t] + 16


def test_vocab_ceil_split():
    assert [len(ceil_range(10, 4, i)) for i in range(4)] == [3, 3, 3, 1]
    assert [len(ceil_range(10, 8, i)) for i in range(8)] == [2, 2, 2, 2, 2, 0, 0, 0]
    assert ceil_range(10, 4, 3) == range(9, 10) and ceil_range(10, 8, 6) == range(10, 10)
    par = ParallelConfig(tp=4)
    assert [par.vocab_rows_of(t, 10) for t in range(4)] == [range(0, 3), range(3, 6), range(6, 9), range(9, 10)]


# ------------------------------------------------------------------ communication and pipeline
def test_all_to_all_and_tp_volume():
    rep = plan(SEED, 8, 2, 8, 1, 16)
    p = rep.projection
    assert p.seqs_per_micro_batch == 128  # 256 sequences, 2 micro-batches
    a2a = 2 * (128 / 8) * 2 * 1024 * 2 * 7 / 8  # dispatch+combine, 16 tokens/rank, K=2, bf16, 7/8 leave
    assert p.a2a_bytes_per_layer == pytest.approx(a2a) == 114_688
    assert p.decode[0].a2a_bytes == pytest.approx(8 * a2a)
    tp = 2 * 7 / 8 * 128 * 1024 * 2  # ring RS + AG of 128 x 1024 bf16
    assert p.tp_bytes_per_layer == pytest.approx(tp)
    assert p.decode[0].tp_bytes == pytest.approx((8 + 1) * tp)  # 8 layers + embedding all-reduce
    assert p.decode[1].tp_bytes == pytest.approx(8 * tp)
    assert p.decode[0].p2p_bytes == pytest.approx(128 * 1024 * 2 / 8) and p.decode[1].p2p_bytes == 0
    assert cost.all_to_all_bytes(100, 2, 1024, 2, 1) == 0  # ep 1: nothing leaves


def test_bubble_and_decode_ticks():
    assert cost.pipeline_bubble(4, 4) == pytest.approx(3 / 7)
    assert cost.pipeline_bubble(2, 6) == pytest.approx(1 / 7)
    assert cost.pipeline_bubble(1, 1) == 0
    rep = plan(SEED, 4, 4, 4, 1, 16, m=8)
    p = rep.projection
    assert p.bubble_fraction == pytest.approx(3 / 11)
    assert p.tpot_s == pytest.approx(8 * p.tick_s)  # max(M, PP) = 8 ticks
    assert p.tick_s == pytest.approx(max(c.roof_s + c.comm_s for c in p.decode))


def test_links_inter_node_when_group_spans_nodes():
    h100 = HardwareSpec.load("h100-sxm")  # 8 per node
    inside = plan(SEED, 8, 2, 8, 1, 16, hw=h100).projection.links[0]
    assert not inside.tp_inter and not inside.ep_inter and inside.pp_inter  # stage 1 is node 1
    across = plan(SEED, 16, 1, 16, 1, 16, hw=h100).projection.links[0]
    assert across.tp_inter and across.ep_inter


def test_flops_per_token_and_active_experts():
    ctx = 1000
    layer = 2 * S_ATTN + 4 * 16 * 64 * ctx + 2 * (64 * 1024 + 2 * S_EXPERT)
    assert cost.decode_flops_per_token(SEED, ctx) == pytest.approx(16 * layer + 2 * 32000 * 1024)
    assert cost.expected_active_experts(8, 64, 2, 1) == pytest.approx(8 * 2 / 64)
    assert cost.prefill_ctx_sum(1, 4) == 10 and cost.prefill_ctx_sum(1, 4, window=2) == 3 + 2 * 2


def test_load_balance_approximation():
    assert cost.expected_max_std_normal(2) == pytest.approx(1 / math.sqrt(math.pi), rel=1e-6)
    assert cost.expert_load(100, 2, 64, 1) == (200, 200)
    mean, emax = cost.expert_load(128, 2, 64, 8)
    assert mean == 32 and 32 < emax < 64
    small = cost.expert_load(64, 2, 64, 8)
    big = cost.expert_load(4096, 2, 64, 8)
    assert small[0] / small[1] < mean / emax < big[0] / big[1] < 1  # more tokens, better balance


# ------------------------------------------------------------------ monotone projection
def _faster_hw(**kw):
    return dataclasses.replace(SEED_HW, **kw)


@pytest.mark.parametrize("field", ["mem_bw_gbs", "intra_node_bw_gbs", "inter_node_bw_gbs", "peak_tflops"])
def test_more_hardware_never_slower(field):
    for layout in [(8, 2, 8, 1), (4, 2, 8, 2), (2, 4, 2, 2)]:
        base = plan(SEED, *layout, 16).projection
        more = plan(SEED, *layout, 16, hw=_faster_hw(**{field: 4 * getattr(SEED_HW, field)})).projection
        assert more.tpot_s <= base.tpot_s and more.ttft_s <= base.ttft_s
        assert more.tokens_per_s_total >= base.tokens_per_s_total


def test_more_memory_never_less_kv_room_and_latency_never_faster():
    base = plan(SEED, 8, 2, 8, 1, 16)
    big = plan(SEED, 8, 2, 8, 1, 16, hw=_faster_hw(memory_gb=128.0))
    assert all(b.kv_room_bytes >= a.kv_room_bytes for a, b in zip(base.per_rank, big.per_rank))
    assert big.max_concurrent_tokens >= base.max_concurrent_tokens
    slow = plan(SEED, 8, 2, 8, 1, 16, hw=_faster_hw(collective_latency_us=20.0))
    assert slow.projection.tpot_s > base.projection.tpot_s


# ------------------------------------------------------------------ validity, search, CLI
def test_note_optimized_invalid_with_both_rules_and_baseline_valid():
    opt, base = Strategy.load("optimized"), Strategy.load("baseline")
    rep = make_plan(SEED, opt.layout, SEED_HW, 16, opt.workload)
    assert not rep.valid and rep.projection is None and rep.per_rank == ()
    assert any(e.startswith("world size") and "32" in e and "16" in e for e in rep.errors)
    assert any(e.startswith("expert parallelism") and "ep (16)" in e and "= 8 ranks" in e for e in rep.errors)
    assert make_plan(SEED, base.layout, SEED_HW, 16, base.workload).valid


def test_search_returns_valid_fitting_layouts_only(tmp_path):
    hw = tmp_path / "small.toml"
    hw.write_text('name = "small"\nmemory_gb = 40.0\npeak_tflops = 100.0\nmem_bw_gbs = 1000.0\n'
                  'intra_node_bw_gbs = 100.0\ninter_node_bw_gbs = 10.0\ngpus_per_node = 8\nreserve_gb = 4.0\n')
    small = HardwareSpec.load(hw)
    got = search(SEED, small, 2, WL)
    allowed = {str(p) for p in valid_layouts(SEED, 2)}
    assert got and all(str(r.layout) in allowed and r.valid and r.fits for r in got)
    # 2 x 29.9e9 bytes of experts on one rank cannot fit 40 GB: ep 1 with pp 1 is dropped
    assert all(not (r.layout.ep == 1 and r.layout.pp == 1) for r in got)
    tps = [r.projection.tokens_per_s_total for r in got]
    assert tps == sorted(tps, reverse=True)
    bound = search(SEED, SEED_HW, 16, WL, max_tpot_ms=3.0)
    assert bound and all(r.projection.tpot_s <= 3e-3 for r in bound)


def test_cli_json_keys_and_exit_codes(capsys):
    assert plan_main(["--model", "tiny", "--hardware", "cpu", "--gpus", "8", "--tp", "2", "--pp", "2",
                      "--ep", "4", "--dp", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("valid", "errors", "params_total", "per_rank", "projection"):
        assert key in out
    assert out["valid"] and out["params_total"] == T_TOTAL and len(out["per_rank"]) == 8
    for key in ("rank", "pp", "dp", "tp", "ep_group", "ep_rank", "layers", "experts", "params", "bytes"):
        assert key in out["per_rank"][0]
    assert out["projection"]["label"] == "projected (roofline on cpu)"
    assert plan_main(["--strategy", "optimized", "--hardware", "seed", "--gpus", "16", "--json"]) == 2
    bad = json.loads(capsys.readouterr().out)
    assert bad["valid"] is False and len(bad["errors"]) == 2 and bad["projection"] is None
    assert plan_main(["--strategy", "optimized", "--gpus", "16"]) == 2
    text = capsys.readouterr().out
    assert "world size" in text and "expert parallelism" in text
    assert plan_main(["--strategy", "baseline"]) == 0
    assert "projected (roofline on seed)" in capsys.readouterr().out
    assert plan_main(["--model", "seed-30b", "--hardware", "seed", "--gpus", "16", "--search", "--top", "3"]) == 0
    assert "TP" in capsys.readouterr().out


def test_toml_unknown_keys_rejected(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nmemory_gb = 1.0\npeak_tflops = 1.0\nmem_bw_gbs = 1.0\nintra_node_bw_gbs = 1.0\n'
                   'inter_node_bw_gbs = 1.0\ngpus_per_node = 1\nreserve_gb = 0.5\nbandwith = 3.0\n')
    with pytest.raises(ValueError, match="unknown key.*bandwith"):
        HardwareSpec.load(bad)
    strat = tmp_path / "s.toml"
    strat.write_text('name = "s"\n[layout]\ntp = 2\n[workload]\nbatch = 4\n')
    with pytest.raises(ValueError, match="unknown key.*batch"):
        Strategy.load(strat)


def test_old_dtype_spelling_rejected_naming_the_accepted_ones(tmp_path):
    strat = tmp_path / "s.toml"
    strat.write_text('name = "s"\n[layout]\ntp = 2\n[workload]\ndtype = "bf16"\n')
    with pytest.raises(ValueError, match=r"s\.toml \[workload\].*'bf16' is not one of "
                                         r"float32, bfloat16, float16, float8"):
        Strategy.load(strat)
    assert plan_main(["--strategy", "baseline", "--dtype", "float32", "--json"]) == 0


def test_planner_imports_no_torch():
    code = "import sys, moerun.plan, moerun.plan.cli; assert 'torch' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("family, layout", [("qwen2_moe", (2, 2, 4, 2)), ("olmoe", (4, 1, 2, 2)),
                                            ("qwen3_moe", (2, 3, 2, 1)), ("mixtral", (1, 2, 8, 4)),
                                            ("glm4_moe", (2, 3, 2, 1)), ("dots1", (2, 1, 4, 2)),
                                            ("minimax_m2", (4, 1, 2, 1)), ("gpt_oss", (2, 1, 4, 2))])
def test_planner_bytes_match_the_runtime_shards(family, layout, hf_checkpoint):
    """The planner's per-rank parameters equal what the runtime builds for that rank
    (counted on a meta-device build of the shard), for every rank."""
    from moerun.layout_cli import shard_params

    m = ModelConfig.load(hf_checkpoint(family)[0])
    tp, pp, ep, dp = layout
    par = ParallelConfig(tp=tp, pp=pp, ep=ep, dp=dp)
    for r in range(par.world_size):
        assert cost.rank_params(m, par, r).total == shard_params(m, par, r), (family, r)
