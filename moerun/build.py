"""Build a model (or one pipeline stage of it) on a device, from a checkpoint or a preset;
the dtype and device resolution every entry point uses; one-process prefill logits.

    model = build_model("tiny")                                   # preset: random weights from seed
    model = build_model("/ckpt", dtype="bfloat16", device="cuda")
    logits = forward_logits(model, [[1, 2, 3]])                   # one prefill, every position

Under a layout, ``moerun.runtime.Runtime`` calls ``build_model`` with the rank's ``Comm``
and stage layers.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .comm import Comm
from .config import ModelConfig
from .dtypes import RUN_DTYPES, check_dtype
from .hugepages import rehome_on_huge_pages
from .kvcache import KVCache
from .model import AttnMeta, MoEModel
from .weights import init_random, load_checkpoint

TORCH_DTYPES = {name: getattr(torch, name) for name in RUN_DTYPES}


def resolve_device(name: str | None) -> torch.device:
    """``name`` as a device this process can use; None = cuda when available, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a device name: use cpu or cuda") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is visible to this process; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: moerun runs on cpu or cuda")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device) -> torch.dtype:
    """A dtype name of ``moerun.dtypes`` (or a torch dtype); None = bfloat16 on GPU, float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return TORCH_DTYPES[check_dtype(dtype, runnable=True)]


def build_model(model: str, *, comm: Comm | None = None, layers: range | None = None, dtype=None,
                device=None, seed: int = 0, cfg: ModelConfig | None = None, progress: bool = False) -> MoEModel:
    """The model (or stage ``layers`` of it, sharded by ``comm``) with its weights: read from
    the checkpoint directory ``model``, or drawn from ``seed`` for a preset."""
    cfg = cfg or ModelConfig.load(model)
    dev = resolve_device(device) if not isinstance(device, torch.device) else device
    with torch.device(dev):
        m = MoEModel(cfg, comm, layers, resolve_dtype(dtype, dev))
    m.requires_grad_(False)
    if Path(model).is_dir():
        m.load_report = load_checkpoint(m, model, progress)
    else:
        init_random(m, seed)
        m.load_report = None
    if dev.type == "cpu":  # the decode step streams the weights: 2 MiB pages (moerun.hugepages)
        rehome_on_huge_pages(m)
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
