"""Run under torchrun by the layout and engine tests: generation through the engine
(requests may arrive at different ticks), written by rank 0 as JSON for the test to
compare with one process: every sampled token with its log probability and top-N.

    torchrun --nproc_per_node=N tests/dist_worker.py MODEL TP PP EP DP SPEC_JSON OUT_JSON

SPEC_JSON: {"prompts": [[ids]...], "max_new": [n...], "arrive": [tick...],
            "engine": {EngineConfig fields}, "sampling": {SamplingParams fields},
            "eplb": {"redundant_experts": R, EPLBOptions fields}}
"""
import json
import sys

from moerun.engine import Engine, EngineConfig, follow_leader
from moerun.entry import run_command
from moerun.mesh import gather_to_rank0
from moerun.model.moe import MoE
from moerun.options import EPLBOptions, ModelOptions, SamplingParams
from moerun.parallel import ParallelConfig
from moerun.runtime import Runtime


def run_staggered(engine, prompts, max_new, arrive, sampling) -> dict[int, list]:
    """Prompt i joins at tick arrive[i]; returns i -> [(token, logprob, top), ...]."""
    ids, events = {}, {}
    while len(ids) < len(prompts) or engine.has_unfinished():
        for i, p in enumerate(prompts):
            if i not in ids and arrive[i] <= engine.tick:
                sp = SamplingParams(**{"max_new_tokens": max_new[i], "ignore_eos": True, **sampling})
                ids[i] = engine.add_request(p, sp)
                events[ids[i]] = []
        for ev in engine.step():
            if ev.token is not None:
                events[ev.req_id].append((ev.token, ev.logprob, [list(t) for t in ev.top_logprobs]))
    return {i: events[rid] for i, rid in ids.items()}


def eplb_state(model) -> dict:
    """This rank's placements ({layer: physical -> logical}), rows its experts computed and
    the dynamic re-planner's counts."""
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    rb = model.rebalancer
    return {"phys": {m.layer: list(m.phys) for m in moes}, "rows": {m.layer: m.rows_received for m in moes},
            "replans": rb.replans if rb else 0, "layers_moved": rb.layers_moved if rb else 0,
            "bytes_moved": rb.bytes_moved if rb else 0}


def main():
    model, tp, pp, ep, dp, spec, out = sys.argv[1:8]
    spec = json.loads(spec)
    eplb = dict(spec.get("eplb", {}))
    par = ParallelConfig(tp=int(tp), pp=int(pp), ep=int(ep), dp=int(dp),
                         redundant_experts=eplb.pop("redundant_experts", 0))
    prompts = spec["prompts"]
    rt = Runtime.create(ModelOptions(model=model, dtype="float32", device="cpu"), par, timeout_s=60,
                        eplb_opts=EPLBOptions(**eplb))
    ecfg = EngineConfig(**spec.get("engine", {}))
    read = gather_to_rank0(rt.mesh, {rt.rank: rt.model.load_report.bytes_read if rt.model.load_report else 0})
    if rt.is_leader:
        engine = Engine(rt.model, ecfg, rt.mesh)
        got = run_staggered(engine, prompts, spec.get("max_new", [8] * len(prompts)),
                            spec.get("arrive", [0] * len(prompts)), spec.get("sampling", {}))
        preemptions = engine.num_preemptions
        engine.shutdown()
        traces = gather_to_rank0(rt.mesh, {0: list(engine.worker.trace)})
        placements = gather_to_rank0(rt.mesh, {0: eplb_state(rt.model)})
        with open(out, "w") as f:
            json.dump({"outputs": {i: [t for t, _, _ in e] for i, e in got.items()},
                       "logprobs": {i: [[lp, top] for _, lp, top in e] for i, e in got.items()},
                       "preemptions": preemptions, "bytes_read": read, "traces": traces,
                       "eplb": placements}, f)
    else:
        worker = follow_leader(rt.model, ecfg, rt.mesh)
        gather_to_rank0(rt.mesh, {rt.rank: list(worker.trace)})
        gather_to_rank0(rt.mesh, {rt.rank: eplb_state(rt.model)})
    return 0


if __name__ == "__main__":
    sys.exit(run_command("dist_worker", main))
