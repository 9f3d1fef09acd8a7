"""The leader's messages to every other rank, one per tick, on the mesh's ``wake`` group.

    Tick(tick=12, cycle=2, plans=(steps_of_replica_0, None), finished=(3, 7))
    Stop()

A ``Tick`` holds, per DP replica, the plan of the micro-batch that stage 0 starts this
tick (None: a bubble), and the requests that finished since the last tick (their sampler
state can go). Every rank runs its stage's share of the tick; ``Stop`` ends the
followers' loop.
"""
from __future__ import annotations

from dataclasses import dataclass

from .request import SeqStep


@dataclass(frozen=True)
class Tick:
    tick: int
    cycle: int  # max(micro-batches, pp): stage s runs the plan of tick t - s, micro-batch (t - s) mod cycle
    plans: tuple[tuple[SeqStep, ...] | None, ...]  # one per DP replica
    finished: tuple[int, ...] = ()


@dataclass(frozen=True)
class Stop:
    pass
