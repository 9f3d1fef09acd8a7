"""The protocol's responses: completion and chat objects, stream chunks, usage, logprobs
objects, model cards, and SSE framing, as plain dicts in vLLM's / OpenAI's shapes (each
builder's docstring lists its keys).
"""
from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Iterable
from typing import Any

_encode_str = json.encoder.encode_basestring  # what dumps writes a str as (ensure_ascii=False)
LOGPROB_FLOOR = -9999.0  # what -inf is sent as (JSON has no -inf), like vLLM


def new_id(prefix: str) -> str:
    """"cmpl-<32 hex>", "chatcmpl-<32 hex>"."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """{"prompt_tokens", "completion_tokens", "total_tokens"}."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _lp(x: float | None) -> float | None:
    if x is None:
        return None
    return LOGPROB_FLOOR if math.isnan(x) or x < LOGPROB_FLOOR else float(x)


def token_text(tokenizer, token_id: int) -> str:
    """A token as logprobs name it: its decoded text (special tokens included), or
    "token_id:<id>" without a tokenizer (vLLM's return_tokens_as_token_ids form)."""
    if tokenizer is None:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _token_bytes(tokenizer, token_id: int, text: str) -> list[int] | None:
    if tokenizer is None:
        return None
    if hasattr(tokenizer, "token_bytes"):
        return list(tokenizer.token_bytes(token_id))
    return list(text.encode("utf-8", errors="replace"))


Sampled = tuple  # (token_id, logprob | None, ((top_id, top_logprob), ...)), moerun.sampling.Sampled


class CompletionLogprobs:
    """The completions ``logprobs`` object of one choice, chunk by chunk:
    {"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}.
    ``text_offset`` counts characters of the token strings from ``initial_offset`` (the echoed
    prompt's length when echo) and carries over between calls, as vLLM computes it. Each
    top_logprobs dict holds the top-N and the sampled token (OpenAI: up to N + 1 entries)."""

    def __init__(self, tokenizer, top_n: int, initial_offset: int = 0):
        self.tokenizer, self.top_n, self.offset = tokenizer, top_n, initial_offset

    def __call__(self, entries: Iterable[Sampled]) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tok, lp, top in entries:
            text = token_text(self.tokenizer, tok)
            tops = {}
            for tid, tlp in tuple(top)[: self.top_n]:
                tops.setdefault(token_text(self.tokenizer, tid), _lp(tlp))
            if lp is not None:
                tops.setdefault(text, _lp(lp))
            out["tokens"].append(text)
            out["token_logprobs"].append(_lp(lp))
            out["top_logprobs"].append(tops)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out


def chat_logprobs(entries: Iterable[Sampled], tokenizer, top_n: int) -> dict:
    """The chat ``logprobs`` object: {"content": [{"token", "logprob", "bytes",
    "top_logprobs": [{"token", "logprob", "bytes"}]}]} with the top ``top_n`` (at most)."""
    content = []
    for tok, lp, top in entries:
        text = token_text(tokenizer, tok)
        tops = []
        for tid, tlp in tuple(top)[:top_n]:
            t = token_text(tokenizer, tid)
            tops.append({"token": t, "logprob": _lp(tlp), "bytes": _token_bytes(tokenizer, tid, t)})
        content.append({"token": text, "logprob": _lp(lp) if lp is not None else LOGPROB_FLOOR,
                        "bytes": _token_bytes(tokenizer, tok, text), "top_logprobs": tops})
    return {"content": content}


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None,
                      stop_reason: int | str | None = None) -> dict:
    """{"index", "text", "logprobs", "finish_reason", "stop_reason"}; stop_reason (vLLM's) is the
    stop string or stop token id that ended the choice, None for EOS / length."""
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
            "stop_reason": stop_reason}


def completion_response(request_id: str, model: str, choices: list[dict], usage: dict,
                        created: int | None = None) -> dict:
    """{"id": "cmpl-...", "object": "text_completion", "created", "model", "choices", "usage"};
    ``choices`` sorted by index."""
    return {"id": request_id, "object": "text_completion", "created": now() if created is None else created,
            "model": model, "choices": sorted(choices, key=lambda c: c["index"]), "usage": usage}


def completion_chunk(request_id: str, model: str, created: int, index: int, text: str,
                     logprobs: dict | None = None, finish_reason: str | None = None,
                     stop_reason: int | str | None = None) -> dict:
    """One streamed piece of one choice: {"id", "object": "text_completion", "created", "model",
    "choices": [completion_choice(...)], "usage": null}. finish_reason stays null until the
    choice's last chunk."""
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [completion_choice(index, text, finish_reason, logprobs, stop_reason)], "usage": None}


def usage_chunk(request_id: str, model: str, created: int, usage: dict, chat: bool = False) -> dict:
    """The last chunk of a stream with include_usage: {"id", "object", "created", "model",
    "choices": [], "usage"}; object "chat.completion.chunk" for chat, else "text_completion"."""
    return {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model, "choices": [], "usage": usage}


def chat_choice(index: int, content: str, finish_reason: str | None, logprobs: dict | None = None,
                stop_reason: int | str | None = None) -> dict:
    """{"index", "message": {"role": "assistant", "content"}, "logprobs", "finish_reason", "stop_reason"}."""
    return {"index": index, "message": {"role": "assistant", "content": content}, "logprobs": logprobs,
            "finish_reason": finish_reason, "stop_reason": stop_reason}


def chat_response(request_id: str, model: str, choices: list[dict], usage: dict, created: int | None = None) -> dict:
    """{"id": "chatcmpl-...", "object": "chat.completion", "created", "model", "choices", "usage"}."""
    return {"id": request_id, "object": "chat.completion", "created": now() if created is None else created,
            "model": model, "choices": sorted(choices, key=lambda c: c["index"]), "usage": usage}


def chat_chunk(request_id: str, model: str, created: int, index: int, *, role: str | None = None,
               content: str | None = None, logprobs: dict | None = None, finish_reason: str | None = None,
               stop_reason: int | str | None = None) -> dict:
    """{"id", "object": "chat.completion.chunk", "created", "model", "choices": [{"index",
    "delta", "logprobs", "finish_reason", "stop_reason"}], "usage": null}; delta holds "role"
    and / or "content" only when given. Each choice's first chunk is ``chat_role_chunk``."""
    delta = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason,
                         "stop_reason": stop_reason}], "usage": None}


def chat_role_chunk(request_id: str, model: str, created: int, index: int) -> dict:
    """A choice's first chunk: delta {"role": "assistant", "content": ""}."""
    return chat_chunk(request_id, model, created, index, role="assistant", content="")


def model_card(model_id: str, max_model_len: int, created: int | None = None, owned_by: str = "moerun",
               root: str | None = None) -> dict:
    """One entry of GET /v1/models, vLLM's shape: {"id", "object": "model", "created", "owned_by",
    "root", "parent", "max_model_len", "permission"}."""
    return {"id": model_id, "object": "model", "created": now() if created is None else created,
            "owned_by": owned_by, "root": root if root is not None else model_id, "parent": None,
            "max_model_len": max_model_len, "permission": []}


def model_list(cards: list[dict]) -> dict:
    return {"object": "list", "data": cards}


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def dumps(obj: Any) -> str:
    """Compact JSON, UTF-8 text kept as is (vLLM's framing)."""
    return _ENCODER.encode(obj)


def sse(obj: Any) -> str:
    """One server-sent event: "data: {json}\\n\\n"."""
    return f"data: {dumps(obj)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class TokenChunks:
    """The SSE frame of a stream's most common chunk, from a template: one choice's new text
    and token ids, no log probabilities, not its last chunk. Byte for byte what
    ``sse(chunk)`` gives for ``completion_chunk(request_id, model, created, index, text)``
    (or ``chat_chunk(..., content=text)``) with ``"token_ids"`` added to the choice, at a
    tenth of the cost: it runs once per token of every stream.

        frame = TokenChunks(request_id, model, created, chat=False)
        frame(index, text, token_ids)    # "data: {...}\n\n"
    """

    def __init__(self, request_id: str, model: str, created: int, chat: bool):
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = dumps({"id": request_id, "object": obj, "created": created, "model": model})
        self.head = f'data: {head[:-1]},"choices":[{{"index":'
        self.text = ',"delta":{"content":' if chat else ',"text":'
        self.rest = ('}' if chat else '') + ',"logprobs":null,"finish_reason":null,"stop_reason":null,"token_ids":['
        self.end = ']}],"usage":null}\n\n'

    def __call__(self, index: int, text: str, token_ids: list[int]) -> str:
        ids = ",".join(map(str, token_ids))
        return f"{self.head}{int(index)}{self.text}{_encode_str(text)}{self.rest}{ids}{self.end}"
