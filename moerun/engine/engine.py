"""Engine: the API that generate and the server share.

    engine = Engine.local("tiny", EngineConfig(kv_cache_gb=1))        # one process
    rid = engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=8))
    while engine.has_unfinished(): events = engine.step()            # [(id, token, finished)]
    outs = engine.generate(prompts, params)                           # offline, in input order

Under torchrun, rank 0 builds the Engine (it holds the schedulers, one per DP replica)
and every other rank calls ``serve_worker(runtime)``. A tick: the leader plans, for each
replica, micro-batch ``t mod C`` (C = max(M, PP); micro-batches >= M are bubbles),
broadcasts the plan on the gloo control group, every rank runs its stage's step (see
``StageWorker``), and the samplers' tokens are gathered back to the leader, which applies
the step the last stage just finished.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..kvcache import KVCache
from ..mesh import gather_to_rank0
from ..sampling import SamplingParams
from .request import Request, Status, check_prompt
from .scheduler import Scheduler
from .worker import StageWorker

log = logging.getLogger("moerun")


@dataclass(frozen=True)
class EngineConfig:
    max_batch_tokens: int = 2048  # tokens one micro-batch step may compute
    kv_cache_gb: float | None = None  # per rank; None: 256 MiB on CPU, 90% of free memory on GPU
    block_size: int = 16
    micro_batches: int | None = None  # None: = PP
    num_blocks: int | None = None  # overrides kv_cache_gb (tests)


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
        n = int(budget // per_block)
    if mesh is not None and mesh.par.world_size > 1:
        t = torch.tensor([n], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=mesh.ctrl)
        n = int(t.item())
    if n < 1:
        raise ValueError("the KV cache budget holds no block: raise --kv-cache-gb")
    return n


def stage_worker(model, cfg: EngineConfig, mesh=None) -> StageWorker:
    """This rank's worker with a KV cache of the agreed number of blocks."""
    return StageWorker(model, KVCache.for_model(model, kv_blocks(model, cfg, mesh), cfg.block_size), mesh)


class Engine:
    def __init__(self, model, cfg: EngineConfig, mesh=None):
        self.cfg, self.mesh, self.model = cfg, mesh, model
        self.pp = mesh.par.pp if mesh else 1
        self.dp = mesh.par.dp if mesh else 1
        if cfg.micro_batches is not None and cfg.micro_batches < 1:
            raise ValueError(f"--micro-batches must be >= 1, got {cfg.micro_batches}")
        self.M = cfg.micro_batches or self.pp
        self.cycle = max(self.M, self.pp)
        self.worker = stage_worker(model, cfg, mesh)
        self.num_blocks = self.worker.cache.num_blocks
        self.schedulers = [Scheduler(self.num_blocks, cfg.block_size, cfg.max_batch_tokens, self.M)
                           for _ in range(self.dp)]
        self.requests: dict[int, Request] = {}
        self.ids = itertools.count()
        self.tick = 0
        self.sent: dict[int, list] = {}  # tick -> plans, until the last stage has run them
        self.finished_ids: list[int] = []
        self.peak_blocks_used = 0
        log.info("KV cache: %d blocks of %d tokens = %d tokens per replica (%.2f GiB on this rank)",
                 self.num_blocks, cfg.block_size, self.num_blocks * cfg.block_size,
                 self.worker.cache.bytes() / 2**30)

    @staticmethod
    def local(model_name: str, cfg: EngineConfig = EngineConfig(), **build) -> "Engine":
        from ..runner import build_model

        return Engine(build_model(model_name, **build), cfg)

    # ---------------------------------------------------------------- the API
    def add_request(self, prompt: list[int], params: SamplingParams) -> int:
        check_prompt(prompt, self.model.cfg.vocab_size)
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
        return rid

    def abort(self, rid: int) -> None:
        req = self.requests.get(rid)
        if req is None or req.status is Status.FINISHED:
            return
        req.aborted = True
        if not req.in_flight:
            self._finish(req, "abort")

    def has_unfinished(self) -> bool:
        return any(r.status is not Status.FINISHED for r in self.requests.values())

    def step(self) -> list[tuple[int, int | None, bool]]:
        """One tick. Returns (request id, new token or None, finished) events."""
        t, mb = self.tick, self.tick % self.cycle
        plans = [s.schedule(mb) if mb < self.M else None for s in self.schedulers]
        self.peak_blocks_used = max(self.peak_blocks_used,
                                    max(self.num_blocks - len(s.blocks.free) for s in self.schedulers))
        finished, self.finished_ids = self.finished_ids, []
        if self.mesh is not None and self.mesh.par.world_size > 1:
            msg = [{"tick": t, "plans": plans, "finished": finished, "cycle": self.cycle}]
            dist.broadcast_object_list(msg, src=0, group=self.mesh.ctrl)
        self.sent[t] = plans
        tokens = self.worker.run_tick(t, plans[0], self.cycle, finished)
        if self.mesh is not None and self.mesh.par.world_size > 1:
            tokens = gather_to_rank0(self.mesh, tokens)
        self.tick += 1
        return self._apply(self.sent.pop(t - (self.pp - 1), None), tokens)

    def generate(self, prompts: list[list[int]], params) -> list[list[int]]:
        params = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        while self.has_unfinished():
            self.step()
        return [self.requests[i].output for i in ids]

    def shutdown(self) -> None:
        if self.mesh is not None and self.mesh.par.world_size > 1:
            dist.broadcast_object_list([{"stop": True}], src=0, group=self.mesh.ctrl)
        self.worker.drain()

    # ------------------------------------------------------------- internals
    def _apply(self, plans, tokens: dict[int, int]):
        events = []
        for steps in plans or []:
            for s in steps or []:
                req = self.requests[s.req_id]
                req.in_flight = False
                if req.status is Status.FINISHED:
                    continue
                req.num_computed = s.start + len(s.tokens)
                if req.aborted:
                    self._finish(req, "abort")
                    events.append((req.id, None, True))
                    continue
                if not s.sample:
                    continue
                tok = tokens[s.req_id]
                req.output.append(tok)
                p = req.params
                reason = ("stop" if tok in p.stop_token_ids or (not p.ignore_eos and tok in self.model.cfg.eos_token_ids)
                          else "length" if len(req.output) >= p.max_new_tokens else None)
                if reason:
                    self._finish(req, reason)
                events.append((req.id, tok, reason is not None))
        return events

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        self.schedulers[req.replica].finish(req)
        self.finished_ids.append(req.id)


def serve_worker(runtime, cfg: EngineConfig) -> StageWorker:
    """Every rank but 0: follow the leader's ticks until it says stop."""
    mesh = runtime.mesh
    worker = stage_worker(runtime.model, cfg, mesh)
    while True:
        msg = [None]
        dist.broadcast_object_list(msg, src=0, group=mesh.ctrl)
        m = msg[0]
        if m.get("stop"):
            break
        out = worker.run_tick(m["tick"], m["plans"][mesh.coord.dp], m["cycle"], m["finished"])
        gather_to_rank0(mesh, out)
    worker.drain()
    return worker
