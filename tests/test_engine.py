"""The engine: continuous batching, chunked prefill, preemption, aborts, seeded
sampling, and the micro-batch pipeline schedule — each request gets exactly the tokens
it gets alone, in one process and under layouts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moerun.build import build_model
from moerun.engine import Engine, EngineConfig
from moerun.options import SamplingParams

from dist_worker import run_staggered
from test_layouts import WORKER, torchrun


def alone(model, prompt, n, **sp):
    return Engine(model).generate([prompt], SamplingParams(max_new_tokens=n, ignore_eos=True, **sp))[0]


def staggered(engine, prompts, max_new, arrive, **sp):
    """Add prompt i at tick arrive[i]; run to the end; outputs in input order."""
    got = run_staggered(engine, prompts, max_new, arrive, sp)
    return [[t for t, _, _ in got[i]] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def mixtral(hf_checkpoint):
    path, _ = hf_checkpoint("mixtral")
    return str(path), build_model(str(path))


def workload(vocab, n=6, seed=0):
    """Random prompts, lengths and arrival ticks, all drawn from ``seed`` (tests name it)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    max_new = [int(torch.randint(1, 12, (1,), generator=g)) for _ in range(n)]
    arrive = sorted(int(torch.randint(0, 10, (1,), generator=g)) for _ in range(n))
    return prompts, max_new, arrive


def test_staggered_requests_equal_alone(mixtral):
    _, model = mixtral
    prompts, max_new, arrive = workload(model.cfg.vocab_size, seed=11)
    got = staggered(Engine(model, EngineConfig(max_batch_tokens=7, num_blocks=64, block_size=4)),
                    prompts, max_new, arrive)  # a 7-token budget chunks every long prompt
    assert got == [alone(model, p, n) for p, n in zip(prompts, max_new)]


def test_small_cache_preempts_and_outputs_stay_identical(mixtral):
    _, model = mixtral
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, model.cfg.vocab_size, (9,), generator=g).tolist() for _ in range(5)]
    engine = Engine(model, EngineConfig(num_blocks=12, block_size=4))  # each request needs 5 blocks
    got = engine.generate(prompts, SamplingParams(max_new_tokens=10, ignore_eos=True))
    assert engine.num_preemptions > 0
    assert got == [alone(model, p, 10) for p in prompts]
    assert all(len(s.blocks.free) == 12 for s in engine.schedulers)  # every block came back
    assert engine.requests == {} and engine.kv_usage() == 0.0  # finished requests left the engine


def test_request_larger_than_cache_is_rejected(mixtral):
    _, model = mixtral
    engine = Engine(model, EngineConfig(num_blocks=4, block_size=4))
    with pytest.raises(ValueError, match=r"needs 20 tokens of KV cache \(5 blocks\), more than the whole cache "
                                         r"\(4 blocks = 16 tokens\): raise --kv-cache-gb"):
        engine.add_request(list(range(10)), SamplingParams(max_new_tokens=10))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request([1, 10_000], SamplingParams())
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        SamplingParams(max_new_tokens=0)


def test_abort_and_stop_tokens(mixtral):
    _, model = mixtral
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    ref = [alone(model, p, 12) for p in prompts]
    engine = Engine(model, EngineConfig(num_blocks=32, block_size=4))
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=12, ignore_eos=True)) for p in prompts]
    stop = engine.add_request(prompts[2], SamplingParams(max_new_tokens=12, ignore_eos=True,
                                                         stop_token_ids=(ref[2][3],)))
    events = {rid: [] for rid in ids + [stop]}
    for _ in range(4):
        for ev in engine.step():
            events[ev.req_id].append(ev)
    engine.abort(ids[1])
    while engine.has_unfinished():
        for ev in engine.step():
            events[ev.req_id].append(ev)
    out = {rid: [e.token for e in evs if e.token is not None] for rid, evs in events.items()}
    last = {rid: evs[-1] for rid, evs in events.items()}
    assert all(e.finished == (e is last[rid]) for rid, evs in events.items() for e in evs)
    assert last[ids[1]].finish_reason == "abort" and 0 < len(out[ids[1]]) < 12
    assert out[ids[1]] == ref[1][: len(out[ids[1]])]
    assert out[ids[0]] == ref[0] and out[ids[2]] == ref[2]
    first = ref[2].index(ref[2][3])  # stops at the first occurrence of the stop token, included
    assert out[stop] == ref[2][: first + 1] and last[stop].finish_reason == "stop"
    assert engine.requests == {}


def test_seeded_sampling_is_reproducible(mixtral):
    _, model = mixtral
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    sp = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=50, seed=1234, ignore_eos=True)
    a = Engine(model, EngineConfig(num_blocks=32)).generate(prompts, sp)
    b = staggered(Engine(model, EngineConfig(num_blocks=32, max_batch_tokens=3)), prompts, [10, 10], [3, 0],
                  temperature=1.0, top_k=50, seed=1234)
    assert a == b and a != [alone(model, p, 10) for p in prompts]  # not greedy, and batch-independent


def run_worker(tmp_path, model, layout, spec):
    out = tmp_path / "out.json"
    tp, pp, ep, dp = layout
    p = torchrun(tp * pp * dp, WORKER, model, tp, pp, ep, dp, json.dumps(spec), out)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(Path(out).read_text())


@pytest.mark.parametrize("layout", [(1, 2, 2, 2), (2, 2, 2, 1)], ids=["pp2-dp2-ep2", "tp2-pp2-ep2"])
def test_layout_engine_staggered_preempting(layout, mixtral, tmp_path):
    path, model = mixtral
    prompts, max_new, arrive = workload(model.cfg.vocab_size, n=7, seed=sum(layout))
    spec = {"prompts": prompts, "max_new": max_new, "arrive": arrive,
            "engine": {"num_blocks": 14, "block_size": 4, "max_batch_tokens": 6}}
    got = run_worker(tmp_path, path, layout, spec)
    assert [got["outputs"][str(i)] for i in range(len(prompts))] == \
        [alone(model, p, n) for p, n in zip(prompts, max_new)]


def test_seeded_sampling_same_across_layouts(mixtral, tmp_path):
    path, model = mixtral
    prompts = [[1, 2, 3], [4, 5, 6, 7], [9, 9]]
    sampling = {"temperature": 0.9, "top_p": 0.95, "seed": 77}
    got = run_worker(tmp_path, path, (2, 1, 2, 2), {"prompts": prompts, "max_new": [8] * 3, "sampling": sampling})
    want = Engine(model, EngineConfig(num_blocks=32)).generate(
        prompts, SamplingParams(max_new_tokens=8, ignore_eos=True, **sampling))
    assert [got["outputs"][str(i)] for i in range(3)] == want


def stage_rows(traces, stage):
    rows = [r for t in traces.values() for r in t if r[1] == stage]
    return {r[0]: r for r in rows}  # tick -> (tick, stage, micro_batch, tokens, busy, wait)


@pytest.mark.parametrize("M", [1, 4])
def test_schedule_trace(M, tmp_path):
    """PP=4: with M = PP every stage works at every steady-state tick; with M = 1 a stage
    works one tick in four (the bubble)."""
    pp = 4
    prompts = [[7 + i, 3, 5] for i in range(8)]
    spec = {"prompts": prompts, "max_new": [6] * 8, "engine": {"micro_batches": M, "num_blocks": 64}}
    got = run_worker(tmp_path, "tiny", (1, pp, 1, 1), spec)
    traces = {int(k): v for k, v in got["traces"].items()}
    ticks = max(r[0] for t in traces.values() for r in t) + 1
    for s in range(pp):
        rows = stage_rows(traces, s)
        steady = range(pp - 1, ticks - pp)  # fill and drain excepted
        busy = [t for t in steady if rows[t][2] is not None and rows[t][3] > 0]
        if M == pp:
            assert busy == list(steady), f"stage {s} idle in steady state"
        else:
            assert all((t - s) % pp == 0 for t in busy) and len(busy) >= len(steady) // pp
            assert all(rows[t][2] is None for t in steady if (t - s) % pp)  # the bubble
