"""``scripts/bench.py --strategy``: the substitution and subset rules (moerun.plan.substitute),
the calibrated projection, the table and JSON built from a fake ``summary.json``, the
range guard of ``moerun plan --measured``, and one real quick run on gloo.

    pytest tests/test_bench_strategy.py -q
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from moerun.config import ModelConfig
from moerun.parallel import ParallelConfig as P
from moerun.parallel import valid_layouts
from moerun.plan import ClaimsFile, HardwareSpec, Strategy, Workload, check, make_plan
from moerun.plan.calibrate import calibrate
from moerun.plan.claims import METRICS, load_measured, verdict
from moerun.plan.cli import main as plan_main
from moerun.plan.compare import build_rows, format_rows
from moerun.plan.measure import measured_values, profiling_available, read_summary, MeasureError
from moerun.plan.substitute import (closest_layouts, layout_distance, measurable_subset, narrow_model,
                                    shard_model)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench.py"
_spec = importlib.util.spec_from_file_location("bench", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench"] = bench
_spec.loader.exec_module(bench)

SEED30 = ModelConfig.load("seed-30b")
TINY = ModelConfig.load("tiny")  # 4 heads, 2 KV heads: TP at most 4


def fake_summary(layout: P, device: str = "cpu", requests: int = 16, prompt_len: int = 32, output_len: int = 16,
                 **metrics) -> dict:
    """A summary.json as ``moerun generate --profile-out`` writes it (moerun.profile.summary)."""
    ranks = range(layout.world_size)
    m = {"latency_ms": 600.0, "ttft_ms": 900.0, "e2e_ms": 10000.0, "throughput_tok_s": 25.0,
         "comm_overhead_pct": 1500.0, "comm_share_pct": 88.0, "load_balance_pct": 89.0,
         "expert_balance_pct": 61.0, "gpu_utilization_pct": 6.0, "memory_per_gpu_gb": 0.3, **metrics}
    return {
        "layout": {"tp": layout.tp, "pp": layout.pp, "ep": layout.ep, "dp": layout.dp},
        "world_size": layout.world_size, "device": device, "model": "model.json", "dtype": "float32",
        "workload": {"requests": requests, "prompt_tokens": requests * prompt_len,
                     "output_tokens": requests * output_len},
        "wall_s": 10.0, "ticks": output_len,
        "phases_s": {str(r): {"experts": 0.6, "attention": 0.2, "tp_collective": 0.0, "other": 0.2, "wall": 1.0}
                     for r in ranks},
        "requests": {"ttft_ms": [900.0] * requests, "tpot_ms": [600.0] * requests, "e2e_ms": [1e4] * requests},
        "expert_load": {"per_layer": [[1] * 64], "per_ep_rank": [8] * layout.ep},
        "memory": {str(r): {"weights_bytes": 1, "kv_cache_bytes": 1, "peak_activation_bytes": 1,
                            "peak_total_bytes": 3} for r in ranks},
        "metrics": m, "definitions": {}, "profile_overhead": {"method": "fake", "pct": 0.1},
    }


# ============================================================ closest_layouts
def test_distance_is_the_weighted_log2_sum():
    # EP 16 -> 8: 4 x 1; TP 4 -> 8: 2 x 1; PP 4 -> 1: 1 x 2; DP 2 -> 2: 0
    assert layout_distance(P(tp=4, ep=16, pp=4, dp=2), P(tp=8, ep=8, pp=1, dp=2)) == 4 + 2 + 2
    assert layout_distance(P(tp=2, ep=4), P(tp=2, ep=4)) == 0


def test_a_valid_layout_is_its_own_closest():
    best = closest_layouts(SEED30, P(tp=8, ep=8, pp=2, dp=1), 16)[0]
    assert best.layout == P(tp=8, ep=8, pp=2, dp=1) and best.distance == 0


def test_optimized_keeps_tp4_and_ep16_first_then_ep_over_tp():
    got = closest_layouts(SEED30, P(tp=4, ep=16, pp=4, dp=2), 16, top=5)
    assert [str(c.layout) for c in got] == ["TP4 EP16 PP1 DP4", "TP8 EP16 PP1 DP2", "TP4 EP8 PP2 DP2",
                                            "TP2 EP16 PP1 DP8", "TP16 EP16 PP1 DP1"]
    assert [c.distance for c in got] == [3, 4, 5, 6, 7]  # changing TP (x2) costs less than EP (x4)
    assert all(not c.layout.problems(SEED30, 16) for c in got)


def test_heads_cap_tp_and_ties_keep_valid_layouts_order():
    # tiny has 4 heads: TP8 is invalid; TP4 with DP2 and TP4 with PP2 are both 2 + 1 = 3 away
    got = closest_layouts(TINY, P(tp=8, ep=4, pp=1, dp=1), 8, top=3)
    assert [(str(c.layout), c.distance) for c in got[:2]] == [("TP4 EP4 PP1 DP2", 3), ("TP4 EP4 PP2 DP1", 3)]
    order = [str(v) for v in valid_layouts(TINY, 8)]
    assert order.index("TP4 EP4 PP1 DP2") < order.index("TP4 EP4 PP2 DP1")
    # EP8 needs 8 ranks in a stage: with TP4 that is DP2, PP1 (EP4 instead would cost 4)
    assert str(closest_layouts(TINY, P(tp=8, ep=8), 8)[0].layout) == "TP4 EP8 PP1 DP2"


def test_closest_rejects_a_non_positive_axis():
    with pytest.raises(ValueError, match="ep must be >= 1"):
        closest_layouts(SEED30, P(tp=4, ep=0), 4)


# ============================================================ subset, narrow, shard
def test_subset_rule():
    base = measurable_subset(SEED30, P(tp=8, ep=8, pp=2, dp=1), 8)
    assert base.layout == P(tp=8, ep=8, pp=1, dp=1) and base.steps == ("PP2 -> PP1",)
    sub = measurable_subset(SEED30, P(tp=4, ep=16, pp=1, dp=4), 8)
    assert sub.layout == P(tp=4, ep=8, pp=1, dp=2) and sub.steps == ("DP4 -> DP2, EP16 -> EP8",)
    assert "measured subset TP4 EP8 PP1 DP2 of TP4 EP16 PP1 DP4 (2 cores" in sub.describe("2 cores")
    same = measurable_subset(TINY, P(tp=2, ep=4, pp=2, dp=2), 8)
    assert same.layout == P(tp=2, ep=4, pp=2, dp=2) and not same.is_subset
    with pytest.raises(ValueError, match="max_world"):
        measurable_subset(TINY, P(), 0)


def test_narrow_model_keeps_every_layout_valid():
    narrow = narrow_model(SEED30)
    assert narrow.num_params() < 100e6 and narrow.name == "seed-30b, narrowed"
    for gpus in (8, 16):
        assert valid_layouts(narrow, gpus) == valid_layouts(SEED30, gpus)


def test_shard_model_is_what_rank_0_holds():
    s = shard_model(SEED30, P(tp=4, ep=16, pp=1, dp=4))
    assert (s.num_layers, s.num_experts, s.top_k, s.num_heads, s.num_kv_heads, s.vocab_size) == (16, 4, 2, 4, 1, 8000)
    s = shard_model(SEED30, P(tp=8, ep=8, pp=2, dp=1))
    assert (s.num_layers, s.num_experts, s.num_heads, s.num_kv_heads) == (8, 8, 2, 1)


# ============================================================ the optimized substitution
def test_optimized_on_16_gpus_substitutes_tp4_ep16_pp1_dp4(capsys):
    strat = Strategy.load("optimized")
    layout, report = bench.substitute(strat, SEED30, HardwareSpec.load("seed"), 16)
    out = capsys.readouterr().out
    assert layout == P(tp=4, ep=16, pp=1, dp=4)
    assert report["as_written"]["valid"] is False and len(report["as_written"]["errors"]) == 2
    assert "world size" in out and "expert parallelism" in out  # every broken rule printed
    assert "optimized as written is invalid; measured TP4 EP16 PP1 DP4 instead" in out
    assert report["substitution"]["note"] == "optimized as written is invalid; measured TP4 EP16 PP1 DP4 instead"


# ============================================================ table and JSON from a fake summary
def test_rows_label_every_figure():
    cf = ClaimsFile.load("seed")
    strat = Strategy.load("optimized")
    layout = P(tp=4, ep=16, pp=1, dp=4)
    plan = make_plan(SEED30, layout, HardwareSpec.load("seed"), 16, strat.workload)
    summary = fake_summary(P(tp=4, ep=8, pp=1, dp=2))
    measured = measured_values(summary)
    cal = calibrate(plan, summary, narrow_model(SEED30))
    assert not cal.applicable and cal.reason == "measured on cpu, target seed"
    as_ = {"optimized": {"layout": "TP4 EP8 PP1 DP2", "model": "seed-30b, narrowed"}}
    labels = {"claimed": "claimed (design note)", "measured": "measured (cpu: fake; TP4 EP8 PP1 DP2)",
              "projected": f"{plan.label}: substitute TP4 EP16 PP1 DP4"}
    rows = build_rows("optimized", check(cf, {"optimized": measured}, as_), plan, measured, cal, labels)
    assert [r.metric for r in rows] == list(METRICS)
    for r in rows:
        assert r.claimed.label.startswith("claimed (") and r.measured.label.startswith("measured (")
        assert r.projected.label == "projected (roofline on seed): substitute TP4 EP16 PP1 DP4"
        assert r.calibrated.value is None and r.calibrated.label.startswith("not applicable")
        assert r.verdict == "invalid layout" and r.measured.value is not None and r.projected.value is not None
    assert rows[0].measured.value == 600.0 and rows[3].measured.value == 89.0
    text = "\n".join(format_rows(rows, {"claimed": "claimed (c)", "measured": "measured (m)",
                                        "projected": "projected (p)", "calibrated": "calibrated"}))
    assert "measured (m)" in text and "projected (p)" in text and "calibrated" not in text
    assert "invalid layout [1]" in text


def test_bench_json_reads_back_through_plan_measured(tmp_path, monkeypatch, capsys):
    summary = fake_summary(P(tp=8, ep=8, pp=1, dp=1))

    def fake_measure(args, model, layout, role, plan):
        return summary, narrow_model(model), "TP8 EP8 PP1 DP1", "cpu: fake, 8 gloo processes", ""

    monkeypatch.setattr(bench, "measure", fake_measure)
    out = tmp_path / "out.json"
    assert bench.main(["--strategy", "baseline", "--json", str(out), "--plot", str(tmp_path / "plots")]) == 0
    text = capsys.readouterr().out
    assert "measured   = measured (cpu: fake" in text and "projected  = projected (roofline on seed): " in text
    assert (tmp_path / "plots" / "baseline.png").stat().st_size > 0
    data = json.loads(out.read_text())
    for row in data["report"]["strategy"]["rows"]:
        assert row["measured"]["label"].startswith("measured (") and row["projected"]["label"].startswith("projected (")
    mf = load_measured(out)
    assert mf.values["baseline"]["load_balance"] == 89.0
    assert mf.measured_as["baseline"]["layout"] == "TP8 EP8 PP1 DP1"
    assert plan_main(["--claims", "seed", "--measured", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["results"]
    lb = next(r for r in res if r["claim"]["strategy"] == "baseline" and r["claim"]["metric"] == "load_balance")
    assert lb["verdict"] == "not comparable" and lb["measured"] == 89.0  # a subset, a narrowed model


def test_calibration_applies_to_a_gpu_shard_at_the_per_rank_batch():
    layout = P(tp=4, ep=16, pp=1, dp=4)
    plan = make_plan(SEED30, layout, HardwareSpec.load("h100-sxm"), 16, Workload())
    seqs = plan.projection.seqs_per_micro_batch  # 64
    summary = fake_summary(P(), device="cuda (NVIDIA H200)", requests=seqs, prompt_len=1024, output_len=256,
                           latency_ms=5.0)
    cal = calibrate(plan, summary, shard_model(SEED30, layout))
    assert cal.applicable, cal.reason
    compute = 0.005 * 0.8  # TPOT x compute share (0.8 of wall in compute phases)
    comm = plan.projection.decode[0].comm_s
    assert cal.values["latency"] == pytest.approx(1e3 * (compute + comm))
    assert cal.values["throughput"] == pytest.approx(256 / (compute + comm))
    assert cal.values["comm_overhead"] == pytest.approx(100 * comm / compute)
    other = fake_summary(P(), device="cuda (NVIDIA H200)", requests=8, prompt_len=1024, output_len=256)
    assert "projection's batch is 64" in calibrate(plan, other, shard_model(SEED30, layout)).reason


def test_gpu_path_runs_rank_0s_shard_at_the_per_rank_batch(tmp_path, monkeypatch, capsys):
    layout = P(tp=4, ep=16, pp=1, dp=4)
    plan = make_plan(SEED30, layout, HardwareSpec.load("h100-sxm"), 16, Workload())
    seen = {}

    def fake_run(cmd, out_dir, timeout_s):
        seen["cmd"] = cmd
        return fake_summary(P(), device="cuda (NVIDIA H200)", requests=64, prompt_len=1024, output_len=256)

    monkeypatch.setattr(bench, "run_profile", fake_run)
    args = bench.parse_args(["--strategy", "auto"])
    summary, shard, ran, desc = bench.measure_gpu(args, SEED30, layout, "", plan, tmp_path)
    cmd = " ".join(seen["cmd"])
    assert "torch.distributed.run" not in cmd and "--device cuda" in cmd and "--dtype bfloat16" in cmd
    assert "--max-new-tokens 256" in cmd and "--max-batch-tokens 65536" in cmd
    assert len((tmp_path / "prompts.jsonl").read_text().splitlines()) == 64
    assert ran == "rank 0 shard of TP4 EP16 PP1 DP4" and shard == shard_model(SEED30, layout)
    assert desc.startswith("cuda (NVIDIA H200); rank 0's shard of seed-30b TP4 EP16 PP1 DP4 as one process")
    cal = calibrate(plan, summary, shard)
    assert cal.applicable and "upper bound on compute" in cal.label


# ============================================================ --measured guard
@pytest.mark.parametrize("metric, value, why", [("load_balance", 500.0, r"outside its range \(0, 100\]"),
                                                ("gpu_utilization", -1.0, r"outside its range \[0, 100\]"),
                                                ("latency", 0.0, "outside its range"),
                                                ("throughput", "fast", "not a finite number"),
                                                ("memory_per_gpu", True, "not a finite number")])
def test_measured_values_out_of_range_are_rejected(tmp_path, capsys, metric, value, why):
    f = tmp_path / "m.json"
    f.write_text(json.dumps({"source": "t", "values": {"baseline": {metric: value}}}))
    with pytest.raises(ValueError, match=why):
        load_measured(f)
    assert plan_main(["--claims", "seed", "--measured", str(f)]) == 2
    assert metric in capsys.readouterr().err


def test_not_comparable_comes_after_not_measured_and_before_holds():
    assert verdict([], "", None, 1.0, "lower", 0.0, "TP1 of m")[0] == "not measured"
    assert verdict([], "", 1.0, 1.0, "lower", 0.0, "TP1 of m")[0] == "not comparable"
    assert verdict([], "why", 1.0, 1.0, "lower", 0.0, "TP1 of m")[0] == "ambiguous"
    cf = ClaimsFile.load("seed")
    same = {"baseline": {"layout": "TP8 EP8 PP2 DP1", "model": "seed-30b"}}  # the claim's own: judged
    lb = next(r for r in check(cf, {"baseline": {"load_balance": 80.0}}, same) if r.claim.metric == "load_balance"
              and r.claim.strategy == "baseline")
    assert lb.verdict == "holds"


def test_read_summary_names_missing_keys(tmp_path):
    f = tmp_path / "summary.json"
    s = fake_summary(P())
    del s["metrics"]["load_balance_pct"], s["ticks"]
    f.write_text(json.dumps(s))
    with pytest.raises(MeasureError, match="ticks, metrics.load_balance_pct"):
        read_summary(f)


# ============================================================ a real quick run on gloo
@pytest.mark.skipif(not profiling_available(),
                    reason="moerun generate has no --profile yet (moerun.profile not landed): nothing to measure")
def test_bench_baseline_quick_on_gloo_reads_back(tmp_path):
    out = tmp_path / "out.json"
    p = subprocess.run([sys.executable, str(SCRIPT), "--strategy", "baseline", "--quick", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "measured subset TP8 EP8 PP1 DP1 of TP8 EP8 PP2 DP1" in p.stdout
    assert "calibrated projection: not applicable (measured on cpu, target seed)" in p.stdout
    assert "GPU path: skipped (torch.cuda.is_available() is False" in p.stdout
    mf = load_measured(out)
    assert set(mf.values["baseline"]) == set(METRICS)
    done = subprocess.run([sys.executable, "-m", "moerun.plan.cli", "--claims", "seed", "--measured", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "measured baseline as: measured (cpu" in done.stdout and "not comparable" in done.stdout


def test_repeats_flag():
    assert bench.parse_args([]).repeats == 3 and bench.parse_args(["--quick"]).repeats == 1
    assert bench.parse_args(["--repeats", "5", "--quick"]).repeats == 5
    with pytest.raises(SystemExit):
        bench.parse_args(["--repeats", "0"])
