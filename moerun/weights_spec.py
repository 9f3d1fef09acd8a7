"""TensorSpec: how one checkpoint tensor maps onto (a slice of) one local parameter.

Every layer lists its tensors with ``specs(prefix)``; the loader (``moerun.weights``)
reads exactly ``index`` of each named tensor with safetensors' ``get_slice``, so a rank
never reads what it does not hold. Saving walks the same specs the other way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TensorSpec:
    name: str  # HF name in the checkpoint
    shape: tuple[int, ...]  # full shape in the checkpoint
    dest: torch.Tensor  # where this rank's part goes: a parameter, or a view of one
    index: tuple[slice, ...] = ()  # the part of the full tensor this rank reads (() = all)

    @property
    def local_shape(self) -> tuple[int, ...]:
        idx = self.index + (slice(None),) * (len(self.shape) - len(self.index))
        return tuple(len(range(*s.indices(n))) for s, n in zip(idx, self.shape))


def rows(r: range) -> tuple[slice, ...]:
    return (slice(r.start, r.stop),)


def cols(r: range) -> tuple[slice, ...]:
    return (slice(None), slice(r.start, r.stop))
