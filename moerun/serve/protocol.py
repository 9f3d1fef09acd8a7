"""The OpenAI-compatible protocol, shaped like vLLM's: request models, errors, the
request -> engine conversions and the response builders. No HTTP here: the server reads
the body, calls these, and sends what they return.

Requests::

    req = parse_request(CompletionRequest, body)        # body: bytes | str | dict; APIError(400) if bad
    prompts = prompts_of(req, tokenizer, vocab_size)    # [[ids], ...]: one per prompt, in order
    check_fanout(req.n, len(prompts))                   # n * prompts <= MAX_FANOUT (prompts_of does it)
    max_tokens = resolve_max_tokens(req.max_tokens, len(ids), max_model_len)    # per prompt
    sp = to_sampling(req, max_tokens, choice_index=i, vocab_size=V)   # one per engine request

Chat requests are the same with ``ChatCompletionRequest``, ``req.max_output_tokens`` (the
``max_completion_tokens`` / ``max_tokens`` alias, resolved; ``req.max_output_tokens_param``
names it for ``resolve_max_tokens(..., param=..., prompt_param="messages")``) and the prompt
from ``moerun.serve.chat.chat_prompt_ids``. The engine request for prompt p, sample c answers as
choice ``choice_index(p, c, n)`` (= p * n + c, as vLLM and OpenAI number them).

Policies:

* Nothing is silently dropped. An unknown field is a 400 that names it (OpenAI's and vLLM's
  own extra fields that this server does not implement are unknown too). A field the server
  accepts but does not implement (``frequency_penalty``, ``presence_penalty``,
  ``repetition_penalty``, ``best_of``, ``logit_bias``, ``suffix``; for chat also ``tools``,
  ``tool_choice``, ``response_format``, ``functions``, ``function_call``) is accepted only at
  its neutral value (0 / 1 / null / best_of == n / {} / "" / [] / "none" / {"type": "text"});
  any other value is a 400 saying it is not supported.
* ``null`` for a field with a default means the default, as in vLLM (``temperature: null`` is
  1.0). ``max_tokens: null`` means "as many as fit in the context", as in vLLM.
* Types are strict: ``"1"`` is not a number, ``1.0`` is not an integer, ``1`` is not a boolean.
* ``n`` <= MAX_N (128) and ``n * len(prompts)`` <= MAX_FANOUT (256): the server fans ``n`` out
  as ``n`` engine requests. With a ``seed``, sample c is seeded ``seed + c``, so the n samples
  differ and each is reproducible.
* logprobs: completions ``logprobs`` and chat ``top_logprobs`` are 0..MAX_LOGPROBS (20, vLLM's
  default cap); chat ``top_logprobs`` > 0 needs ``logprobs: true``. ``echo`` with ``logprobs``
  (prompt logprobs) is not supported. Log probabilities are of the model's distribution
  before temperature / top-k / top-p, as vLLM reports them; -inf is sent as -9999.0.
* Text-only chat: content parts other than {"type": "text"} are a 400; roles are system,
  developer, user and assistant ("tool" needs tools, which are not supported).

Responses are plain dicts in vLLM's / OpenAI's shapes (each builder's docstring lists the
keys); ``sse(obj)`` frames one for a stream and ``SSE_DONE`` ends it. Log probabilities come
from the engine as ``(token_id, logprob, ((top_id, top_logprob), ...))`` triples
(``moerun.sampling.Sampled``) and are formatted with ``CompletionLogprobs`` (one per choice:
it carries ``text_offset`` across stream chunks) or ``chat_logprobs``. In a stream, a token
whose text is still held back (half a character, a possible stop string) has no text to send
yet: keep its logprobs entry pending and send it with the next chunk that has text, or with
the choice's last chunk, so every generated token's logprobs are sent exactly once.
"""
from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import fields as dc_fields
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moerun.sampling import SamplingParams

MAX_N = 128  # choices per request (OpenAI's limit for chat)
MAX_FANOUT = 256  # engine requests per HTTP request: n * number of prompts
try:  # top-N log probabilities (vLLM's default max_logprobs): the engine's own cap
    from moerun.options import MAX_LOGPROBS
except ImportError:
    MAX_LOGPROBS = 20
LOGPROB_FLOOR = -9999.0  # what -inf is sent as (JSON has no -inf), like vLLM
_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1

_SP_HAS_LOGPROBS = "logprobs" in {f.name for f in dc_fields(SamplingParams)}


# ---------------------------------------------------------------------------------------------
# errors


class APIError(Exception):
    """An error the server answers with ``status`` and ``error_body(err)``.

    ``type`` is OpenAI's: "invalid_request_error" (400, and 404 for an unknown model, as
    OpenAI sends it), "authentication_error" (401), "server_error" (500),
    "service_unavailable_error" (503). ``param`` names the offending field, ``code`` is
    OpenAI's short code or None."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def __repr__(self):
        return f"APIError({self.status}, {self.message!r}, param={self.param!r})"

    @classmethod
    def bad_request(cls, message: str, param: str | None = None, code: str | None = None) -> APIError:
        return cls(400, message, "invalid_request_error", param, code)

    @classmethod
    def model_not_found(cls, model: str) -> APIError:
        return cls(404, f"The model `{model}` does not exist.", "invalid_request_error", "model", "model_not_found")

    @classmethod
    def unauthorized(cls, message: str = "Invalid or missing API key.") -> APIError:
        return cls(401, message, "authentication_error", None, "invalid_api_key")

    @classmethod
    def server_error(cls, message: str) -> APIError:
        return cls(500, message, "server_error")

    @classmethod
    def unavailable(cls, message: str) -> APIError:
        return cls(503, message, "service_unavailable_error")


def error_body(err: APIError) -> dict:
    """{"error": {"message", "type", "param", "code"}}, OpenAI's error shape."""
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


def _param_path(loc: Sequence) -> str | None:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, (list, tuple)):
        return "an array"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _short(v: Any, n: int = 40) -> str:
    s = json.dumps(v, ensure_ascii=False, default=str) if not isinstance(v, str) else json.dumps(v, ensure_ascii=False)
    return s if len(s) <= n else s[: n - 3] + "..."


_EXPECTED = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
    "string_type": "a string", "bool_type": "a boolean", "bool_parsing": "a boolean",
    "list_type": "an array", "tuple_type": "an array", "dict_type": "an object",
    "model_type": "an object", "model_attributes_type": "an object",
}
_BOUNDS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"),
           "less_than_equal": ("<=", "le"), "less_than": ("<", "lt")}


def validation_error(e: ValidationError) -> APIError:
    """A 400 naming the first bad field (``param``) and what is wrong with it in words. All
    the unknown fields of a request are named together."""
    errors = e.errors(include_url=False)
    unknown = [err for err in errors if err["type"] == "extra_forbidden"]
    if unknown:
        names = [_param_path(err["loc"]) for err in unknown]
        listed = ", ".join(f"'{n}'" for n in names)
        what = "Unknown field" if len(names) == 1 else "Unknown fields"
        return APIError.bad_request(f"{what} {listed}: not supported by this server "
                                    "(unknown fields are rejected, not ignored).", names[0])
    err = errors[0]
    kind, loc, value, ctx = err["type"], err["loc"], err.get("input"), err.get("ctx") or {}
    param = _param_path(loc)
    if kind == "json_invalid":
        return APIError.bad_request(f"The request body is not valid JSON: {ctx.get('error', err['msg'])}.")
    if not loc and kind in ("model_type", "model_attributes_type", "dict_type"):
        return APIError.bad_request(f"The request body must be a JSON object, got {_json_type(value)}.")
    if kind == "missing":
        return APIError.bad_request(f"'{param}' is required.", param)
    if kind in _EXPECTED:
        return APIError.bad_request(f"'{param}' must be {_EXPECTED[kind]}, got {_json_type(value)} "
                                    f"({_short(value)}).", param)
    if kind in _BOUNDS:
        op, key = _BOUNDS[kind]
        return APIError.bad_request(f"'{param}' must be {op} {ctx[key]}, got {_short(value)} (out of range).", param)
    if kind == "too_short":
        return APIError.bad_request(f"'{param}' must not be empty." if ctx.get("min_length") == 1 else
                                    f"'{param}' needs at least {ctx.get('min_length')} items.", param)
    if kind == "literal_error":
        return APIError.bad_request(f"'{param}' must be {ctx.get('expected')}, got {_short(value)}.", param)
    msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return APIError.bad_request(f"'{param}': {msg}" if param else msg, param)


def parse_request(cls: type[BaseModel], body: bytes | bytearray | str | dict):
    """``cls`` validated from a raw JSON body (or an already decoded dict); APIError(400) if bad."""
    try:
        if isinstance(body, (bytes, bytearray, str)):
            return cls.model_validate_json(body)
        return cls.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None


def check_model(requested: str | None, served: str | Iterable[str]) -> None:
    """404 when the request names a model this server does not serve (None: the served one)."""
    names = {served} if isinstance(served, str) else set(served)
    if requested is not None and requested not in names:
        raise APIError.model_not_found(requested)


# ---------------------------------------------------------------------------------------------
# requests


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


def _stop_list(v: Any) -> list[str]:
    if v is None:
        return []
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise ValueError(f"must be a string or an array of strings, got {_json_type(v)}")
    if any(s == "" for s in items):
        raise ValueError("stop strings must not be empty")
    return list(items)


def _token_id_list(v: Any, what: str) -> list[int]:
    if not isinstance(v, list):
        raise ValueError(f"must be an array of token ids, got {_json_type(v)}")
    for i, t in enumerate(v):
        if type(t) is not int:
            raise ValueError(f"{what}[{i}] must be a token id (an integer), got {_json_type(t)} ({_short(t)})")
        if t < 0:
            raise ValueError(f"{what}[{i}] = {t} is not a token id (ids are >= 0)")
    return list(v)


# fields whose null means "the default" (vLLM does the same); the others keep null
_NULL_IS_DEFAULT = frozenset({"temperature", "top_p", "top_k", "ignore_eos", "skip_special_tokens", "n", "stream",
                              "echo", "logprobs", "add_generation_prompt", "stop", "stop_token_ids"})


class _SamplingFields(_Strict):
    """The fields completions and chat share."""

    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # -1 or 0: off
    seed: int | None = Field(None, ge=_LONG_MIN, le=_LONG_MAX)
    stop: Any = Field(default_factory=list)  # str | list[str], kept as list[str]
    stop_token_ids: Any = Field(default_factory=list)  # list[int]
    ignore_eos: bool = False
    skip_special_tokens: bool = True  # vLLM's extra: leave special tokens out of the text
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # metadata, accepted and unused
    # accepted only at their neutral values
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data):
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if not (v is None and k in _NULL_IS_DEFAULT)}
        return data

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, v):
        return _stop_list(v)

    @field_validator("stop_token_ids", mode="before")
    @classmethod
    def _check_stop_ids(cls, v):
        return _token_id_list(v, "stop_token_ids")

    def _check_common(self):
        neutral = {"frequency_penalty": (0.0,), "presence_penalty": (0.0,), "repetition_penalty": (1.0,)}
        for name, ok in neutral.items():
            v = getattr(self, name)
            if v is not None and v not in ok:
                raise APIError.bad_request(f"'{name}' is not supported by this server: only {ok[0]} "
                                           f"(no penalty) is accepted, got {v}.", name)
        if self.logit_bias:
            raise APIError.bad_request("'logit_bias' is not supported by this server: only null or {} is accepted.",
                                       "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise APIError.bad_request("'stream_options' can only be given with \"stream\": true.", "stream_options")

    @property
    def stop_strings(self) -> list[str]:
        return list(self.stop)

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage-only chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


def _check_prompt(v: Any):
    shape = "a string, an array of token ids, an array of strings or an array of arrays of token ids"
    if isinstance(v, str):
        if not v:
            raise ValueError("the prompt must not be empty")
        return v
    if not isinstance(v, list):
        raise ValueError(f"must be {shape}, got {_json_type(v)}")
    if not v:
        raise ValueError("the prompt must not be empty")
    if all(isinstance(p, str) for p in v):
        for i, p in enumerate(v):
            if not p:
                raise ValueError(f"prompt[{i}] is empty")
        return v
    if all(isinstance(p, list) for p in v):
        for i, p in enumerate(v):
            if not p:
                raise ValueError(f"prompt[{i}] is empty")
            _token_id_list(p, f"prompt[{i}]")
        return v
    if any(isinstance(p, (str, list)) for p in v):
        raise ValueError(f"must be {shape}: an array mixes kinds of prompts")
    _token_id_list(v, "prompt")
    return v


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: Any
    max_tokens: int | None = Field(16, ge=1)  # null: as many as fit (vLLM)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v):
        return _check_prompt(v)

    @model_validator(mode="after")
    def _check(self):
        self._check_common()
        if self.best_of is not None and self.best_of != self.n:
            raise APIError.bad_request(f"'best_of' is not supported by this server: only best_of == n ({self.n}) "
                                       f"is accepted, got {self.best_of}.", "best_of")
        if self.suffix:
            raise APIError.bad_request("'suffix' is not supported by this server.", "suffix")
        if self.echo and self.logprobs is not None:
            raise APIError.bad_request("'echo' together with 'logprobs' (prompt log probabilities) is not "
                                       "supported by this server.", "echo")
        return self

    @property
    def logprobs_n(self) -> int | None:
        """The top-N log probabilities each sampled token returns (None: none)."""
        return self.logprobs

    @property
    def prompt_is_text(self) -> bool:
        return isinstance(self.prompt, str) or isinstance(self.prompt[0], str)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


def _check_content(v: Any):
    if v is None or isinstance(v, str):
        return v
    if not isinstance(v, list):
        raise ValueError(f"must be a string or an array of content parts, got {_json_type(v)}")
    parts = []
    for i, part in enumerate(v):
        if not isinstance(part, dict):
            raise ValueError(f"content[{i}] must be an object {{\"type\": \"text\", \"text\": ...}}, "
                             f"got {_json_type(part)}")
        kind = part.get("type")
        if kind != "text":
            raise ValueError(f"content[{i}] has type {_short(kind)}: this server takes text only "
                             "(content parts of type \"text\")")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"content[{i}].text must be a string, got {_json_type(part.get('text'))}")
        if extra := sorted(set(part) - {"type", "text"}):
            raise ValueError(f"content[{i}] has unknown field(s) {', '.join(map(repr, extra))}")
        parts.append(TextPart(type="text", text=part["text"]))
    return parts


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Any = None
    name: str | None = None
    reasoning_content: str | None = None  # an assistant turn's reasoning, passed to the template
    # accepted only at their neutral values (what clients send back from a response)
    tool_calls: list | None = None
    refusal: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v):
        return _check_content(v)

    @model_validator(mode="after")
    def _check(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs 'content'")
        if self.tool_calls:
            raise ValueError("'tool_calls' is not supported by this server (no tools)")
        return self

    def text_parts(self) -> list[str]:
        if self.content is None:
            return []
        return [self.content] if isinstance(self.content, str) else [p.text for p in self.content]


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True  # vLLM's extra
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's extra: more template variables
    # accepted only at their neutral values
    tools: list | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    functions: list | None = None
    function_call: Any = None

    @model_validator(mode="after")
    def _check(self):
        self._check_common()
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise APIError.bad_request(f"'max_tokens' ({self.max_tokens}) and 'max_completion_tokens' "
                                       f"({self.max_completion_tokens}) are the same setting and disagree: "
                                       "give one.", "max_completion_tokens")
        if self.top_logprobs and not self.logprobs:
            raise APIError.bad_request("'top_logprobs' needs \"logprobs\": true.", "top_logprobs")
        if self.tools:
            raise APIError.bad_request("'tools' is not supported by this server.", "tools")
        if self.functions:
            raise APIError.bad_request("'functions' is not supported by this server.", "functions")
        if self.tool_choice not in (None, "none", "auto"):
            raise APIError.bad_request("'tool_choice' is not supported by this server: only \"none\" is accepted.",
                                       "tool_choice")
        if self.function_call not in (None, "none", "auto"):
            raise APIError.bad_request("'function_call' is not supported by this server.", "function_call")
        if self.response_format not in (None, {"type": "text"}):
            raise APIError.bad_request("'response_format' is not supported by this server: only "
                                       "{\"type\": \"text\"} is accepted.", "response_format")
        return self

    @property
    def max_output_tokens(self) -> int | None:
        """max_completion_tokens, else max_tokens; None: as many as fit."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def max_output_tokens_param(self) -> str:
        """The field ``max_output_tokens`` came from, for error messages."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def logprobs_n(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# ---------------------------------------------------------------------------------------------
# request -> engine


def check_fanout(n: int, n_prompts: int) -> None:
    if n * n_prompts > MAX_FANOUT:
        raise APIError.bad_request(f"n ({n}) x {n_prompts} prompts = {n * n_prompts} sequences: this server "
                                   f"takes at most {MAX_FANOUT} per request.", "n")


def prompts_of(req: CompletionRequest, tokenizer, vocab_size: int) -> list[list[int]]:
    """The request's prompts as token ids, in order: a string or an array of token ids is one
    prompt, an array of strings or of arrays of ids a batch. Text is encoded with the tokenizer
    (adding its special tokens, BOS, as vLLM does for completions)."""
    p = req.prompt
    if isinstance(p, str):
        batch, text = [p], True
    elif isinstance(p[0], str):
        batch, text = list(p), True
    elif isinstance(p[0], list):
        batch, text = list(p), False
    else:
        batch, text = [p], False
    check_fanout(req.n, len(batch))
    if text and tokenizer is None:
        raise APIError.bad_request("This model has no tokenizer.json: send the prompt as token ids.", "prompt")
    out = []
    for i, item in enumerate(batch):
        where = "prompt" if len(batch) == 1 else f"prompt[{i}]"
        ids = tokenizer.encode(item, add_special_tokens=True) if text else list(item)
        if not ids:
            raise APIError.bad_request(f"{where} is empty after tokenization.", "prompt")
        for j, t in enumerate(ids):
            if type(t) is not int:
                raise APIError.bad_request(f"{where}[{j}] must be a token id (an integer), got {_json_type(t)}.",
                                           "prompt")
            if not 0 <= t < vocab_size:
                raise APIError.bad_request(f"{where}[{j}] = {t} is outside the vocabulary "
                                           f"(token ids are 0..{vocab_size - 1}).", "prompt")
        out.append(ids)
    return out


def echo_texts(req: CompletionRequest, tokenizer, prompts: list[list[int]]) -> list[str]:
    """What ``echo`` puts before each prompt's completions: the prompt as sent when it is text,
    its decoding when it is ids (empty without a tokenizer)."""
    if req.prompt_is_text:
        return [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    return [tokenizer.decode(ids) if tokenizer is not None else "" for ids in prompts]


def choice_index(prompt_idx: int, sample_idx: int, n: int) -> int:
    return prompt_idx * n + sample_idx


def check_length(n_prompt: int, max_tokens: int, max_model_len: int, param: str = "max_tokens") -> None:
    """400 when prompt + completion do not fit in the model's context (vLLM's wording)."""
    if n_prompt + max_tokens > max_model_len:
        raise APIError.bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{n_prompt + max_tokens} tokens ({n_prompt} in the messages, {max_tokens} in the completion). "
            "Please reduce the length of the messages or completion.", param, "context_length_exceeded")


def resolve_max_tokens(requested: int | None, n_prompt: int, max_model_len: int, param: str = "max_tokens",
                       prompt_param: str = "prompt") -> int:
    """The completion's token budget: ``requested`` if it fits (else 400 naming ``param``), or all
    the room left when None (vLLM's rule); a prompt that leaves no room is a 400 naming
    ``prompt_param`` ("messages" for chat) either way."""
    if n_prompt >= max_model_len:
        raise APIError.bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt has "
            f"{n_prompt} tokens, which leaves no room for the completion. Please reduce the length of the "
            "messages.", prompt_param, "context_length_exceeded")
    if requested is None:
        return max_model_len - n_prompt
    check_length(n_prompt, requested, max_model_len, param)
    return requested


def to_sampling(req: CompletionRequest | ChatCompletionRequest, max_tokens: int, *, choice_index: int = 0,
                vocab_size: int | None = None) -> SamplingParams:
    """The engine's SamplingParams for one engine request (sample ``choice_index`` of ``n``):
    temperature 0 is greedy, top_k -1 (vLLM's "off") becomes 0, a seed becomes seed + choice_index.
    ``vocab_size`` checks ``stop_token_ids``."""
    if vocab_size is not None:
        for i, t in enumerate(req.stop_token_ids):
            if t >= vocab_size:
                raise APIError.bad_request(f"stop_token_ids[{i}] = {t} is outside the vocabulary "
                                           f"(token ids are 0..{vocab_size - 1}).", "stop_token_ids")
    seed = req.seed
    if seed is not None and choice_index:
        seed = (seed + choice_index - _LONG_MIN) % 2**64 + _LONG_MIN  # wraps within int64
    kw = dict(max_new_tokens=max_tokens, temperature=float(req.temperature), top_k=max(req.top_k, 0),
              top_p=float(req.top_p), seed=seed, stop_token_ids=tuple(req.stop_token_ids),
              ignore_eos=req.ignore_eos)
    if _SP_HAS_LOGPROBS:
        kw["logprobs"] = req.logprobs_n
    return SamplingParams(**kw)


# ---------------------------------------------------------------------------------------------
# responses


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


def dumps(obj: Any) -> str:
    """Compact JSON, UTF-8 text kept as is (vLLM's framing)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def sse(obj: Any) -> str:
    """One server-sent event: "data: {json}\\n\\n"."""
    return f"data: {dumps(obj)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
