"""The protocol's requests: the pydantic models of POST /v1/completions and
/v1/chat/completions (strict: unknown fields are a 400 that names them), and their
conversion to the engine's prompt token ids and ``SamplingParams``. See the package
docstring for the policies.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ...options import MAX_LOGPROBS, SamplingParams
from .errors import APIError, _json_type, _short

MAX_N = 128  # choices per request (OpenAI's limit for chat)
MAX_FANOUT = 256  # engine requests per HTTP request: n * number of prompts
_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1


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
    return SamplingParams(max_new_tokens=max_tokens, temperature=float(req.temperature), top_k=max(req.top_k, 0),
                          top_p=float(req.top_p), seed=seed, stop_token_ids=tuple(req.stop_token_ids),
                          ignore_eos=req.ignore_eos, logprobs=req.logprobs_n)
