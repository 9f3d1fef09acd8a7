"""Runtime: one rank's share of a layout, its mesh (process groups) and its model stage.

    rt = Runtime.create(ModelOptions(model="tiny"), ParallelConfig(tp=2, pp=2))   # under torchrun
    rt = Runtime.create(ModelOptions(model="/ckpt"))                             # one process
    rt.model, rt.mesh, rt.cfg, rt.is_leader

The layout is validated against the model and the launched world before any process
group exists. One process (no torchrun, a 1x1x1x1 layout) has no mesh and builds the
whole model; under torchrun each rank builds only its stage's layers, sharded by its
``DistComm``, and reads only its own slices of the checkpoint.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from . import kernels
from .build import build_model, resolve_device
from .config import ModelConfig
from .mesh import DistComm, Mesh
from .model import MoEModel
from .options import ModelOptions
from .parallel import ParallelConfig


def launched_world() -> tuple[int, int]:
    """(rank, world size) as torchrun set them; (0, 1) without torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class Runtime:
    model: MoEModel
    cfg: ModelConfig
    mesh: Mesh | None  # None: one process

    @staticmethod
    def create(opts: ModelOptions, par: ParallelConfig | None = None, timeout_s: float = 180.0) -> "Runtime":
        par = par or ParallelConfig()
        rank, world = launched_world()
        cfg = ModelConfig.load(opts.model)
        if world == 1 and par.world_size > 1:
            raise ValueError(f"layout {par} needs {par.world_size} processes; launch with "
                             f"torchrun --nproc_per_node={par.world_size} -m moerun.<command> ...")
        par.validate(cfg, world)  # before any process group
        kernels.set_default_impl(opts.kernels)
        if world == 1:
            model = build_model(opts.model, dtype=opts.dtype, device=opts.device, seed=opts.seed, cfg=cfg)
            return Runtime(model, cfg, None)
        mesh = Mesh.create(par, timeout_s, str(resolve_device(opts.device)))
        model = build_model(opts.model, comm=DistComm(mesh), layers=mesh.layers(cfg), dtype=opts.dtype,
                            device=mesh.device, seed=opts.seed, cfg=cfg)
        return Runtime(model, cfg, mesh)

    @property
    def rank(self) -> int:
        return self.mesh.rank if self.mesh else 0

    @property
    def is_leader(self) -> bool:
        """Rank 0 holds the requests and the schedulers; the others follow its ticks."""
        return self.rank == 0

    @property
    def par(self) -> ParallelConfig:
        return self.mesh.par if self.mesh else ParallelConfig()
