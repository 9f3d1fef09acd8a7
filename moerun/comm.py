"""Comm: the one door through which parallelism enters the model.

The model never imports ``torch.distributed``. Every layer that needs a collective
calls a method of the ``Comm`` it was built with. ``Comm`` itself is the
single-process case (every collective is the identity); ``moerun.mesh.DistComm``
implements the same methods with process groups.

    comm = Comm()                       # one process: tp = ep = 1
    model = MoEModel(cfg, comm=comm)    # or DistComm from moerun.mesh under torchrun

Token sharding inside a layer (see docs/ARCHITECTURE.md): attention runs on all T
tokens of the replica with heads split over TP; its output projection is
reduce-scattered so each TP rank keeps ``T/tp`` tokens for the MoE; the layer ends with
an all-gather that restores all T tokens for the next attention.
"""
from __future__ import annotations

import torch


class Comm:
    """Single process: the identity for every collective."""

    tp_size = 1
    tp_rank = 0
    ep_size = 1
    ep_rank = 0

    def tp_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the TP group (partial sums of a row-parallel matmul)."""
        return x

    def tp_reduce_scatter_tokens(self, x_TH: torch.Tensor) -> torch.Tensor:
        """Sum over TP and keep this rank's contiguous 1/tp of the tokens (padded)."""
        return x_TH

    def tp_all_gather_tokens(self, x_tH: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Inverse of ``tp_reduce_scatter_tokens``: all ``num_tokens`` rows on every rank."""
        return x_tH

    def tp_token_range(self, num_tokens: int) -> tuple[int, int]:
        """Rows [start, end) of the T tokens that this TP rank owns after the scatter."""
        per = -(-num_tokens // self.tp_size)
        start = min(self.tp_rank * per, num_tokens)
        return start, min(start + per, num_tokens)

    def ep_all_to_all(self, send: torch.Tensor, send_splits: list[int],
                      recv_splits: list[int]) -> torch.Tensor:
        """Exchange rows over the EP group: ``send_splits[r]`` rows go to EP rank r."""
        return send

    def ep_exchange_counts(self, send_counts: torch.Tensor) -> torch.Tensor:
        """All-to-all of a small int tensor [ep, ...]: row r goes to EP rank r."""
        return send_counts

    def tp_all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-sized pieces from every TP rank along the last dim."""
        return x
