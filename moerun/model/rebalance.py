"""Dynamic EPLB (``--eplb-interval N``): re-plan every N steps from a sliding window of
the measured expert load and move the expert weights between EP ranks, between ticks.

    rb = Rebalancer(model, interval=8, window=32)
    rb.step()        # the worker, after every forward step of this rank's stage

Every rank of an EP group runs the same steps (the EP all-to-all makes them), so the
window's load, summed over the group, and the plan made from it are the same on all of
them; the move is one all-to-all of the changed experts per layer
(``moerun.model.placement.move_experts``). Requests are not touched: the next step runs
on the new placement, whose outputs equal the old one's.

Shape legend: L = this stage's MoE layers, E = logical experts.
"""
from __future__ import annotations

from collections import deque

import torch

from .. import eplb
from .moe import MoE
from .placement import move_experts


class Rebalancer:
    """Dynamic EPLB: every ``interval`` forward steps, re-plan each MoE layer of this stage
    from the expert load of the last ``window`` steps (summed over the EP group, so every
    rank of the group computes the same plan) and move the weights that changed, when the
    new plan lowers that window's busiest-rank load by more than ``min_gain`` (a small
    change of the load does not move weights back and forth). Called by the worker after
    a step, on every rank of the stage at the same step count."""

    def __init__(self, model, interval: int, window: int | None = None, gpus_per_node: int | None = None,
                 min_gain: float = 0.05):
        if interval < 1:
            raise eplb.EPLBError(f"--eplb-interval must be >= 1 steps, got {interval}")
        self.moes = [m for m in model.modules() if isinstance(m, MoE)]
        self.interval, self.window = interval, window or interval
        if self.window < 1:
            raise eplb.EPLBError(f"--eplb-window must be >= 1 steps, got {self.window}")
        self.gpus_per_node, self.min_gain = gpus_per_node, min_gain
        for m in self.moes:
            m.count_load()
        self.history: deque[torch.Tensor] = deque(maxlen=self.window + 1)  # cumulative [L, E] snapshots
        if self.moes:
            self.history.append(torch.zeros_like(self._snapshot()))
        self.steps = self.replans = self.layers_moved = self.bytes_moved = 0
        self.rows_at_first_move: list[int] | None = None  # each layer's rows_received then (measured balance after)

    def _snapshot(self) -> torch.Tensor:
        return torch.stack([m.load_E for m in self.moes])  # [L, E], a copy

    def step(self) -> None:
        if not self.moes:
            return
        self.steps += 1
        self.history.append(self._snapshot())
        if self.steps % self.interval:
            return
        comm = self.moes[0].comm
        window_LE = comm.ep_all_reduce((self.history[-1] - self.history[0]).contiguous())
        self.replans += 1
        ep = comm.ep_size
        for m, row in zip(self.moes, window_LE.tolist()):
            if not sum(row):
                continue
            new = eplb.plan_layer(row, ep, comm.par.redundant_experts, self.gpus_per_node)
            now = max(eplb.rank_loads(row, m.phys, ep))
            if new != m.phys and max(eplb.rank_loads(row, new, ep)) < (1 - self.min_gain) * now:
                if self.rows_at_first_move is None:
                    self.rows_at_first_move = [x.rows_received for x in self.moes]
                self.bytes_moved += move_experts(m, new)
                self.layers_moved += 1
