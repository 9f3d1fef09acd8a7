"""Run under torchrun by tests/test_eplb.py: one MoE layer under expert parallelism on
gloo, every rank with its own tokens (one rank with none). Checks, on every rank:

- the layer's EP path (device-side count exchange, expert ids riding in the rows) is
  bit-identical to the earlier path (host splits, a counts tensor, a separate all-to-all
  of the ids), written out below;
- with R redundant experts and a skewed placement the output equals the default
  placement's within 1e-5, on the torch and the Triton paths;
- after ``move_experts`` to another placement (weights moved between EP ranks) it still
  does.

    torchrun --nproc_per_node=N tests/dist_eplb_worker.py MODEL TP EP DP R OUT_JSON
"""
import json
import sys

import torch

from moerun import eplb, kernels
from moerun.config import ModelConfig
from moerun.entry import run_command
from moerun.mesh import DistComm, Mesh, gather_to_rank0
from moerun.model.moe import MoE
from moerun.model.placement import move_experts
from moerun.parallel import ParallelConfig
from moerun.weights import init_random


class One:
    """A model of one MoE layer, for init_random (same weights under every placement)."""

    def __init__(self, moe):
        self.moe = moe

    def specs(self):
        return self.moe.specs("model.layers.0.mlp")


def legacy_expert_parallel(moe, x_tH):
    """The EP path as it was: host splits, a counts tensor, the ids in their own all-to-all."""
    comm, E = moe.comm, moe.cfg.num_experts
    weights_tK, ids_tK = moe.route(x_tH)
    owner_E = kernels.contiguous_expert_ranks(E, comm.ep_size, x_tH.device)
    send, send_splits, meta = kernels.dispatch(x_tH, ids_tK, weights_tK, owner_E, num_ranks=comm.ep_size)
    send_splits = [int(n) for n in send_splits]
    recv_splits = comm.ep_exchange_counts(torch.tensor(send_splits)).tolist()
    recv_RH = comm.ep_all_to_all(send, send_splits, recv_splits)
    recv_ids_R = comm.ep_all_to_all(meta.expert_of_row, send_splits, recv_splits)
    ones_R1 = torch.ones(recv_RH.shape[0], 1, dtype=torch.float32)
    y_RH = kernels.fused_moe(recv_RH, moe.w13, moe.w2, ones_R1, recv_ids_R[:, None],
                             expert_start=moe.expert_start, num_local_experts=moe.num_local)
    back = comm.ep_all_to_all(y_RH, recv_splits, send_splits)
    return kernels.combine(back, meta)


def max_err(a, b) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


def skewed_load(E: int, layer_seed: int) -> list[int]:
    g = torch.Generator().manual_seed(layer_seed)
    load = torch.randint(0, 10, (E,), generator=g)
    load[torch.randperm(E, generator=g)[:2]] += 200  # two hot experts
    return load.tolist()


def main():
    model, tp, ep, dp, R, out = sys.argv[1:7]
    tp, ep, dp, R = int(tp), int(ep), int(dp), int(R)
    cfg = ModelConfig.load(model)
    E = cfg.num_experts
    base_par = ParallelConfig(tp=tp, ep=ep, dp=dp)
    mesh = Mesh.create(base_par, timeout_s=60, device="cpu")
    red_par = ParallelConfig(tp=tp, ep=ep, dp=dp, redundant_experts=R)
    red_mesh = Mesh(red_par, mesh.rank, mesh.coord, mesh.device, mesh.device_mesh, mesh.tp_group,
                    mesh.ep_group, mesh.ctrl, mesh.wake)
    place_a = eplb.plan_layer(skewed_load(E, 1), ep, R)
    place_b = eplb.plan_layer(skewed_load(E, 2), ep, R)
    default = MoE(cfg, DistComm(mesh), 0)
    placed = MoE(cfg, DistComm(red_mesh, {0: place_a}), 0)
    for m in (default, placed):
        m.requires_grad_(False)
        init_random(One(m), seed=3, std=0.15)
    T = 0 if mesh.rank == 1 else 3 + 2 * mesh.rank
    x_tH = torch.randn(T, cfg.hidden_size, generator=torch.Generator().manual_seed(mesh.rank))
    res = {"rank": mesh.rank, "T": T, "place_a": list(place_a), "local_a": list(placed.local_logical)}
    with torch.inference_mode():
        want = legacy_expert_parallel(default, x_tH)
        res["bit_identical"] = bool(torch.equal(default(x_tH), want))
        for impl in ("torch", "triton"):  # every rank runs every layer call: the EP all-to-all spans them
            kernels.set_default_impl(impl)
            res[f"placed_err_{impl}"] = max_err(placed(x_tH), default(x_tH))
        kernels.set_default_impl("torch")
        res["moved_bytes"] = move_experts(placed, place_b)
        res["local_b"] = list(placed.local_logical)
        ref = default(x_tH)
        res["moved_err"] = max_err(placed(x_tH), ref)
        res["ref_max"] = ref.abs().max().item() if T else 0.0
    got = gather_to_rank0(mesh, {mesh.rank: res})
    if mesh.rank == 0:
        with open(out, "w") as f:
            json.dump(got, f)
    return 0


if __name__ == "__main__":
    sys.exit(run_command("dist_eplb_worker", main))
