"""Comm: the one door through which parallelism enters the model.

The model never imports ``torch.distributed``. Every layer that needs a collective
calls a method of the ``Comm`` it was built with. ``Comm`` itself is the
single-process case (every collective is the identity); ``moerun.mesh.DistComm``
implements the same methods with process groups.

    comm = Comm()                       # one process: tp = ep = 1
    model = MoEModel(cfg, comm=comm)    # or DistComm from moerun.mesh under torchrun
    Comm(par, rank)                     # rank's shard ranges, identity collectives: to
                                        # build (count) one rank's shard on the meta device

A ``Comm`` also carries the rank's shard ranges (which heads, experts, vocabulary rows
and token rows it holds). ``ParallelConfig`` computes them, so the layers, ``moerun
layout`` and the planner read the same numbers.

Token sharding inside a layer (see docs/ARCHITECTURE.md): attention runs on all T
tokens of the replica with heads split over TP; its output projection is
reduce-scattered so each TP rank keeps ``T/tp`` tokens for the MoE; the layer ends with
an all-gather that restores all T tokens for the next attention.
"""
from __future__ import annotations

import torch

from . import eplb
from .parallel import ParallelConfig


class Comm:
    """Single process: the identity for every collective.

    ``placement``: {global layer: physical slot -> logical expert} (``moerun.eplb``) for
    the layers placed from a measured load; other layers take the default placement."""

    def __init__(self, par: ParallelConfig | None = None, rank: int = 0,
                 placement: dict[int, tuple[int, ...]] | None = None):
        self.par = par or ParallelConfig()
        c = self.par.coord(rank)
        self.tp_size, self.tp_rank = self.par.tp, c.tp
        self.ep_size, self.ep_rank = self.par.ep, c.ep_rank
        self.placement = dict(placement or {})

    # ----------------------------------------------------------- shard ranges
    def q_heads(self, num_heads: int) -> range:
        return self.par.q_heads_of(self.tp_rank, num_heads)

    def kv_heads(self, num_kv_heads: int) -> range:
        return self.par.kv_heads_of(self.tp_rank, num_kv_heads)

    def kv_replicas(self, num_kv_heads: int) -> int:
        return self.par.kv_replicas(num_kv_heads)

    def experts(self, num_experts: int) -> range:
        return self.par.experts_of(self.ep_rank, num_experts)

    def physical_experts(self, layer: int, num_experts: int) -> tuple[int, ...]:
        """Physical slot -> logical expert of MoE layer ``layer`` in this EP group: the
        measured placement, else the contiguous split (R = 0) or the plan of a uniform load."""
        if layer in self.placement:
            return self.placement[layer]
        return eplb.default_placement(num_experts, self.ep_size, self.par.redundant_experts)

    def vocab_rows(self, vocab_size: int) -> range:
        return self.par.vocab_rows_of(self.tp_rank, vocab_size)

    def token_rows(self, num_tokens: int) -> range:
        """Rows of the T tokens that this TP rank owns after the scatter."""
        return self.par.token_rows_of(self.tp_rank, num_tokens)

    # ------------------------------------------------------------ collectives

    def tp_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the TP group (partial sums of a row-parallel matmul)."""
        return x

    def tp_reduce_scatter_tokens(self, x_TH: torch.Tensor) -> torch.Tensor:
        """Sum over TP and keep this rank's contiguous 1/tp of the tokens (padded)."""
        return x_TH

    def tp_all_gather_tokens(self, x_tH: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Inverse of ``tp_reduce_scatter_tokens``: all ``num_tokens`` rows on every rank."""
        return x_tH

    def ep_all_to_all(self, send: torch.Tensor, send_splits: list[int],
                      recv_splits: list[int]) -> torch.Tensor:
        """Exchange rows over the EP group: ``send_splits[r]`` rows go to EP rank r."""
        return send

    def ep_exchange_counts(self, send_counts: torch.Tensor) -> torch.Tensor:
        """All-to-all of a small int tensor [ep, ...] on its device: row r goes to EP rank r."""
        return send_counts

    def ep_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the EP group (the expert load of a re-planning window)."""
        return x

    def tp_all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-sized pieces from every TP rank along the last dim."""
        return x
