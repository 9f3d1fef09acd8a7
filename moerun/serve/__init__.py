"""moerun's OpenAI-compatible HTTP server (``moerun serve`` / ``torchrun -m moerun.serve``),
shaped like vLLM's: /v1/completions, /v1/chat/completions, /v1/models, /metrics.

The modules, each small and usable on its own:

    protocol  pydantic request models (CompletionRequest, ChatCompletionRequest), APIError and
              the OpenAI error body, request -> SamplingParams / prompt token ids, length checks,
              response / stream-chunk / logprobs builders, SSE framing
    detok     IncrementalDetokenizer (token ids -> text deltas, never half a UTF-8 character),
              StopStrings (hold back text that may become a stop string), TextStream (both)
    chat      a checkpoint's chat template (chat_template.jinja / tokenizer_config.json)
              rendered the way transformers renders it, then tokenized
    metrics   the Prometheus metrics (moerun:*) in their own registry, rendered for GET /metrics
    loop      EngineLoop: the engine driven from the main thread, requests in, events out
    client    EngineClient: the HTTP process's end of the pipe, read in the event loop; Inbox
    choice    Choice: one engine request's events -> text, token ids, logprobs; run_all
    asgi      the API-key middleware, the streamed response, RawSend (plain ASGI)
    app       the FastAPI app: the routes, n choices per request, streams, disconnects
    cli       `moerun serve`: flags, the HTTP thread, signals and draining, followers

Importing ``moerun.serve`` imports none of them (nor torch, nor fastapi): import the module
you need, e.g. ``from moerun.serve import protocol``.
"""
