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
keys); ``sse(obj)`` frames one for a stream and ``SSE_DONE`` ends it; ``TokenChunks`` frames
a stream's plain text chunks from a template, the same bytes. Log probabilities come
from the engine as ``(token_id, logprob, ((top_id, top_logprob), ...))`` triples
(``moerun.sampling.Sampled``) and are formatted with ``CompletionLogprobs`` (one per choice:
it carries ``text_offset`` across stream chunks) or ``chat_logprobs``. In a stream, a token
whose text is still held back (half a character, a possible stop string) has no text to send
yet: keep its logprobs entry pending and send it with the next chunk that has text, or with
the choice's last chunk, so every generated token's logprobs are sent exactly once.
"""
from .errors import APIError, check_model, error_body, parse_request, validation_error
from .requests import (MAX_FANOUT, MAX_LOGPROBS, MAX_N, ChatCompletionRequest, ChatMessage, CompletionRequest,
                       StreamOptions, TextPart, check_fanout, check_length, choice_index, echo_texts, prompts_of,
                       resolve_max_tokens, to_sampling)
from .responses import (LOGPROB_FLOOR, SSE_DONE, CompletionLogprobs, TokenChunks, chat_chunk, chat_choice,
                        chat_logprobs, chat_response, chat_role_chunk, completion_choice, completion_chunk,
                        completion_response, dumps, model_card, model_list, new_id, now, sse, token_text, usage,
                        usage_chunk)

__all__ = ["APIError", "check_model", "error_body", "parse_request", "validation_error", "MAX_FANOUT",
           "MAX_LOGPROBS", "MAX_N", "ChatCompletionRequest", "ChatMessage", "CompletionRequest", "StreamOptions",
           "TextPart", "check_fanout", "check_length", "choice_index", "echo_texts", "prompts_of",
           "resolve_max_tokens", "to_sampling", "LOGPROB_FLOOR", "SSE_DONE", "CompletionLogprobs", "TokenChunks",
           "chat_chunk", "chat_choice", "chat_logprobs", "chat_response", "chat_role_chunk", "completion_choice",
           "completion_chunk", "completion_response", "dumps", "model_card", "model_list", "new_id", "now", "sse",
           "token_text", "usage", "usage_chunk"]
