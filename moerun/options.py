"""The settings every entry point passes down: what model to build, how the engine runs,
and how one request samples. Frozen dataclasses, no torch, so the command lines
(``moerun.args``), the planner and the tests build them without loading anything.

    opts = ModelOptions(model="tiny", dtype=None, device=None, weights_seed=0, kernels="auto")
    ecfg = EngineConfig(max_batch_tokens=2048, block_size=16, cuda_graph_max_bs=32)
    sp = SamplingParams(max_new_tokens=32, temperature=0.8, top_p=0.9, seed=7, logprobs=5)

Each checks its own values: a bad value is a ``ValueError`` that names the field.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .dtypes import check_dtype

KERNEL_IMPLS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class ModelOptions:
    model: str = "tiny"  # checkpoint directory or preset name
    dtype: str | None = None  # a name of moerun.dtypes.RUN_DTYPES; None: float32 on CPU, bfloat16 on GPU
    device: str | None = None  # "cpu" | "cuda" | "cuda:N"; None: cuda when available
    weights_seed: int = 0  # a preset's random weights (sampling has its own, per request)
    kernels: str = "auto"  # auto = Triton on CUDA tensors, the PyTorch references on CPU

    def __post_init__(self):
        if self.dtype is not None:
            check_dtype(self.dtype, runnable=True)
        if self.kernels not in KERNEL_IMPLS:
            raise ValueError(f"kernels {self.kernels!r} is not one of {', '.join(KERNEL_IMPLS)}")


@dataclass(frozen=True)
class EngineConfig:
    max_batch_tokens: int = 2048  # tokens one micro-batch step may compute (prefill chunks + decodes)
    kv_cache_gb: float | None = None  # per rank; None: 256 MiB on CPU, 90% of free memory on GPU
    block_size: int = 16  # tokens per KV cache block
    micro_batches: int | None = None  # per DP replica; None: = PP
    num_blocks: int | None = None  # overrides kv_cache_gb (tests)
    profile: bool = False  # every rank's worker runs a moerun.profile.Profiler (--profile)
    enforce_eager: bool = False  # no CUDA graphs (--enforce-eager)
    cuda_graph_max_bs: int = 32  # the largest decode batch replayed from a CUDA graph

    def __post_init__(self):
        bad = [f"{k} must be >= 1, got {getattr(self, k)}" for k in ("max_batch_tokens", "block_size")
               if getattr(self, k) < 1]
        if not isinstance(self.cuda_graph_max_bs, int) or self.cuda_graph_max_bs < 1:
            bad.append(f"cuda_graph_max_bs must be an integer >= 1, got {self.cuda_graph_max_bs!r} "
                       "(--cuda-graph-max-bs; --enforce-eager turns CUDA graphs off)")
        bad += [f"{k} must be >= 1, got {getattr(self, k)}" for k in ("micro_batches", "num_blocks")
                if getattr(self, k) is not None and getattr(self, k) < 1]
        if self.kv_cache_gb is not None and not self.kv_cache_gb > 0:
            bad.append(f"kv_cache_gb must be > 0, got {self.kv_cache_gb}")
        if bad:
            raise ValueError("engine: " + "; ".join(bad))


@dataclass(frozen=True)
class EPLBOptions:
    """Expert-parallel load balancing (``moerun.eplb``); the redundant experts R are part
    of the layout (``ParallelConfig.redundant_experts``)."""
    load_file: str | None = None  # --eplb-load: place experts at start-up from this measured load
    interval: int | None = None  # --eplb-interval: re-plan every N steps (None: never)
    window: int | None = None  # --eplb-window: steps of load a re-plan reads (None: = interval)
    gpus_per_node: int | None = None  # hierarchical placement when EP spans nodes
    load_out: str | None = None  # --expert-load-out: write the run's expert load here

    def __post_init__(self):
        flags = {"interval": "--eplb-interval", "window": "--eplb-window", "gpus_per_node": "--gpus-per-node"}
        bad = [f"{flag} must be >= 1, got {getattr(self, k)}"
               for k, flag in flags.items() if getattr(self, k) is not None and getattr(self, k) < 1]
        if self.window is not None and self.interval is None:
            bad.append("--eplb-window needs --eplb-interval (it sizes the dynamic re-plan's window)")
        if bad:
            raise ValueError("eplb: " + "; ".join(bad))

    @property
    def counts_load(self) -> bool:
        return self.interval is not None or self.load_out is not None


MAX_LOGPROBS = 20  # top-N log probabilities a request may ask for (vLLM's default cap)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed per request
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N log probabilities of each sampled token; None = none

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (an integer), got {self.max_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:  # also rejects NaN
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in 0..{MAX_LOGPROBS}, got {self.logprobs}")
