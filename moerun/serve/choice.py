"""One engine request of an HTTP request (one sample of one prompt): ``Choice`` turns its
engine events into the text to send (incremental detokenizing, stop strings held back and
cut), its token ids, logprobs and finish; ``run_choice`` / ``run_all`` drive non-streamed
requests to their end (a stream reads its choices' events itself, ``moerun.serve.app``).

    c = Choice(index, prompt_ids, sampling_params, stop_strings, tokenizer, skip_special)
    c.submit(engine_client)            # or c.submit(engine_client, shared_inbox)
    text = c.on_item(item, t)          # each (item, t) from the inbox: "" while held back
    c.close(metrics)                   # aborts it in the engine if it may still run; counts it
    await run_all(request, choices, engine, metrics)   # every choice to its end, aborted on disconnect
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from . import protocol as P
from .client import EngineClient, Inbox
from .detok import TextStream
from .loop import Accepted, Failed
from .metrics import RequestClock, ServerMetrics

if TYPE_CHECKING:
    from fastapi import Request


class _NoText:
    """A model without a tokenizer: no text, the token ids carry the answer (``token_ids``)."""
    stopped, stop_reason, text = False, None, ""

    def add(self, token_id: int) -> str:
        return ""

    def finish(self) -> str:
        return ""


class Choice:
    """One engine request: one sample of one prompt, and the text it has produced. Every
    choice also carries its token ids (``token_ids``, as vLLM's return_token_ids does)."""

    def __init__(self, index: int, prompt: list[int], params, stops, tokenizer, skip_special: bool):
        self.index, self.prompt, self.params = index, prompt, params
        self.text = TextStream(tokenizer, stops, skip_special, prompt) if tokenizer is not None else _NoText()
        self.clock = RequestClock()
        self.num_tokens = 0
        self.ids: list[int] = []  # every generated token
        self.unsent: list[int] = []  # token ids not yet in a chunk
        self.sampled: list = []  # (token, logprob, top) of tokens not yet sent, when logprobs are asked
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.handle = None
        self.engine: EngineClient | None = None
        self.accepted = False  # the engine took it (an Accepted came)
        self.closed = False

    def submit(self, engine: EngineClient, inbox: Inbox | None = None) -> None:
        self.engine = engine
        self.handle = engine.submit(self.prompt, self.params, inbox, self)

    def on_item(self, item, t: float | None = None) -> str | None:
        """One item from the engine (``t``: when its step ended): None for ``Accepted``, the
        text to send for a token event ("" while held back); a ``Failed`` (or a server-side
        abort) raises the APIError the client gets."""
        if isinstance(item, Failed):
            raise P.APIError(item.status, item.message, "server_error" if item.status >= 500 else
                             "invalid_request_error")
        if isinstance(item, Accepted):
            self.accepted = True
            return None
        text = self.take(item, t)
        if self.finish_reason == "abort":  # aborted by the server (drain timeout), not by the client
            raise P.APIError.unavailable("The request was aborted: the server is shutting down.")
        return text

    def close(self, metrics: ServerMetrics) -> None:
        """Done with it (finished, failed, or the client is gone): abort the engine request if
        it may still run (a stop string ends it here before the engine knows), so its KV blocks
        are freed now, and count it. Idempotent."""
        if self.closed or self.engine is None:
            return
        self.closed = True
        if self.finish_reason is None or self.text.stopped:
            self.engine.abort(self.handle)
        reason = self.finish_reason if self.finish_reason in ("stop", "length") else "abort"
        metrics.request_finished(reason, len(self.prompt), self.num_tokens, self.clock.ttft, self.clock.itls,
                                 self.clock.e2e())

    def take(self, ev, t: float | None = None) -> str:
        """An engine event into text to send (stop strings held back and cut)."""
        out = ""
        if ev.token is not None:
            self.clock.token(t)
            self.num_tokens += 1
            self.ids.append(ev.token)
            self.unsent.append(ev.token)
            out = self.text.add(ev.token)
            if self.params.logprobs is not None:
                self.sampled.append((ev.token, ev.logprob, ev.top_logprobs))
            if self.text.stopped:
                self.finish_reason, self.stop_reason = "stop", self.text.stop_reason
                return out
        if ev.finished:
            out += self.text.finish()
            self.finish_reason = ev.finish_reason
            if ev.finish_reason == "stop" and ev.token in self.params.stop_token_ids:
                self.stop_reason = ev.token
        return out


async def run_choice(c: Choice, engine: EngineClient, metrics: ServerMetrics) -> None:
    """Drive one engine request to its end (its own inbox). Aborts the engine request when
    cancelled; raises the APIError of a failure."""
    c.submit(engine)
    try:
        while c.finish_reason is None:
            for _, item, t in await c.handle.inbox.take():
                c.on_item(item, t)
                if c.finish_reason is not None:
                    break
    finally:
        c.close(metrics)


async def run_all(request: Request, choices: list[Choice], engine: EngineClient, metrics: ServerMetrics) -> None:
    """Every choice to its end; a client that disconnects first cancels them (which aborts
    their engine requests); the first error is raised."""
    tasks = [asyncio.create_task(run_choice(c, engine, metrics)) for c in choices]
    gathered = asyncio.gather(*tasks)
    try:
        while True:
            done, _ = await asyncio.wait({gathered}, timeout=0.25)
            if done:
                gathered.result()
                return
            if await request.is_disconnected():
                raise asyncio.CancelledError("client disconnected")
    finally:
        for t in tasks:
            t.cancel()
        if not gathered.done():
            gathered.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
