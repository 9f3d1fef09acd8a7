"""Tile configs of fused_moe: JSON files in kernels/configs/, written by the tuner.

One file per expert shape, dtype and device, e.g.
``kernels/configs/E=16,F=9472,H=1024,dtype=bfloat16,device=NVIDIA_H100_80GB_HBM3.json``:

    {"1": {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1,
           "num_warps": 4, "num_stages": 3},
     "64": {...}, "4096": {...}}

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

    def __post_init__(self):
        for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name}={v} must be a power of two >= 16 (tl.dot needs it)")
        if self.GROUP_M < 1 or self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"GROUP_M, num_warps, num_stages must be >= 1 in {self}")

    @classmethod
    def from_dict(cls, d: dict) -> "MoeTileConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown fused_moe config keys {sorted(unknown)}; allowed: "
                             f"{sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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


def default_config(num_tokens: int, top_k: int, E: int, dtype: torch.dtype,
                   interpreted: bool) -> MoeTileConfig:
    if interpreted:  # numpy runs each program; small tiles keep the test shapes honest
        return MoeTileConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_stages=1)
    stages = 2 if dtype == torch.float32 else 3
    if num_tokens * top_k <= 4 * E:  # decode: a handful of rows per expert, weight-bound
        return MoeTileConfig(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1,
                             num_warps=4, num_stages=stages)
    return MoeTileConfig(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8,
                         num_warps=8, num_stages=stages)


def get_config(num_tokens: int, top_k: int, E: int, F: int, H: int, dtype: torch.dtype,
               device: torch.device, interpreted: bool) -> MoeTileConfig:
    """The tuned tiles for this shape when a file exists, else ``default_config``."""
    if not interpreted and device.type == "cuda":
        table = _load(config_path(E, F, H, dtype, device_key(device)))
        if table:
            return nearest_config(table, num_tokens)
    return default_config(num_tokens, top_k, E, dtype, interpreted)
