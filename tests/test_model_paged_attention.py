"""The model with the Triton kernels (paged attention included) equals transformers and the
PyTorch path (SDPA over gathered blocks): a chunked prefill of two sequences, then decode
steps of both in one batch, with their blocks scattered over the cache. Runs under the
Triton interpreter on CPU, compiled on a GPU:

    python -m pytest tests/test_model_paged_attention.py -q
"""
from __future__ import annotations

import pytest
import torch

from kernel_env import DEVICE, needs_triton

import moerun.kernels as K
from moerun.build import build_model, forward_logits
from moerun.kvcache import KVCache
from moerun.model import AttnMeta


def run_steps(model, seqs, tables, plan, block_size):
    """plan: per step, new tokens of each sequence. Returns each sequence's logits, in order."""
    cache = KVCache.for_model(model, num_blocks=12, block_size=block_size)
    done = [0] * len(seqs)
    out = [[] for _ in seqs]
    with torch.no_grad():
        for lens in plan:
            ids = torch.tensor([t for s, d, n in zip(seqs, done, lens) for t in s[d:d + n]])
            meta = AttnMeta.build(tables, list(done), list(lens), block_size, DEVICE)
            logits = model(ids.to(DEVICE), meta.pos_T, meta, cache).cpu()
            row = 0
            for b, n in enumerate(lens):
                out[b].append(logits[row:row + n])
                row += n
                done[b] += n
    return [torch.cat(o) for o in out]


@needs_triton
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])  # window 6; GQA, D = 24; sinks
def test_model_with_paged_attention_kernel(family, hf_checkpoint, monkeypatch):
    path, hf = hf_checkpoint(family)
    model = build_model(str(path), dtype="float32", device=DEVICE)
    vocab = model.cfg.vocab_size
    seqs = [torch.randint(0, vocab, (11,)).tolist(), torch.randint(0, vocab, (7,)).tolist()]
    tables = [[9, 2, 5], [0, 7, 11]]  # scattered, not from 0
    plan = [(6, 0), (3, 5), (1, 1), (1, 1)]  # an idle sequence, varlen, then decode
    block_size = 4
    calls = []
    kernel = K.paged_attention
    monkeypatch.setattr(K, "paged_attention", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    try:
        K.set_default_impl("triton")
        ours = run_steps(model, seqs, tables, plan, block_size)
    finally:
        K.set_default_impl("auto")
    assert len(calls) == len(plan) * model.cfg.num_layers  # every layer took the kernel
    try:
        K.set_default_impl("torch")
        cpu_path = run_steps(model, seqs, tables, plan, block_size)
        assert len(calls) == len(plan) * model.cfg.num_layers  # the PyTorch path does not
        full = [f.cpu() for f in forward_logits(model, [s[:len(o)] for s, o in zip(seqs, ours)])]
    finally:
        K.set_default_impl("auto")
    with torch.no_grad():
        refs = [hf(torch.tensor([s[:len(o)]])).logits[0] for s, o in zip(seqs, ours)]
    for o, c, f, r in zip(ours, cpu_path, full, refs):
        assert (o - c).abs().max().item() <= 1e-4
        assert (o - f).abs().max().item() <= 1e-4
        assert (o - r).abs().max().item() <= 1e-4


@pytest.mark.skipif(str(DEVICE) != "cpu" or not K.cpu_ext.available(), reason="CPU only, with the C kernel")
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])  # window 6; GQA, D = 24; sinks
def test_model_with_cpu_c_attention(family, hf_checkpoint, monkeypatch):
    """On CPU, steps of at most CPU_KERNEL_MAX_NEW new tokens per sequence run attention in
    the C kernel, longer ones in SDPA: the same steps either way equal transformers."""
    import moerun.model.attention as A
    path, hf = hf_checkpoint(family)
    model = build_model(str(path), dtype="float32", device="cpu")
    model.set_fused_cpu(False)  # the layer path's choice of kernel (the fused step: tests/test_cpu_fused.py)
    vocab = model.cfg.vocab_size
    seqs = [torch.randint(0, vocab, (11,)).tolist(), torch.randint(0, vocab, (7,)).tolist()]
    tables = [[9, 2, 5], [0, 7, 11]]
    plan = [(6, 0), (3, 5), (1, 1), (1, 1)]
    calls = []
    kernel = K.cpu_ext.paged_attention
    monkeypatch.setattr(K.cpu_ext, "paged_attention", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    monkeypatch.setattr(A, "CPU_KERNEL_MAX_NEW", 5)  # the 6-token step takes SDPA, the others the C kernel
    ours = run_steps(model, seqs, tables, plan, 4)
    assert len(calls) == (len(plan) - 1) * model.cfg.num_layers
    monkeypatch.setattr(A, "CPU_KERNEL_MAX_NEW", 0)
    sdpa = run_steps(model, seqs, tables, plan, 4)
    assert len(calls) == (len(plan) - 1) * model.cfg.num_layers
    with torch.no_grad():
        refs = [hf(torch.tensor([s[:len(o)]])).logits[0] for s, o in zip(seqs, ours)]
    for o, s, r in zip(ours, sdpa, refs):
        assert (o - s).abs().max().item() <= 1e-4
        assert (o - r).abs().max().item() <= 1e-4
