"""CUDA graphs of the decode step: one graph per batch-size bucket, captured at start-up
and replayed, so a decode step costs one launch instead of one per kernel.

    runner = graph_runner(model, cache, EngineConfig(), mesh)  # None when graphs are off (logged)
    if runner is not None and runner.fits(steps):
        y = runner.run(steps, x, sampled)                       # [B, H], or logits of the sampled rows

A graph replays fixed shapes reading fixed addresses, so each bucket b (1, 2, 4, 8, ...,
``--cuda-graph-max-bs``) has persistent input buffers: the token ids (first stage) or
hidden states, positions, KV slots, sequence starts and lengths, and a block table of a
fixed P blocks (enough for ``max_position_embeddings``). A step of B <= b decodes (one new
token each) writes its inputs into the buffers with one non-blocking copy, padded to b:
a padding row decodes token 0 at position 0 of the cache's scratch block, which no
sequence reads, and its output row is dropped. Attention then reads P blocks per
sequence, the mask hiding what lies past each sequence. Prefill chunks, mixed steps and
batches over the largest bucket run eagerly.

Graphs are on for a CUDA device, expert parallelism 1, and neither ``--enforce-eager``
nor ``--profile`` (the profiler times eager phases). Under EP > 1 they stay off: the
all-to-all's send and receive sizes depend on the routing, read on the host each layer,
so a step's shapes are not fixed (a fixed-capacity all-to-all would make them so).
Without a capture (``capture()`` not called: a CPU test) ``run`` runs the same padded
forward eagerly on the same buffers.

Shape legend: B = sequences of the step, b = its bucket, P = blocks per table, H = hidden,
V = vocab.
"""
from __future__ import annotations

import logging
import time

import torch

from ..model import AttnMeta
from ..profile import NULL_PROFILER
from .request import SeqStep

log = logging.getLogger("moerun")


def buckets(max_bs: int) -> list[int]:
    """The batch sizes captured: powers of two below ``max_bs``, then ``max_bs``."""
    if max_bs < 1:
        raise ValueError(f"cuda_graph_max_bs must be >= 1, got {max_bs}")
    out, b = [], 1
    while b < max_bs:
        out.append(b)
        b *= 2
    return out + [max_bs]


def bucket_for(batch: int, sizes: list[int]) -> int | None:
    """The smallest bucket that holds ``batch`` sequences; None when none does."""
    return next((b for b in sizes if b >= batch), None)


def graphs_off_reason(cfg, device: torch.device, ep_size: int) -> str | None:
    """Why CUDA graphs stay off for this rank (None: they are on)."""
    if cfg.enforce_eager:
        return "--enforce-eager"
    if device.type != "cuda":
        return f"device {device.type}: graphs need CUDA"
    if ep_size > 1:
        return "EP > 1: the expert all-to-all's sizes depend on the routing, so a step's shapes are not fixed"
    if cfg.profile:
        return "--profile times the eager phases"
    return None


def graph_runner(model, cache, cfg, mesh=None) -> "GraphRunner | None":
    """This rank's captured runner, or None (and one log line saying why)."""
    device = next(model.parameters()).device
    why = graphs_off_reason(cfg, device, model.comm.ep_size)
    if why:
        log.info("CUDA graphs: off (%s)", why)
        return None
    runner = GraphRunner(model, cache, cfg.cuda_graph_max_bs)
    t0 = time.perf_counter()
    try:
        runner.capture()
    except RuntimeError as e:
        if model.comm.tp_size > 1:  # the TP peers captured their collectives: do not diverge from them
            raise RuntimeError(f"CUDA graph capture failed ({e}); run with --enforce-eager") from e
        log.warning("CUDA graphs: capture failed (%s); running eagerly (--enforce-eager hides this)", e)
        return None
    log.info("CUDA graphs: decode buckets %s captured in %.1fs (%d blocks per table)",
             runner.buckets, time.perf_counter() - t0, runner.max_blocks)
    return runner


class GraphRunner:
    def __init__(self, model, cache, max_bs: int, max_blocks: int | None = None):
        self.model, self.cache = model, cache
        self.device = next(model.parameters()).device
        self.buckets = buckets(max_bs)
        n, bs = self.buckets[-1], cache.block_size
        self.max_blocks = P = max_blocks or max(min(-(-model.cfg.max_position_embeddings // bs), cache.num_blocks), 1)
        # one flat int64 buffer, one copy per step: ids | positions | slots | starts | lens | sampled rows | table
        self.sizes = (n, n, n, n, n, n, n * P)
        self.inputs = torch.zeros(sum(self.sizes), dtype=torch.long, device=self.device)
        ids, pos, slot, starts, lens, rows, table = self.inputs.split(self.sizes)
        self.ids, self.rows = ids, rows
        self.hidden = None if model.is_first else torch.zeros(n, model.cfg.hidden_size, dtype=model.dtype,
                                                              device=self.device)
        table_nP = table.view(n, P)
        # under a graph the host lists only give shapes: B sequences of one new token each
        self.metas = {b: AttnMeta(slot[:b], pos[:b], table_nP[:b], torch.arange(b, device=self.device), starts[:b],
                                  lens[:b], [0] * b, [1] * b, 1, P * bs, True) for b in self.buckets}
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pin = self.device.type == "cuda"

    def fits(self, steps: list[SeqStep]) -> bool:
        """A decode step (one new token per sequence) of at most the largest bucket, every
        sequence within the P blocks of the fixed table."""
        bs, P = self.cache.block_size, self.max_blocks
        return 0 < len(steps) <= self.buckets[-1] and all(
            len(s.tokens) == 1 and s.start < P * bs for s in steps)

    def _fill(self, steps: list[SeqStep], b: int, sampled: list[int] | None = None) -> None:
        """The step's inputs, padded to bucket b, into the persistent buffers: one copy."""
        n, bs, P = self.buckets[-1], self.cache.block_size, self.max_blocks
        scratch = self.cache.scratch_block
        B = len(steps)
        ids = [s.tokens[0] for s in steps] if self.model.is_first else []
        pos = [s.start for s in steps]
        slot = [s.blocks[p // bs] * bs + p % bs for s, p in zip(steps, pos)]
        table = []
        for s in steps:
            t = list(s.blocks[:P])
            table += t + [scratch] * (P - len(t))
        pad = b - B
        host = (ids + [0] * (n - len(ids)) + pos + [0] * (n - B) + slot + [scratch * bs] * (n - B)
                + pos + [0] * (n - B) + [1] * n + list(sampled or ()) + [0] * (n - len(sampled or ()))
                + table + [scratch] * (P * (n - B)))
        assert pad >= 0 and len(host) == self.inputs.numel()
        src = torch.tensor(host, dtype=torch.long, pin_memory=self.pin)
        self.inputs.copy_(src, non_blocking=self.pin)

    def _forward(self, b: int) -> torch.Tensor:
        meta = self.metas[b]
        meta._masks.clear()  # the mask is computed from the buffers (and, under capture, recorded)
        x = self.ids[:b] if self.model.is_first else self.hidden[:b]
        return self.model(x, meta.pos_T, meta, self.cache, logits_rows=None, prof=NULL_PROFILER)

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up and capture every bucket, largest first, in one shared memory pool."""
        pool = None
        for b in reversed(self.buckets):
            self._fill([], b)  # every row a padding row: only the scratch block is written
            for _ in range(2):  # kernels compiled and tuned, workspaces allocated, outside the capture
                self._forward(b)
            torch.cuda.synchronize(self.device)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                out = self._forward(b)
            pool = g.pool()
            self.graphs[b] = (g, out)
        torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def run(self, steps: list[SeqStep], x: torch.Tensor | None, sampled: list[int] | None) -> torch.Tensor:
        """The model on a decode step that ``fits``: hidden states [B, H] (a copy: the
        graph's output buffer is reused), or on the last stage the logits of rows
        ``sampled`` ([len(sampled), V]; None = every row)."""
        B = len(steps)
        b = bucket_for(B, self.buckets)
        some = sampled is not None and len(sampled) < B
        self._fill(steps, b, sampled if some else None)
        if self.hidden is not None:
            self.hidden[:B].copy_(x)
        if b in self.graphs:
            g, out = self.graphs[b]
            g.replay()
        else:
            out = self._forward(b)
        if not self.model.is_last:
            return out[:B].clone()
        return out[self.rows[:len(sampled)]] if some else out[:B]
