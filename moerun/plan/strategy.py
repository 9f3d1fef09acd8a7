"""Strategy and Workload: a named layout plus the workload a projection assumes.

Loaded from ``configs/strategies/<name>.toml`` (or a path); unknown keys are rejected, and
so is a dtype that is not one of ``moerun.dtypes.DTYPE_BYTES`` (spelled as torch does).

    s = Strategy.load("baseline")
    s.layout        # ParallelConfig(tp=8, pp=2, ep=8, dp=1)
    s.workload      # Workload(concurrency=256, prompt_len=1024, output_len=256, dtype="bfloat16", ...)

A strategy file may also name the model, hardware and GPU count its source meant
(``model``, ``hardware``, ``gpus``): the CLI uses them when no flag overrides them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..dtypes import DTYPE_BYTES, check_dtype
from ..parallel import ParallelConfig
from .presets import from_table, load_toml, resolve_preset


@dataclass(frozen=True)
class Workload:
    """What is being served. Every projection prints it: the numbers depend on it."""
    concurrency: int = 256  # concurrent sequences in the whole deployment, split over DP replicas
    prompt_len: int = 1024  # tokens per prompt (prefill)
    output_len: int = 256  # tokens generated per request (decode)
    dtype: str = "bfloat16"  # weights, activations and KV cache
    micro_batches: int = 0  # pipeline micro-batches per replica; 0 = pp
    note: str = "assumed by moerun; the design note states no workload"

    def __post_init__(self):
        bad = [f"{k} = {getattr(self, k)} must be >= 1" for k in
               ("concurrency", "prompt_len", "output_len") if getattr(self, k) < 1]
        if self.micro_batches < 0:
            bad.append(f"micro_batches = {self.micro_batches} must be >= 0 (0 = one per stage)")
        try:
            check_dtype(self.dtype)
        except ValueError as e:
            bad.append(str(e))
        if bad:
            raise ValueError("workload: " + "; ".join(bad))

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def describe(self) -> str:
        return (f"{self.concurrency} concurrent sequences, prompt {self.prompt_len} tokens, "
                f"output {self.output_len} tokens, {self.dtype} ({self.note})")


@dataclass(frozen=True)
class Strategy:
    name: str
    layout: ParallelConfig
    workload: Workload = field(default_factory=Workload)
    description: str = ""
    model: str = ""  # model preset the source meant ("" = say it on the command line)
    hardware: str = ""  # hardware preset the source meant
    gpus: int = 0  # GPU count the source states (0 = not stated)

    @staticmethod
    def load(name: str | Path) -> "Strategy":
        path = resolve_preset("strategies", name)
        raw = dict(load_toml(path))
        where = str(path)
        for key in ("layout", "workload"):
            if key in raw and not isinstance(raw[key], dict):
                raise ValueError(f"{where}: [{key}] must be a table")
        if "layout" not in raw:
            raise ValueError(f"{where}: missing [layout] table (tp, pp, ep, dp)")
        raw["layout"] = from_table(ParallelConfig, raw["layout"], where=f"{where} [layout]")
        raw["workload"] = from_table(Workload, raw.get("workload", {}), where=f"{where} [workload]")
        return from_table(Strategy, raw, where=where)
