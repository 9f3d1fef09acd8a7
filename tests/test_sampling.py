"""The batched sampler: its tokens and log probabilities equal the per-row reference
(``sample_one``, ``logprobs_of``) for seeded requests of every kind (greedy, temperature,
top-k, top-p, mixed in one batch), a seed gives the same tokens in any batch, and
non-finite logits are an error naming the request."""
from __future__ import annotations

import random

import pytest
import torch

from moerun.options import SamplingParams
from moerun.sampling import logprobs_of, make_generator, sample, sample_one, sample_step, sample_tokens


def random_params(rng: random.Random) -> SamplingParams:
    return SamplingParams(temperature=rng.choice([0.0, rng.uniform(0.05, 2.0), rng.uniform(0.05, 2.0)]),
                          top_k=rng.choice([0, 0, 1, rng.randint(2, 40), 10_000]),
                          top_p=rng.choice([1.0, 1.0, rng.uniform(0.05, 1.0)]),
                          seed=rng.randint(0, 2**31), logprobs=rng.choice([None, None, 0, rng.randint(1, 5)]))


def reference_step(logits_BV, params, gens):
    toks = [sample_one(logits_BV[b], p, g) for b, (p, g) in enumerate(zip(params, gens))]
    return logprobs_of(logits_BV, toks, [p.logprobs for p in params])


@pytest.mark.parametrize("seed", range(4))
def test_batched_sampler_equals_per_row_sampler(seed):
    rng = random.Random(seed)
    for _ in range(25):
        B, V = rng.randint(1, 7), rng.choice([5, 64, 512])
        params = [random_params(rng) for _ in range(B)]
        ref_gens = [make_generator(p, b) for b, p in enumerate(params)]
        gens = [make_generator(p, b) for b, p in enumerate(params)]
        for _ in range(3):  # generators advance step by step alike
            logits_BV = torch.randn(B, V) * rng.uniform(0.5, 6.0)
            assert sample_step(logits_BV, params, gens) == reference_step(logits_BV, params, ref_gens), params


def test_seed_gives_the_same_tokens_in_any_batch():
    V = 300
    mine = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, seed=1234)
    others = [SamplingParams(temperature=1.3, seed=5), SamplingParams(), SamplingParams(temperature=0.5, top_p=0.5)]
    logits = [torch.randn(V) * 3 for _ in range(6)]
    alone_gen = [make_generator(mine)]
    alone = [sample(l_V[None], [mine], alone_gen)[0] for l_V in logits]
    for pos in range(len(others) + 1):  # the request at every row of a batch of four
        params = others[:pos] + [mine] + others[pos:]
        gens = [make_generator(p, i) for i, p in enumerate(params)]
        got = []
        for l_V in logits:
            batch = torch.randn(len(params), V) * 3
            batch[pos] = l_V
            got.append(int(sample_tokens(batch, params, gens)[pos]))
        assert got == alone
    assert len(set(alone)) > 1  # really sampled


def test_greedy_batch_is_argmax_and_needs_no_generator():
    logits = torch.randn(5, 40)
    params = [SamplingParams(logprobs=2)] * 5
    out = sample_step(logits, params, [None] * 5)
    assert [t for t, _, _ in out] == logits.argmax(-1).tolist()
    lp = torch.log_softmax(logits, -1)
    assert [o[1] for o in out] == [float(lp[b, t]) for b, (t, _, _) in enumerate(out)]
    assert [len(o[2]) for o in out] == [2] * 5


def test_non_finite_logits_name_the_request():
    logits = torch.randn(3, 16)
    logits[1, 4] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite logits \(NaN or inf\) for request\(s\) \[42\]"):
        sample_step(logits, [SamplingParams()] * 3, [None] * 3, request_ids=[7, 42, 9])
    assert sample_step(torch.zeros(0, 16), [], []) == []


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_only_rows_with_non_finite_logits_are_refused(bad):
    """Finite logits whose float32 row sum overflows are not refused; any inf or NaN is."""
    logits = torch.full((4, 8), 3e38)
    logits[2] = torch.randn(8)
    logits[1, 3] = bad
    logits[3, 0] = -3e38
    with pytest.raises(FloatingPointError, match=r"for request\(s\) \['b'\]"):
        sample_step(logits, [SamplingParams()] * 4, [None] * 4, request_ids=["a", "b", "c", "d"])
    rows = [0, 2, 3]
    got = sample_step(logits[rows], [SamplingParams()] * 3, [None] * 3)
    assert [t for t, _, _ in got] == logits[rows].argmax(-1).tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_sampler_is_batch_independent_and_greedy_exact():
    dev = torch.device("cuda")
    V = 1000
    mine = SamplingParams(temperature=0.8, top_p=0.95, top_k=100, seed=99)
    logits = [torch.randn(V, device=dev) * 3 for _ in range(8)]
    gen = [make_generator(mine, 0, dev)]
    alone = [int(sample_tokens(l_V[None], [mine], gen)[0]) for l_V in logits]
    params = [SamplingParams(), mine, SamplingParams(temperature=1.0, seed=3)]
    gens = [make_generator(p, i, dev) for i, p in enumerate(params)]
    got = []
    for l_V in logits:
        batch = torch.randn(3, V, device=dev) * 3
        batch[1] = l_V
        toks = sample_tokens(batch, params, gens)
        assert int(toks[0]) == int(batch[0].argmax())
        got.append(int(toks[1]))
    assert got == alone
