"""TensorSpec: how one checkpoint tensor maps onto (a slice of) one local parameter.

Every layer lists its tensors with ``specs(prefix)``; the loader (``moerun.weights``)
reads exactly ``index`` of each named tensor with safetensors' ``get_slice``, so a rank
never reads what it does not hold. Saving walks the same specs the other way.

A checkpoint whose layout differs from the parameter's (GPT-OSS interleaves the gate and up
columns of its fused experts) gives the spec a ``transform``: a pair of functions, the read
slice -> the destination's layout, and back (``DEINTERLEAVE``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


def deinterleave_last(t: torch.Tensor) -> torch.Tensor:
    """[..., 2F] with the columns (a0, b0, a1, b1, ...) -> [..., 2F] as (a0..aF-1, b0..bF-1)."""
    return torch.cat((t[..., 0::2], t[..., 1::2]), dim=-1)


def interleave_last(t: torch.Tensor) -> torch.Tensor:
    """The inverse of ``deinterleave_last``."""
    half = t.shape[-1] // 2
    return torch.stack((t[..., :half], t[..., half:]), dim=-1).flatten(-2)


DEINTERLEAVE = (deinterleave_last, interleave_last)


@dataclass
class TensorSpec:
    name: str  # HF name in the checkpoint
    shape: tuple[int, ...]  # full shape in the checkpoint
    dest: torch.Tensor  # where this rank's part goes: a parameter, or a view of one
    index: tuple[slice, ...] = ()  # the part of the full tensor this rank reads (() = all)
    # (checkpoint slice -> dest layout, dest -> checkpoint layout); None = the same layout
    transform: tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]] | None = None

    def to_dest(self, t: torch.Tensor) -> torch.Tensor:
        """A slice read from the checkpoint, in the destination's layout."""
        return self.transform[0](t) if self.transform else t

    def to_checkpoint(self, t: torch.Tensor) -> torch.Tensor:
        """The destination's values in the checkpoint's layout (for saving)."""
        return self.transform[1](t) if self.transform else t

    @property
    def local_shape(self) -> tuple[int, ...]:
        idx = self.index + (slice(None),) * (len(self.shape) - len(self.index))
        return tuple(len(range(*s.indices(n))) for s, n in zip(idx, self.shape))


def rows(r: range) -> tuple[slice, ...]:
    return (slice(r.start, r.stop),)


def cols(r: range) -> tuple[slice, ...]:
    return (slice(None), slice(r.start, r.stop))
