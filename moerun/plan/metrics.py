"""The note's six metrics, each with one definition that the planner's projection, the
profiler's measurement and the claims checker all use. No torch.

    tpot_ms(decode_s, decode_tokens)            # latency: time per output token after the first
    throughput(output_tokens, wall_s)           # output tokens/s of all replicas
    comm_overhead(comm_s, compute_s)            # communication time / compute time
    comm_share(comm_s, wall_s)                  # communication time / wall time
    load_balance([tokens per EP rank])          # mean / max (1 = perfect)
    utilization(compute_s, wall_s)              # time in compute phases / wall time
    memory_per_gpu([peak bytes per rank])       # the fullest rank

Definitions (the units are those of ``METRIC_UNITS``, which ``moerun.plan.claims`` reads):
- latency: TPOT, the decode time per output token of one sequence: a sequence's time from
  its first output token to its last, over (output tokens - 1). Also reported: TTFT
  (arrival to first token) and end-to-end time per request.
- throughput: output tokens of all replicas / wall time of the run.
- comm_overhead: time in communication phases (TP collectives, EP all-to-alls, pipeline
  send/recv waits) / time in compute phases, summed over the ranks; comm_share is the same
  communication time over the ranks' wall time.
- load_balance: mean / max of the token-slots each EP rank receives, summed over the MoE
  layers of a step and over the run; expert_balance is the same over the experts.
- utilization: time in compute phases / wall time, per rank, averaged over ranks.
- memory_per_gpu: peak bytes of the fullest rank (weights + KV cache + activations).
"""
from __future__ import annotations

from collections.abc import Sequence

COMPUTE_PHASES = ("embedding", "qkv", "attention", "o_proj", "router", "dispatch", "experts", "combine",
                  "dense_mlp", "norm", "lm_head", "sampling")
COMM_PHASES = ("tp_collective", "ep_all_to_all", "pp_send_recv")
CONTROL_PHASES = ("schedule",)  # the leader's scheduling and the control plane
PHASES = COMPUTE_PHASES + COMM_PHASES + CONTROL_PHASES

# metric -> (unit, which way is better)
METRIC_UNITS = {
    "latency": ("ms", "lower"),
    "throughput": ("tok/s", "higher"),
    "comm_overhead": ("%", "lower"),
    "load_balance": ("%", "higher"),
    "gpu_utilization": ("%", "higher"),
    "memory_per_gpu": ("GB", "lower"),
}


def tpot_ms(decode_s: float, decode_tokens: int) -> float | None:
    """Decode seconds over the tokens after the first, in ms; None without such tokens."""
    return 1e3 * decode_s / decode_tokens if decode_tokens > 0 else None


def throughput(output_tokens: int, wall_s: float) -> float:
    return output_tokens / wall_s if wall_s > 0 else 0.0


def comm_overhead(comm_s: float, compute_s: float) -> float:
    """Communication / compute time (may exceed 1)."""
    return comm_s / compute_s if compute_s > 0 else 0.0


def comm_share(comm_s: float, wall_s: float) -> float:
    return comm_s / wall_s if wall_s > 0 else 0.0


def load_balance(loads: Sequence[float]) -> float:
    """mean / max of the loads (1 = perfectly even; 1 as well when nothing was routed)."""
    loads = list(loads)
    top = max(loads, default=0)
    return (sum(loads) / len(loads)) / top if top > 0 else 1.0


def utilization(compute_s: float, wall_s: float) -> float:
    return compute_s / wall_s if wall_s > 0 else 0.0


def memory_per_gpu(peak_bytes: Sequence[int]) -> int:
    return max(peak_bytes, default=0)
