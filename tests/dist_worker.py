"""Run under torchrun by the layout and engine tests: prefill logits of a layout, then
generation through the engine (requests may arrive at different ticks), written by
rank 0 as JSON for the test to compare with one process.

    torchrun --nproc_per_node=N tests/dist_worker.py MODEL TP PP EP DP SPEC_JSON OUT_JSON

SPEC_JSON: {"prompts": [[ids]...], "max_new": [n...], "arrive": [tick...],
            "engine": {EngineConfig fields}, "sampling": {SamplingParams fields}}
"""
import json
import sys

import torch

from moerun.dist_generate import Runtime, dist_prefill_logits
from moerun.mesh import gather_to_rank0
from moerun.engine import Engine, EngineConfig, serve_worker
from moerun.parallel import ParallelConfig
from moerun.sampling import SamplingParams


def main():
    model, tp, pp, ep, dp, spec, out = sys.argv[1:8]
    par = ParallelConfig(tp=int(tp), pp=int(pp), ep=int(ep), dp=int(dp))
    spec = json.loads(spec)
    prompts = spec["prompts"]
    rt = Runtime.create(model, par, dtype=torch.float32, device="cpu", timeout_s=60)
    logits = dist_prefill_logits(rt, prompts)
    ecfg = EngineConfig(**spec.get("engine", {}))
    read = gather_to_rank0(rt.mesh, {rt.mesh.rank: rt.model.load_report.bytes_read if rt.model.load_report else 0})
    if rt.mesh.rank == 0:
        engine = Engine(rt.model, ecfg, rt.mesh)
        arrive = spec.get("arrive", [0] * len(prompts))
        max_new = spec.get("max_new", [8] * len(prompts))
        ids = {}
        while len(ids) < len(prompts) or engine.has_unfinished():
            for i, p in enumerate(prompts):
                if i not in ids and arrive[i] <= engine.tick:
                    sp = SamplingParams(**{"max_new_tokens": max_new[i], "ignore_eos": True, **spec.get("sampling", {})})
                    ids[i] = engine.add_request(p, sp)
            engine.step()
        engine.shutdown()
        traces = gather_to_rank0(rt.mesh, {0: engine.worker.trace})
        with open(out, "w") as f:
            json.dump({"logits": {i: logits[i].tolist() for i in logits},
                       "outputs": {i: engine.requests[ids[i]].output for i in ids},
                       "preemptions": sum(r.num_preemptions for r in engine.requests.values()),
                       "bytes_read": read, "traces": traces}, f)
    else:
        worker = serve_worker(rt, ecfg)
        gather_to_rank0(rt.mesh, {rt.mesh.rank: worker.trace})
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
