"""Physical experts at run time: the logical -> physical map of a MoE layer's token-slots
and the weight moves that change a layer's placement. The placement and its algorithm
are ``moerun.eplb``; the dynamic re-planner is ``moerun.model.rebalance``.

    rmap = ReplicaMap(phys, num_experts, device)
    pids_tK = rmap(ids_tK, offset)          # logical -> physical expert ids, replicas spread evenly
    move_experts(moe, new_phys)             # this EP group's weights follow a new placement

Spreading: the j-th token-slot (in slot order) routed to logical expert e with r replicas
goes to replica ``(j + offset) % r``: within a step e's slots split evenly over its
replicas (sizes differ by at most one); ``offset`` (the layer's step count plus the EP
rank) rotates which replica takes the extra slot, so small decode steps spread too. Any
choice computes the same output: every replica holds a copy of e's weights.

Shape legend: t = this rank's tokens, K = top-k, E = logical experts, J = most replicas of
one expert, P = physical experts (E + R).
"""
from __future__ import annotations

import torch

from .. import eplb


class ReplicaMap:
    """Logical expert ids -> physical slot ids for one placement ``phys``."""

    def __init__(self, phys: tuple[int, ...], num_experts: int, device=None):
        reps = eplb.replicas(phys, num_experts)
        self.identity = tuple(phys) == tuple(range(num_experts))
        self.single = all(len(r) == 1 for r in reps)  # a permutation: no spreading needed
        J = max(len(r) for r in reps)
        self.table_EJ = torch.tensor([r + [r[0]] * (J - len(r)) for r in reps], dtype=torch.int32, device=device)
        self.num_rep_E = torch.tensor([len(r) for r in reps], dtype=torch.long, device=device)
        self.num_experts = num_experts

    def __call__(self, ids_tK: torch.Tensor, offset: int = 0) -> torch.Tensor:
        if self.identity:
            return ids_tK
        flat_S = ids_tK.reshape(-1).long()
        if self.single:
            return self.table_EJ[flat_S, 0].view(ids_tK.shape)
        S = flat_S.numel()
        order_S = torch.argsort(flat_S, stable=True)  # slots grouped by expert, in slot order
        count_E = torch.bincount(flat_S, minlength=self.num_experts)
        start_E = torch.cumsum(count_E, 0) - count_E
        occ_S = torch.empty_like(flat_S)
        occ_S[order_S] = torch.arange(S, device=flat_S.device) - start_E[flat_S[order_S]]
        j_S = (occ_S + offset) % self.num_rep_E[flat_S]
        return self.table_EJ[flat_S, j_S].view(ids_tK.shape)


def move_experts(moe, new_phys: tuple[int, ...]) -> int:
    """Re-place ``moe``'s physical experts as ``new_phys`` (same E + R), moving the expert
    weights this EP rank lacks from the old holders with one all-to-all in the EP group
    (every rank of the group calls it with the same ``new_phys``); slots that keep their
    expert are not touched. Returns the bytes this rank received."""
    comm, me, ep = moe.comm, moe.comm.ep_rank, moe.comm.ep_size
    eplb.check_placement(new_phys, moe.cfg.num_experts, ep)
    moves = eplb.transfers(moe.phys, tuple(new_phys), ep)
    tensors = moe.expert_tensors()  # w13 [P_l, H, 2F], w2 [P_l, F, H] (contiguous), and any biases
    dev = tensors[0].device

    def index(xs):
        return torch.tensor(xs, dtype=torch.long, device=dev)
    out = [ss for s, ss, d, _ in moves if s == me and d != me]  # sorted by (dst rank, dst slot)
    send_splits = [sum(1 for s, _, d, _ in moves if s == me and d == r != me) for r in range(ep)]
    recv_splits = [sum(1 for s, _, d, _ in moves if d == me and s == r != me) for r in range(ep)]
    sizes = [t[0].numel() for t in tensors]
    send = torch.cat([t[index(out)].flatten(1) for t in tensors], dim=1)  # [rows, sum of sizes]
    recv = comm.ep_all_to_all(send, send_splits, recv_splits)
    local = [(ss, ds) for s, ss, d, ds in moves if s == me == d and ss != ds]
    if local:  # gather first: a source slot may itself be overwritten
        src, dst = index([ss for ss, _ in local]), index([ds for _, ds in local])
        gathered = [t[src] for t in tensors]
        for t, g in zip(tensors, gathered):
            t[dst] = g
    dst = [ds for s, _, d, ds in moves if d == me != s]  # sorted by (src rank, dst slot): the recv order
    if dst:
        for t, part in zip(tensors, recv.split(sizes, dim=1)):
            t[index(dst)] = part.reshape((len(dst),) + tuple(t.shape[1:]))
    moe.set_placement(tuple(new_phys))
    return recv.numel() * recv.element_size()
