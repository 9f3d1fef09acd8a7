"""The built-in profiler (``--profile``): phase times add up to each step's wall, the
expert counts are the router's, the load balance is the hand computation, profiling
changes no token and the null profiler does nothing; under torchrun every rank's profile
reaches summary.json (the schema the bench reads) and trace.json (a track per rank)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from moerun import kernels, profile_report
from moerun.build import build_model
from moerun.engine import Engine, EngineConfig
from moerun.model.moe import MoE
from moerun.options import SamplingParams
from moerun.parallel import ParallelConfig
from moerun.plan import metrics as M
from moerun.profile import NO_PHASE, NULL_PROFILER, NullProfiler, Profiler
from moerun.profile.summary import build_summary, expert_load, metric_definitions

from test_layouts import torchrun

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23]]
NEW = 6
SCHEMA = {  # summary.json: key -> its keys (None: a leaf)
    "layout": {"tp", "pp", "ep", "dp"}, "world_size": None, "device": None, "model": None, "dtype": None,
    "workload": {"requests", "prompt_tokens", "output_tokens"}, "wall_s": None, "ticks": None,
    "phases_s": None, "requests": {"ttft_ms", "tpot_ms", "e2e_ms"}, "expert_load": {"per_layer", "per_ep_rank"},
    "memory": None, "metrics": {"latency_ms", "ttft_ms", "e2e_ms", "throughput_tok_s", "comm_overhead_pct",
                                "comm_share_pct", "load_balance_pct", "expert_balance_pct", "gpu_utilization_pct",
                                "memory_per_gpu_gb"},
    "definitions": None, "profile_overhead": {"method", "pct"},
}
MEMORY_KEYS = {"weights_bytes", "kv_cache_bytes", "peak_activation_bytes", "peak_total_bytes"}


@pytest.fixture(scope="module")
def mixtral(hf_checkpoint):
    path, _ = hf_checkpoint("mixtral")
    return str(path), build_model(str(path))


def run(model, profile: bool, prompts=PROMPTS):
    engine = Engine(model, EngineConfig(num_blocks=64, block_size=4, profile=profile))
    out = engine.generate(prompts, SamplingParams(max_new_tokens=NEW, ignore_eos=True))
    return engine, out


def check_schema(summary: dict, world: int) -> None:
    assert set(summary) == set(SCHEMA)
    for key, sub in SCHEMA.items():
        if sub is not None:
            assert set(summary[key]) == sub, key
    ranks = {str(r) for r in range(world)}
    assert set(summary["phases_s"]) == ranks and set(summary["memory"]) == ranks
    for r in ranks:
        assert set(summary["phases_s"][r]) == set(M.PHASES) | {"other", "wall"}
        assert set(summary["memory"][r]) == MEMORY_KEYS
    assert set(summary["definitions"]) == SCHEMA["metrics"]
    assert summary["world_size"] == world and summary["device"] == "cpu"
    json.dumps(summary)  # plain data


def test_phases_add_up_to_each_step_and_other_is_small():
    model = build_model("tiny")  # 16 layers, 12 sequences: enough work per step that Python glue stays small
    prompts = PROMPTS * 4
    engine, _ = run(model, True, prompts)
    prof = engine.worker.prof
    assert prof.num_steps == engine.tick == len(prof.steps)
    for tick, rank, stage, tokens, phases, wall in prof.steps:
        assert set(phases) <= set(M.PHASES) and all(s >= 0 for s in phases.values())
        assert sum(phases.values()) <= wall * (1 + 1e-9) + 1e-6  # the phases never overlap
    rep = engine.worker.profile_report()
    covered = sum(rep["phases_s"].values())
    assert covered + rep["other_s"] == pytest.approx(rep["wall_s"], rel=1e-9, abs=1e-9)
    # other = the engine's Python glue between the phases, about 2 ms a step: 13-19% of this
    # tiny run on a 2-core machine through the fused CPU decode step (moerun.model.cpu_fused),
    # whose C loop marks its own phases (the experts alone are ~50%, so a phase left unmeasured
    # would show far above the bound)
    assert rep["other_s"] < 0.25 * rep["wall_s"], rep
    assert sum(s[3] for s in prof.steps) == sum(len(p) + NEW - 1 for p in prompts)  # every token fed once
    for tick, start, wall, names, offs, durs in prof.timeline:  # the trace's segments follow one another
        ends = [off + d for off, d in zip(offs, durs)]
        assert all(b >= a_end - 1e-9 for a_end, b in zip(ends, offs[1:])) and max(ends) <= wall + 1e-6


def test_expert_counts_equal_the_routers_choices(mixtral):
    """Count the router's top-k independently, from every MoE layer's input and gate weight (on
    the layer path, where the MoE block is a module call); the fused CPU decode step, whose router
    runs inside its C loop, counts the same."""
    _, model = mixtral
    cfg = model.cfg
    fused_counts = run(model, True)[0].worker.profile_report()["experts"]
    model.set_fused_cpu(False)
    mine: dict[int, torch.Tensor] = {}

    def hook(layer):
        def count(moe, inputs):
            logits_tE = torch.nn.functional.linear(inputs[0], moe.gate.weight)
            _, ids = kernels.topk_softmax(logits_tE, cfg.top_k, cfg.norm_topk_prob)
            mine[layer] = mine.get(layer, 0) + torch.bincount(ids.reshape(-1).long(), minlength=cfg.num_experts)
        return count
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    handles = [m.register_forward_pre_hook(hook(m.layer)) for m in moes]
    try:
        engine, _ = run(model, True)
    finally:
        for h in handles:
            h.remove()
    model.set_fused_cpu(True)
    got = engine.worker.profile_report()["experts"]
    assert sorted(got) == [m.layer for m in moes] == sorted(mine)
    assert got == {layer: c.tolist() for layer, c in mine.items()} == fused_counts
    slots = cfg.top_k * sum(len(p) + NEW - 1 for p in PROMPTS)
    assert all(sum(c) == slots for c in got.values())


def test_load_balance_of_a_hand_made_routing():
    prof = Profiler("cpu")
    prof.step_begin()
    prof.count_experts(0, torch.tensor([[0, 3], [0, 1], [3, 0], [3, 3]], dtype=torch.int32), 4)  # 3 1 0 4
    prof.count_experts(2, torch.tensor([[0, 1], [2, 3], [1, 0]], dtype=torch.int32), 4)  # 2 2 1 1
    prof.note_step(0, 4)
    prof.step_end()
    rep = prof.report(weights_bytes=0, kv_cache_bytes=0)
    assert rep["experts"] == {0: [3, 1, 0, 4], 2: [2, 2, 1, 1]}
    par = ParallelConfig(tp=2, ep=2)  # EP rank 0 holds experts 0-1, rank 1 experts 2-3
    load = expert_load({0: rep}, par)
    assert load == {"per_layer": [[3, 1, 0, 4], [2, 2, 1, 1]], "per_ep_rank": [3 + 1 + 2 + 2, 0 + 4 + 1 + 1]}
    assert M.load_balance(load["per_ep_rank"]) == pytest.approx(((8 + 6) / 2) / 8)
    rep1 = {**rep, "rank": 1, "experts": {}}  # a rank that routed nothing changes nothing
    s = build_summary({0: rep, 1: rep1}, par=par, model="hand", dtype="float32",
                      workload={"requests": 0, "prompt_tokens": 0, "output_tokens": 0}, wall_s=1.0, ticks=1)
    assert s["metrics"]["load_balance_pct"] == pytest.approx(100 * 7 / 8)
    assert s["metrics"]["expert_balance_pct"] == pytest.approx(100 * (14 / 4) / 5)  # per expert 5 3 1 5
    assert s["definitions"] == metric_definitions() and "mean / max" in s["definitions"]["load_balance_pct"]


def test_profiling_changes_no_token_and_the_null_profiler_does_nothing(mixtral):
    _, model = mixtral
    plain, out_plain = run(model, False)
    profiled, out_prof = run(model, True)
    assert out_plain == out_prof
    assert plain.worker.prof is NULL_PROFILER and not NULL_PROFILER.enabled
    assert not hasattr(NULL_PROFILER, "__dict__")  # holds no state: safe to share
    assert all(NULL_PROFILER.phase(p) is NO_PHASE for p in M.PHASES)

    class Counting(NullProfiler):
        calls = 0

        def phase(self, name):
            Counting.calls += 1
            return super().phase(name)
    counted = Engine(model, EngineConfig(num_blocks=64, block_size=4))
    counted.worker.prof = Counting()
    assert counted.generate(PROMPTS, SamplingParams(max_new_tokens=NEW, ignore_eos=True)) == out_plain
    # the null path enters the same phases the profiler counts, each a shared no-op
    assert Counting.calls == profiled.worker.prof.phase_calls > 0
    with pytest.raises(ValueError, match="unknown profiler phase"):
        Profiler("cpu").phase("nap")


def test_torchrun_profile_writes_summary_and_trace(mixtral, tmp_path):
    path, model = mixtral
    out = tmp_path / "prof"
    ids = [",".join(map(str, p)) for p in PROMPTS]
    p = torchrun(4, "-m", "moerun.generate", "--model", path, "--tp", "2", "--ep", "2", "--pp", "2",
                 "--profile-out", out, "--max-new-tokens", NEW, "--ignore-eos", "--json",
                 *[a for i in ids for a in ("--prompt-ids", i)], timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    got = [r["output_ids"] for r in json.loads(p.stdout)]
    assert got == run(model, False)[1]  # the profiled layout generates one process's tokens
    assert "profiler overhead:" in p.stderr

    summary = json.loads((out / "summary.json").read_text())
    check_schema(summary, 4)
    assert summary["layout"] == {"tp": 2, "pp": 2, "ep": 2, "dp": 1} and summary["model"] == path
    assert summary["workload"] == {"requests": 3, "prompt_tokens": 13, "output_tokens": 3 * NEW}
    assert len(summary["requests"]["ttft_ms"]) == 3 and all(t > 0 for t in summary["requests"]["tpot_ms"])
    cfg = model.cfg
    per_layer = summary["expert_load"]["per_layer"]
    assert len(per_layer) == cfg.num_layers and all(len(c) == cfg.num_experts for c in per_layer)
    slots = cfg.top_k * sum(len(q) + NEW - 1 for q in PROMPTS)  # TP ranks split the tokens, PP the layers
    assert all(sum(c) == slots for c in per_layer)
    assert sum(summary["expert_load"]["per_ep_rank"]) == slots * cfg.num_layers
    for r, ph in summary["phases_s"].items():
        assert ph["other"] < 0.25 * ph["wall"], (r, ph)  # four processes on few cores: a loose bound
        assert ph["tp_collective"] > 0 and ph["ep_all_to_all"] > 0
    assert summary["profile_overhead"]["pct"] is not None

    trace = json.loads((out / "trace.json").read_text())["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in trace if e["ph"] == "M" and e["name"] == "process_name"}
    assert sorted(names) == [0, 1, 2, 3] and names[3] == "rank 3 (stage 1, tp 1, dp 0, ep 1)"
    spans = [e for e in trace if e["ph"] == "X"]
    assert {e["pid"] for e in spans} == {0, 1, 2, 3} and all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)
    assert {e["name"] for e in spans} >= {"attention", "experts", "ep_all_to_all", "pp_send_recv", "schedule"}

    assert profile_report.main([str(out)]) == 0


def test_profile_report_prints_the_tables(mixtral, tmp_path, capsys):
    path, _ = mixtral
    p = subprocess.run(
        [sys.executable, "-m", "moerun.generate", "--model", path, "--prompt-ids", "1,2,3", "--max-new-tokens", "3",
         "--profile-out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    check_schema(json.loads((tmp_path / "summary.json").read_text()), 1)
    assert profile_report.main([str(tmp_path)]) == 0
    text = capsys.readouterr().out
    for heading in ("phase seconds per rank", "metrics", "definitions (moerun.plan.metrics)",
                    "expert load per EP rank", "memory per rank", "profiler overhead"):
        assert heading in text
    assert profile_report.main([str(tmp_path / "missing")]) == 2
