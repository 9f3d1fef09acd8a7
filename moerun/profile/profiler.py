"""The per-rank profiler: phase times per step, expert load, memory, request timings.

One ``Profiler`` per rank, owned by its ``StageWorker`` and passed explicitly down the
calls (``model(..., prof=prof)``); ``NULL_PROFILER`` is the default everywhere and does
nothing (its ``phase`` returns the one shared no-op ``NO_PHASE``; it counts no experts).
No globals: two profilers in one process never share state.

    prof = Profiler(torch.device("cpu"), rank=0, coord={"pp": 0, "dp": 0, "tp": 0, "ep": 0})
    prof.step_begin()                                # the tick loop (Engine.step, follow_leader)
    with prof.phase("attention"):                    # a name of moerun.plan.metrics.PHASES
        ...
    prof.count_experts(layer, ids_tK, num_experts)   # the router's choices
    prof.count_rows(layer, rows)                     # EP: rows this rank's experts computed
    prof.note_step(tick, tokens)                     # the worker ran tick ``tick``
    prof.step_end()                                  # one record in prof.steps
    prof.report(weights_bytes=..., kv_cache_bytes=...)   # plain data, for moerun.profile.summary

Time accounting: at any moment the time belongs to the innermost open phase, or to no
phase ("other"). A phase entered inside another (a TP all-gather inside the q/k norm,
inside "qkv") pauses the outer one, so the phases of a step never overlap and, with
"other", add up to the step's wall time. Each phase boundary is one mark: a
``time.perf_counter`` reading on CPU; on CUDA a recorded ``torch.cuda.Event``, all of a
step's resolved at ``step_end`` after one synchronize (never one per phase). On CUDA a
phase is GPU stream time between its marks, which for host-only work (a gloo broadcast)
is the host time when the stream is idle; the step's wall is host time including that
synchronize.

Memory per rank: weights (parameter bytes) and the KV cache (``KVCache.bytes()``), given
to ``report``; peak activations on CUDA are ``torch.cuda.max_memory_allocated`` (reset when
the profiler is built, after weights and cache are allocated) minus weights and KV cache.
On CPU there is no allocator counter, so the model notes groups of tensors that are live
together at its hot spots (``note_activation``: attention after the KV read, the MoE
block's rows, the logits); the peak is ACTIVATION_FACTOR x the largest group, the factor
standing for what is not noted (the residual stream, masks, kernel scratch such as the
experts' [slots, 2F] intermediate and the attention scores).

The leader's profiler also keeps each request's arrival, first and last token times and
token count (``request_added``, ``request_events``): TTFT, TPOT and end-to-end latency on
one clock. Its own cost: ``measure_overhead`` times one phase enter + exit, one
``count_experts`` and one ``note_activation`` on a scratch profiler; ``step_end`` times
itself (``bookkeeping_s``); ``moerun.profile.summary.overhead`` adds them up per rank.

Shape legend: t = this rank's tokens, K = top-k, E = experts.
"""
from __future__ import annotations

import time
from array import array
from collections import deque

import torch

from ..plan.metrics import PHASES

STEP_RECORDS = 10_000  # step records kept per rank, about 1 kB each (a ring buffer: a server runs for ever)
TIMELINE_STEPS = 1_000  # steps whose phase segments are kept for the trace, 24 bytes a segment
REQUEST_RECORDS = 100_000  # finished requests' timings kept on the leader
ACTIVATION_FACTOR = 2.0  # CPU peak activations = this x the largest noted group of live tensors


class _Phase:
    """The context manager of one phase name; stateless (the profiler keeps the stack),
    so one object per name serves every use, nested or not. The hot path: it works on
    the profiler's lists directly, one mark per boundary."""
    __slots__ = ("prof", "name")

    def __init__(self, prof: "Profiler", name: str):
        self.prof, self.name = prof, name

    def __enter__(self):
        p = self.prof
        if p._t0 is None:  # a phase outside the tick loop opens a step
            p.step_begin()
        p._stack.append(self.name)
        p._marks.append((p._clock(), self.name))

    def __exit__(self, *exc):
        p = self.prof
        stack = p._stack
        stack.pop()
        p._marks.append((p._clock(), stack[-1] if stack else None))  # the outer phase resumes
        return False


class _NoPhase:
    __slots__ = ()

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


NO_PHASE = _NoPhase()  # what a disabled profiler's phase() returns, every time


class NullProfiler:
    """Profiling off: every method does nothing; ``phase`` returns the shared NO_PHASE.
    Holds no state, so the one instance NULL_PROFILER is safe to share."""
    __slots__ = ()
    enabled = False

    def phase(self, name: str) -> _NoPhase:
        return NO_PHASE

    def count_experts(self, layer: int, ids_tK: torch.Tensor, num_experts: int) -> None:
        pass

    def external_marks(self, times: list[float], names: list) -> None:
        pass

    def note_activation(self, *tensors: torch.Tensor) -> None:
        pass

    def count_rows(self, layer: int, rows: int) -> None:
        pass

    def step_begin(self) -> None:
        pass

    def note_step(self, tick: int, tokens: int) -> None:
        pass

    def step_end(self) -> None:
        pass

    def request_added(self, req_id: int) -> None:
        pass

    def request_events(self, events) -> None:
        pass


NULL_PROFILER = NullProfiler()


class Profiler:
    enabled = True

    def __init__(self, device, rank: int = 0, coord: dict | None = None, *, reset_peak: bool = True):
        """``coord``: the rank's place in the layout ({"pp", "dp", "tp", "ep"}), for the
        report and the trace's track names. ``reset_peak``: restart CUDA's peak memory
        counter here (False for a scratch profiler that must not disturb it)."""
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.rank = rank
        self.coord = dict(coord or {"pp": 0, "dp": 0, "tp": 0, "ep": 0})
        self.steps: deque[tuple] = deque(maxlen=STEP_RECORDS)  # (tick, rank, stage, tokens, {phase: s}, wall_s)
        # (tick, epoch start, wall_s, segment phases, their offsets from the start and durations in s)
        self.timeline: deque[tuple] = deque(maxlen=TIMELINE_STEPS)
        self.totals = dict.fromkeys(PHASES, 0.0)  # over every step, not only those still in the ring buffer
        self.other_s = self.wall_s = 0.0
        self.bookkeeping_s = 0.0  # host time in step_end (resolving the marks, counting the experts)
        self.num_steps = self.phase_calls = self.count_calls = self.note_calls = 0
        self._phases = {name: _Phase(self, name) for name in PHASES}
        self._stack: list[str] = []
        self._marks: list[tuple] = []  # (clock reading or CUDA event, phase or None): the time from here is phase's
        self._t0: float | None = None  # host perf_counter at step_begin; None: no step open
        self._external = 0  # marks of the open step that external_marks added
        self._events: list = []  # CUDA: the event pool; the open step's marks use the first _used
        self._used = 0
        self._clock = self._cuda_mark if self.cuda else time.perf_counter
        self._epoch0 = 0.0
        self._tick: int | None = None
        self._tokens = 0
        self._pending_ids: list[tuple[int, torch.Tensor]] = []  # (global layer, ids_tK) of the open step
        self._num_experts: int | None = None
        self._expert_acc: torch.Tensor | None = None  # [layers seen so far, E] int64 on device, by global layer
        self._layers_seen: set[int] = set()
        self._ep_rows: dict[int, int] = {}  # global layer -> rows this rank's experts computed (EP)
        self._offsets: dict[tuple, torch.Tensor] = {}  # (layers, ids shape) -> [L, 1, 1] row offsets l*E
        self._act_bytes = 0
        self._requests: dict[int, list] = {}  # leader: rid -> [arrival, first token, last token, tokens]
        self._finished: deque[list] = deque(maxlen=REQUEST_RECORDS)
        if self.cuda and reset_peak:  # weights and KV cache are allocated by now: the peak above them is activations
            torch.cuda.reset_peak_memory_stats(self.device)

    # ------------------------------------------------------------- phases
    def phase(self, name: str) -> _Phase:
        try:
            return self._phases[name]
        except KeyError:
            raise ValueError(f"unknown profiler phase {name!r}: one of {', '.join(PHASES)}") from None

    def _cuda_mark(self) -> torch.cuda.Event:
        if self._used == len(self._events):  # events are reused from step to step: creating one costs more
            self._events.append(torch.cuda.Event(enable_timing=True))
        ev = self._events[self._used]
        self._used += 1
        ev.record()
        return ev

    def external_marks(self, times: list[float], names: list) -> None:
        """Phase boundaries timed elsewhere (a C loop over the layers): at ``times[i]``
        (``time.perf_counter`` seconds) phase ``names[i]`` began; None ends them, and the
        phase that was open before resumes."""
        if self.cuda:
            raise ValueError("external_marks: CPU clock readings, but this profiler times CUDA events")
        if self._t0 is None:
            self.step_begin()
        outer = self._stack[-1] if self._stack else None
        for t, name in zip(times, names):
            if name is not None and name not in self._phases:
                raise ValueError(f"unknown profiler phase {name!r}: one of {', '.join(PHASES)}")
            self._marks.append((t, name if name is not None else outer))
        self._external += len(times)  # not Python phase calls: the overhead estimate leaves them out

    # --------------------------------------------------------------- steps
    def step_begin(self) -> None:
        """Open a step (no-op when one is open: what ran before belongs to it)."""
        if self._t0 is not None:
            return
        self._epoch0, self._t0 = time.time(), time.perf_counter()
        self._used = 0  # the last step's events were resolved at its end: free to record again
        self._marks = [(self._clock(), None)]

    def note_step(self, tick: int, tokens: int) -> None:
        """The open step is tick ``tick`` of this rank, computing ``tokens`` tokens."""
        self._tick, self._tokens = tick, tokens

    def step_end(self) -> None:
        """Close the open step and record it; a step no tick was noted for (a follower's
        wait for the leader's stop message) is dropped."""
        if self._t0 is None:
            return
        t_book = time.perf_counter()
        self._flush_experts()
        end = self._clock()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - self._t0
        marks, tick = self._marks, self._tick
        marks.append((end, None))
        self._t0, self._tick, self._marks = None, None, []
        self.phase_calls += (len(marks) - 2 - self._external) // 2  # every enter and exit left one mark
        self._external = 0
        if tick is None:
            self.bookkeeping_s += time.perf_counter() - t_book
            return
        if self.cuda:
            durs = [a.elapsed_time(b) / 1e3 for (a, _), (b, _) in zip(marks, marks[1:])]
        else:
            durs = [b - a for (a, _), (b, _) in zip(marks, marks[1:])]
        phases: dict[str, float] = {}
        names, offs, lens, off = [], array("d"), array("d"), 0.0
        for (_, name), d in zip(marks, durs):
            if name is not None:
                phases[name] = phases.get(name, 0.0) + d
                names.append(name)
                offs.append(off)
                lens.append(d)
            off += d
        other = max(wall - sum(phases.values()), 0.0)
        for name, d in phases.items():
            self.totals[name] += d
        self.other_s += other
        self.wall_s += wall
        self.num_steps += 1
        self.steps.append((tick, self.rank, self.coord["pp"], self._tokens, phases, wall))
        self.timeline.append((tick, self._epoch0, wall, tuple(names), offs, lens))
        self.bookkeeping_s += time.perf_counter() - t_book

    # -------------------------------------------------------- expert load
    def count_experts(self, layer: int, ids_tK: torch.Tensor, num_experts: int) -> None:
        """Count the token-slots global layer ``layer`` routes to each expert. Only a
        reference is kept here; ``step_end`` counts the step's layers at once (one
        bincount per step, not a few ops per layer, and on CUDA no sync per layer)."""
        if self._num_experts is None:
            self._num_experts = num_experts
        elif num_experts != self._num_experts:
            raise ValueError(f"count_experts: {num_experts} experts, but earlier layers had {self._num_experts}")
        self.count_calls += 1
        self._pending_ids.append((layer, ids_tK))

    def _flush_experts(self) -> None:
        pend, self._pending_ids = self._pending_ids, []
        if not pend:
            return
        E, dev = self._num_experts, pend[0][1].device
        layers = [layer for layer, _ in pend]
        rows = max(layers) + 1
        if self._expert_acc is None or self._expert_acc.shape[0] < rows:
            acc = torch.zeros(rows, E, dtype=torch.int64, device=dev)
            if self._expert_acc is not None:
                acc[: self._expert_acc.shape[0]] = self._expert_acc
            self._expert_acc = acc
        self._layers_seen.update(layers)
        key = (tuple(layers), pend[0][1].shape)
        if all(ids.shape == key[1] for _, ids in pend):  # one forward per step: every layer routed the same t
            off = self._offsets.get(key)
            if off is None:  # the same layers every step: built once
                off = self._offsets[key] = torch.tensor(layers, device=dev).mul_(E).view(-1, 1, 1)
            flat = torch.stack([ids for _, ids in pend]).long().add_(off)  # layer l's ids -> l*E + id
        else:
            sizes = torch.tensor([ids.numel() for _, ids in pend], device=dev)
            flat = torch.cat([ids.reshape(-1) for _, ids in pend]).long()
            flat += torch.repeat_interleave(torch.tensor(layers, device=dev) * E, sizes)
        self._expert_acc.view(-1).add_(torch.bincount(flat.view(-1), minlength=self._expert_acc.numel()))

    def _expert_counts(self) -> dict[int, list[int]]:
        """Global layer -> token-slots per expert, for the MoE layers this rank routed."""
        acc = self._expert_acc.tolist() if self._expert_acc is not None else []
        return {layer: acc[layer] for layer in sorted(self._layers_seen)}

    def count_rows(self, layer: int, rows: int) -> None:
        """Rows (token-slots) the EP all-to-all brought to this rank's experts in global
        layer ``layer``: the measured load of this EP rank, replicas included (a host int,
        known after the count exchange: no sync)."""
        self._ep_rows[layer] = self._ep_rows.get(layer, 0) + rows

    # -------------------------------------------------------------- memory
    def note_activation(self, *tensors: torch.Tensor) -> None:
        """Tensors live at the same moment (CPU estimate; CUDA reads the allocator)."""
        if not self.cuda:
            self.note_calls += 1
            self._act_bytes = max(self._act_bytes, sum([t.nbytes for t in tensors]))

    # ------------------------------------------------- requests (the leader)
    def request_added(self, req_id: int) -> None:
        self._requests[req_id] = [time.perf_counter(), None, None, 0]

    def request_events(self, events) -> None:
        """The engine's TokenEvents of a step (``.req_id``, ``.token``, ``.finished``), on
        the leader's clock."""
        now = time.perf_counter()
        for ev in events:
            r = self._requests.get(ev.req_id)
            if r is None:
                continue
            if ev.token is not None:
                if r[1] is None:
                    r[1] = now
                r[2], r[3] = now, r[3] + 1
            if ev.finished:
                self._finished.append(self._requests.pop(ev.req_id))

    # --------------------------------------------------------------- report
    def report(self, weights_bytes: int, kv_cache_bytes: int) -> dict:
        """This rank's profile as plain data (picklable, JSON-able): the input of
        ``moerun.profile.summary``."""
        if self.cuda:
            peak_act = max(torch.cuda.max_memory_allocated(self.device) - weights_bytes - kv_cache_bytes, 0)
            device = f"cuda ({torch.cuda.get_device_name(self.device)})"
        else:
            peak_act, device = int(ACTIVATION_FACTOR * self._act_bytes), "cpu"
        self._flush_experts()  # ids counted outside a step (a model called without the tick loop)
        reqs = list(self._finished) + list(self._requests.values())
        return {
            "rank": self.rank, "coord": dict(self.coord), "device": device,
            "steps": self.num_steps, "phases_s": dict(self.totals), "other_s": self.other_s, "wall_s": self.wall_s,
            "phase_calls": self.phase_calls, "count_calls": self.count_calls, "note_calls": self.note_calls,
            "bookkeeping_s": self.bookkeeping_s,
            "experts": self._expert_counts(),
            "ep_rows": dict(sorted(self._ep_rows.items())),
            "memory": {"weights_bytes": weights_bytes, "kv_cache_bytes": kv_cache_bytes,
                       "peak_activation_bytes": peak_act,
                       "peak_total_bytes": weights_bytes + kv_cache_bytes + peak_act},
            "requests": [{"arrival": a, "first": f, "last": la, "tokens": n} for a, f, la, n in reqs],
            "timeline": [[tick, start, wall, list(names), offs.tolist(), lens.tolist()]
                         for tick, start, wall, names, offs, lens in self.timeline],
            "overhead": measure_overhead(self.device),
        }


def measure_overhead(device, n: int = 2000) -> dict:
    """Host seconds of one phase enter + exit, one ``count_experts`` and one
    ``note_activation`` call, measured on a scratch profiler of the same device (warm, in a
    tight loop: a lower bound). ``step_end``'s own time is measured in the run
    (``bookkeeping_s``)."""
    p = Profiler(device, reset_peak=False)
    x = torch.zeros(8, 2, dtype=torch.int32, device=p.device)
    ph = p.phase("norm")
    for _ in range(2):  # the second step times it: CUDA's event pool is full by then, as in a run
        p.step_begin()
        t0 = time.perf_counter()
        for _ in range(n):
            with ph:
                pass
        phase_s = time.perf_counter() - t0
        p.step_end()
    t1 = time.perf_counter()
    for _ in range(n):
        p.count_experts(0, x, 8)
    t2 = time.perf_counter()
    for _ in range(n):
        p.note_activation(x, x, x, x)
    t3 = time.perf_counter()
    return {"phase_call_s": phase_s / n, "count_call_s": (t2 - t1) / n, "note_call_s": (t3 - t2) / n}
