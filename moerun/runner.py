"""Build a (stage of a) model on a device; one-process generation and prefill logits.

    model = build_model("tiny")                       # preset: random weights from --seed
    model = build_model("/ckpt", dtype=torch.bfloat16, device="cuda")
    outs = generate_batch(model, [[1, 2, 3]], SamplingParams(max_new_tokens=8))
    logits = forward_logits(model, [[1, 2, 3]])   # one prefill, every position
"""
from __future__ import annotations

from pathlib import Path

import torch

from .comm import Comm
from .config import ModelConfig
from .kvcache import KVCache
from .model import AttnMeta, MoEModel
from .sampling import SamplingParams
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


def prefill_meta(model: MoEModel, prompts: list[list[int]], block_size: int = 16):
    """AttnMeta and a fresh KV cache for one prefill of ``prompts`` (blocks in order)."""
    tables, n = [], 0
    for p in prompts:
        k = -(-len(p) // block_size)
        tables.append(list(range(n, n + k)))
        n += k
    device = next(model.parameters()).device
    meta = AttnMeta.build(tables, [0] * len(prompts), [len(p) for p in prompts], block_size, device)
    return meta, KVCache.for_model(model, max(n, 1), block_size)


@torch.inference_mode()
def forward_logits(model: MoEModel, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Float32 logits [len(p), V] of every position of every prompt, one forward (one process)."""
    meta, cache = prefill_meta(model, prompts)
    device = next(model.parameters()).device
    logits = model(torch.tensor(sum(prompts, []), device=device), meta.pos_T, meta, cache)
    return list(logits.split([len(p) for p in prompts]))


def generate_batch(model: MoEModel, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                   engine_cfg=None) -> list[list[int]]:
    """Generate for a batch of prompts in one process, through the engine."""
    from .engine import Engine, EngineConfig

    return Engine(model, engine_cfg or EngineConfig()).generate(prompts, params)
