"""DeepSpeed's MoE layer beside moerun's MoE layer, on the same weights and the same tokens,
at one expert-parallel degree; run by ``scripts/bench.py --section peers`` under torchrun:

    LOCAL_SIZE=2 torchrun --nproc_per_node=2 scripts/peer_deepspeed.py OUT.json [--tokens 64] [--iters 20]

Both layers hold the same router and the same SwiGLU experts (moerun's tiny-preset shape:
E = 64 experts, top-2, H = 128, F = 256, random weights from one seed), split over the EP
ranks the same way (rank r holds experts [r E/ep, (r+1) E/ep)), and each rank feeds its own
tokens, as data-parallel ranks do. DeepSpeed computes the same function only under these
conditions, which the output prints: ``drop_tokens=False`` (no capacity limit),
``use_rts=False`` (no random token selection), ``top2_2nd_expert_sampling=False`` (the second
expert is the argmax, not sampled), k = 2 with its gates renormalised over the two (moerun's
``norm_topk_prob=True``, Mixtral's rule), ``LOCAL_SIZE`` set, which torchrun does not set, and
``set_deepspeed_parallelism()`` called on the layer, which ``deepspeed.initialize`` would do:
without it the gate has no EP group, the ranks' capacities disagree and gloo's all-to-all fails
on mismatched sizes from EP 4 on.

Rank 0 writes {ep, tokens_per_rank, max_abs_diff, max_abs_output, moerun_ms, deepspeed_ms,
conditions} to OUT.json: the largest |moerun - DeepSpeed| over every rank's output (beside
the largest |output|, its scale), and the median wall
time of one forward of each layer (after a warm-up), measured on this CPU on gloo.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

from moerun.config import ModelConfig
from moerun.mesh import DistComm, Mesh, gather_to_rank0
from moerun.model.moe import MoE
from moerun.parallel import ParallelConfig

CONDITIONS = ("drop_tokens=False", "use_rts=False", "top2_2nd_expert_sampling=False", "k=2, gates renormalised",
              "capacity_factor=1.0 (unused without dropping)", "LOCAL_SIZE set by the launcher",
              "set_deepspeed_parallelism() called (no deepspeed.initialize engine)")


class SwiGLU(nn.Module):
    """One expert as DeepSpeed takes it (a module): down(silu(gate(x)) * up(x))."""

    def __init__(self, H: int, F: int):
        super().__init__()
        self.gate = nn.Linear(H, F, bias=False)
        self.up = nn.Linear(H, F, bias=False)
        self.down = nn.Linear(F, H, bias=False)

    def forward(self, x):
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


def timed(fn, iters: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(iters):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


@torch.inference_mode()
def main() -> None:
    import deepspeed
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per rank")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    ep = dist.get_world_size()
    cfg = ModelConfig.load("tiny").replace(norm_topk_prob=True, num_layers=1, moe_layers=(True,),
                                           sliding_windows=(0,))
    E, H, F = cfg.num_experts, cfg.hidden_size, cfg.moe_ffn
    par = ParallelConfig(tp=1, pp=1, ep=ep, dp=ep)
    mesh = Mesh.create(par, timeout_s=120, device="cpu")
    ours = MoE(cfg, DistComm(mesh), 0, torch.float32)
    g = torch.Generator().manual_seed(0)  # the full weights, the same on every rank
    router = torch.randn(E, H, generator=g) * 0.1
    w_gate, w_up = torch.randn(E, F, H, generator=g) * 0.05, torch.randn(E, F, H, generator=g) * 0.05
    w_down = torch.randn(E, H, F, generator=g) * 0.05
    mine = par.experts_of(mesh.coord.ep_rank, E)
    ours.gate.weight.copy_(router)
    ours.w13.copy_(torch.cat([w_gate[mine.start:mine.stop], w_up[mine.start:mine.stop]], dim=1))
    ours.w2.copy_(w_down[mine.start:mine.stop])

    theirs = DeepSpeedMoE(hidden_size=H, expert=SwiGLU(H, F), num_experts=E, ep_size=ep, k=2,
                          capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0, drop_tokens=False,
                          use_rts=False, top2_2nd_expert_sampling=False).eval()
    theirs.set_deepspeed_parallelism()  # deepspeed.initialize would; without it the gate has no EP group
    theirs.deepspeed_moe.gate.wg.weight.copy_(router)
    for j, expert in enumerate(theirs.deepspeed_moe.experts.deepspeed_experts):  # its local experts, in order
        e = mine.start + j
        expert.gate.weight.copy_(w_gate[e])
        expert.up.weight.copy_(w_up[e])
        expert.down.weight.copy_(w_down[e])

    x = torch.randn(args.tokens, H, generator=torch.Generator().manual_seed(100 + dist.get_rank()))
    y_ours, y_theirs = ours(x), theirs(x[None])[0][0]
    diff, scale = (y_ours - y_theirs).abs().max().item(), y_ours.abs().max().item()
    ms_ours = timed(lambda: ours(x), args.iters)
    ms_theirs = timed(lambda: theirs(x[None]), args.iters)
    got = gather_to_rank0(mesh, {dist.get_rank(): (diff, ms_ours, ms_theirs, scale)})
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"ep": ep, "tokens_per_rank": args.tokens, "max_abs_diff": max(v[0] for v in got.values()),
                       "max_abs_output": max(v[3] for v in got.values()),
                       "moerun_ms": statistics.median(v[1] for v in got.values()),
                       "deepspeed_ms": statistics.median(v[2] for v in got.values()),
                       "deepspeed_version": deepspeed.__version__, "conditions": list(CONDITIONS)}, f)
    dist.barrier()


if __name__ == "__main__":
    main()
