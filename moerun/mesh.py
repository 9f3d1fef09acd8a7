"""Process groups for a TP x PP x EP x DP layout, and ``DistComm``: the collectives the
model calls, implemented on them.

    par.validate(cfg, world_size)              # before any group exists
    mesh = Mesh.create(par, timeout_s=180)     # under torchrun: NCCL on CUDA, gloo on CPU
    model = MoEModel(cfg, DistComm(mesh), layers=mesh.layers(cfg))

The mesh is a ``DeviceMesh`` ("pp", "dp", "tp"), tp fastest. EP groups are carved from
each stage's dp*tp ranks (``ParallelConfig.ep_group_ranks``). Two gloo groups over all
ranks carry small CPU messages: ``ctrl`` (the tokens and counts gathered each tick) and
``wake``, on which the leader broadcasts each tick's message. Every group has the
collective timeout, so a dead rank becomes an error on the others rather than a hang,
except ``wake``: an idle server sends nothing for as long as no request comes, and its
followers wait there without a deadline (a dead leader still closes its connections,
which fails the wait at once).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .comm import Comm
from .config import ModelConfig
from .parallel import ParallelConfig, RankCoord

# torch 2.13 names the tensor collectives *_single and warns on the old names.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
WAIT_FOREVER = timedelta(days=365)  # the wake group's timeout: an idle server may idle


@dataclass
class Mesh:
    par: ParallelConfig
    rank: int
    coord: RankCoord
    device: torch.device
    device_mesh: object
    tp_group: object
    ep_group: object
    ctrl: object  # gloo, all ranks, the collective timeout
    wake: object  # gloo, all ranks, no deadline: the leader's tick messages

    @staticmethod
    def create(par: ParallelConfig, timeout_s: float = 180.0, device: str | None = None) -> "Mesh":
        from torch.distributed.device_mesh import init_device_mesh

        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if str(device).startswith("cuda"):
            local = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
            torch.cuda.set_device(local)
            dev, backend = torch.device("cuda", local), "nccl"
        else:
            dev, backend = torch.device("cpu"), "gloo"
        timeout = timedelta(seconds=timeout_s)
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=timeout, world_size=world, rank=rank)
        dm = init_device_mesh(dev.type, (par.pp, par.dp, par.tp), mesh_dim_names=("pp", "dp", "tp"))
        coord = par.coord(rank)
        ctrl = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
        wake = dist.new_group(backend="gloo", timeout=WAIT_FOREVER)
        ep_group = None
        for pp in range(par.pp):  # every rank creates every group, in the same order
            for g in range(par.dp * par.tp // par.ep):
                grp = dist.new_group(par.ep_group_ranks(pp, g), timeout=timeout)
                if (pp, g) == (coord.pp, coord.ep_group):
                    ep_group = grp
        return Mesh(par, rank, coord, dev, dm, dm["tp"].get_group(), ep_group, ctrl, wake)

    def layers(self, cfg: ModelConfig) -> range:
        return self.par.stage_layers(cfg.num_layers)[self.coord.pp]

    @property
    def is_first_stage(self) -> bool:
        return self.coord.pp == 0

    @property
    def is_last_stage(self) -> bool:
        return self.coord.pp == self.par.pp - 1

    def stage_peer(self, offset: int) -> int:
        """The rank holding the same (dp, tp) position ``offset`` stages away."""
        c = self.coord
        return self.par.rank_of(c.pp + offset, c.dp, c.tp)


def gather_to_rank0(mesh: Mesh, part: dict) -> dict | None:
    """Merge every rank's small dict on rank 0 (gloo control group); None elsewhere."""
    parts = [None] * mesh.par.world_size if mesh.rank == 0 else None
    dist.gather_object(part, parts, dst=0, group=mesh.ctrl)
    if mesh.rank != 0:
        return None
    merged = {}
    for p in parts:
        merged.update(p)
    return merged


def leader_decides(mesh: Mesh | None, fn):
    """``fn()`` on rank 0 (reading prompts, say: files may exist on the first host only),
    its result on every rank; a ValueError it raises is raised on every rank, so all of
    them exit with the same error. ``mesh`` None: just ``fn()``."""
    if mesh is None:
        return fn()
    box = [None]
    if mesh.rank == 0:
        try:
            box = [fn()]
        except ValueError as e:
            box = [e]
    dist.broadcast_object_list(box, src=0, group=mesh.ctrl)
    if isinstance(box[0], ValueError):
        raise ValueError(str(box[0])) from None
    return box[0]


class DistComm(Comm):
    def __init__(self, mesh: Mesh, placement: dict[int, tuple[int, ...]] | None = None):
        super().__init__(mesh.par, mesh.rank, placement)
        self.mesh = mesh

    # TP collectives: every rank of a TP group holds the same T, so T = 0 is skipped by all.
    def tp_all_reduce(self, x):
        if self.tp_size > 1 and x.numel():
            dist.all_reduce(x, group=self.mesh.tp_group)
        return x

    def tp_reduce_scatter_tokens(self, x_TH):
        if self.tp_size == 1 or x_TH.numel() == 0:
            mine = self.token_rows(x_TH.shape[0])
            return x_TH[mine.start:mine.stop]
        T = x_TH.shape[0]
        per = len(self.par.token_rows_of(0, T))  # rank 0 holds the full ceil share
        x = F.pad(x_TH, (0, 0, 0, per * self.tp_size - T)).contiguous()
        out = x.new_empty(per, x.shape[1])
        _reduce_scatter(out, x, group=self.mesh.tp_group)
        return out[: len(self.token_rows(T))]

    def tp_all_gather_tokens(self, x_tH, num_tokens):
        if self.tp_size == 1 or num_tokens == 0:
            return x_tH
        per = len(self.par.token_rows_of(0, num_tokens))
        x = F.pad(x_tH, (0, 0, 0, per - x_tH.shape[0])).contiguous()
        out = x.new_empty(per * self.tp_size, x.shape[1])
        _all_gather(out, x, group=self.mesh.tp_group)
        return out[:num_tokens]

    def tp_all_gather_last(self, x):
        if self.tp_size == 1 or x.numel() == 0:
            return x
        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.mesh.tp_group)
        return torch.cat(parts, dim=-1)

    # EP collectives span DP replicas: always called, even with zero rows.
    def ep_all_to_all(self, send, send_splits, recv_splits):
        if self.ep_size == 1:
            return send
        out = send.new_empty((sum(recv_splits),) + tuple(send.shape[1:]))
        dist.all_to_all_single(out, send.contiguous(), recv_splits, send_splits, group=self.mesh.ep_group)
        return out

    def ep_exchange_counts(self, send_counts):
        if self.ep_size == 1:
            return send_counts
        send = send_counts.to(self.mesh.device, torch.int64).contiguous()
        out = torch.empty_like(send)
        dist.all_to_all_single(out, send, group=self.mesh.ep_group)
        return out

    def ep_all_reduce(self, x):
        if self.ep_size > 1:
            dist.all_reduce(x, group=self.mesh.ep_group)
        return x
