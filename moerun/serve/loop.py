"""EngineLoop: the leader's engine driven for a server. It runs in the main thread of
rank 0 (the collectives and the signal handlers live there); the HTTP handlers, in the
server's event loop thread, talk to it only through ``submit`` / ``abort`` and the
asyncio queue each request gets.

    loop = EngineLoop(engine, on_step=metrics_update)
    handle = loop.submit(prompt_ids, params, asyncio_loop)   # -> RequestHandle (thread-safe)
    ev = await handle.queue.get()      # Accepted, then TokenEvent..., or Failed
    loop.abort(handle)                 # client gone, stop string: frees its KV blocks
    loop.run()                         # main thread: until drained or failed

Between engine steps the loop takes new requests and aborts, and when nothing is in
flight it sleeps on a condition: an idle server ticks no step and sends nothing over the
control group. ``drain(timeout_s)`` refuses new requests, lets the ones in flight
finish, and after the timeout aborts what is left (their clients get an error). An
exception in a step (a peer rank died, a collective timed out) fails every request in
flight with ``Failed`` and is re-raised from ``run``: the process then exits non-zero.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ..engine import Engine, TokenEvent
from ..options import SamplingParams

log = logging.getLogger("moerun")
IDLE_WAIT_S = 0.5  # an idle loop wakes this often only to look at the drain flag


@dataclass(frozen=True)
class Accepted:
    """The engine took the request (it passed the engine's own checks)."""
    req_id: int


@dataclass(frozen=True)
class Failed:
    """The request cannot complete: ``status`` 400 (the engine refused it), 503 (drained
    or shutting down) or 500 (the engine failed)."""
    status: int
    message: str


@dataclass
class RequestHandle:
    prompt: list[int]
    params: SamplingParams
    queue: asyncio.Queue
    aio: asyncio.AbstractEventLoop
    req_id: int | None = None
    done: bool = False
    arrival: float = field(default_factory=time.monotonic)

    def put(self, item) -> None:
        """From the engine thread: hand an event to the request's handler."""
        self.aio.call_soon_threadsafe(self.queue.put_nowait, item)


def _deliver(items) -> None:
    for queue, ev in items:
        queue.put_nowait(ev)


class EngineLoop:
    def __init__(self, engine: Engine, on_step: Callable[["EngineLoop", list[TokenEvent]], None] | None = None):
        self.engine = engine
        self.on_step = on_step
        self.cond = threading.Condition()
        self.pending: list[RequestHandle] = []  # submitted, not yet given to the engine
        self.aborts: list[RequestHandle] = []
        self.live: dict[int, RequestHandle] = {}  # engine request id -> handle
        self.draining = False
        self.drain_deadline: float | None = None
        self.failed: BaseException | None = None
        self.stopped = False
        # read by the HTTP thread without the lock (plain ints and floats)
        self.num_running = self.num_waiting = 0
        self.kv_usage = 0.0

    # ------------------------------------------------------------ HTTP thread
    def submit(self, prompt: list[int], params: SamplingParams, aio: asyncio.AbstractEventLoop) -> RequestHandle:
        h = RequestHandle(prompt, params, asyncio.Queue(), aio)
        with self.cond:
            if self.failed is not None or self.stopped:
                h.put(Failed(500, "the engine has stopped"))
            elif self.draining:
                h.put(Failed(503, "the server is shutting down"))
            else:
                self.pending.append(h)
                self.cond.notify()
        return h

    def abort(self, h: RequestHandle) -> None:
        with self.cond:
            if not h.done:
                self.aborts.append(h)
                self.cond.notify()

    def queued(self) -> int:
        """Requests not yet running: for the --max-waiting check."""
        return len(self.pending) + self.num_waiting

    # ------------------------------------------------------------ main thread
    def drain(self, timeout_s: float) -> None:
        """Stop taking requests; finish the ones in flight within ``timeout_s``. Callable
        from a signal handler (it only sets two fields)."""
        if not self.draining:
            self.drain_deadline = time.monotonic() + timeout_s
            self.draining = True

    def run(self) -> None:
        try:
            while True:
                with self.cond:
                    while not (self.pending or self.aborts or self.engine.has_unfinished() or self.draining):
                        self.cond.wait(IDLE_WAIT_S)
                    pending, self.pending = self.pending, []
                    aborts, self.aborts = self.aborts, []
                if self.draining:
                    for h in pending:
                        h.put(Failed(503, "the server is shutting down"))
                    pending = []
                    if not self.engine.has_unfinished():
                        break
                    if time.monotonic() >= self.drain_deadline:
                        aborts += [h for h in self.live.values() if h not in aborts]
                for h in aborts:
                    if h.req_id is not None and not h.done:
                        self.engine.abort(h.req_id)
                for h in pending:
                    self._admit(h, aborted=h in aborts)
                if not self.engine.has_unfinished():
                    self._publish([])
                    continue
                events = self.engine.step()
                by_loop: dict = {}  # one wake-up of each HTTP event loop per step, not one per token
                for ev in events:
                    h = self.live.get(ev.req_id)
                    if h is None:
                        continue
                    if ev.finished:
                        h.done = True
                        del self.live[ev.req_id]
                    by_loop.setdefault(h.aio, []).append((h.queue, ev))
                for aio, items in by_loop.items():
                    aio.call_soon_threadsafe(_deliver, items)
                self._publish(events)
        except BaseException as e:
            self.failed = e
            with self.cond:
                handles = list(self.live.values()) + self.pending
                self.pending = []
            for h in handles:
                h.put(Failed(500, f"the engine failed: {type(e).__name__}: {e}"))
            raise
        finally:
            self.stopped = True

    def _admit(self, h: RequestHandle, aborted: bool) -> None:
        if aborted:  # the client left before the engine saw the request
            h.done = True
            return
        try:
            h.req_id = self.engine.add_request(h.prompt, h.params)
        except ValueError as e:
            h.done = True
            h.put(Failed(400, str(e)))
            return
        self.live[h.req_id] = h
        h.put(Accepted(h.req_id))

    def _publish(self, events: list[TokenEvent]) -> None:
        e = self.engine
        self.num_running, self.num_waiting, self.kv_usage = e.num_running(), e.num_waiting(), e.kv_usage()
        if self.on_step is not None:
            self.on_step(self, events)
