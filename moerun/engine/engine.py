"""Engine: the leader's API that generate and the server share.

    engine = Engine(model, EngineConfig(kv_cache_gb=1))              # one process
    rid = engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=8))
    while engine.has_unfinished(): events = engine.step()            # [TokenEvent]
    outs = engine.generate(prompts, params)                           # offline, in input order

Under torchrun, rank 0 builds the Engine with the mesh (it holds the schedulers, one per
DP replica) and every other rank calls ``follow_leader``. A tick: the leader plans, for
each replica, micro-batch ``t mod C`` (C = max(M, PP); micro-batches >= M are bubbles),
broadcasts the plan as a ``Tick``, every rank runs its stage's step (see
``StageWorker``), and the samplers' tokens are gathered back to the leader, which applies
the step the last stage just finished. A request leaves the engine with its last
``TokenEvent``: the engine keeps only what is still running or waiting.
"""
from __future__ import annotations

import itertools
import logging

import torch
import torch.distributed as dist

from ..kvcache import KVCache
from ..mesh import gather_to_rank0
from ..options import EngineConfig, SamplingParams
from .graphs import graph_runner
from .messages import Stop, Tick
from .request import Request, TokenEvent, check_prompt
from .scheduler import Scheduler
from .worker import StageWorker

log = logging.getLogger("moerun")


def kv_blocks(model, cfg: EngineConfig, mesh=None) -> int:
    """Blocks that fit this rank's budget; the smallest over all ranks, so every rank of a
    replica can hold the same block table."""
    if cfg.num_blocks is not None:
        n = cfg.num_blocks
    else:
        per_block = max(KVCache.block_bytes(model, cfg.block_size), 1)
        dev = next(model.parameters()).device
        if cfg.kv_cache_gb is not None:
            budget = cfg.kv_cache_gb * 2**30
        elif dev.type == "cuda":
            budget = 0.9 * torch.cuda.mem_get_info(dev)[0]
        else:
            budget = 2**28  # CPU: 256 MiB unless --kv-cache-gb says otherwise
        n = int(budget // per_block) - 1  # one block of the budget is the cache's scratch block
    if mesh is not None:
        t = torch.tensor([n], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=mesh.ctrl)
        n = int(t.item())
    if n < 1:
        raise ValueError("the KV cache budget holds no block: raise --kv-cache-gb")
    return n


def stage_worker(model, cfg: EngineConfig, mesh=None) -> StageWorker:
    """This rank's worker with a KV cache of the agreed number of blocks, and its decode
    steps captured as CUDA graphs when they can be (``graphs.graph_runner``)."""
    worker = StageWorker(model, KVCache.for_model(model, kv_blocks(model, cfg, mesh), cfg.block_size), mesh,
                         profile=cfg.profile)
    worker.graphs = graph_runner(model, worker.cache, cfg, mesh)
    return worker


class Engine:
    def __init__(self, model, cfg: EngineConfig = EngineConfig(), mesh=None):
        self.cfg, self.mesh, self.model = cfg, mesh, model
        self.pp = mesh.par.pp if mesh else 1
        self.dp = mesh.par.dp if mesh else 1
        self.M = cfg.micro_batches or self.pp
        self.cycle = max(self.M, self.pp)
        self.worker = stage_worker(model, cfg, mesh)
        self.num_blocks = self.worker.cache.num_blocks
        self.schedulers = [Scheduler(self.num_blocks, cfg.block_size, cfg.max_batch_tokens, self.M)
                           for _ in range(self.dp)]
        self.requests: dict[int, Request] = {}  # running or waiting only
        self.ids = itertools.count()
        self.tick = 0
        self.sent: dict[int, tuple] = {}  # tick -> plans, until the last stage has run them
        self.finished_ids: list[int] = []  # since the last tick, for the workers' sampler state
        self.aborted_events: list[TokenEvent] = []  # aborts outside the pipeline, for the next step
        self.peak_blocks_used = 0
        log.info("KV cache: %d blocks of %d tokens = %d tokens per replica (%.2f GiB on this rank)",
                 self.num_blocks, cfg.block_size, self.num_blocks * cfg.block_size,
                 self.worker.cache.bytes() / 2**30)

    # ---------------------------------------------------------------- the API
    def add_request(self, prompt: list[int], params: SamplingParams) -> int:
        """Queue a request; a ValueError (bad ids, too long for the cache) changes nothing."""
        check_prompt(prompt, self.model.cfg.vocab_size)
        limit = self.model.cfg.max_position_embeddings
        if len(prompt) + params.max_new_tokens > limit:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) = "
                             f"{len(prompt) + params.max_new_tokens} tokens is beyond the model's "
                             f"max_position_embeddings ({limit}): shorten the prompt or lower max_new_tokens")
        need = -(-(len(prompt) + params.max_new_tokens) // self.cfg.block_size)
        if need > self.num_blocks:
            raise ValueError(
                f"request needs {len(prompt) + params.max_new_tokens} tokens of KV cache ({need} blocks), "
                f"more than the whole cache ({self.num_blocks} blocks = "
                f"{self.num_blocks * self.cfg.block_size} tokens): raise --kv-cache-gb or shorten it")
        rid = next(self.ids)
        replica = min(range(self.dp), key=lambda d: self.schedulers[d].load())
        req = Request(rid, list(prompt), params, replica=replica)
        self.requests[rid] = req
        self.schedulers[replica].add(req)
        self.worker.prof.request_added(rid)
        return rid

    def abort(self, rid: int) -> None:
        """Stop a request. Not in the pipeline: it leaves now, its blocks freed, and the
        next step reports its ``abort`` event. In flight: it leaves when its step comes
        back (stages may still write its KV), with that event."""
        req = self.requests.get(rid)
        if req is None:
            return
        req.aborted = True
        if not req.in_flight:
            self._finish(req)
            self.aborted_events.append(TokenEvent(rid, None, True, "abort"))

    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self.aborted_events)

    def step(self) -> list[TokenEvent]:
        """One tick."""
        prof = self.worker.prof
        prof.step_begin()
        t, mb = self.tick, self.tick % self.cycle
        with prof.phase("schedule"):
            plans = tuple(tuple(s.schedule(mb)) if mb < self.M else None for s in self.schedulers)
            self.peak_blocks_used = max(self.peak_blocks_used, self.blocks_used())
            finished, self.finished_ids = tuple(self.finished_ids), []
            if self.mesh is not None:
                dist.broadcast_object_list([Tick(t, self.cycle, plans, finished)], src=0, group=self.mesh.wake)
        self.sent[t] = plans
        sampled = self.worker.run_tick(t, plans[0], self.cycle, finished)
        with prof.phase("schedule"):  # the control plane: tokens back to the leader, and applied
            if self.mesh is not None:
                sampled = gather_to_rank0(self.mesh, sampled)
            self.tick += 1
            events, self.aborted_events = self.aborted_events, []
            events = events + self._apply(self.sent.pop(t - (self.pp - 1), None), sampled)
        prof.request_events(events)
        prof.step_end()
        return events

    def generate(self, prompts: list[list[int]], params) -> list[list[int]]:
        """Every prompt to the end; the output ids in input order."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        out: dict[int, list[int]] = {i: [] for i in ids}
        while self.has_unfinished():
            for ev in self.step():
                if ev.token is not None and ev.req_id in out:
                    out[ev.req_id].append(ev.token)
        return [out[i] for i in ids]

    def shutdown(self) -> None:
        if self.mesh is not None:
            dist.broadcast_object_list([Stop()], src=0, group=self.mesh.wake)
        self.worker.drain()

    # ------------------------------------------------------------------ state
    def blocks_used(self) -> int:
        """KV blocks held in the fullest replica."""
        return max(self.num_blocks - len(s.blocks.free) for s in self.schedulers)

    def kv_usage(self) -> float:
        """Fraction of the KV cache in use, over all replicas (0..1)."""
        free = sum(len(s.blocks.free) for s in self.schedulers)
        return 1.0 - free / (self.num_blocks * self.dp)

    def num_running(self) -> int:
        return sum(len(s.running) for s in self.schedulers)

    def num_waiting(self) -> int:
        return sum(len(s.waiting) for s in self.schedulers)

    @property
    def num_preemptions(self) -> int:
        return sum(s.num_preemptions for s in self.schedulers)

    # ------------------------------------------------------------- internals
    def _apply(self, plans, sampled: dict) -> list[TokenEvent]:
        events = []
        for steps in plans or ():
            for s in steps or ():
                req = self.requests.get(s.req_id)
                if req is None:  # left the engine while this step was in flight
                    continue
                req.in_flight = False
                req.num_computed = s.start + len(s.tokens)
                if req.aborted:
                    self._finish(req)
                    events.append(TokenEvent(req.id, None, True, "abort"))
                    continue
                if not s.sample:
                    continue
                tok, lp, top = sampled[s.req_id]
                req.output.append(tok)
                p = req.params
                reason = ("stop" if tok in p.stop_token_ids or (not p.ignore_eos and tok in self.model.cfg.eos_token_ids)
                          else "length" if len(req.output) >= p.max_new_tokens else None)
                if reason:
                    self._finish(req)
                events.append(TokenEvent(req.id, tok, reason is not None, reason, lp, top))
        return events

    def _finish(self, req: Request) -> None:
        self.schedulers[req.replica].finish(req)
        self.finished_ids.append(req.id)
        del self.requests[req.id]


def follow_leader(model, cfg: EngineConfig, mesh) -> StageWorker:
    """Every rank but 0: run the leader's ticks until it says stop."""
    worker = stage_worker(model, cfg, mesh)
    prof = worker.prof
    while True:
        prof.step_begin()
        with prof.phase("schedule"):  # waiting for the leader's plan
            box = [None]
            dist.broadcast_object_list(box, src=0, group=mesh.wake)
        msg = box[0]
        if isinstance(msg, Stop):
            break
        assert isinstance(msg, Tick), f"unexpected control message {type(msg).__name__}"
        out = worker.run_tick(msg.tick, msg.plans[mesh.coord.dp], msg.cycle, msg.finished)
        with prof.phase("schedule"):
            gather_to_rank0(mesh, out)
        prof.step_end()
    prof.step_end()  # the wait for Stop ran no tick: dropped
    worker.drain()
    return worker
