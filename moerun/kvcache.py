"""A contiguous per-slot KV cache for the layers and KV heads this rank holds.

One tensor per layer and per K/V: ``[num_slots, max_len, kv_heads, head_dim]``. A
sequence owns a slot for its lifetime; its token at position p lives at ``[slot, p]``.
Simple and exact; the engine's paged cache replaces it.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype=torch.float32, device="cpu"):
        shape = (num_slots, max_len, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots, self.max_len = num_slots, max_len

    def write(self, layer: int, slot_T: torch.Tensor, pos_T: torch.Tensor,
              k_TND: torch.Tensor, v_TND: torch.Tensor) -> None:
        self.k[layer][slot_T, pos_T] = k_TND
        self.v[layer][slot_T, pos_T] = v_TND

    def read(self, layer: int, slots_B: torch.Tensor, length: int):
        """K and V of the given slots, positions [0, length): [B, L, N, D] each."""
        return self.k[layer][slots_B, :length], self.v[layer][slots_B, :length]

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
