"""Runtime: one rank's share of a layout, its mesh (process groups) and its model stage.

    rt = Runtime.create(ModelOptions(model="tiny"), ParallelConfig(tp=2, pp=2))   # under torchrun
    rt = Runtime.create(ModelOptions(model="/ckpt"))                             # one process
    rt = Runtime.create(opts, ParallelConfig(ep=4, redundant_experts=4), eplb_opts=EPLBOptions(load_file="load.json"))
    rt.model, rt.mesh, rt.cfg, rt.is_leader

With ``EPLBOptions`` the experts are placed from a measured load (``--eplb-load``: the
plan of ``moerun.eplb``, computed on every rank alike before anything is built, so each
rank reads only its physical experts), re-planned every N steps (``--eplb-interval``:
``moerun.model.rebalance``), and/or counted for ``--expert-load-out``.

The layout is validated against the model and the launched world before any process
group exists. One process (no torchrun, a 1x1x1x1 layout) has no mesh and builds the
whole model; under torchrun each rank builds only its stage's layers, sharded by its
``DistComm``, and reads only its own slices of the checkpoint.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from . import eplb, kernels
from .build import build_model, resolve_device, resolve_dtype
from .comm import Comm
from .config import ModelConfig
from .mesh import DistComm, Mesh, gather_to_rank0
from .model import MoEModel
from .model.moe import MoE
from .model.rebalance import Rebalancer
from .options import EPLBOptions, ModelOptions
from .parallel import ParallelConfig, valid_layouts
from .plan.cost import rank_params

GB = 1e9


def available_bytes(device) -> int:
    """Memory this process may still take: free device memory on a GPU, MemAvailable on a CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not refuse


def check_memory(cfg: ModelConfig, par: ParallelConfig, rank: int, dtype, device) -> None:
    """Refuse, before allocating anything, a model whose weights do not fit: how much this
    rank needs, how much there is, and what would fit. On a CPU every rank of this machine
    shares one memory, so there the whole layout's weights count."""
    elem = torch.empty((), dtype=dtype).element_size()
    need = rank_params(cfg, par, rank).total * elem
    if device.type != "cuda":  # the ranks on this host share its memory (ranks fill hosts in order)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        first = rank - int(os.environ.get("LOCAL_RANK", "0"))
        need = sum(rank_params(cfg, par, r).total for r in range(first, first + local)) * elem if local > 1 else need
    have = available_bytes(device)
    if need <= have:
        return
    what = (f"{cfg.name or cfg.model_type} needs {need / GB:.1f} GB for its weights "
            f"({'this rank' if device.type == 'cuda' else 'the ranks on this machine'}, {par}, "
            f"{str(dtype).removeprefix('torch.')}), but {have / GB:.1f} GB is available")
    if device.type == "cuda":
        fits = [p for w in (2, 4, 8, 16, 32, 64) for p in valid_layouts(cfg, w)
                if max(rank_params(cfg, p, r).total for r in range(p.world_size)) * elem <= have][:5]
        hint = ("layouts whose fullest rank fits: " + ", ".join(f"{p} ({p.world_size} GPUs)" for p in fits)
                if fits else "no layout of up to 64 GPUs fits this GPU's free memory")
    else:
        half = rank_params(cfg, ParallelConfig(), 0).total * 2
        hint = (f"on one machine the ranks share its memory, so the whole model must fit: "
                f"bfloat16 needs {half / GB:.1f} GB (--dtype bfloat16), or run on GPUs / more machines")
    raise ValueError(f"{what}; {hint}")


def launched_world() -> tuple[int, int]:
    """(rank, world size) as torchrun set them; (0, 1) without torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class Runtime:
    model: MoEModel
    cfg: ModelConfig
    mesh: Mesh | None  # None: one process

    @staticmethod
    def create(opts: ModelOptions, par: ParallelConfig | None = None, timeout_s: float = 180.0,
               eplb_opts: EPLBOptions | None = None) -> "Runtime":
        par, eo = par or ParallelConfig(), eplb_opts or EPLBOptions()
        rank, world = launched_world()
        cfg = ModelConfig.load(opts.model)
        if world == 1 and par.world_size > 1:
            raise ValueError(f"layout {par} needs {par.world_size} processes; launch with "
                             f"torchrun --nproc_per_node={par.world_size} -m moerun.<command> ...")
        par.validate(cfg, world)  # before any process group
        placement = None
        if eo.load_file is not None:  # every rank plans alike from the same file
            placement = eplb.plan(eplb.read_load(eo.load_file, cfg), par.ep, par.redundant_experts, eo.gpus_per_node)
        elif eo.gpus_per_node is not None:
            eplb.nodes_of(par.ep, eo.gpus_per_node)  # the rule, checked before start
        kernels.set_default_impl(opts.kernels)
        device = resolve_device(opts.device)
        check_memory(cfg, par, rank, resolve_dtype(opts.dtype, device), device)
        if world == 1:
            model = build_model(opts.model, comm=Comm(par, 0, placement), dtype=opts.dtype, device=opts.device,
                                seed=opts.weights_seed, cfg=cfg, progress=True)
            return Runtime(model, cfg, None).with_eplb(eo)
        mesh = Mesh.create(par, timeout_s, str(resolve_device(opts.device)))
        model = build_model(opts.model, comm=DistComm(mesh, placement), layers=mesh.layers(cfg), dtype=opts.dtype,
                            device=mesh.device, seed=opts.weights_seed, cfg=cfg, progress=rank == 0)
        return Runtime(model, cfg, mesh).with_eplb(eo)

    def with_eplb(self, eo: EPLBOptions) -> "Runtime":
        """Dynamic re-planning (the worker steps ``model.rebalancer``) and load counting."""
        if eo.interval is not None:
            self.model.rebalancer = Rebalancer(self.model, eo.interval, eo.window, eo.gpus_per_node)
        if eo.counts_load:
            for m in self.model.modules():
                if isinstance(m, MoE):
                    m.count_load()
        return self

    @property
    def rank(self) -> int:
        return self.mesh.rank if self.mesh else 0

    @property
    def is_leader(self) -> bool:
        """Rank 0 holds the requests and the schedulers; the others follow its ticks."""
        return self.rank == 0

    @property
    def par(self) -> ParallelConfig:
        return self.model.comm.par


def measured_load(model) -> dict[int, list[int]]:
    """{global layer: token-slots per logical expert} this rank's MoE layers routed since
    ``count_load`` (``EPLBOptions.counts_load``)."""
    return {m.layer: m.load_E.tolist() for m in model.modules() if isinstance(m, MoE) and m.load_E is not None}


def gather_expert_load(rt: Runtime) -> dict[int, list[int]] | None:
    """Every rank's ``measured_load`` summed on rank 0 (each rank routes its own tokens:
    TP shares, DP replicas, PP stages' layers); None on the other ranks. Every rank calls it."""
    mine = measured_load(rt.model)
    parts = gather_to_rank0(rt.mesh, {rt.rank: mine}) if rt.mesh else {0: mine}
    if parts is None:
        return None
    total: dict[int, list[int]] = {}
    for part in parts.values():
        for layer, row in part.items():
            acc = total.setdefault(layer, [0] * len(row))
            total[layer] = [a + b for a, b in zip(acc, row)]
    return dict(sorted(total.items()))
