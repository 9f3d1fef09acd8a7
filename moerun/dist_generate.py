"""Generation under a TP x PP x EP x DP layout, launched by torchrun.

    torchrun --nproc_per_node=8 -m moerun.generate --tp 2 --pp 2 --ep 4 --dp 2 \
        --prompt-ids 1,2,3 --prompt-ids 4,5 --json

``Runtime`` is a rank's share of a layout: its mesh and its stage of the model, built
after the layout is validated. Rank 0 reads the prompts and runs the ``Engine`` (the
scheduler of every DP replica and the micro-batch pipeline schedule); every other rank
follows the leader's ticks in ``serve_worker``. ``dist_prefill_logits`` runs one
prefill through the layout and returns float32 logits on rank 0 (for equivalence tests).
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ModelConfig
from .engine import Engine, serve_worker
from .engine.request import check_prompt
from .mesh import DistComm, Mesh, gather_to_rank0
from .model import AttnMeta
from .parallel import ParallelConfig
from .runner import build_model, prefill_meta, resolve_dtype

log = logging.getLogger("moerun")


@dataclass
class Runtime:
    mesh: Mesh
    model: object
    cfg: ModelConfig

    @staticmethod
    def create(model: str, par: ParallelConfig, *, dtype=None, device=None, seed=0,
               timeout_s=180.0) -> "Runtime":
        cfg = ModelConfig.load(model)
        par.validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # before any process group
        mesh = Mesh.create(par, timeout_s, device)
        dt = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, mesh.device.type)
        m = build_model(model, comm=DistComm(mesh), layers=mesh.layers(cfg), dtype=dt,
                        device=mesh.device, seed=seed, cfg=cfg)
        return Runtime(mesh, m, cfg)

    def stage_forward(self, tokens_T, meta: AttnMeta, cache, logits_rows=None):
        """Run this rank's stage on its replica's batch; returns logits on the last stage."""
        mesh, m, H = self.mesh, self.model, self.cfg.hidden_size
        T = meta.pos_T.shape[0]
        if mesh.is_first_stage:
            x = tokens_T.to(mesh.device)
        else:
            x = torch.empty(T, H, dtype=m.dtype, device=mesh.device)
            if T:
                dist.recv(x, src=mesh.stage_peer(-1))
        out = m(x, meta.pos_T, meta, cache, logits_rows=logits_rows)
        if not mesh.is_last_stage:
            if T:
                dist.send(out.contiguous(), dst=mesh.stage_peer(+1))
            return None
        return out

    def sampler_rank(self) -> int:
        c = self.mesh.coord
        return self.mesh.par.rank_of(self.mesh.par.pp - 1, c.dp, 0)

    def replica_prompts(self, n: int) -> list[int]:
        """Indices of the prompts this rank's DP replica serves (round-robin)."""
        return list(range(self.mesh.coord.dp, n, self.mesh.par.dp))


@torch.inference_mode()
def dist_prefill_logits(rt: Runtime, prompts: list[list[int]]) -> dict[int, torch.Tensor] | None:
    """Float32 logits of every prompt position (one prefill step); the dict reaches rank 0."""
    mine = rt.replica_prompts(len(prompts))
    lens = [len(prompts[i]) for i in mine]
    meta, cache = prefill_meta(rt.model, [prompts[i] for i in mine])
    tokens = torch.tensor([t for i in mine for t in prompts[i]], dtype=torch.long)
    logits = rt.stage_forward(tokens, meta, cache)
    part = {}
    if rt.mesh.rank == rt.sampler_rank() and mine:
        part = dict(zip(mine, logits.float().cpu().split(lens)))
    return gather_to_rank0(rt.mesh, part)


def main(args) -> int:
    """``moerun generate`` under torchrun (args parsed by moerun.generate)."""
    from . import kernels
    from .generate import engine_config, read_prompts, serve_prompts
    from .tokenizer import load_tokenizer

    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        logging.getLogger("moerun").setLevel(logging.WARNING)
    try:
        kernels.set_default_impl(args.kernels)
        par = ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep, dp=args.dp)
        cfg = ModelConfig.load(args.model)
        tok = load_tokenizer(args.model, cfg)
        t0 = time.perf_counter()
        rt = Runtime.create(args.model, par, dtype=args.dtype, device=args.device, seed=args.seed,
                            timeout_s=args.timeout)
        rep = rt.model.load_report
        read = gather_to_rank0(rt.mesh, {rank: rep.bytes_read if rep else 0})
        layers = rt.mesh.layers(cfg)
        log.info("%s on %d ranks: rank 0 holds layers %d-%d; loaded in %.1fs", par, par.world_size,
                 layers.start, layers.stop - 1, time.perf_counter() - t0)
        if rank == 0 and rep is not None:
            log.info("checkpoint bytes read per rank (MiB): %s",
                     ", ".join(f"{r}: {b / 2**20:.1f}" for r, b in sorted(read.items())))
        box = [None]
        if rank == 0:
            try:
                box = [read_prompts(args, tok)]
            except ValueError as e:
                box = [e]
        dist.broadcast_object_list(box, src=0, group=rt.mesh.ctrl)
        if isinstance(box[0], Exception):
            raise box[0]
        prompts = box[0]
        for i, (p, _) in enumerate(prompts):  # on every rank, so all exit with the same error
            try:
                check_prompt(p, cfg.vocab_size)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        ecfg = engine_config(args)
        if rank == 0:
            def finish(engine):
                engine.shutdown()
                return gather_to_rank0(rt.mesh, {rank: engine.worker.trace})
            serve_prompts(Engine(rt.model, ecfg, rt.mesh), prompts, args, tok,
                          f"{par}, {rt.mesh.device.type}", finish)
        else:
            worker = serve_worker(rt, ecfg)
            gather_to_rank0(rt.mesh, {rank: worker.trace})
        dist.barrier(group=rt.mesh.ctrl)
        dist.destroy_process_group()
        return 0
    except ValueError as e:  # bad layout or request: the same message on every rank
        if rank == 0:
            print(f"moerun generate: error: {e}", file=sys.stderr, flush=True)
        else:  # let rank 0 print before torchrun tears the group down on the first exit
            time.sleep(2)
        os._exit(2)
    except Exception as e:  # a peer died or a collective timed out: exit, never hang
        print(f"moerun generate: rank {rank} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        os._exit(1)
