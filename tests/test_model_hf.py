"""moerun's model equals transformers on the same weights, for every supported family."""
from __future__ import annotations

import torch
import pytest

from moerun.model import AttnMeta
from moerun.kvcache import KVCache
from moerun.build import build_model, forward_logits
from moerun.engine import Engine
from moerun.options import SamplingParams

FAMILY_NAMES = ["olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "glm4_moe", "dots1", "minimax_m2", "glm4_moe-fp8",
                "gpt_oss"]


def random_prompts(n, vocab, gen, lo=1, hi=14):
    return [torch.randint(0, vocab, (int(torch.randint(lo, hi, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_logits_match_transformers(family, hf_checkpoint):
    path, hf = hf_checkpoint(family)
    model = build_model(str(path))
    gen = torch.Generator().manual_seed(torch.seed())
    prompts = random_prompts(4, model.cfg.vocab_size, gen)
    ours = forward_logits(model, prompts)
    with torch.no_grad():
        refs = [hf(torch.tensor([p])).logits[0] for p in prompts]
    for p, o, r in zip(prompts, ours, refs):
        assert (o - r).abs().max().item() <= 1e-4, f"prompt {p}"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_greedy_generation_matches_transformers(family, hf_checkpoint):
    path, hf = hf_checkpoint(family)
    model = build_model(str(path))
    gen = torch.Generator().manual_seed(torch.seed())
    prompts = random_prompts(3, model.cfg.vocab_size, gen, lo=2, hi=10)
    ours = Engine(model).generate(prompts, SamplingParams(max_new_tokens=16))
    for p, o in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              do_sample=False, max_new_tokens=16, pad_token_id=0)[0, len(p):].tolist()
        assert o == ref, f"prompt {p}"


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_paged_decode_equals_full_forward(family, hf_checkpoint):
    """Chunked prefill then step-by-step decode through scattered blocks of a paged cache
    gives the logits of one full forward."""
    path, _ = hf_checkpoint(family)  # sliding windows (6; gpt_oss: 4 with sinks): they must hold across steps
    model = build_model(str(path))
    seq = torch.randint(0, model.cfg.vocab_size, (13,)).tolist()
    full = forward_logits(model, [seq])[0]
    cache = KVCache.for_model(model, num_blocks=8, block_size=4)
    blocks = [6, 1, 4, 2]  # not in order, not from 0
    steps, pos = [], 0
    with torch.no_grad():
        for n in (5, 3, 1, 1, 1, 1, 1):
            meta = AttnMeta.build([blocks], [pos], [n], 4, "cpu")
            steps.append(model(torch.tensor(seq[pos:pos + n]), meta.pos_T, meta, cache))
            pos += n
    assert (torch.cat(steps) - full).abs().max().item() <= 1e-4
