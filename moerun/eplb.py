"""Expert-parallel load balancing (EPLB): physical experts, their placement on EP ranks,
the placement algorithm, and the expert-load file. Pure Python, no torch: the runtime,
``moerun layout`` and the planner share it.

    phys = plan_layer(load_E, ep=4, redundant=4)     # physical slot -> logical expert, E + R slots
    rank_loads(load_E, phys, ep=4)                   # expected token-slots per EP rank
    balance(rank_loads(...))                         # mean / max, 1.0 = perfectly balanced
    load = read_load("load.json", cfg)               # {global layer: [E counts]}, validated
    write_load("load.json", cfg, load)

Physical experts: a MoE layer holds ``P = E + R`` physical experts per EP group (R, the
redundant experts, must keep ``P % ep == 0``); slot p lives on EP rank ``p // (P / ep)``
(each rank holds a contiguous block of slots, so the kernels' ``expert_start`` /
``num_local_experts`` are unchanged) and holds a copy of logical expert ``phys[p]``. A
token-slot routed to logical expert e goes to one of e's replicas, spread evenly (see
``moerun.model.moe``). The default placement (R = 0, no load) is the contiguous split:
``phys = (0, 1, ..., E-1)``.

The algorithm (after DeepSeek's EPLB): give each logical expert one replica, then the R
extra replicas one by one, each to the expert (of the few with the most load per replica)
whose resulting packing has the lowest maximum rank load; packing puts the physical
experts, heaviest first, onto the EP rank with the least load that still has a free slot
(and, when it can, no copy of that expert yet). With ``gpus_per_node`` smaller
than ep (EP spans nodes) it is hierarchical: logical experts are first packed onto nodes
(E / nodes each), then replicated and packed inside each node, so every replica of an
expert stays on its node. A plan is never worse than the contiguous split: when greedy
packing lands above it (possible on hand-made loads), the contiguous split is kept (with
each rank's extra slots copying its own hottest experts).

Load file (JSON): ``{"format": "moerun-expert-load", "version": 1, "model": name,
"num_layers": L, "num_experts": E, "counts": [[int] * E] * L}`` (one row per model
layer, zeros for dense layers). A ``moerun --profile-out`` summary.json (its
``expert_load.per_layer``, one row per MoE layer) is read as well.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

LOAD_FORMAT = "moerun-expert-load"
LOAD_VERSION = 1


class EPLBError(ValueError):
    """Invalid redundant experts, placement or load file; the message names the rule."""


# ------------------------------------------------------------------ rules
def redundant_problems(num_experts: int, ep: int, redundant: int) -> list[str]:
    """Every rule ``--redundant-experts`` breaks for E experts over ep ranks."""
    if not isinstance(redundant, int) or redundant < 0:
        return [f"redundant experts: --redundant-experts {redundant!r} must be an integer >= 0"]
    p = []
    if (num_experts + redundant) % ep:
        p.append(f"redundant experts: num_experts + R = {num_experts} + {redundant} = {num_experts + redundant} "
                 f"physical experts must be divisible by ep ({ep}); pick R so that (E + R) % ep == 0")
    if ep > 1 and redundant > num_experts * (ep - 1):
        p.append(f"redundant experts: R ({redundant}) above E * (ep - 1) = {num_experts * (ep - 1)} would put "
                 f"two copies of an expert on one rank even if every rank held every expert")
    return p


def nodes_of(ep: int, gpus_per_node: int | None) -> int:
    """Nodes an EP group spans (1 when it fits in a node or the node size is unknown)."""
    if not gpus_per_node or ep <= gpus_per_node:
        return 1
    if ep % gpus_per_node:
        raise EPLBError(f"--gpus-per-node {gpus_per_node} must divide ep ({ep}) for hierarchical placement")
    return ep // gpus_per_node


# ------------------------------------------------------------- placement
def contiguous(num_experts: int) -> tuple[int, ...]:
    """The default placement: R = 0, EP rank r holds experts [r*E/ep, (r+1)*E/ep)."""
    return tuple(range(num_experts))


@functools.lru_cache(maxsize=256)
def default_placement(num_experts: int, ep: int, redundant: int) -> tuple[int, ...]:
    """A layer's placement when no load was measured: the contiguous split for R = 0,
    else the plan of a uniform load."""
    return contiguous(num_experts) if redundant == 0 else plan_layer([1.0] * num_experts, ep, redundant)


def replicate(load_E: list[float], redundant: int) -> list[int]:
    """Replicas per logical expert: one each, then each extra one to the expert with the
    largest load per replica (ties: the lower id)."""
    reps = [1] * len(load_E)
    for _ in range(redundant):
        e = max(range(len(load_E)), key=lambda i: (load_E[i] / reps[i], -i))
        reps[e] += 1
    return reps


def pack(items: list[tuple[float, int]], num_bins: int, capacity: int) -> list[list[int]]:
    """Greedy balanced packing: ``items`` (weight, logical id), heaviest first (ties: lower
    id), each onto the least-loaded bin with room, preferring a bin without that id (ties:
    the lower bin). Returns the ids of each bin, sorted."""
    return _pack(items, num_bins, capacity)[0]


def _pack(items, num_bins, capacity):
    assert len(items) <= num_bins * capacity, "more physical experts than slots"
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    loads = [0.0] * num_bins
    for w, e in sorted(items, key=lambda it: (-it[0], it[1])):
        room = [b for b in range(num_bins) if len(bins[b]) < capacity]
        fresh = [b for b in room if e not in bins[b]] or room
        b = min(fresh, key=lambda i: (loads[i], i))
        bins[b].append(e)
        loads[b] += w
    return [sorted(b) for b in bins], loads


LOOKAHEAD = 4  # candidates (most load per replica) a replica is tried on, by packing each


def _replicate_and_pack(experts: list[int], load_E: list[float], redundant: int, ranks: int,
                        slots: int) -> list[list[int]]:
    """Replicas for ``experts`` and their packing onto ``ranks``. Each extra replica goes to
    the candidate (of the LOOKAHEAD with the most load per replica) whose packing has the
    lowest maximum rank load; ties go to the most load per replica. (Giving it simply to
    the most load per replica can leave pieces that do not split over the ranks: two hot
    experts with 3 copies each on 4 ranks put two pieces on two of them.)"""
    load = [load_E[e] for e in experts]
    reps = [1] * len(experts)

    def packed(reps):
        items = [(load[i] / r, e) for i, (e, r) in enumerate(zip(experts, reps)) for _ in range(r)]
        bins, loads = _pack(items, ranks, slots)
        return bins, max(loads)
    for _ in range(redundant):
        order = sorted(range(len(experts)), key=lambda i: (-load[i] / reps[i], i))[:LOOKAHEAD]
        best = None
        for i in order:
            trial = reps[:i] + [reps[i] + 1] + reps[i + 1:]
            cost = packed(trial)[1]
            if best is None or cost < best[0] - 1e-12:
                best = (cost, i)
        reps[best[1]] += 1
    return packed(reps)[0]


def plan_layer(load_E: list[float], ep: int, redundant: int = 0,
               gpus_per_node: int | None = None) -> tuple[int, ...]:
    """Physical slot -> logical expert (E + R slots, rank-major) for one layer's load."""
    E = len(load_E)
    problems = redundant_problems(E, ep, redundant)
    if problems:
        raise EPLBError("; ".join(problems))
    if any(x < 0 for x in load_E):
        raise EPLBError("expert load must be non-negative")
    load_E = [float(x) for x in load_E]
    slots = (E + redundant) // ep
    nodes = nodes_of(ep, gpus_per_node)
    if nodes > 1 and (E % nodes or redundant % nodes):
        raise EPLBError(f"hierarchical placement over {nodes} nodes needs num_experts ({E}) and R ({redundant}) "
                        f"divisible by the node count; set --gpus-per-node so that it is, or leave it out")
    if nodes == 1:
        per_rank = _replicate_and_pack(list(range(E)), load_E, redundant, ep, slots)
    else:
        groups = pack([(load_E[e], e) for e in range(E)], nodes, E // nodes)
        g = ep // nodes
        per_rank = [r for grp in groups
                    for r in _replicate_and_pack(grp, load_E, redundant // nodes, g, slots)]
    phys = tuple(e for r in per_rank for e in r)
    base = _contiguous_with_replicas(load_E, ep, redundant)
    if base is not None and max(rank_loads(load_E, base, ep)) < max(rank_loads(load_E, phys, ep)):
        return base
    return phys


def _contiguous_with_replicas(load_E: list[float], ep: int, redundant: int) -> tuple[int, ...] | None:
    """The contiguous split, each rank's R/ep extra slots copying its own hottest experts:
    its rank loads equal the contiguous split's. None when E or R does not split over ep."""
    E = len(load_E)
    if E % ep or redundant % ep:
        return None
    n, extra = E // ep, redundant // ep
    out = []
    for r in range(ep):
        mine = list(range(r * n, (r + 1) * n))
        reps = replicate([load_E[e] for e in mine], extra)
        out += [e for e, k in zip(mine, reps) for _ in range(k)]
    return tuple(out)


def plan(load: dict[int, list[float]], ep: int, redundant: int = 0,
         gpus_per_node: int | None = None) -> dict[int, tuple[int, ...]]:
    """``plan_layer`` for every layer of ``load`` ({global layer: [E]})."""
    return {layer: plan_layer(row, ep, redundant, gpus_per_node) for layer, row in load.items()}


def check_placement(phys: tuple[int, ...], num_experts: int, ep: int) -> None:
    """A placement covers every logical expert and fills every rank's slots evenly."""
    if len(phys) % ep or len(phys) < num_experts:
        raise EPLBError(f"a placement needs E + R physical slots divisible by ep ({ep}); got {len(phys)}")
    missing = sorted(set(range(num_experts)) - set(phys))
    if missing or any(not 0 <= e < num_experts for e in phys):
        raise EPLBError(f"a placement must hold every logical expert in [0, {num_experts}) at least once; "
                        f"missing {missing[:10]}")


# ---------------------------------------------------------------- balance
def replicas(phys: tuple[int, ...], num_experts: int) -> list[list[int]]:
    """Logical expert -> its physical slots, in slot order."""
    out: list[list[int]] = [[] for _ in range(num_experts)]
    for p, e in enumerate(phys):
        out[e].append(p)
    return out


def rank_loads(load_E: list[float], phys: tuple[int, ...], ep: int) -> list[float]:
    """Token-slots per EP rank when each expert's slots spread evenly over its replicas."""
    reps = replicas(phys, len(load_E))
    per = len(phys) // ep
    out = [0.0] * ep
    for e, slots in enumerate(reps):
        for p in slots:
            out[p // per] += load_E[e] / len(slots)
    return out


def balance(loads: list[float]) -> float:
    """mean / max of per-rank loads: 1.0 is perfect, 1/ep is everything on one rank."""
    m = max(loads, default=0.0)
    return sum(loads) / len(loads) / m if m > 0 else 1.0


def summed_rank_loads(load: dict[int, list[float]], placement: dict[int, tuple[int, ...]] | None,
                      ep: int) -> list[float]:
    """Per-rank token-slots summed over the layers (placement None: contiguous)."""
    out = [0.0] * ep
    for layer, row in load.items():
        phys = placement[layer] if placement else contiguous(len(row))
        for r, x in enumerate(rank_loads(row, phys, ep)):
            out[r] += x
    return out


def layer_balance(load: dict[int, list[float]], placement: dict[int, tuple[int, ...]] | None,
                  ep: int) -> float:
    """Mean over the layers of each layer's balance (a step waits for the busiest rank
    of every layer in turn, so each layer's own max counts)."""
    bs = [balance(rank_loads(row, placement[layer] if placement else contiguous(len(row)), ep))
          for layer, row in load.items() if sum(row) > 0]
    return sum(bs) / len(bs) if bs else 1.0


# ---------------------------------------------------------- weight moves
def transfers(old: tuple[int, ...], new: tuple[int, ...], ep: int) -> list[tuple[int, int, int, int]]:
    """Moves from placement ``old`` to ``new`` of one layer (same P): ``(src rank, src local
    slot, dst rank, dst local slot)`` for every new slot, a local copy when src == dst.
    The source is the destination itself when it already held the expert, else one of the
    old holders, chosen round-robin by destination. Sorted by (src, dst, dst slot): the
    row order of the weight all-to-all on both sides."""
    assert len(old) == len(new) and len(old) % ep == 0
    per = len(old) // ep
    holders: dict[int, list[int]] = {}
    for p, e in enumerate(old):
        holders.setdefault(e, []).append(p)
    out = []
    for q, e in enumerate(new):
        d, j = divmod(q, per)
        own = [p for p in holders[e] if p // per == d]
        if own:
            src = own[0]
        else:
            ranks = sorted({p // per for p in holders[e]})
            s = ranks[(d + j) % len(ranks)]
            src = next(p for p in holders[e] if p // per == s)
        out.append((src // per, src % per, d, j))
    return sorted(out, key=lambda m: (m[0], m[2], m[3]))


# -------------------------------------------------------------- load file
def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_load(path: str | Path, cfg) -> dict[int, list[int]]:
    """The expert load of ``path`` for model ``cfg`` (a ModelConfig): {global MoE layer:
    [E] token-slot counts}. Raises EPLBError naming the broken rule."""
    where = f"--eplb-load {path}"
    try:
        with open(path) as f:
            obj = json.load(f)
    except OSError as e:
        raise EPLBError(f"{where}: cannot read it ({e})") from None
    except json.JSONDecodeError as e:
        raise EPLBError(f"{where}: not JSON ({e}); write it with --expert-load-out or --profile-out") from None
    if not isinstance(obj, dict):
        raise EPLBError(f"{where}: must be a JSON object with \"counts\" (or a profile summary.json)")
    moe = [i for i, m in enumerate(cfg.moe_layers) if m]
    E = cfg.num_experts
    if "expert_load" in obj and "counts" not in obj:  # a profile summary.json
        rows = (obj["expert_load"] or {}).get("per_layer") if isinstance(obj["expert_load"], dict) else None
        if not isinstance(rows, list) or len(rows) != len(moe):
            raise EPLBError(f"{where}: a profile summary needs expert_load.per_layer with one row per MoE layer "
                            f"({len(moe)}); profile a run of the whole model")
        counts = dict(zip(moe, rows))
    else:
        if obj.get("format") != LOAD_FORMAT:
            raise EPLBError(f"{where}: \"format\" must be {LOAD_FORMAT!r}, got {obj.get('format')!r}")
        if obj.get("num_layers") != cfg.num_layers:
            raise EPLBError(f"{where}: num_layers {obj.get('num_layers')!r} must equal the model's {cfg.num_layers}")
        if obj.get("num_experts") != E:
            raise EPLBError(f"{where}: num_experts {obj.get('num_experts')!r} must equal the model's {E}")
        rows = obj.get("counts")
        if not isinstance(rows, list) or len(rows) != cfg.num_layers:
            raise EPLBError(f"{where}: counts must be a [num_layers={cfg.num_layers}, num_experts={E}] matrix")
        counts = {i: rows[i] for i in moe}
        if any(_is_count(x) and x for i, r in enumerate(rows) if i not in moe and isinstance(r, list) for x in r):
            raise EPLBError(f"{where}: counts of dense (non-MoE) layers must be zero")
    for layer, row in counts.items():
        if not isinstance(row, list) or len(row) != E:
            raise EPLBError(f"{where}: layer {layer} must have num_experts = {E} counts, got "
                            f"{len(row) if isinstance(row, list) else type(row).__name__}")
        if not all(_is_count(x) for x in row):
            raise EPLBError(f"{where}: layer {layer}: counts must be non-negative integers")
    return {layer: list(row) for layer, row in counts.items()}


def write_load(path: str | Path, cfg, load: dict[int, list[int]], model: str | None = None) -> None:
    """Write ``load`` ({global layer: [E]}) in the load-file format."""
    rows = [list(map(int, load.get(i, [0] * cfg.num_experts))) for i in range(cfg.num_layers)]
    obj = {"format": LOAD_FORMAT, "version": LOAD_VERSION, "model": model or cfg.name or cfg.model_type,
           "num_layers": cfg.num_layers, "num_experts": cfg.num_experts, "counts": rows}
    try:
        with open(path, "w") as f:
            json.dump(obj, f)
    except OSError as e:
        raise EPLBError(f"--expert-load-out {path}: cannot write it ({e})") from None
