"""Tile configs of fused_moe: JSON files in kernels/configs/, written by the tuner.

One file per expert shape, dtype and device, e.g.
``kernels/configs/E=16,F=9472,H=1024,dtype=bfloat16,device=NVIDIA_H100_80GB_HBM3.json``:

    {"1": {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1,
           "num_warps": 4, "num_stages": 3,
           "gemm2": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "num_stages": 4,
                     "SPLIT_K": 4}},
     "64": {...}, "4096": {...}}

The outer tiles are GEMM1's (gate-up, N = 2F, reduction H); ``gemm2`` holds the down
projection's own (N = H, reduction F: the opposite shape), with the same BLOCK_M because
both walk one aligned slot order; without it GEMM2 uses GEMM1's tiles. ``SPLIT_K`` splits
GEMM2's F reduction over that many programs, each writing its own float32 partial, which
the top-k sum adds up (deterministic, no atomics): at small T a decode step otherwise
launches a few dozen programs on 132 SMs.

The keys are token counts T; a call with T tokens uses the entry whose key is nearest
(ties: the smaller key). E is the number of LOCAL experts the kernel sees. Without a
matching file ``default_config`` picks decode tiles (few tokens per expert) or prefill
tiles; under the Triton interpreter it picks small tiles. Write files with
``scripts/tune_fused_moe.py`` on the GPU they are for.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclasses.dataclass(frozen=True)
class MoeTileConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 1
    num_warps: int = 4
    num_stages: int = 3
    SPLIT_K: int = 1  # GEMM2 only: programs that share one output tile's F reduction
    gemm2: "MoeTileConfig | None" = None  # GEMM2's own tiles; None: these

    def __post_init__(self):
        for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name}={v} must be a power of two >= 16 (tl.dot needs it)")
        if self.GROUP_M < 1 or self.num_warps < 1 or self.num_stages < 1 or self.SPLIT_K < 1:
            raise ValueError(f"GROUP_M, num_warps, num_stages, SPLIT_K must be >= 1 in {self}")
        if self.gemm2 is not None:
            if self.gemm2.gemm2 is not None or self.gemm2.BLOCK_M != self.BLOCK_M:
                raise ValueError(f"gemm2 tiles {self.gemm2} must have BLOCK_M={self.BLOCK_M} "
                                 "(both GEMMs walk one aligned slot order) and no gemm2 of "
                                 "their own")
            if self.SPLIT_K != 1:
                raise ValueError("SPLIT_K belongs to the gemm2 tiles when they are given "
                                 f"(GEMM1 has no split reduction); got SPLIT_K={self.SPLIT_K}")

    def for_gemm2(self) -> "MoeTileConfig":
        """The tiles GEMM2 launches with."""
        return self.gemm2 or self

    @classmethod
    def from_dict(cls, d: dict) -> "MoeTileConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown fused_moe config keys {sorted(unknown)}; allowed: "
                             f"{sorted(known)}")
        d = dict(d)
        if d.get("gemm2") is not None:
            d["gemm2"] = cls.from_dict({"BLOCK_M": d.get("BLOCK_M"), **d["gemm2"]})
        return cls(**d)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.gemm2 is None:
            del d["gemm2"]
        return d


def device_key(device: torch.device) -> str:
    """The device part of a config file name: the CUDA device name, spaces as '_'."""
    if device.type != "cuda":
        return device.type
    return torch.cuda.get_device_name(device).replace(" ", "_").replace("/", "_")


def config_path(E: int, F: int, H: int, dtype: torch.dtype, device_name: str) -> Path:
    dtype_name = str(dtype).removeprefix("torch.")
    return CONFIG_DIR / f"E={E},F={F},H={H},dtype={dtype_name},device={device_name}.json"


@functools.lru_cache(maxsize=64)
def _load(path: Path) -> dict[int, MoeTileConfig] | None:
    if not path.is_file():
        return None
    with open(path) as f:
        raw = json.load(f)
    return {int(t): MoeTileConfig.from_dict(c) for t, c in raw.items()}


def save_configs(path: Path, table: dict[int, MoeTileConfig]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump({str(t): c.to_dict() for t, c in sorted(table.items())}, f, indent=1)
        f.write("\n")
    _load.cache_clear()


def nearest_config(table: dict[int, MoeTileConfig], num_tokens: int) -> MoeTileConfig:
    """The entry whose token-count key is nearest to num_tokens (ties: the smaller key)."""
    return table[min(table, key=lambda t: (abs(t - num_tokens), t))]


def decode_split_k(num_tokens: int, top_k: int, E: int, H: int, block_n: int, num_sms: int,
                   F: int, block_k: int) -> int:
    """SPLIT_K for GEMM2 at decode: enough programs for about two per SM. The row blocks are
    at most min(T * K, E) (one per busy expert), the column blocks H / BLOCK_N; each split
    keeps at least four BLOCK_K steps of F."""
    programs = min(num_tokens * top_k, E) * -(-H // block_n)
    split = 1
    while split < 16 and programs * split < 2 * num_sms and F // (2 * split) >= 4 * block_k:
        split *= 2
    return split


def default_config(num_tokens: int, top_k: int, E: int, dtype: torch.dtype,
                   interpreted: bool, *, F: int = 0, H: int = 0, num_sms: int = 0) -> MoeTileConfig:
    """Untuned tiles. At decode GEMM2 takes narrow tiles (BLOCK_N = 32), a deeper pipeline
    and, given F, H and the SM count, split-K (a choice to be checked by the tuner's
    measurements on each GPU, not a measured optimum)."""
    if interpreted:  # numpy runs each program; small tiles keep the test shapes honest
        return MoeTileConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_stages=1)
    stages = 2 if dtype == torch.float32 else 3
    if num_tokens * top_k <= 4 * E:  # decode: a handful of rows per expert, weight-bound
        split = decode_split_k(num_tokens, top_k, E, H, 32, num_sms, F, 128) if num_sms else 1
        gemm2 = MoeTileConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, num_warps=4,
                              num_stages=stages + 1, SPLIT_K=split)
        return MoeTileConfig(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1,
                             num_warps=4, num_stages=stages, gemm2=gemm2)
    return MoeTileConfig(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8,
                         num_warps=8, num_stages=stages)


@functools.lru_cache(maxsize=16)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def get_config(num_tokens: int, top_k: int, E: int, F: int, H: int, dtype: torch.dtype,
               device: torch.device, interpreted: bool) -> MoeTileConfig:
    """The tuned tiles for this shape when a file exists, else ``default_config``."""
    if not interpreted and device.type == "cuda":
        table = _load(config_path(E, F, H, dtype, device_key(device)))
        if table:
            return nearest_config(table, num_tokens)
        return default_config(num_tokens, top_k, E, dtype, interpreted, F=F, H=H,
                              num_sms=_num_sms(device))
    return default_config(num_tokens, top_k, E, dtype, interpreted)
