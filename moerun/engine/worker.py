"""StageWorker: what every rank does at every tick of the pipeline schedule.

At tick t a rank of stage s runs the step its replica's plan gave at tick ``t - s``
(stage 0 runs the newest plan; a plan reaches stage s after s ticks). It receives the
hidden states with an ``irecv`` posted at the end of the previous tick, computes, sends
its output on with ``isend`` and posts the ``irecv`` for the next tick before the tick's
control collectives, so transfers overlap compute and never wait on a sender. The last
stage samples (TP rank 0 only) and returns the tokens (with log probabilities for the
requests that ask), batched on the device with one copy of the tokens to the host; a
decode step replays a CUDA graph when the engine captured them (``graphs.py``).
``trace`` keeps the last ``TRACE_TICKS`` ticks (a ring buffer: a server runs for ever).

The worker owns the rank's profiler ``prof`` (``moerun.profile``; the do-nothing
``NULL_PROFILER`` unless built with ``profile=True``): it times the pipeline transfers and
the sampling here and hands ``prof`` to the model; the tick loops (``Engine.step``,
``follow_leader``) open and close each step around ``run_tick``.

Shape legend: T = tokens of the step, H = hidden, V = vocab.
"""
from __future__ import annotations

import itertools
import os
import time
from collections import deque

import torch
import torch.distributed as dist

from ..model import AttnMeta
from ..profile import NULL_PROFILER, Profiler
from ..sampling import Sampled, make_generator, sample_step
from .request import SeqStep

TRACE_TICKS = 100_000  # (tick, stage, micro_batch, tokens, busy_s, wait_s) rows kept per rank


class StageWorker:
    def __init__(self, model, cache, mesh=None, profile: bool = False):
        self.model, self.cache, self.mesh = model, cache, mesh
        self.stage = mesh.coord.pp if mesh else 0
        self.num_stages = mesh.par.pp if mesh else 1
        self.is_sampler = mesh is None or (mesh.is_last_stage and mesh.coord.tp == 0)
        self.device = mesh.device if mesh else next(model.parameters()).device
        self.history: dict[int, list[SeqStep] | None] = {}
        self.pending_recv = None  # (buffer, work) for the next tick
        self.pending_send = []
        self.gens: dict[int, object] = {}
        self.graphs = None  # a GraphRunner (moerun.engine.graphs) once captured, on CUDA
        self.trace: deque[tuple] = deque(maxlen=TRACE_TICKS)  # (tick, stage, micro_batch, tokens, busy_s, wait_s)
        kill = os.environ.get("MOERUN_TEST_KILL")  # "rank:tick": that rank dies there (tests)
        rank = mesh.rank if mesh else 0
        self.kill_at = int(kill.split(":")[1]) if kill and int(kill.split(":")[0]) == rank else None
        # seconds each tick is held back (tests that need a request to stay running a while)
        self.tick_delay = float(os.environ.get("MOERUN_TEST_TICK_DELAY", 0) or 0)
        c = mesh.coord if mesh else None
        coord = {"pp": c.pp, "dp": c.dp, "tp": c.tp, "ep": c.ep_rank} if c else None
        self.prof = Profiler(self.device, rank, coord) if profile else NULL_PROFILER

    def _recv_for(self, tick: int):
        steps = self.history.get(tick - self.stage)
        T = sum(len(s.tokens) for s in steps) if steps else 0
        if self.stage == 0 or not T:
            return None
        buf = torch.empty(T, self.model.cfg.hidden_size, dtype=self.model.dtype, device=self.device)
        return buf, dist.irecv(buf, src=self.mesh.stage_peer(-1))

    @torch.inference_mode()
    def run_tick(self, tick: int, my_plan: list[SeqStep] | None, cycle: int,
                 finished=()) -> dict[int, Sampled]:
        """Run this rank's share of tick ``tick``; ``my_plan`` is the replica's new plan
        (stage 0's step). Returns {request id: (token, logprob, top-N)} on the sampler rank."""
        if tick == self.kill_at:
            os._exit(3)  # a test simulates a crashed rank
        if self.tick_delay:
            time.sleep(self.tick_delay)
        for rid in finished:
            self.gens.pop(rid, None)
        self.history[tick] = my_plan
        steps = self.history.pop(tick - self.stage, None)
        prof = self.prof
        t0 = time.perf_counter()
        wait = 0.0
        out: dict[int, Sampled] = {}
        if steps is not None:  # None: a bubble, the same on every replica
            with prof.phase("pp_send_recv" if self.stage else "embedding"):
                x = self._input(tick, steps)
            wait = time.perf_counter() - t0
            t1 = time.perf_counter()
            lens = [len(s.tokens) for s in steps]
            y = self._forward(x, steps, lens, prof)
            if self.stage < self.num_stages - 1:
                if y.shape[0]:
                    with prof.phase("pp_send_recv"):
                        self.drain()  # earlier sends were matched by irecvs posted at earlier ticks
                        self.pending_send.append(dist.isend(y.contiguous(), dst=self.mesh.stage_peer(+1)))
            elif self.is_sampler:
                with prof.phase("sampling"):
                    out = self._sample(y, [s for s in steps if s.sample])
            if self.model.rebalancer is not None:  # between steps, on every rank of the stage alike
                self.model.rebalancer.step()
            busy = time.perf_counter() - t1
            self.trace.append((tick, self.stage, (tick - self.stage) % cycle, sum(lens), busy, wait))
            prof.note_step(tick, sum(lens))
        else:
            self.trace.append((tick, self.stage, None, 0, 0.0, 0.0))
            prof.note_step(tick, 0)
        if self.mesh is not None and self.stage > 0:
            with prof.phase("pp_send_recv"):
                self.pending_recv = self._recv_for(tick + 1)
        return out

    def _forward(self, x, steps: list[SeqStep], lens: list[int], prof) -> torch.Tensor:
        """The model on this step: replayed from a CUDA graph when one fits (decode), else
        eager, its step metadata (ids, positions, slots, block tables, sampled rows) sent
        to the device in one copy (``AttnMeta.build``)."""
        last = self.stage == self.num_stages - 1
        sampled = [i for i, s in enumerate(steps) if s.sample] if last else None
        if self.graphs is not None and self.graphs.fits(steps):
            return self.graphs.run(steps, x, sampled)
        with prof.phase("attention"):  # the KV cache addressing (slots, block tables) attention reads
            rows = None  # the logits rows to keep; None: all (every row is a sampled decode)
            if last and (len(sampled) < len(steps) or any(n != 1 for n in lens)):
                ends = list(itertools.accumulate(lens))
                rows = [ends[i] - 1 for i in sampled]
            ids = [t for s in steps for t in s.tokens] if self.stage == 0 else None
            meta = AttnMeta.build([s.blocks for s in steps], [s.start for s in steps], lens,
                                  self.cache.block_size, self.device, ids=ids, rows=rows)
        return self.model(meta.ids_T if self.stage == 0 else x, meta.pos_T, meta, self.cache,
                          logits_rows=meta.rows_R, prof=prof)

    def _input(self, tick: int, steps: list[SeqStep]):
        """The hidden states from the previous stage; None on stage 0 (its ids travel in
        the step metadata)."""
        if self.stage == 0:
            return None
        if self.pending_recv is None:  # nothing to receive: zero tokens this step
            return torch.empty(0, self.model.cfg.hidden_size, dtype=self.model.dtype, device=self.device)
        buf, work = self.pending_recv
        work.wait()
        self.pending_recv = None
        return buf

    def _sample(self, logits_RV: torch.Tensor, steps: list[SeqStep]) -> dict[int, Sampled]:
        """The step's tokens, batched on the logits' device; one copy to the host."""
        for s in steps:
            if s.req_id not in self.gens:
                self.gens[s.req_id] = make_generator(s.params, s.req_id, logits_RV.device)
        toks = sample_step(logits_RV, [s.params for s in steps], [self.gens[s.req_id] for s in steps],
                           [s.req_id for s in steps])
        return {s.req_id: r for s, r in zip(steps, toks)}

    def profile_report(self) -> dict:
        """This rank's profile (``Profiler.report``) with its weight and KV cache bytes."""
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return self.prof.report(weights_bytes=weights, kv_cache_bytes=self.cache.bytes())

    def drain(self) -> None:
        for w in self.pending_send:
            w.wait()
        self.pending_send = []
