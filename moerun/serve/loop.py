"""The engine side of the server: ``EngineLoop`` drives the leader's engine in the main
thread of rank 0 (the collectives and the signal handlers live there) and talks to the
HTTP process (``moerun.serve.client``) over one duplex pipe. The HTTP process owns
tokenizing, detokenizing, JSON and sockets; the engine process only sees token ids, so
the two never contend for one interpreter lock.

    loop = EngineLoop(engine, conn, stream_interval=1)  # conn: a Connection to the HTTP process
    loop.run()                          # main thread: until drained (returns) or failed (raises)
    loop.drain(timeout_s)               # from a signal handler

Messages, HTTP -> engine: ``("submit", hid, prompt_ids, SamplingParams)``,
``("abort", hid)``. Engine -> HTTP: ``("ready", vocab_size, max_model_len)`` once loaded,
``("step", [(hid, item, t), ...], Stats, t_step, [hid, ...], [token, ...])`` once per step
that has something to say. The items come first: ``Accepted``, ``Failed``, or a token event
as a plain tuple that ``Token._make`` reads (``t``: the ``time.monotonic()`` at which the
step that made the token ended; None for the others). Then the step's plain tokens (not the
last, no log probabilities, made by this step, which ended at ``t_step``) as two columns of
ints: most steps are only those, and a message of columns unpickles in a fraction of the
time of one object per token (the HTTP process's one thread does that work for every step).
``("drain",)`` when draining starts, ``("stop",)`` at the end. The loop reads the HTTP
messages itself between steps (a poll that does not wait while requests are in flight): a
submit written while a step runs wakes no thread of the engine process, whose cores the
step's threads are using.

``stream_interval`` N > 1 (SGLang's ``--stream-interval``) holds a request's tokens back and
sends them N at a time: its first token goes at once, then every Nth, and whatever is held
when it finishes. The HTTP process then writes one chunk per N tokens (its per-chunk work and
the client's shrink N-fold, which on a machine whose cores the engine also uses is engine
time); the token times stay those of the steps that made them, so the latency metrics do
not move.

When nothing is in flight the loop sleeps in ``select`` on the pipe (and on a wake-up pipe
that ``drain`` writes to): an idle server ticks no step and sends nothing over the control
group. ``drain`` refuses new requests, lets the ones in
flight finish, and after the timeout aborts what is left (their clients get an error). An
exception in a step (a peer rank died, a collective timed out) fails every request in
flight with ``Failed`` and is re-raised from ``run``: the process then exits non-zero.
"""
from __future__ import annotations

import logging
import os
import select
import time
from dataclasses import dataclass
from typing import NamedTuple

from ..engine import Engine

log = logging.getLogger("moerun")
IDLE_WAIT_S = 0.5  # an idle loop wakes at least this often (drain also wakes it at once)


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


class Token(NamedTuple):
    """An engine ``TokenEvent`` on the HTTP side (it crosses the pipe as a plain tuple, or
    as two ints in a step's columns)."""
    token: int | None
    finished: bool
    finish_reason: str | None
    logprob: float | None
    top_logprobs: tuple

    @staticmethod
    def wire(ev) -> tuple:
        return ev.token, ev.finished, ev.finish_reason, ev.logprob, ev.top_logprobs


class Stats(NamedTuple):
    """The engine's queue after a step, for /metrics and --max-waiting."""
    running: int
    waiting: int
    kv_usage: float
    preemptions: int  # since start


class EngineLoop:
    def __init__(self, engine: Engine, conn, stream_interval: int = 1):
        self.engine, self.conn = engine, conn
        self.stream_interval = stream_interval  # >= 1 (moerun.serve.cli checks the flag)
        self.held: dict[int, list[tuple]] = {}  # HTTP handle id -> its held (hid, event, t)
        self.started: set[int] = set()  # HTTP handle ids whose first token has gone out
        self.wake_r, self.wake_w = os.pipe()  # drain() -> the idle select
        os.set_blocking(self.wake_w, False)
        self.live: dict[int, int] = {}  # engine request id -> HTTP handle id
        self.req_of: dict[int, int] = {}  # HTTP handle id -> engine request id
        self.draining = False
        self.drain_deadline = 0.0
        self.http_gone = False
        self.num_requests = self.prompt_tokens = self.output_tokens = 0  # served, for the profile
        self.t_step: float | None = None  # when the last step ended
        self.hids: list[int] = []  # the step's plain tokens' handles and tokens (the columns)
        self.tokens: list[int] = []

    def _receive(self, wait: bool) -> list[tuple]:
        """Every message the HTTP process has written (EOF: it is gone). ``wait``: when there
        is none, sleep until one comes, ``drain`` is called, or IDLE_WAIT_S passes."""
        if self.http_gone:
            return []
        if wait:
            ready, _, _ = select.select([self.conn.fileno(), self.wake_r], [], [], IDLE_WAIT_S)
            if self.wake_r in ready:
                os.read(self.wake_r, 4096)
        msgs = []
        try:
            while self.conn.poll(0):
                msgs.append(self.conn.recv())
        except (EOFError, OSError):
            self.http_gone = True
        return msgs

    def _send(self, msg) -> None:
        """The loop's thread is the only one that touches the pipe: no lock needed."""
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
            if self.wake_w >= 0:
                try:
                    os.write(self.wake_w, b"d")
                except OSError:  # full: it already says so
                    pass

    def run(self) -> None:
        out: list[tuple] = []
        told_drain = False
        try:
            while True:
                inbox = self._receive(wait=False)
                while not (inbox or self.engine.has_unfinished() or self.draining or self.http_gone):
                    inbox = self._receive(wait=True)
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
                held_only = False  # a step whose every token is held back: nothing to send
                if self.engine.has_unfinished():
                    events = self.engine.step()
                    now = self.t_step = time.monotonic()
                    for ev in events:
                        hid = self.live.get(ev.req_id)
                        if hid is None:
                            continue
                        self.output_tokens += ev.token is not None
                        if ev.finished:
                            del self.live[ev.req_id]
                            self.req_of.pop(hid, None)
                        self._emit(hid, ev, now, out)
                    held_only = not (out or self.hids)
                if not held_only:
                    self._flush(out)
        except BaseException as e:
            for hid in list(self.live.values()):
                self.held.pop(hid, None)
                out.append((hid, Failed(500, f"the engine failed: {type(e).__name__}: {e}"), None))
            self._flush(out)
            raise
        finally:
            wake, self.wake_r, self.wake_w = (self.wake_r, self.wake_w), -1, -1  # drain() after this: no write
            for fd in wake:
                os.close(fd)

    def _emit(self, hid: int, ev, t: float, out: list) -> None:
        """A token event to send now, or to hold back (``stream_interval``)."""
        n = self.stream_interval
        if n == 1:
            if ev.finished or ev.logprob is not None or ev.token is None:
                out.append((hid, Token.wire(ev), t))
            else:  # a plain token: into the step's columns
                self.hids.append(hid)
                self.tokens.append(ev.token)
            return
        held = self.held.setdefault(hid, [])
        held.append((hid, Token.wire(ev), t))
        first = ev.token is not None and hid not in self.started
        if first:
            self.started.add(hid)
        if ev.finished or first or len(held) >= n:
            out.extend(self.held.pop(hid))
        if ev.finished:
            self.started.discard(hid)

    def _handle(self, msg: tuple, out: list) -> None:
        kind = msg[0]
        if kind == "submit":
            _, hid, prompt, params = msg
            if self.draining:
                out.append((hid, Failed(503, "the server is shutting down"), None))
                return
            try:
                rid = self.engine.add_request(prompt, params)
            except ValueError as e:
                out.append((hid, Failed(400, str(e)), None))
                return
            self.live[rid], self.req_of[hid] = hid, rid
            self.num_requests += 1
            self.prompt_tokens += len(prompt)
            out.append((hid, Accepted(rid), None))
        elif kind == "abort":
            rid = self.req_of.pop(msg[1], None)
            if rid is not None:
                self.engine.abort(rid)  # its last event comes with the next step
        else:
            raise AssertionError(f"unknown message from the HTTP process: {kind!r}")

    def _flush(self, out: list) -> None:
        e = self.engine
        stats = Stats(e.num_running(), e.num_waiting(), e.kv_usage(), e.num_preemptions)
        if out or self.hids or not self.http_gone:
            self._send(("step", list(out), stats, self.t_step, self.hids, self.tokens))
        out.clear()
        self.hids, self.tokens = [], []
