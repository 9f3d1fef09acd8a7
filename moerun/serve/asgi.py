"""ASGI pieces under the FastAPI app: the API-key check (``ApiKeyMiddleware``), the
streamed response that always closes its choices (``ClosingStreamingResponse``) and the
outermost layer that hands it the server's own ``send`` (``RawSend``). Plain ASGI: each
costs less per request and per streamed chunk than Starlette's generic versions.

    app.add_middleware(ApiKeyMiddleware, api_key=key)
    served = RawSend(app)                                   # what uvicorn runs
    return ClosingStreamingResponse(chunks(), on_close, media_type="text/event-stream")
"""
from __future__ import annotations

import asyncio
import hmac

from fastapi.responses import JSONResponse, StreamingResponse

from . import protocol as P


class ApiKeyMiddleware:
    """401 for a /v1 request without ``Authorization: Bearer <api key>``. Plain ASGI, not
    ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware runs every response through
    an extra memory stream and task group, which cost more CPU per streamed chunk than the
    chunk itself."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(given, self.expected):
                await JSONResponse(P.error_body(P.APIError.unauthorized()), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that calls ``on_close`` however it ends: written out, the client
    gone (even before the first chunk, when the body never starts), or an error. The
    client's disconnect is watched by one plain asyncio task that cancels the stream (what
    Starlette does with an anyio task group, at less cost per request). The body's chunks
    go to the server's own ``send`` when ``RawSend`` put it in the scope: the middleware
    stack's send wrappers only watch the response's start, which still passes them."""

    def __init__(self, content, on_close, **kw):
        super().__init__(content, **kw)
        self.on_close = on_close
        self.raw_send = None

    async def stream_response(self, send):
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        send = self.raw_send or send
        async for chunk in self.body_iterator:
            await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope, receive, send):
        self.raw_send = scope.get(RawSend.KEY)

        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
        body = asyncio.ensure_future(self.stream_response(send))
        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.wait((body, watcher), return_when=asyncio.FIRST_COMPLETED)
            if body.done():
                body.result()  # its error, if it failed
        finally:
            for t in (body, watcher):
                t.cancel()
            await asyncio.gather(body, watcher, return_exceptions=True)
            self.on_close()


class RawSend:
    """The outermost ASGI layer (``RawSend(build_app(state))``): puts the server's own
    ``send`` in the scope, for the streams' body chunks (``ClosingStreamingResponse``)."""
    KEY = "moerun.raw_send"

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        scope[self.KEY] = send
        await self.app(scope, receive, send)
