"""moerun's model equals transformers on the same weights, for every supported family."""
from __future__ import annotations

import torch
import pytest

from moerun.model import AttnMeta
from moerun.runner import build_model, generate_batch, new_cache
from moerun.sampling import SamplingParams

FAMILY_NAMES = ["olmoe", "mixtral", "qwen2_moe", "qwen3_moe"]


def random_prompts(n, vocab, gen, lo=1, hi=14):
    return [torch.randint(0, vocab, (int(torch.randint(lo, hi, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_logits_match_transformers(family, hf_checkpoint):
    path, hf = hf_checkpoint(family)
    model = build_model(str(path))
    gen = torch.Generator().manual_seed(torch.seed())
    prompts = random_prompts(4, model.cfg.vocab_size, gen)
    meta = AttnMeta.build(list(range(len(prompts))), [0] * len(prompts), [len(p) for p in prompts], "cpu")
    with torch.no_grad():
        ours = model(torch.tensor(sum(prompts, [])), meta.pos_T, meta, new_cache(model, len(prompts), 32))
        refs = [hf(torch.tensor([p])).logits[0] for p in prompts]
    ours = ours.split([len(p) for p in prompts])
    for p, o, r in zip(prompts, ours, refs):
        assert (o - r).abs().max().item() <= 1e-4, f"prompt {p}"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_greedy_generation_matches_transformers(family, hf_checkpoint):
    path, hf = hf_checkpoint(family)
    model = build_model(str(path))
    gen = torch.Generator().manual_seed(torch.seed())
    prompts = random_prompts(3, model.cfg.vocab_size, gen, lo=2, hi=10)
    ours = generate_batch(model, prompts, SamplingParams(max_new_tokens=16))
    for p, o in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              do_sample=False, max_new_tokens=16, pad_token_id=0)[0, len(p):].tolist()
        assert o == ref, f"prompt {p}"


def test_decode_with_cache_equals_full_forward(hf_checkpoint):
    """Logits of the last token after step-by-step decode equal one full forward."""
    path, _ = hf_checkpoint("mixtral")  # sliding window 6: the window must hold across steps
    model = build_model(str(path))
    seq = torch.randint(0, model.cfg.vocab_size, (12,)).tolist()
    with torch.no_grad():
        meta = AttnMeta.build([0], [0], [12], "cpu")
        full = model(torch.tensor(seq), meta.pos_T, meta, new_cache(model, 1, 16))
        cache = new_cache(model, 1, 16)
        meta = AttnMeta.build([0], [0], [5], "cpu")
        steps = [model(torch.tensor(seq[:5]), meta.pos_T, meta, cache)]
        for i in range(5, 12):
            meta = AttnMeta.build([0], [i], [1], "cpu")
            steps.append(model(torch.tensor(seq[i:i + 1]), meta.pos_T, meta, cache))
    assert (torch.cat(steps) - full).abs().max().item() <= 1e-4
