"""Claims-checker tests: verdict rules, projection consistency, measured values.

    pytest tests/test_claims.py -q
"""
from __future__ import annotations

import json

import pytest

from moerun.plan.claims import ClaimsFile, check, load_measured, verdict
from moerun.plan.cli import main as plan_main

SEED = ClaimsFile.load("seed")


def by(results, strategy, metric):
    return next(r for r in results if r.claim.strategy == strategy and r.claim.metric == metric)


def test_seed_file_holds_the_notes_six_figures():
    opt = {c.metric: c.claimed for c in SEED.claims if c.strategy == "optimized"}
    assert opt == {"latency": 27.0, "throughput": 38000.0, "comm_overhead": 1.5, "load_balance": 92.0,
                   "gpu_utilization": 94.0, "memory_per_gpu": 11.6}
    assert (SEED.model, SEED.hardware, SEED.gpus) == ("seed-30b", "seed", 16)


def test_optimized_on_16_gpus_is_invalid_layout_for_every_claim():
    res = [r for r in check(SEED) if r.claim.strategy == "optimized"]
    assert len(res) == 6
    for r in res:
        assert r.verdict == "invalid layout" and r.projected is None and r.consistent == "n/a"
        assert "world size" in r.reason and "expert parallelism" in r.reason


def test_invalid_layout_wins_even_with_a_measurement():
    res = check(SEED, measured={"optimized": {"latency": 20.0}})
    assert by(res, "optimized", "latency").verdict == "invalid layout"


def test_not_measured_and_ambiguous_without_measurements():
    res = check(SEED)
    lb = by(res, "baseline", "load_balance")
    assert lb.verdict == "not measured" and lb.measured is None
    assert lb.projected is not None and lb.consistent in ("yes", "no")  # projection shown apart
    lat = by(res, "baseline", "latency")
    assert lat.verdict == "ambiguous" and "workload not stated" in lat.reason
    # the roofline is a best case: a 129 ms claim is slower than it, so consistent
    assert lat.projected < 129 and lat.consistent == "yes"
    assert lat.label == "projected (roofline on seed)"


def test_holds_and_fails_from_measured_values():
    # load balance: higher is better, tolerance 5%: holds iff measured >= 75 * 0.95 = 71.25
    assert by(check(SEED, {"baseline": {"load_balance": 80.0}}), "baseline", "load_balance").verdict == "holds"
    assert by(check(SEED, {"baseline": {"load_balance": 71.3}}), "baseline", "load_balance").verdict == "holds"
    assert by(check(SEED, {"baseline": {"load_balance": 60.0}}), "baseline", "load_balance").verdict == "fails"
    # an ambiguous claim stays ambiguous whatever is measured
    assert by(check(SEED, {"baseline": {"latency": 100.0}}), "baseline", "latency").verdict == "ambiguous"


def test_custom_claims_latency(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('name = "t"\nmodel = "seed-30b"\nhardware = "seed"\ngpus = 16\ntolerance = 0.05\n'
                 '[[claim]]\nstrategy = "baseline"\nmetric = "latency"\nclaimed = 10.0\n'
                 '[[claim]]\nstrategy = "baseline"\nmetric = "latency"\nclaimed = 1.0\n')
    cf = ClaimsFile.load(f)
    loose, tight = check(cf)
    assert loose.verdict == tight.verdict == "not measured"
    assert loose.consistent == "yes"  # projected TPOT ~4.4 ms <= 10 ms
    assert tight.consistent == "no"  # 1 ms beats the roofline's best case
    # lower is better: holds iff measured <= 10 * 1.05 = 10.5
    assert check(cf, {"baseline": {"latency": 10.4}})[0].verdict == "holds"
    assert check(cf, {"baseline": {"latency": 10.6}})[0].verdict == "fails"


def test_verdict_rule_order():
    assert verdict(["rule"], "why", 1.0, 1.0, "lower", 0.0)[0] == "invalid layout"
    assert verdict([], "why", 1.0, 1.0, "lower", 0.0)[0] == "ambiguous"
    assert verdict([], "", None, 1.0, "lower", 0.0)[0] == "not measured"
    assert verdict([], "", 1.0, 1.0, "lower", 0.0)[0] == "holds"
    assert verdict([], "", 1.01, 1.0, "lower", 0.0)[0] == "fails"
    assert verdict([], "", 0.99, 1.0, "higher", 0.0)[0] == "fails"


def test_bad_inputs_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown metric"):
        check(SEED, {"baseline": {"latncy": 1.0}})
    f = tmp_path / "m.json"
    f.write_text(json.dumps({"values": {}, "when": "now"}))
    with pytest.raises(ValueError, match="unknown key"):
        load_measured(f)
    bad = tmp_path / "c.toml"
    bad.write_text('name = "t"\nmodel = "tiny"\nhardware = "cpu"\ngpus = 8\n'
                   '[[claim]]\nstrategy = "baseline"\nmetric = "speed"\nclaimed = 1.0\n')
    with pytest.raises(ValueError, match="speed"):
        ClaimsFile.load(bad)


def test_cli_table_json_and_measured_file(tmp_path, capsys):
    assert plan_main(["--claims", "seed"]) == 0
    text = capsys.readouterr().out
    assert "invalid layout" in text and "not measured" in text and "projected (roofline on seed)" in text
    m = tmp_path / "m.json"
    m.write_text(json.dumps({"source": "test", "values": {"baseline": {"load_balance": 90.0}}}))
    assert plan_main(["--claims", "seed", "--measured", str(m), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    lb = next(r for r in out["results"] if r["claim"]["strategy"] == "baseline"
              and r["claim"]["metric"] == "load_balance")
    assert lb["verdict"] == "holds" and lb["measured"] == 90.0 and out["measured_source"] == "test"
