"""The fused CPU decode step (moerun/model/cpu_fused.py over decode_layers_f32 in
kernels/csrc/moe_cpu.c): a step through it equals the same step layer by layer (hidden
states, logits and every KV cache write), on the first and on a later pipeline stage, with
sliding windows and partial RoPE; an engine run through it gives the layer path's tokens; the
model and step rules that send work back to the layer path; its phases in the profiler."""
from __future__ import annotations

import pytest
import torch

from moerun.build import build_model
from moerun.engine import Engine, EngineConfig
from moerun.kernels import cpu_ext
from moerun.kvcache import KVCache
from moerun.model import AttnMeta
from moerun.model.cpu_fused import FusedDecodeCPU, why_not
from moerun.options import SamplingParams

needs_ext = pytest.mark.skipif(not cpu_ext.available() or cpu_ext.sgemm() is None,
                               reason=f"no C kernels or sgemm: {cpu_ext.unavailable_reason()}")


def layer_path(model):
    model.set_fused_cpu(False)
    return model


def steps(models_caches, prompts, n_decode, bs):
    """Prefill ``prompts`` (block tables in order), then ``n_decode`` one-token steps, through
    the (model, cache) stages; every stage's output of every step."""
    g = torch.Generator().manual_seed(5)
    tables, n = [], 0
    for p in prompts:
        k = -(-(len(p) + n_decode) // bs)
        tables.append(list(range(n, n + k)))
        n += k
    starts, lens, ids, outs = [0] * len(prompts), [len(p) for p in prompts], sum(prompts, []), []
    vocab = models_caches[0][0].cfg.vocab_size
    for _ in range(n_decode + 1):
        meta = AttnMeta.build(tables, starts, lens, bs, "cpu")
        x = torch.tensor(ids)
        with torch.inference_mode():
            for model, cache in models_caches:
                x = model(x, meta.pos_T, meta, cache)
                outs.append(x.clone())
        starts = [s + n for s, n in zip(starts, lens)]
        lens = [1] * len(prompts)
        ids = torch.randint(0, vocab, (len(prompts),), generator=g).tolist()
    return outs


def variant(ckpt):
    """The checkpoint's shape with partial RoPE, q/k/v and o biases, unrenormalised scaled
    routing weights and no sliding window, random weights: what the checkpoints do not cover."""
    import dataclasses
    from moerun.config import ModelConfig
    cfg = ModelConfig.load(ckpt)
    return dataclasses.replace(cfg, rotary_dim=cfg.head_dim // 2, qkv_bias=True, o_bias=True, norm_topk_prob=False,
                               routed_scaling=1.5, sliding_windows=(0,) * cfg.num_layers)


@needs_ext
@pytest.mark.parametrize("kind", ["mixtral", "variant"])
def test_fused_steps_equal_the_layer_path(hf_checkpoint, kind, monkeypatch):
    ckpt = str(hf_checkpoint("mixtral")[0])  # sliding window 6
    cfg = variant(ckpt) if kind == "variant" else None
    src = "random" if cfg else ckpt
    bs = 4
    prompts = [torch.randint(0, 160, (int(n),)).tolist() for n in (3, 9, 1, 13)]
    runs = {}
    for fused in (True, False):
        first = build_model(src, layers=range(0, 1), cfg=cfg, seed=3)
        last = build_model(src, layers=range(1, 3), cfg=cfg, seed=3)
        if cfg:  # the two stages of one random model: the full model's weights, by name
            full = build_model(src, cfg=cfg, seed=3).state_dict()
            for stage in (first, last):
                stage.load_state_dict({k: full[k2] for k, k2 in stage_names(stage, full)})
        if not fused:
            layer_path(first), layer_path(last)
        stages = [(m, KVCache.for_model(m, 64, bs)) for m in (first, last)]
        calls = []
        real = cpu_ext.decode_layers
        monkeypatch.setattr(cpu_ext, "decode_layers", lambda *a: calls.append(a[2]) or real(*a))
        runs[fused] = (steps(stages, prompts, 6, bs), [c for _, cache in stages for c in cache.k + cache.v], calls)
    (got, got_cache, calls), (want, want_cache, none) = runs[True], runs[False]
    assert len(calls) == 14 and set(calls) == {1, 2} and not none  # 7 steps x 2 stages, all fused
    for a, b in zip(got, want):  # hidden states of stage 0, logits of stage 1
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(got_cache, want_cache):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def stage_names(stage, full):
    """(stage's state-dict key, the full model's key) pairs: a stage numbers its layers from 0."""
    first = stage.layer_ids.start
    for k in stage.state_dict():
        if k.startswith("layers."):
            i, rest = k.split(".", 2)[1:]
            yield k, f"layers.{int(i) + first}.{rest}"
        else:
            yield k, k


@needs_ext
def test_engine_tokens_equal_the_layer_path(hf_checkpoint):
    ckpt = str(hf_checkpoint("mixtral")[0])
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 160, (int(n),), generator=g).tolist() for n in (5, 2, 11, 7, 3)]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    outs = []
    for fused in (True, False):
        model = build_model(ckpt)
        if not fused:
            layer_path(model)
        outs.append(Engine(model, EngineConfig(num_blocks=64, block_size=4)).generate(prompts, params))
    assert outs[0] == outs[1]


@needs_ext
def test_what_takes_the_layer_path(hf_checkpoint, monkeypatch):
    for family, why in [("qwen3_moe", "q/k norm"), ("qwen2_moe", "plain routed silu experts"),
                        ("gpt_oss", "router scoring 'topk_softmax'"), ("glm4_moe", "router scoring 'sigmoid'")]:
        assert why in why_not(build_model(str(hf_checkpoint(family)[0])))
    ckpt = str(hf_checkpoint("mixtral")[0])
    monkeypatch.setenv("MOERUN_FUSED_DECODE", "0")
    assert "MOERUN_FUSED_DECODE=0" in why_not(build_model(ckpt))
    monkeypatch.delenv("MOERUN_FUSED_DECODE")
    model = build_model(ckpt)
    fused = FusedDecodeCPU(model)
    cache = KVCache.for_model(model, 64, 4)  # 64 blocks of 4
    tables = [list(range(0, 30)), list(range(30, 60))]  # 120 positions each

    def run(lens, **kw):
        meta = AttnMeta.build(tables, [0, 0], lens, 4, "cpu")
        h = torch.randn(sum(lens), model.cfg.hidden_size)
        cos = torch.ones(sum(lens), model.cfg.head_dim)
        return fused.run(h, cos, cos.clone(), meta, cache)

    with torch.inference_mode():
        assert run([3, 1]) is not None
        assert run([3, 1]).shape == (4, model.cfg.hidden_size)
        assert run([70, 3]) is None  # a prefill chunk over the C attention kernel's 64 new tokens
        assert run([60, 40]) is None  # 100 tokens x top-2 on 8 experts: 25 slots each, the grouped path's
        assert run([60, 35]) is not None  # 23.75 slots each
        model.layers[0].mlp.count_load()  # expert load counting (EPLB) runs in the layer path
        assert run([3, 1]) is None
        model.layers[0].mlp.load_E = None
    with torch.no_grad():
        torch.set_grad_enabled(True)
        try:
            assert run([3, 1]) is None  # gradients recorded: the layer path
        finally:
            torch.set_grad_enabled(False)


@needs_ext
def test_profiler_sees_the_fused_phases(hf_checkpoint):
    model = build_model(str(hf_checkpoint("mixtral")[0]))
    engine = Engine(model, EngineConfig(num_blocks=64, block_size=4, profile=True))
    engine.generate([[1, 2, 3, 4], [5, 6]], SamplingParams(max_new_tokens=8, ignore_eos=True))
    prof = engine.worker.prof
    for phase in ("norm", "qkv", "attention", "o_proj", "router", "experts"):
        assert prof.totals[phase] > 0, phase
    assert sum(prof.totals.values()) <= prof.wall_s * 1.0001
    # every step counted its experts: 2 layers x the step's tokens x top-2 over the run
    assert prof.num_steps >= 8
