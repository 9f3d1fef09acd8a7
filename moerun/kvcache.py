"""The paged KV cache of one rank: fixed-size blocks for the rank's layers and KV heads.

Per layer, K and V are ``[num_blocks, block_size, kv_heads, head_dim]``. A sequence owns
a list of blocks (its block table, kept by the scheduler); its token at position p lives
in block ``table[p // block_size]`` at row ``p % block_size``. ``AttnMeta`` turns block
tables into flat slot indices, so attention writes and reads through them.

    cache = KVCache.for_model(model, num_blocks=1024, block_size=16)
    KVCache.block_bytes(model, block_size)      # one block's bytes on this rank: how many fit

Blocks ``0 .. num_blocks - 1`` are the scheduler's; one more, ``scratch_block``, belongs to
no sequence: the padding rows of a CUDA-graph batch (``moerun.engine.graphs``) write there.

Shape legend: B = sequences, P = blocks of one sequence's table, N = KV heads, D = head dim.
"""
from __future__ import annotations

import torch

from . import hugepages


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype=torch.float32, device="cpu"):
        shape = (num_blocks + 1, block_size, kv_heads, head_dim)  # + the scratch block
        # attention reads blocks all over the cache: on the CPU, 2 MiB pages (moerun.hugepages)
        self.k = [hugepages.zeros(shape, dtype, device) for _ in range(num_layers)]
        self.v = [hugepages.zeros(shape, dtype, device) for _ in range(num_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size
        self.scratch_block = num_blocks  # written by padding rows, read by no sequence

    @staticmethod
    def block_bytes(model, block_size: int) -> int:
        attn = model.layers[0].self_attn if len(model.layers) else None
        kv = attn.num_kv_heads if attn else 0
        p = next(model.parameters())
        return 2 * len(model.layers) * block_size * kv * model.cfg.head_dim * p.element_size()

    @staticmethod
    def for_model(model, num_blocks: int, block_size: int) -> "KVCache":
        attn = model.layers[0].self_attn if len(model.layers) else None
        p = next(model.parameters())
        return KVCache(len(model.layers), num_blocks, block_size, attn.num_kv_heads if attn else 0,
                       model.cfg.head_dim, p.dtype, p.device)

    def write(self, layer: int, slot_T: torch.Tensor, k_TND: torch.Tensor, v_TND: torch.Tensor) -> None:
        self.k[layer].view(-1, *k_TND.shape[1:])[slot_T] = k_TND
        self.v[layer].view(-1, *v_TND.shape[1:])[slot_T] = v_TND

    def read(self, layer: int, table_BP: torch.Tensor, length: int):
        """K and V of positions ``[0, length)`` of each sequence, through its block table
        ``table_BP`` (padded entries read some block; the attention mask hides them):
        [B, length, N, D] each, gathered whole blocks at a time."""
        B, nblk = table_BP.shape
        flat = table_BP.reshape(-1)

        def gather(c):
            return c.index_select(0, flat).view(B, nblk * self.block_size, *c.shape[2:])[:, :length]
        return gather(self.k[layer]), gather(self.v[layer])

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
