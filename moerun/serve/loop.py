"""The engine side of the server: ``EngineLoop`` drives the leader's engine in the main
thread of rank 0 (the collectives and the signal handlers live there) and talks to the
HTTP process (``moerun.serve.client``) over one duplex pipe. The HTTP process owns
tokenizing, detokenizing, JSON and sockets; the engine process only sees token ids, so
the two never contend for one interpreter lock.

    loop = EngineLoop(engine, conn)    # conn: a multiprocessing Connection to the HTTP process
    loop.run()                          # main thread: until drained (returns) or failed (raises)
    loop.drain(timeout_s)               # from a signal handler

Messages, HTTP -> engine: ``("submit", hid, prompt_ids, SamplingParams)``,
``("abort", hid)``. Engine -> HTTP: ``("ready", vocab_size, max_model_len)`` once loaded,
``("step", [(hid, item), ...], Stats)`` once per step (items: ``Accepted``, ``Failed``,
``TokenEvent``), ``("drain",)`` when draining starts, ``("stop",)`` at the end.
A reader thread takes the HTTP messages into the loop between steps.

When nothing is in flight the loop sleeps on a condition: an idle server ticks no step and
sends nothing over the control group. ``drain`` refuses new requests, lets the ones in
flight finish, and after the timeout aborts what is left (their clients get an error). An
exception in a step (a peer rank died, a collective timed out) fails every request in
flight with ``Failed`` and is re-raised from ``run``: the process then exits non-zero.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from ..engine import Engine

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


@dataclass(frozen=True)
class Stats:
    """The engine's queue after a step, for /metrics and --max-waiting."""
    running: int
    waiting: int
    kv_usage: float
    preemptions: int  # since start


class EngineLoop:
    def __init__(self, engine: Engine, conn):
        self.engine, self.conn = engine, conn
        self.cond = threading.Condition()
        self.inbox: list[tuple] = []  # messages from the HTTP process, not yet handled
        self.live: dict[int, int] = {}  # engine request id -> HTTP handle id
        self.req_of: dict[int, int] = {}  # HTTP handle id -> engine request id
        self.draining = False
        self.drain_deadline = 0.0
        self.http_gone = False
        self.num_requests = self.prompt_tokens = self.output_tokens = 0  # served, for the profile
        threading.Thread(target=self._read, name="from-http", daemon=True).start()

    def _read(self) -> None:
        """The reader thread: HTTP messages into the inbox (EOF: the HTTP process is gone)."""
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                with self.cond:
                    self.http_gone = True
                    self.cond.notify()
                return
            with self.cond:
                self.inbox.append(msg)
                self.cond.notify()

    def _send(self, msg) -> None:
        """Only the main thread sends (the reader thread only receives): no lock needed."""
        try:
            self.conn.send(msg)
        except (BrokenPipeError, OSError):
            self.http_gone = True

    def drain(self, timeout_s: float) -> None:
        """Stop taking requests; finish the ones in flight within ``timeout_s``. Callable
        from a signal handler (it only sets fields; the loop tells the HTTP process)."""
        if not self.draining:
            self.drain_deadline = time.monotonic() + timeout_s
            self.draining = True
            with self.cond:
                self.cond.notify()

    def run(self) -> None:
        out: list[tuple] = []
        told_drain = False
        try:
            while True:
                with self.cond:
                    while not (self.inbox or self.engine.has_unfinished() or self.draining or self.http_gone):
                        self.cond.wait(IDLE_WAIT_S)
                    inbox, self.inbox = self.inbox, []
                if self.http_gone and not self.draining:
                    log.warning("the HTTP process is gone: draining")
                    self.drain(0.0)
                if self.draining and not told_drain:
                    self._send(("drain",))
                    told_drain = True
                for msg in inbox:
                    self._handle(msg, out)
                if self.draining:
                    if not self.engine.has_unfinished():
                        self._flush(out)
                        return
                    if time.monotonic() >= self.drain_deadline:
                        for rid in list(self.live):
                            self.engine.abort(rid)
                if self.engine.has_unfinished():
                    for ev in self.engine.step():
                        hid = self.live.get(ev.req_id)
                        if hid is None:
                            continue
                        self.output_tokens += ev.token is not None
                        if ev.finished:
                            del self.live[ev.req_id]
                            self.req_of.pop(hid, None)
                        out.append((hid, ev))
                self._flush(out)
        except BaseException as e:
            for hid in list(self.live.values()):
                out.append((hid, Failed(500, f"the engine failed: {type(e).__name__}: {e}")))
            self._flush(out)
            raise

    def _handle(self, msg: tuple, out: list) -> None:
        kind = msg[0]
        if kind == "submit":
            _, hid, prompt, params = msg
            if self.draining:
                out.append((hid, Failed(503, "the server is shutting down")))
                return
            try:
                rid = self.engine.add_request(prompt, params)
            except ValueError as e:
                out.append((hid, Failed(400, str(e))))
                return
            self.live[rid], self.req_of[hid] = hid, rid
            self.num_requests += 1
            self.prompt_tokens += len(prompt)
            out.append((hid, Accepted(rid)))
        elif kind == "abort":
            rid = self.req_of.pop(msg[1], None)
            if rid is not None:
                self.engine.abort(rid)  # its last event comes with the next step
        else:
            raise AssertionError(f"unknown message from the HTTP process: {kind!r}")

    def _flush(self, out: list) -> None:
        e = self.engine
        stats = Stats(e.num_running(), e.num_waiting(), e.kv_usage(), e.num_preemptions)
        if out or not self.http_gone:
            self._send(("step", list(out), stats))
        out.clear()
