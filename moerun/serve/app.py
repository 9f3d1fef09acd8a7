"""The FastAPI app: the OpenAI routes on top of an ``EngineClient`` (the engine runs in
another process; see moerun.serve.loop and moerun.serve.client).

    state = ServerState(settings, metrics)          # before the model loads: /health is 503
    app = build_app(state)                          # uvicorn serves it (moerun.serve.cli)
    state.ready(client, tokenizer, chat_template, vocab_size, max_model_len)

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET /version, POST /tokenize, POST /detokenize, GET /metrics. Every error is OpenAI's
``{"error": {...}}`` body: 400 for a bad field (the protocol module names it), 401 for a
missing or wrong API key (the /v1 routes, when one is set), 404 for an unknown model name,
503 while loading or draining or when ``--max-waiting`` requests already wait, 500 only
when the engine itself fails. A request whose client disconnects is aborted in the engine
at once, which frees its KV blocks.

A request with n choices over P prompts is n x P engine requests (``Choice``), run
concurrently; a stream interleaves their chunks as tokens arrive.
"""
from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from . import protocol as P
from .asgi import ApiKeyMiddleware, ClosingStreamingResponse
from .chat import chat_prompt_ids
from .choice import Choice, run_all
from .client import EngineClient, Inbox
from .metrics import ServerMetrics

# seconds a stream waits before it reads each piece (tests: the engine's events pile up, as
# they do when it runs faster than the stream is written)
_TEST_STREAM_DELAY = float(os.environ.get("MOERUN_TEST_STREAM_DELAY", 0) or 0)


@dataclass(frozen=True)
class ServerSettings:
    served_model_name: str
    max_waiting: int = 256  # requests queued (not yet running) before new ones get 503
    api_key: str | None = None


class ServerState:
    """What the routes read: filled in by ``ready`` once the model is loaded."""

    def __init__(self, settings: ServerSettings, metrics: ServerMetrics):
        self.settings, self.metrics = settings, metrics
        self.loop: EngineClient | None = None
        self.tokenizer = self.chat_template = None
        self.vocab_size = self.max_model_len = 0
        self.created = P.now()

    def ready(self, loop: EngineClient, tokenizer, chat_template, vocab_size: int, max_model_len: int) -> None:
        self.tokenizer, self.chat_template = tokenizer, chat_template
        self.vocab_size, self.max_model_len = vocab_size, max_model_len
        self.loop = loop  # last: a non-None loop means ready

    def serving(self) -> EngineClient:
        """The loop if requests can be taken now, else the 503 that says why."""
        loop = self.loop
        if loop is None:
            raise P.APIError.unavailable("The model is still loading.")
        if loop.draining or loop.stopped:
            raise P.APIError.unavailable("The server is shutting down.")
        return loop


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[P.ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int] = Field(min_length=0)


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="moerun", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    settings = state.settings

    @app.exception_handler(P.APIError)
    async def _api_error(request: Request, e: P.APIError):
        return JSONResponse(P.error_body(e), status_code=e.status)

    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)

    @app.get("/health")
    async def health():
        try:
            state.serving()
        except P.APIError as e:
            return JSONResponse(P.error_body(e), status_code=503)
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/v1/models")
    async def models():
        return P.model_list([P.model_card(settings.served_model_name, state.max_model_len, state.created)])

    @app.get("/metrics")
    async def metrics():
        body, ctype = state.metrics.render()
        return Response(body, media_type=ctype)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = P.parse_request(TokenizeRequest, await request.body())
        P.check_model(req.model, settings.served_model_name)
        state.serving()
        if (req.prompt is None) == (req.messages is None):
            raise P.APIError.bad_request("Give exactly one of 'prompt' and 'messages'.", "prompt")
        if state.tokenizer is None:
            raise P.APIError.bad_request("This model has no tokenizer.json.", "prompt")
        if req.prompt is not None:
            ids = state.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            chat = P.parse_request(P.ChatCompletionRequest, {"messages": [m.model_dump() for m in req.messages],
                                                             "add_generation_prompt": req.add_generation_prompt})
            ids = chat_prompt_ids(chat, state.chat_template, state.tokenizer, state.vocab_size)
        return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = P.parse_request(DetokenizeRequest, await request.body())
        P.check_model(req.model, settings.served_model_name)
        state.serving()
        if state.tokenizer is None:
            raise P.APIError.bad_request("This model has no tokenizer.json.", "tokens")
        bad = [t for t in req.tokens if not 0 <= t < state.vocab_size]
        if bad:
            raise P.APIError.bad_request(f"token ids {bad[:5]} are outside the vocabulary "
                                         f"(0..{state.vocab_size - 1}).", "tokens")
        return {"prompt": state.tokenizer.decode(req.tokens)}

    # The two generation routes are plain Starlette routes (the handler takes the Request and
    # returns a Response): FastAPI's dependency solving and response wrapping cost more per
    # request than the route's own work; errors still go through the APIError handler above.
    async def completions(request: Request):
        req = P.parse_request(P.CompletionRequest, await request.body())
        P.check_model(req.model, settings.served_model_name)
        admit(state)
        prompts = P.prompts_of(req, state.tokenizer, state.vocab_size)
        choices = make_choices(state, req, prompts, req.max_tokens, "max_tokens")
        echo = P.echo_texts(req, state.tokenizer, prompts) if req.echo else None
        return await respond(request, state, req, choices, chat=False, echo=echo)

    async def chat_completions(request: Request):
        req = P.parse_request(P.ChatCompletionRequest, await request.body())
        P.check_model(req.model, settings.served_model_name)
        admit(state)
        prompt = chat_prompt_ids(req, state.chat_template, state.tokenizer, state.vocab_size)
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        choices = make_choices(state, req, [prompt], req.max_output_tokens, param, "messages")
        return await respond(request, state, req, choices, chat=True)

    app.add_route("/v1/completions", completions, methods=["POST"])
    app.add_route("/v1/chat/completions", chat_completions, methods=["POST"])
    return app


def admit(state: ServerState) -> None:
    """503 unless requests can be taken now and fewer than --max-waiting wait."""
    if state.serving().queued() >= state.settings.max_waiting:
        raise P.APIError.unavailable(f"The server is at capacity: {state.settings.max_waiting} requests are "
                                     "already waiting (--max-waiting). Retry later.")


def make_choices(state: ServerState, req, prompts: list[list[int]], max_tokens: int | None, param: str,
                 prompt_param: str = "prompt") -> list[Choice]:
    if req.stop_strings and state.tokenizer is None:
        raise P.APIError.bad_request("'stop' strings need a tokenizer and this model has no tokenizer.json: "
                                     "use 'stop_token_ids'.", "stop")
    out = []
    for p, ids in enumerate(prompts):
        budget = P.resolve_max_tokens(max_tokens, len(ids), state.max_model_len, param, prompt_param)
        for s in range(req.n):
            i = P.choice_index(p, s, req.n)
            sp = P.to_sampling(req, budget, choice_index=s, vocab_size=state.vocab_size)
            out.append(Choice(i, ids, sp, req.stop_strings, state.tokenizer, req.skip_special_tokens))
    return out


async def respond(request: Request, state: ServerState, req, choices: list[Choice], *,
                  chat: bool, echo: list[str] | None = None):
    rid, model, created = P.new_id("chatcmpl" if chat else "cmpl"), state.settings.served_model_name, P.now()
    n_prompt = sum(len(c.prompt) for c in choices[:: req.n])
    lp_n = req.logprobs_n
    formatters = {c.index: P.CompletionLogprobs(state.tokenizer, lp_n or 0,
                                                len(echo[c.index // req.n]) if echo else 0) for c in choices}

    def logprobs_of(c: Choice):
        if lp_n is None:
            return None
        entries, c.sampled = c.sampled, []
        return P.chat_logprobs(entries, state.tokenizer, lp_n) if chat else formatters[c.index](entries)

    if not req.stream:  # each choice's TextStream keeps its whole text; logprobs formatted once at the end
        await run_all(request, choices, state.serving(), state.metrics)
        out = []
        for c in choices:
            text, lp = c.text.text, logprobs_of(c)
            if chat:
                choice = P.chat_choice(c.index, text, c.finish_reason, lp, c.stop_reason)
            else:
                text = (echo[c.index // req.n] if echo else "") + text
                choice = P.completion_choice(c.index, text, c.finish_reason, lp, c.stop_reason)
            choice["token_ids"] = c.ids
            out.append(choice)
        usage = P.usage(n_prompt, sum(c.num_tokens for c in choices))
        build = P.chat_response if chat else P.completion_response
        return JSONResponse(build(rid, model, out, usage, created))

    # Streaming: the events of every choice come into one inbox that the stream reads itself
    # (no task per choice), all that have come at each wake-up: a choice's tokens that came
    # together (held back by --stream-interval, or piled up while the stream was slower than
    # the engine) go out as one chunk, as vLLM merges a slow consumer's outputs. Every
    # choice's first event must be in before the 200 goes out, so that a request the engine
    # refuses still gets its 400.
    inbox = Inbox()
    engine = state.serving()
    for c in choices:
        c.submit(engine, inbox)

    async def read() -> list[tuple]:
        """Every engine item that has come (waiting for the first), as one piece per choice
        in the order the choices first appear: (choice, text, finish_reason, stop_reason),
        text None when a choice only got its Accepted. Each finish state is taken now: a
        later piece of the same choice may finish it before this one is sent."""
        items = await inbox.take()
        merged: dict[Choice, str | None] = {}
        for h, item, t in items:
            c = h.owner
            if c.finish_reason is not None:
                continue  # an event after a stop string ended it here
            text = c.on_item(item, t)
            if text is not None:
                merged[c] = (merged.get(c) or "") + text
            else:
                merged.setdefault(c, None)
        return [(c, text, c.finish_reason, c.stop_reason) for c, text in merged.items()]

    def close_all():
        for c in choices:
            c.close(state.metrics)
    early: list = []  # pieces read while waiting for the acceptances
    try:  # a refusal before the first token is an HTTP error, not a 200 stream with an error in it
        while not all(c.accepted for c in choices):
            early += [piece for piece in await read() if piece[1] is not None]
    except BaseException:
        close_all()
        raise

    plain = P.TokenChunks(rid, model, created, chat)

    async def stream():
        for c in choices:
            if chat:
                yield P.sse(P.chat_role_chunk(rid, model, created, c.index))
            elif echo:
                yield P.sse(P.completion_chunk(rid, model, created, c.index, echo[c.index // req.n]))
        left = len(choices)
        pieces = early
        while left:
            if not pieces:
                if _TEST_STREAM_DELAY:
                    await asyncio.sleep(_TEST_STREAM_DELAY)
                try:
                    pieces = await read()
                except Exception as e:  # the stream reports it and ends
                    err = e if isinstance(e, P.APIError) else P.APIError.server_error(str(e))
                    yield P.sse(P.error_body(err))
                    yield P.SSE_DONE
                    return
            c, text, finish_reason, stop_reason = pieces.pop(0)
            if text is None:
                continue
            final = finish_reason is not None
            if final:
                left -= 1
                c.close(state.metrics)
            elif not (text or c.unsent):
                continue
            lp = logprobs_of(c)
            if not final and lp is None:  # the common chunk, from its template
                yield plain(c.index, text, c.unsent)
                c.unsent = []
                continue
            if chat:
                chunk = P.chat_chunk(rid, model, created, c.index, content=text if text or not final else None,
                                     logprobs=lp, finish_reason=finish_reason, stop_reason=stop_reason)
            else:
                chunk = P.completion_chunk(rid, model, created, c.index, text, lp, finish_reason, stop_reason)
            chunk["choices"][0]["token_ids"], c.unsent = c.unsent, []
            yield P.sse(chunk)
        if req.include_usage:
            yield P.sse(P.usage_chunk(rid, model, created, P.usage(n_prompt, sum(c.num_tokens for c in choices)),
                                      chat))
        yield P.SSE_DONE
    return ClosingStreamingResponse(stream(), close_all, media_type="text/event-stream")
