"""HardwareSpec: the figures of one accelerator (and its links) that the planner projects on.

Loaded from ``configs/hardware/<name>.toml`` (or any .toml path); unknown keys are rejected.

    hw = HardwareSpec.load("h100-sxm")
    hw.link_bandwidth(crosses_nodes=True)    # bytes/s per GPU, one direction

Units: GB = 1e9 bytes, GB/s = 1e9 bytes/s, TFLOP/s = 1e12 FLOP/s. Link bandwidths are per
GPU and per direction (what one rank can send while it also receives), which is what the
ring and all-to-all formulas in ``moerun.plan.cost`` divide by. ``shared = true`` describes one
box whose figures all ranks share (the gloo emulation on a CPU): each of N ranks then gets
1/N of the compute, memory and memory bandwidth.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .presets import from_table, load_toml, resolve_preset


@dataclass(frozen=True)
class HardwareSpec:
    name: str
    memory_gb: float  # per device
    peak_tflops: float  # dense, in the workload's dtype
    mem_bw_gbs: float  # device memory bandwidth
    intra_node_bw_gbs: float  # per GPU, one direction
    inter_node_bw_gbs: float  # per GPU, one direction
    gpus_per_node: int
    reserve_gb: float  # per device: activations, workspace, CUDA/NCCL context (not for KV)
    num_gpus: int = 0  # devices in the described system; 0 = a device type, any count
    collective_latency_us: float = 0.0  # fixed cost per collective call; 0 = pure bandwidth
    shared: bool = False  # figures are one box's, divided among all ranks
    description: str = ""
    source: str = ""
    ambiguous: tuple[str, ...] = ()

    def __post_init__(self):
        bad = [f"{k} = {getattr(self, k)} must be > 0" for k in
               ("memory_gb", "peak_tflops", "mem_bw_gbs", "intra_node_bw_gbs",
                "inter_node_bw_gbs", "gpus_per_node") if getattr(self, k) <= 0]
        bad += [f"{k} = {getattr(self, k)} must be >= 0" for k in
                ("reserve_gb", "num_gpus", "collective_latency_us") if getattr(self, k) < 0]
        if self.reserve_gb >= self.memory_gb:
            bad.append(f"reserve_gb ({self.reserve_gb}) must be below memory_gb ({self.memory_gb})")
        if bad:
            raise ValueError(f"hardware {self.name!r}: " + "; ".join(bad))

    @staticmethod
    def load(name: str | Path) -> "HardwareSpec":
        path = resolve_preset("hardware", name)
        return from_table(HardwareSpec, load_toml(path), where=str(path))

    # Per-rank figures (a shared box splits its figures among the ranks on it).
    def per_rank(self, value: float, world_size: int) -> float:
        return value / world_size if self.shared else value

    def flops(self, world_size: int) -> float:
        return self.per_rank(self.peak_tflops * 1e12, world_size)

    def mem_bw(self, world_size: int) -> float:
        return self.per_rank(self.mem_bw_gbs * 1e9, world_size)

    def memory_bytes(self, world_size: int) -> float:
        return self.per_rank(self.memory_gb * 1e9, world_size)

    def reserve_bytes(self, world_size: int) -> float:
        return self.per_rank(self.reserve_gb * 1e9, world_size)

    def link_bandwidth(self, crosses_nodes: bool) -> float:
        return (self.inter_node_bw_gbs if crosses_nodes else self.intra_node_bw_gbs) * 1e9

    def node_of(self, rank: int) -> int:
        return 0 if self.shared else rank // self.gpus_per_node

    def spans_nodes(self, ranks) -> bool:
        """True when the ranks of a group sit on more than one node (ranks fill nodes in order)."""
        return len({self.node_of(r) for r in ranks}) > 1
