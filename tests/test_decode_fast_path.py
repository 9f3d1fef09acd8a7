"""The decode fast path, engine side: a step's metadata built in one host buffer (equal
to the plain per-sequence definition), the decode step padded to a CUDA-graph bucket
(same logits and tokens as unpadded, padding rows writing only the scratch block), the
bucket choice, the flags, and on a GPU graph replay equal to eager."""
from __future__ import annotations

import argparse
import importlib.util
import random
from pathlib import Path

import pytest
import torch

from moerun.args import add_engine_args, engine_config
from moerun.build import build_model
from moerun.engine import Engine, EngineConfig, SeqStep
from moerun.engine.graphs import GraphRunner, bucket_for, buckets, graphs_off_reason
from moerun.kvcache import KVCache
from moerun.model import AttnMeta
from moerun.options import SamplingParams
from moerun.sampling import make_generator, sample_tokens

from dist_worker import run_staggered


# ------------------------------------------------------------ step metadata
def reference_meta(tables, starts, lens, block_size):
    """Slots, positions, padded tables, query-block index and mask, one sequence and one
    token at a time."""
    B = len(lens)
    max_new, max_len = max(lens), max(s + n for s, n in zip(starts, lens))
    nblk = -(-max_len // block_size)
    slot, pos, pad = [], [], []
    for b, (t, s, n) in enumerate(zip(tables, starts, lens)):
        for p in range(s, s + n):
            pos.append(p)
            slot.append(t[p // block_size] * block_size + p % block_size)
            pad.append(b * max_new + p - s)
    table = torch.zeros(B, nblk, dtype=torch.long)
    for b, t in enumerate(tables):
        table[b, : min(len(t), nblk)] = torch.tensor(t[:nblk])
    mask = torch.zeros(B, 1, max_new, max_len, dtype=torch.bool)
    for b, (s, n) in enumerate(zip(starts, lens)):
        for j in range(max_new):
            for k in range(max_len):
                mask[b, 0, j, k] = (k <= s + j) if j < n else k == 0  # a padded query row sees key 0
    return torch.tensor(slot), torch.tensor(pos), table, torch.tensor(pad), mask


@pytest.mark.parametrize("seed", range(3))
def test_step_metadata_equals_per_token_definition(seed):
    rng = random.Random(seed)
    for _ in range(30):
        bs, B = rng.choice([1, 4, 16]), rng.randint(1, 5)
        starts = [rng.randint(0, 40) for _ in range(B)]
        lens = [rng.randint(1, 20) for _ in range(B)]
        tables = [rng.sample(range(300), -(-(s + n) // bs) + rng.randint(0, 2)) for s, n in zip(starts, lens)]
        ids = [rng.randint(0, 99) for _ in range(sum(lens))]
        rows = sorted(rng.sample(range(sum(lens)), rng.randint(0, B)))
        meta = AttnMeta.build(tables, starts, lens, bs, "cpu", ids=ids, rows=rows)
        slot, pos, table, pad, mask = reference_meta(tables, starts, lens, bs)
        assert torch.equal(meta.slot_T, slot) and torch.equal(meta.pos_T, pos)
        assert torch.equal(meta.table_BP, table) and torch.equal(meta.pad_index_T, pad)
        assert meta.mask(0).shape == mask.shape and torch.equal(meta.mask(0), mask)
        assert meta.ids_T.tolist() == ids and meta.rows_R.tolist() == rows
        assert meta.starts_B.tolist() == starts and meta.lens_B.tolist() == lens
        assert meta.uniform == (len(set(lens)) == 1)
        # one buffer: every tensor is a view of the same storage
        ptrs = {t.untyped_storage().data_ptr() for t in (meta.slot_T, meta.pos_T, meta.table_BP, meta.ids_T,
                                                          meta.starts_B, meta.lens_B)}
        assert len(ptrs) == 1
        window = rng.randint(1, 8)
        kpos = torch.arange(mask.shape[-1])
        qpos = torch.tensor(starts)[:, None, None, None] + torch.arange(mask.shape[2])[None, None, :, None]
        want = mask & (qpos - kpos < window)
        want[..., 0] |= mask[..., 0] & ~(torch.arange(mask.shape[2])[None, None, :] < torch.tensor(lens)[:, None, None])
        assert torch.equal(meta.mask(window), want)


# ------------------------------------------------------------ buckets and flags
def test_buckets_and_bucket_choice():
    assert buckets(32) == [1, 2, 4, 8, 16, 32] and buckets(24) == [1, 2, 4, 8, 16, 24] and buckets(1) == [1]
    sizes = buckets(24)
    assert [bucket_for(b, sizes) for b in (1, 2, 3, 5, 16, 17, 24, 25)] == [1, 2, 4, 8, 16, 24, 24, None]


def parse(*argv):
    ap = argparse.ArgumentParser()
    add_engine_args(ap)
    return engine_config(ap.parse_args(list(argv)))


def test_graph_flags_parsed_and_validated():
    assert parse().cuda_graph_max_bs == 32 and parse().enforce_eager is False
    cfg = parse("--enforce-eager", "--cuda-graph-max-bs", "8")
    assert cfg.enforce_eager and cfg.cuda_graph_max_bs == 8
    for bad in ("0", "-4"):
        with pytest.raises(ValueError, match=rf"cuda_graph_max_bs must be an integer >= 1, got {bad} "
                                             r"\(--cuda-graph-max-bs; --enforce-eager turns CUDA graphs off\)"):
            parse("--cuda-graph-max-bs", bad)


def test_when_graphs_are_off():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert graphs_off_reason(EngineConfig(), cuda, ep_size=1) is None
    assert graphs_off_reason(EngineConfig(), cpu, 1) == "device cpu: graphs need CUDA"
    assert graphs_off_reason(EngineConfig(enforce_eager=True), cuda, 1) == "--enforce-eager"
    assert "EP > 1" in graphs_off_reason(EngineConfig(), cuda, 2)
    assert "--profile" in graphs_off_reason(EngineConfig(profile=True), cuda, 1)
    engine = Engine(build_model("tiny", device="cpu"), EngineConfig(num_blocks=8))
    assert engine.worker.graphs is None  # on CPU the engine runs eagerly


# ------------------------------------------------------------ padded decode
@pytest.fixture(scope="module")
def mixtral(hf_checkpoint):
    """A small Mixtral checkpoint (sliding-window attention): its path."""
    return str(hf_checkpoint("mixtral")[0])


def prefill(stages, prompts, block_size, device="cpu"):
    """Prefill ``prompts`` through the (model, cache) ``stages`` (blocks in order, a spare
    block each); their decode steps for one next token each."""
    steps, n, vocab = [], 0, stages[0][0].cfg.vocab_size
    for i, p in enumerate(prompts):
        k = -(-len(p) // block_size) + 1
        steps.append(SeqStep(i, tuple(range(n, n + k)), len(p), (int(torch.randint(0, vocab, (1,))),), True,
                             SamplingParams()))
        n += k
    meta = AttnMeta.build([s.blocks for s in steps], [0] * len(prompts), [len(p) for p in prompts], block_size,
                          device)
    x = torch.tensor(sum(prompts, []), device=device)
    for model, cache in stages:
        x = model(x, meta.pos_T, meta, cache)
    return steps


def eager_decode(stages, steps, block_size, device="cpu"):
    """The decode step unpadded and eager: each stage's output."""
    meta = AttnMeta.build([s.blocks for s in steps], [s.start for s in steps], [1] * len(steps), block_size, device)
    x, outs = torch.tensor([s.tokens[0] for s in steps], device=device), []
    for model, cache in stages:
        x = model(x, meta.pos_T, meta, cache)
        outs.append(x)
    return outs


def test_padded_decode_step_equals_unpadded(mixtral):
    tiny = build_model(mixtral)
    bs = 4
    prompts = [torch.randint(0, 160, (int(n),)).tolist() for n in torch.randint(1, 30, (5,))]
    cache = KVCache.for_model(tiny, 64, bs)
    steps = prefill([(tiny, cache)], prompts, bs)
    want, = eager_decode([(tiny, cache)], steps, bs)  # writes the new tokens' K/V: the runner writes the same
    used = {b for s in steps for b in s.blocks}
    before = [c.clone() for c in cache.k]
    runner = GraphRunner(tiny, cache, max_bs=8)
    assert runner.max_blocks == min(512 // bs, 64) and runner.fits(steps)
    got = runner.run(steps, None, list(range(len(steps))))  # 5 sequences in the bucket of 8
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    for c, c0 in zip(cache.k, before):  # padding rows wrote the scratch block, nothing else
        changed = {int(b) for b in (c != c0).flatten(1).any(1).nonzero()}
        assert changed <= used | {cache.scratch_block} and cache.scratch_block in changed
    some = [0, 3]  # only rows 0 and 3 are sampled: their logits alone
    torch.testing.assert_close(runner.run(steps, None, some), want[some], rtol=1e-5, atol=1e-5)
    assert not runner.fits([SeqStep(0, (0, 1), 0, (1, 2), True, SamplingParams())])  # a prefill chunk
    assert not runner.fits(steps * 2)  # 10 sequences: over the largest bucket
    assert not runner.fits([])


def test_padded_decode_on_a_later_stage_takes_hidden_states(mixtral):
    bs = 4
    first, last = build_model(mixtral, layers=range(0, 1)), build_model(mixtral, layers=range(1, 3))
    stages = [(m, KVCache.for_model(m, 32, bs)) for m in (first, last)]
    prompts = [torch.randint(0, 160, (int(n),)).tolist() for n in torch.randint(1, 20, (3,))]
    steps = prefill(stages, prompts, bs)
    h_want, want = eager_decode(stages, steps, bs)
    r0, r1 = (GraphRunner(m, c, max_bs=4) for m, c in stages)  # 3 sequences in the bucket of 4
    h = r0.run(steps, None, None)
    torch.testing.assert_close(h, h_want, rtol=1e-5, atol=1e-5)
    assert h.shape == (3, first.cfg.hidden_size) and h._base is None  # a copy, not the reused output buffer
    torch.testing.assert_close(r1.run(steps, h, [0, 1, 2]), want, rtol=1e-5, atol=1e-5)


def test_engine_with_padded_buckets_equals_eager_engine(mixtral):
    """The engine's decode steps through the runner's padded buffers (run eagerly here)
    give every request the tokens of the plain engine: staggered arrivals, one-token
    prompt chunks beside decodes, sliding-window layers, seeded sampling with logprobs."""
    model = build_model(mixtral)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, model.cfg.vocab_size, (int(torch.randint(2, 9, (1,), generator=g)),),
                             generator=g).tolist() for _ in range(6)]
    max_new, arrive = [int(torch.randint(6, 14, (1,), generator=g)) for _ in prompts], [0, 0, 1, 2, 5, 9]
    sp = {"temperature": 0.8, "top_k": 20, "seed": 11, "logprobs": 2}
    cfg = EngineConfig(num_blocks=64, block_size=4, max_batch_tokens=5)
    want = run_staggered(Engine(model, cfg), prompts, max_new, arrive, sp)
    engine = Engine(model, cfg)
    runner = engine.worker.graphs = GraphRunner(model, engine.worker.cache, max_bs=8)
    calls = []
    run = runner.run
    runner.run = lambda steps, x, sampled: calls.append((len(steps), len(sampled))) or run(steps, x, sampled)
    got = run_staggered(engine, prompts, max_new, arrive, sp)
    tokens = {i: [t for t, _, _ in evs] for i, evs in want.items()}
    assert {i: [t for t, _, _ in evs] for i, evs in got.items()} == tokens
    for i in want:  # log probabilities equal to float rounding (the padded batch's matmuls differ in shape)
        for (_, lp, top), (_, lp_want, top_want) in zip(got[i], want[i]):
            assert lp == pytest.approx(lp_want, abs=1e-4)
            assert [t for t, _ in top] == [t for t, _ in top_want]
            assert [v for _, v in top] == pytest.approx([v for _, v in top_want], abs=1e-4)
    assert any(n not in runner.buckets for n, _ in calls)  # padded to a bucket
    assert any(k < n for n, k in calls)  # a one-token prompt chunk beside decodes: not sampled


def test_bench_decode_section_measures_eager_and_says_why_not_graphs(monkeypatch):
    """``scripts/bench.py --section decode``: real step times, the graph row only where
    CUDA is; here (or with --enforce-eager) the reason it is missing."""
    spec = importlib.util.spec_from_file_location("bench_decode", Path(__file__).parents[1] / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "DECODE_BATCHES", (1, 3))
    args = bench.parse_args(["--section", "decode", "--enforce-eager"])
    res = bench.decode(args)
    assert [(r["mode"], r["batch"], r["steps"]) for r in res["rows"]] == [("eager", 1, 20), ("eager", 3, 20)]
    assert all(r["step_ms"] > 0 for r in res["rows"]) and res["modes"] == ["eager"]
    assert res["graphs_note"] == ("--enforce-eager" if torch.cuda.is_available() else
                                  "not measured: no CUDA device (graphs need CUDA)")


# ------------------------------------------------------------ on a GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_step_metadata_and_sampling_do_not_wait_for_the_device():
    logits = torch.randn(4, 300, device="cuda")
    params = [SamplingParams(), SamplingParams(temperature=0.7, top_k=20, seed=1),
              SamplingParams(temperature=1.0, top_p=0.8, seed=2), SamplingParams(temperature=0.5, seed=3)]
    gens = [None] + [make_generator(p, i, "cuda") for i, p in enumerate(params[1:])]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call raises
    try:
        meta = AttnMeta.build([[3, 1], [2]], [17, 4], [1, 1], 16, "cuda", ids=[5, 6], rows=[0, 1])
        meta.mask(0)
        meta.mask(4)
        toks = sample_tokens(logits, params, gens)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert meta.slot_T.tolist() == [1 * 16 + 1, 2 * 16 + 4] and toks.shape == (4,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replay_equals_eager():
    model = build_model("tiny", device="cuda", dtype="float32")
    bs = 16
    prompts = [torch.randint(0, 256, (int(n),)).tolist() for n in torch.randint(1, 40, (5,))]
    cache = KVCache.for_model(model, 64, bs)
    runner = GraphRunner(model, cache, max_bs=8)
    runner.capture()
    assert sorted(runner.graphs) == [1, 2, 4, 8]
    with torch.inference_mode():
        steps = prefill([(model, cache)], prompts, bs, "cuda")
        want, = eager_decode([(model, cache)], steps, bs, "cuda")
    got = runner.run(steps, None, list(range(5)))  # replayed: 5 sequences in the graph of 8
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    sp = SamplingParams(max_new_tokens=12, ignore_eos=True)
    graphs = Engine(model, EngineConfig(num_blocks=128, block_size=bs, cuda_graph_max_bs=8))
    eager = Engine(model, EngineConfig(num_blocks=128, block_size=bs, enforce_eager=True))
    assert graphs.worker.graphs is not None and eager.worker.graphs is None
    assert graphs.generate(prompts, sp) == eager.generate(prompts, sp)


# ------------------------------------------------------------ the CPU LM head
@pytest.mark.parametrize("rows", [0, 1, 7, 48, 49, 130])
def test_cpu_lm_head_equals_linear_on_both_sides_of_its_switch(rows):
    """Up to LM_HEAD_TALL_MAX_ROWS rows the CPU LM head computes (W x^T)^T, above it x W^T:
    either way the logits are F.linear's, within float32 summation-order error."""
    from moerun.comm import Comm
    from moerun.model.layers import LM_HEAD_TALL_MAX_ROWS, LMHead
    head = LMHead(1000, 64, Comm(), None)
    with torch.no_grad():
        head.weight.normal_(0, 0.1)
    x = torch.randn(rows, 64)
    got = head(x)
    assert got.shape == (rows, 1000) and got.is_contiguous()
    if rows:
        assert (got - torch.nn.functional.linear(x, head.weight)).abs().max().item() <= 1e-5
    assert LM_HEAD_TALL_MAX_ROWS == 48  # the cases above sit on both sides of it
