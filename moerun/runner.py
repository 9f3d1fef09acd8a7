"""Build a (stage of a) model on a device and run batched generation with a KV cache.

    model = build_model("tiny")                       # preset: random weights from --seed
    model = build_model("/ckpt", dtype=torch.bfloat16, device="cuda")
    outs = generate_batch(model, [[1, 2, 3]], SamplingParams(max_new_tokens=8))

This is the single-process path; distributed layouts and the engine reuse
``build_model`` and ``AttnMeta``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .comm import Comm
from .config import ModelConfig
from .kvcache import KVCache
from .model import AttnMeta, MoEModel
from .sampling import SamplingParams, make_generator, sample
from .weights import init_random, load_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str | None, device: str) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def build_model(model: str, *, comm: Comm | None = None, layers: range | None = None,
                dtype=torch.float32, device="cpu", seed: int = 0, cfg: ModelConfig | None = None):
    cfg = cfg or ModelConfig.load(model)
    with torch.device(device):
        m = MoEModel(cfg, comm, layers, dtype)
    m.requires_grad_(False)
    if Path(model).is_dir():
        m.load_report = load_checkpoint(m, model)
    else:
        init_random(m, seed)
        m.load_report = None
    return m.eval()


def new_cache(model: MoEModel, num_slots: int, max_len: int) -> KVCache:
    attn = model.layers[0].self_attn if len(model.layers) else None
    p = next(model.parameters())
    return KVCache(len(model.layers), num_slots, max_len, attn.num_kv_heads if attn else 0,
                   model.cfg.head_dim, p.dtype, p.device)


@torch.inference_mode()
def generate_batch(model: MoEModel, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                   eos_token_ids: tuple[int, ...] | None = None) -> list[list[int]]:
    """Greedy or sampled generation for a batch of prompts in one process."""
    if not prompts:
        return []
    params = params if isinstance(params, list) else [params] * len(prompts)
    cfg = model.cfg
    eos = set(cfg.eos_token_ids if eos_token_ids is None else eos_token_ids)
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty: a prompt needs at least one token")
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids {bad[:5]} outside the vocabulary (0..{cfg.vocab_size - 1})")
    device = next(model.parameters()).device
    max_len = max(len(p) + sp.max_new_tokens for p, sp in zip(prompts, params))
    cache = new_cache(model, len(prompts), max_len)
    gens = [make_generator(sp, i) for i, sp in enumerate(params)]
    outputs = [[] for _ in prompts]
    active = list(range(len(prompts)))
    starts, lens = [0] * len(prompts), [len(p) for p in prompts]
    feed = [list(p) for p in prompts]
    while active:
        meta = AttnMeta.build(active, [starts[i] for i in active], [lens[i] for i in active], device)
        tokens = torch.tensor([t for i in active for t in feed[i]], device=device)
        last = torch.cumsum(torch.tensor([lens[i] for i in active], device=device), 0) - 1
        logits = model(tokens, meta.pos_T, meta, cache, logits_rows=last)
        new = sample(logits, [params[i] for i in active], [gens[i] for i in active])
        still = []
        for i, tok in zip(active, new):
            outputs[i].append(tok)
            starts[i] += lens[i]
            lens[i], feed[i] = 1, [tok]
            sp = params[i]
            stop = tok in sp.stop_token_ids or (not sp.ignore_eos and tok in eos)
            if not stop and len(outputs[i]) < sp.max_new_tokens:
                still.append(i)
        active = still
    return outputs
