"""Expert-parallel load balancing: the placement algorithm on hand-made loads (against
hand computation and the contiguous split), the load file's rules, replica dispatch and
weight moves in one process, and under torchrun on gloo: EP 2 and 4, experts replicated
over DP x TP / EP, placements from a load file and moved during generation, against one
process without EPLB."""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

from moerun import eplb
from moerun.build import build_model, forward_logits
from moerun.comm import Comm
from moerun.config import ModelConfig
from moerun.engine import Engine, EngineConfig
from moerun.model.moe import MoE, ids_of, with_ids
from moerun.model.placement import ReplicaMap, move_experts
from moerun.model.rebalance import Rebalancer
from moerun.options import SamplingParams
from moerun.parallel import LayoutError, ParallelConfig
from moerun.weights import full_model_shapes

sys.path.insert(0, str(Path(__file__).parent))
from test_layouts import WORKER, random_prompts, torchrun  # noqa: E402

EPLB_WORKER = Path(__file__).with_name("dist_eplb_worker.py")


# ------------------------------------------------------------ the algorithm
def test_packing_matches_hand_computation():
    # R = 0: heaviest first onto the least-loaded rank with room: 10 -> r0, 1 -> r1, 1 -> r1, 0 -> r0
    assert eplb.plan_layer([10, 1, 1, 0], ep=2) == (0, 3, 1, 2)
    assert eplb.rank_loads([10, 1, 1, 0], (0, 3, 1, 2), 2) == [10, 2]
    # contiguous: [11, 1] -> balance 6/11; packed: [10, 2] -> 6/10
    assert eplb.balance(eplb.rank_loads([10, 1, 1, 0], eplb.contiguous(4), 2)) == pytest.approx(6 / 11)
    # R = 2, 3 slots a rank. The plain rule (most load per replica) gives expert 0 both
    # extra copies: 10/3 x 3 cannot split over 2 ranks, [20/3, 16/3]. Trying each copy by
    # its packing instead: a 2nd copy of 0 (5, 5, 1, 1, 0 -> [6, 6]), then a copy of 3, whose
    # packing [6, 6] beats another copy of 0 ([20/3, 16/3]) and of 1 or 2 ([6.5, 5.5]).
    assert eplb.replicate([10, 1, 1, 0], 2) == [3, 1, 1, 1]
    phys = eplb.plan_layer([10, 1, 1, 0], ep=2, redundant=2)
    assert phys == (0, 1, 3, 0, 2, 3)
    assert eplb.rank_loads([10, 1, 1, 0], phys, 2) == [6, 6]
    assert eplb.balance(eplb.rank_loads([10, 1, 1, 0], phys, 2)) == 1.0


def test_packing_keeps_the_contiguous_split_when_greedy_is_worse():
    # greedy: 3 -> r0, 3 -> r1, 2 -> r0, 2 -> r1, 2 -> r0, 0 -> r1 = [7, 5]; contiguous: [6, 6]
    load = [3, 3, 0, 2, 2, 2]
    assert eplb.plan_layer(load, ep=2) == eplb.contiguous(6)
    assert eplb.balance(eplb.rank_loads(load, eplb.plan_layer(load, ep=2), 2)) == 1.0


@pytest.mark.parametrize("ep, R", [(2, 0), (4, 0), (4, 4), (8, 8), (4, 12)])
def test_packing_is_never_worse_than_the_contiguous_split(ep, R):
    rng = random.Random(ep * 100 + R)
    for _ in range(200):
        E = ep * rng.choice([1, 2, 4])
        load = [int(rng.paretovariate(1.2)) if rng.random() < 0.8 else rng.randint(0, 3) for _ in range(E)]
        phys = eplb.plan_layer(load, ep, R)
        eplb.check_placement(phys, E, ep)
        assert len(phys) == E + R
        assert max(eplb.rank_loads(load, phys, ep)) <= max(eplb.rank_loads(load, eplb.contiguous(E), ep)) + 1e-9
        assert sum(eplb.rank_loads(load, phys, ep)) == pytest.approx(sum(load))


def test_replicas_of_a_hot_expert_land_on_distinct_ranks_and_raise_balance():
    load = [1000, 1000] + [10] * 14  # two hot experts of 16
    contiguous = eplb.balance(eplb.rank_loads(load, eplb.contiguous(16), 4))
    phys = eplb.plan_layer(load, ep=4, redundant=4)
    per = len(phys) // 4
    for e in (0, 1):
        ranks = [p // per for p, x in enumerate(phys) if x == e]
        assert len(ranks) >= 2 and len(set(ranks)) == len(ranks)
    assert contiguous < 0.6 and eplb.balance(eplb.rank_loads(load, phys, 4)) > 0.9


def test_hierarchical_placement_keeps_replicas_on_one_node():
    rng = random.Random(5)
    load = [rng.randint(0, 100) for _ in range(16)]
    load[3] = 2000
    phys = eplb.plan_layer(load, ep=8, redundant=8, gpus_per_node=4)
    per = len(phys) // 8
    for e in range(16):
        assert len({p // per // 4 for p, x in enumerate(phys) if x == e}) == 1, e
    assert max(eplb.rank_loads(load, phys, 8)) <= max(eplb.rank_loads(load, eplb.contiguous(16), 8))
    with pytest.raises(eplb.EPLBError, match="must divide ep"):
        eplb.plan_layer(load, ep=8, gpus_per_node=3)


def test_transfers_rebuild_the_new_placement():
    rng = random.Random(2)
    for _ in range(50):
        ep, E = 4, 8
        old = eplb.plan_layer([rng.randint(0, 50) for _ in range(E)], ep, 4)
        new = eplb.plan_layer([rng.randint(0, 50) for _ in range(E)], ep, 4)
        per = len(old) // ep
        slots = [[old[r * per + j] for j in range(per)] for r in range(ep)]
        rebuilt = [[None] * per for _ in range(ep)]
        for s, ss, d, ds in eplb.transfers(old, new, ep):
            rebuilt[d][ds] = slots[s][ss]
        assert [e for r in rebuilt for e in r] == list(new)


# ---------------------------------------------------------------- the rules
def test_invalid_redundant_experts_are_layout_errors():
    cfg = ModelConfig.load("tiny")  # 64 experts
    with pytest.raises(LayoutError, match=r"num_experts \+ R = 64 \+ 3 = 67 physical experts must be divisible by "
                                          r"ep \(4\)"):
        ParallelConfig(ep=4, dp=4, redundant_experts=3).validate(cfg, 4)
    with pytest.raises(LayoutError, match="must be an integer >= 0"):
        ParallelConfig(ep=4, dp=4, redundant_experts=-4).validate(cfg, 4)
    ParallelConfig(ep=4, dp=4, redundant_experts=4).validate(cfg, 4)
    par = ParallelConfig(ep=4, dp=4, redundant_experts=4)
    assert len(par.experts_of(3, 64)) == 17 and str(par) == "TP1 EP4 PP1 DP4 R4"


def write(tmp_path, obj) -> Path:
    p = tmp_path / "load.json"
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def test_load_file_round_trip_and_its_rules(tmp_path):
    cfg = ModelConfig.load("tiny")
    load = {i: [(i * 7 + e * 3) % 11 for e in range(64)] for i in range(16)}
    eplb.write_load(tmp_path / "load.json", cfg, load)
    assert eplb.read_load(tmp_path / "load.json", cfg) == load
    good = json.loads((tmp_path / "load.json").read_text())
    bad = [({**good, "num_experts": 8}, "num_experts 8 must equal the model's 64"),
           ({**good, "num_layers": 3}, "num_layers 3 must equal the model's 16"),
           ({**good, "format": "x"}, "\"format\" must be 'moerun-expert-load'"),
           ({**good, "counts": good["counts"][:-1]}, r"counts must be a \[num_layers=16, num_experts=64\] matrix"),
           ({**good, "counts": [[-1] * 64] + good["counts"][1:]}, "counts must be non-negative integers"),
           ({**good, "counts": [[0.5] * 64] + good["counts"][1:]}, "counts must be non-negative integers"),
           ({**good, "counts": [[1] * 63] + good["counts"][1:]}, "layer 0 must have num_experts = 64 counts"),
           ("{not json", "not JSON"), ([1, 2], "must be a JSON object")]
    for obj, rule in bad:
        with pytest.raises(eplb.EPLBError, match=rule):
            eplb.read_load(write(tmp_path, obj), cfg)
    summary = {"expert_load": {"per_layer": [load[i] for i in range(16)]}}
    assert eplb.read_load(write(tmp_path, summary), cfg) == load


def test_bad_eplb_flags_are_rejected_before_start(tmp_path, capsys, monkeypatch):
    from moerun import generate

    def never(*a, **k):
        raise AssertionError("the model was built despite a bad flag")
    monkeypatch.setattr("moerun.runtime.build_model", never)
    write(tmp_path, {"format": "moerun-expert-load", "num_layers": 16, "num_experts": 64, "counts": [[1] * 64]})
    cases = [(["--eplb-load", str(tmp_path / "load.json")], r"counts must be a \[num_layers=16"),
             (["--eplb-load", str(tmp_path / "missing.json")], "cannot read it"),
             (["--redundant-experts", "-1"], "must be an integer >= 0"),
             (["--eplb-interval", "0"], "--eplb-interval must be >= 1"),
             (["--eplb-window", "4"], "--eplb-window needs --eplb-interval")]
    for flags, rule in cases:
        assert generate.main([*flags, "--prompt-ids", "1"]) == 2, flags
        err = capsys.readouterr().err
        assert __import__("re").search(rule, err), (flags, err)


# ------------------------------------------------- one process: the model
def test_replica_map_spreads_slots_evenly_over_the_replicas():
    phys = (0, 0, 3, 0, 1, 2)
    rmap = ReplicaMap(phys, 4)
    ids = torch.randint(0, 4, (37, 2), dtype=torch.int32)
    for offset in (0, 1, 5):
        pids = rmap(ids, offset)
        assert torch.equal(torch.tensor(phys)[pids.long()], ids.long())  # each slot -> a copy of its expert
        per_slot = torch.bincount(pids.reshape(-1).long(), minlength=6)
        n0 = int((ids == 0).sum())
        assert sorted(per_slot[[0, 1, 3]].tolist()) in ([n0 // 3] * (3 - n0 % 3) + [n0 // 3 + 1] * (n0 % 3),)
    assert ReplicaMap(eplb.contiguous(4), 4)(ids) is ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_expert_ids_ride_in_the_rows_bit_exactly(dtype):
    rows = torch.randn(9, 5).to(dtype)
    ids = torch.randint(0, 2**31 - 1, (9,), dtype=torch.int32)
    packed = with_ids(rows, ids)
    assert torch.equal(packed[:, :5], rows) and torch.equal(ids_of(packed, 5), ids)
    assert with_ids(rows[:0], ids[:0]).shape[0] == 0


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])  # gpt_oss: fused 3-D experts with biases
def test_placed_and_moved_experts_compute_the_same_logits(family, hf_checkpoint):
    path, _ = hf_checkpoint(family)
    ref = build_model(str(path))
    cfg = ref.cfg
    prompts = random_prompts(3, cfg.vocab_size, 11)
    want = forward_logits(ref, prompts)
    load = {i: [500 if e in (i, 5) else e for e in range(8)] for i in range(cfg.num_layers)}
    placement = eplb.plan(load, 1, 4)
    m = build_model(str(path), comm=Comm(ParallelConfig(redundant_experts=4), 0, placement))
    H, Fw = cfg.hidden_size, cfg.moe_ffn
    expert_bytes = 4 * (3 * H * Fw + (2 * Fw + H if cfg.expert_bias else 0))  # float32 weights (+ biases)
    assert m.load_report.bytes_read == ref.load_report.bytes_read + cfg.num_layers * 4 * expert_bytes
    got = forward_logits(m, prompts)
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(got, want))
    moe = m.layers[0].mlp
    assert isinstance(moe, MoE) and moe.phys == placement[0]
    move_experts(moe, eplb.plan_layer([1, 900, 2, 3, 4, 800, 6, 7], 1, 4))
    assert moe.phys != placement[0]
    got = forward_logits(m, prompts)
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(got, want))


def test_rebalancer_moves_experts_and_changes_no_token(hf_checkpoint):
    path, _ = hf_checkpoint("mixtral")
    ref = build_model(str(path))
    prompts = random_prompts(3, ref.cfg.vocab_size, 4)
    sp = SamplingParams(max_new_tokens=6, ignore_eos=True)
    want = Engine(ref, EngineConfig(num_blocks=64)).generate(prompts, [sp] * 3)
    m = build_model(str(path), comm=Comm(ParallelConfig(redundant_experts=2), 0))
    m.rebalancer = Rebalancer(m, interval=2, min_gain=-1.0)  # one rank gains nothing: move on any change
    got = Engine(m, EngineConfig(num_blocks=64)).generate(prompts, [sp] * 3)
    assert got == want
    assert m.rebalancer.replans == 3 and m.rebalancer.layers_moved > 0


# --------------------------------------------------------- torchrun on gloo
def test_ep_layer_under_torchrun_bit_identical_and_placed(hf_checkpoint, tmp_path):
    """EP 2 in 2 groups (experts replicated over DP / EP), one rank with no tokens."""
    path, _ = hf_checkpoint("olmoe")
    out = tmp_path / "out.json"
    p = torchrun(4, EPLB_WORKER, path, 1, 2, 4, 2, out)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(out.read_text())
    expert_bytes = 3 * 64 * 48 * 4
    for r, res in got.items():
        assert res["bit_identical"], f"rank {r}: the EP path differs from the earlier one"
        assert res["placed_err_torch"] <= 1e-5 and res["placed_err_triton"] <= 1e-5, res
        assert res["moved_err"] <= 1e-5, res
        assert res["local_a"] != res["local_b"]
        new = [e for e in res["local_b"] if e not in res["local_a"]]  # slots whose expert this rank lacked
        assert res["moved_bytes"] == len(new) * expert_bytes, f"rank {r}"
    assert got["0"]["T"] > 0 and got["1"]["T"] == 0


def skewed_load_file(tmp_path, cfg, hot=(1, 6)) -> Path:
    load = {i: [400 if e in hot else 3 + e for e in range(cfg.num_experts)]
            for i, m in enumerate(cfg.moe_layers) if m}
    eplb.write_load(tmp_path / "load.json", cfg, load)
    return tmp_path / "load.json"


def one_process_logprobs(model, prompts, n_new=6):
    engine = Engine(model, EngineConfig(num_blocks=64))
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=n_new, ignore_eos=True, logprobs=1))
           for p in prompts]
    got = {rid: [] for rid in ids}
    while engine.has_unfinished():
        for ev in engine.step():
            got[ev.req_id].append((ev.token, ev.logprob))
    return [got[rid] for rid in ids]


EPLB_CASES = [  # (family, tp, ep, dp, R, eplb options)
    pytest.param("olmoe", 2, 2, 2, 2, {"interval": 2}, id="w4-ep2-replicated-dynamic"),
    pytest.param("qwen2_moe", 1, 4, 4, 4, {}, id="w4-ep4-static"),
]


@pytest.mark.parametrize("family, tp, ep, dp, R, opts", EPLB_CASES)
def test_eplb_layout_equals_one_process(family, tp, ep, dp, R, opts, hf_checkpoint, tmp_path):
    """A placement from a skewed load file (and moved every 2 steps when dynamic) gives the
    tokens and log probabilities of one process without EPLB; each rank reads exactly
    its physical experts."""
    path, _ = hf_checkpoint(family)
    ref = build_model(str(path))
    cfg = ref.cfg
    prompts = random_prompts(4, cfg.vocab_size, 77 + ep)
    spec = {"prompts": prompts, "max_new": [6] * 4, "sampling": {"logprobs": 1},
            "eplb": {"redundant_experts": R, "load_file": str(skewed_load_file(tmp_path, cfg)), **opts}}
    out = tmp_path / "out.json"
    p = torchrun(tp * dp, WORKER, path, tp, 1, ep, dp, json.dumps(spec), out)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(out.read_text())
    for i, want in enumerate(one_process_logprobs(ref, prompts)):
        assert got["outputs"][str(i)] == [t for t, _ in want], f"prompt {i}"
        for (lp, _), (_, wlp) in zip(got["logprobs"][str(i)], want):
            assert abs(lp - wlp) <= 1e-5
    states = got["eplb"]
    static = eplb.plan(eplb.read_load(tmp_path / "load.json", cfg), ep, R)
    assert any(list(v) != list(range(cfg.num_experts)) for v in static.values())
    moe_layers = [i for i, m in enumerate(cfg.moe_layers) if m]
    default = ParallelConfig(tp=tp, ep=ep, dp=dp)
    full = full_model_shapes(cfg)
    expert_bytes = 4 * sum(torch.Size(s).numel() for n, s in full.items() if ".experts.0." in n and ".layers.0." in n)
    for r, st in states.items():
        c = default.coord(int(r))
        extra = len(moe_layers) * R // ep * expert_bytes  # R/ep more physical experts per MoE layer
        base = _bytes_read_default(path, default, int(r))
        assert got["bytes_read"][r] == base + extra, f"rank {r}"
        if opts.get("interval"):
            assert st["replans"] >= 2
        else:
            assert {int(k): tuple(v) for k, v in st["phys"].items()} == static, f"rank {r} ({c})"
    if opts.get("interval"):
        assert any(st["layers_moved"] for st in states.values())


def _bytes_read_default(path, par, rank) -> int:
    """Bytes rank ``rank`` reads under the default placement (R = 0), built on the meta device."""
    from moerun.model import MoEModel

    cfg = ModelConfig.load(str(path))
    with torch.device("meta"):
        m = MoEModel(cfg, Comm(par, rank), par.stage_layers(cfg.num_layers)[par.coord(rank).pp])
    return 4 * sum(torch.Size(s.local_shape).numel() for s in m.specs())


# ------------------------------------------------------ planner and layout
def skewed_tiny_load(tmp_path) -> Path:
    cfg = ModelConfig.load("tiny")
    load = {i: [3000 if e in (i % 64, (i * 5 + 1) % 64) else 10 + e % 7 for e in range(64)] for i in range(16)}
    eplb.write_load(tmp_path / "load.json", cfg, load)
    return tmp_path / "load.json"


def test_plan_projects_balance_and_step_time_from_a_measured_load(tmp_path, capsys):
    from moerun.plan.cli import main

    load = str(skewed_tiny_load(tmp_path))
    base = ["--model", "tiny", "--hardware", "cpu", "--gpus", "4", "--ep", "4", "--dp", "4", "--json",
            "--concurrency", "256", "--prompt-len", "2048"]  # a compute-bound prefill

    def plan(*flags):
        assert main([*base, *flags]) == 0
        return json.loads(capsys.readouterr().out)
    uniform, contiguous = plan(), plan("--expert-load", load)
    placed = plan("--expert-load", load, "--redundant-experts", "4")
    cfg = ModelConfig.load("tiny")
    want = eplb.layer_balance(eplb.read_load(load, cfg), None, 4)
    assert contiguous["expert_load"]["contiguous_balance"] == pytest.approx(want) and want < 0.7
    assert placed["expert_load"]["placed_balance"] > 0.9 > contiguous["expert_load"]["used"]
    assert placed["projection"]["measured_balance"] == placed["expert_load"]["placed_balance"]
    prefill = {k: v["projection"]["batch_prefill_s"] for k, v in (("u", uniform), ("c", contiguous), ("p", placed))}
    assert prefill["c"] > 1.2 * prefill["p"] and prefill["c"] > 1.2 * prefill["u"]  # the busiest rank's experts
    tpot = {k: v["projection"]["tpot_s"] for k, v in (("u", uniform), ("c", contiguous))}
    assert tpot["c"] >= tpot["u"]  # decode reads weights and KV: memory-bound, skew or not
    extra = 16 * cfg.expert_params() * 2  # one more physical expert per rank and layer, bfloat16
    assert placed["memory_per_gpu_bytes"] - contiguous["memory_per_gpu_bytes"] >= extra
    assert main([*base, "--eplb"]) == 2 and "need --expert-load" in capsys.readouterr().err


def test_layout_counts_redundant_experts_and_prints_the_balance(tmp_path, capsys):
    from moerun.layout_cli import main

    load = str(skewed_tiny_load(tmp_path))
    cfg = ModelConfig.load("tiny")
    assert main(["--model", "tiny", "--world", "4", "--ep", "4", "--dp", "4", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["--model", "tiny", "--world", "4", "--ep", "4", "--dp", "4", "--redundant-experts", "4",
                 "--eplb-load", load, "--json"]) == 0
    red = json.loads(capsys.readouterr().out)
    for a, b in zip(plain["ranks"], red["ranks"]):
        assert b["params"] - a["params"] == 16 * cfg.expert_params()  # 16 MoE layers, one more expert each
    assert red["ranks"][3]["experts"] == [51, 67]
    assert red["expert_balance"]["placed"] > 0.9 > red["expert_balance"]["contiguous"]


def test_profile_summary_spreads_replicated_experts_over_their_ranks():
    from moerun.profile.summary import expert_load

    reports = {0: {"experts": {"0": [10, 1, 1, 0]}}, 1: {"experts": {"0": [10, 1, 1, 0]}}}
    par = ParallelConfig(ep=2, dp=2, redundant_experts=2)
    got = expert_load(reports, par, {0: (0, 1, 3, 0, 2, 3)})
    assert got["per_ep_rank"] == [12, 12]  # expert 0's 20 slots split over its two replicas
    assert expert_load(reports, ParallelConfig(ep=2, dp=2))["per_ep_rank"] == [22, 2]


def test_generate_writes_the_expert_load_and_places_experts_from_it(tmp_path, capsys):
    from moerun import generate

    out = tmp_path / "load.json"
    flags = ["--prompt-ids", "5,6,7", "--prompt-ids", "9,8", "--max-new-tokens", "4", "--ignore-eos", "--json"]
    assert generate.main([*flags, "--expert-load-out", str(out)]) == 0
    plain = json.loads(capsys.readouterr().out)
    cfg = ModelConfig.load("tiny")
    load = eplb.read_load(out, cfg)
    computed = (3 + 4 - 1) + (2 + 4 - 1)  # a request computes its prompt and all but its last token
    assert sorted(load) == list(range(16)) and all(sum(row) == computed * cfg.top_k for row in load.values())
    assert generate.main([*flags, "--eplb-load", str(out), "--redundant-experts", "2"]) == 0
    assert json.loads(capsys.readouterr().out) == plain


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_dispatch_with_device_splits_equals_the_host_path(impl):
    from moerun import kernels

    T, K, H, P, R = 13, 2, 8, 10, 2
    x = torch.randn(T, H)
    ids = torch.randint(0, P, (T, K), dtype=torch.int32)
    w = torch.rand(T, K)
    owner = kernels.contiguous_expert_ranks(P, R)
    send, splits, meta = kernels.dispatch(x, ids, w, owner, num_ranks=R, impl=impl)
    send_d, splits_d, meta_d = kernels.dispatch(x, ids, w, owner, num_ranks=R, impl=impl, host_splits=False)
    assert torch.is_tensor(splits_d) and splits_d.tolist() == splits == [int((ids < 5).sum()), int((ids >= 5).sum())]
    assert torch.equal(send, send_d) and torch.equal(meta.row_of_slot_TK, meta_d.row_of_slot_TK)
    assert torch.equal(meta.expert_of_row, meta_d.expert_of_row)
    with pytest.raises(ValueError, match="needs num_ranks"):
        kernels.dispatch(x, ids, w, owner, impl=impl, host_splits=False)
