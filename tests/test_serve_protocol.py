"""moerun.serve.protocol: request validation (each bad field a 400 naming it), the request ->
SamplingParams / prompt ids conversions, the length checks and the response shapes."""
import json
import sys

import pytest

from moerun.serve import protocol as P
from moerun.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_request
from moerun.tokenizer import ByteTokenizer

V = 300
TOK = ByteTokenizer(V, bos=256, eos=(257,))


def comp(**kw):
    return parse_request(CompletionRequest, {"prompt": "hi", **kw})


def chat(**kw):
    return parse_request(ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}], **kw})


def bad(fn, **kw) -> APIError:
    with pytest.raises(APIError) as e:
        fn(**kw)
    assert e.value.status == 400 and e.value.type == "invalid_request_error"
    return e.value


def test_importing_moerun_serve_is_light():
    import subprocess

    code = "import sys, moerun.serve; print('torch' in sys.modules, 'fastapi' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize("field, value, words", [
    ("temperature", "hot", "must be a number, got a string"),
    ("max_tokens", 1.5, "must be an integer, got a number"),
    ("n", True, "must be an integer, got a boolean"),
    ("stream", "yes", "must be a boolean"),
    ("logprobs", "5", "must be an integer"),
    ("seed", "7", "must be an integer"),
    ("user", 3, "must be a string"),
])
def test_wrong_type_names_the_field(field, value, words):
    e = bad(comp, **{field: value})
    assert e.param == field and f"'{field}'" in e.message and words in e.message


@pytest.mark.parametrize("field, value, words", [
    ("temperature", -0.1, ">= 0"), ("temperature", 2.5, "<= 2"), ("top_p", 0, "> 0"), ("top_p", 1.01, "<= 1"),
    ("max_tokens", 0, ">= 1"), ("logprobs", 21, "<= 20"), ("logprobs", -1, ">= 0"),
    ("n", 0, ">= 1"), ("n", P.MAX_N + 1, f"<= {P.MAX_N}"), ("top_k", -2, ">= -1"),
])
def test_out_of_range_names_the_field(field, value, words):
    e = bad(comp, **{field: value})
    assert e.param == field and words in e.message and "out of range" in e.message


def test_chat_out_of_range_and_types():
    assert bad(chat, top_logprobs=21, logprobs=True).param == "top_logprobs"
    assert bad(chat, logprobs=3).param == "logprobs"  # a bool in chat
    assert bad(chat, max_completion_tokens=0).param == "max_completion_tokens"
    e = bad(chat, top_logprobs=2)
    assert e.param == "top_logprobs" and "logprobs" in e.message


def test_unknown_fields_are_rejected_by_name():
    e = bad(comp, frobnicate=1)
    assert e.param == "frobnicate" and "'frobnicate'" in e.message and "Unknown field" in e.message
    e = bad(comp, aaa=1, bbb=2)
    assert "'aaa'" in e.message and "'bbb'" in e.message
    e = bad(chat, messages=[{"role": "user", "content": "x", "colour": "red"}])
    assert e.param == "messages[0].colour"
    e = bad(comp, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
    assert e.param == "stream_options.continuous_usage_stats"


@pytest.mark.parametrize("field, value", [
    ("frequency_penalty", 0.5), ("presence_penalty", -1.0), ("repetition_penalty", 1.2),
    ("best_of", 3), ("logit_bias", {"50": 10.0}), ("suffix", "tail"),
])
def test_non_neutral_unsupported_fields(field, value):
    e = bad(comp, **{field: value})
    assert e.param == field and "not supported" in e.message
    # the neutral values are accepted
    neutral = {"frequency_penalty": 0, "presence_penalty": 0.0, "repetition_penalty": 1, "best_of": 1,
               "logit_bias": {}, "suffix": ""}
    comp(**{field: neutral[field]})
    comp(**{field: None})


@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "required"),
    ("response_format", {"type": "json_object"}), ("frequency_penalty", 0.1),
])
def test_chat_non_neutral_unsupported_fields(field, value):
    e = bad(chat, **{field: value})
    assert e.param == field and "not supported" in e.message
    chat(tools=[], tool_choice="none", response_format={"type": "text"}, parallel_tool_calls=True)


def test_chat_max_tokens_alias():
    assert chat(max_tokens=7).max_output_tokens == 7
    assert chat(max_completion_tokens=9).max_output_tokens == 9
    assert chat(max_tokens=5, max_completion_tokens=5).max_output_tokens == 5
    assert chat().max_output_tokens is None
    e = bad(chat, max_tokens=5, max_completion_tokens=6)
    assert e.param == "max_completion_tokens" and "max_tokens" in e.message


def test_chat_messages_validation():
    assert bad(chat, messages=[]).param == "messages"
    e = bad(chat, messages=[{"role": "robot", "content": "x"}])
    assert e.param == "messages[0].role" and "robot" in e.message
    e = bad(chat, messages=[{"role": "user", "content": "a"},
                            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    assert e.param == "messages[1].content" and "image_url" in e.message and "text only" in e.message
    e = bad(chat, messages=[{"role": "user"}])
    assert e.param == "messages[0]" and "content" in e.message
    e = bad(chat, messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}])
    assert e.param == "messages[0].content" and "text" in e.message
    ok = chat(messages=[{"role": "system", "content": "s"},
                        {"role": "user", "content": [{"type": "text", "text": "a"}]},
                        {"role": "assistant", "content": None, "tool_calls": []}])
    assert ok.messages[1].text_parts() == ["a"]


def test_body_errors():
    e = bad(lambda: parse_request(CompletionRequest, b"{not json"))
    assert "not valid JSON" in e.message and e.param is None
    e = bad(lambda: parse_request(CompletionRequest, b"[1, 2]"))
    assert "JSON object" in e.message
    e = bad(lambda: parse_request(CompletionRequest, b"{}"))
    assert e.param == "prompt" and "required" in e.message
    e = bad(comp, stream_options={"include_usage": True})
    assert e.param == "stream_options" and "stream" in e.message


def test_stop_validation():
    assert comp(stop="x").stop_strings == ["x"]
    assert comp(stop=["a", "b"]).stop_strings == ["a", "b"]
    assert comp(stop=None).stop_strings == []
    assert bad(comp, stop=["a", 3]).param == "stop"
    assert bad(comp, stop="").param == "stop"
    e = bad(comp, stop_token_ids=[1, "2"])
    assert e.param == "stop_token_ids" and "stop_token_ids[1]" in e.message


def test_valid_requests_map_to_sampling_params():
    req = comp(temperature=0, top_k=-1, top_p=0.5, seed=11, stop_token_ids=[3, 4], ignore_eos=True, logprobs=2,
               max_tokens=9)
    sp = P.to_sampling(req, req.max_tokens)
    assert (sp.max_new_tokens, sp.temperature, sp.top_k, sp.top_p, sp.seed, sp.stop_token_ids, sp.ignore_eos) == \
        (9, 0.0, 0, 0.5, 11, (3, 4), True)
    if hasattr(sp, "logprobs"):
        assert sp.logprobs == 2
    # OpenAI's defaults: temperature 1, top_p 1, 16 tokens; null means the default
    d = comp(temperature=None, top_p=None, n=None)
    assert (d.temperature, d.top_p, d.n, d.max_tokens, d.top_k) == (1.0, 1.0, 1, 16, 0)
    assert comp(max_tokens=None).max_tokens is None  # vLLM: as many as fit
    assert P.to_sampling(comp(top_k=5), 4).top_k == 5
    # n samples with a seed: each its own, reproducible seed
    seeds = [P.to_sampling(comp(seed=5, n=3), 4, choice_index=i).seed for i in range(3)]
    assert seeds == [5, 6, 7]
    assert P.to_sampling(comp(seed=2**63 - 1), 4, choice_index=1).seed == -(2**63)
    # chat logprobs: top_logprobs when logprobs is true
    assert chat(logprobs=True, top_logprobs=3).logprobs_n == 3
    assert chat(logprobs=True).logprobs_n == 0
    assert chat().logprobs_n is None
    e = bad(lambda: P.to_sampling(comp(stop_token_ids=[V]), 4, vocab_size=V))
    assert e.param == "stop_token_ids" and str(V) in e.message


def test_prompts_normalise_in_order():
    assert P.prompts_of(comp(prompt="hé"), TOK, V) == [[256, 104, 195, 169]]
    assert P.prompts_of(comp(prompt=[5, 6, 7]), TOK, V) == [[5, 6, 7]]
    assert P.prompts_of(comp(prompt=["a", "bc"]), TOK, V) == [[256, 97], [256, 98, 99]]
    assert P.prompts_of(comp(prompt=[[1], [2, 3], [4]]), None, V) == [[1], [2, 3], [4]]
    assert P.echo_texts(comp(prompt=[[104, 105]]), TOK, [[104, 105]]) == ["hi"]
    assert P.echo_texts(comp(prompt=["a", "b"]), TOK, [[256, 97], [256, 98]]) == ["a", "b"]


@pytest.mark.parametrize("prompt, words", [
    ("", "empty"), ([], "empty"), ([[1], []], "prompt[1] is empty"), ([1, 2.5], "prompt[1]"),
    ([1, True], "prompt[1]"), ([1, -3], "prompt[1]"), ([[1], ["a"]], "prompt[1][0]"), ([1, "a"], "mixes"),
    (5, "must be a string"), ({"a": 1}, "must be a string"),
])
def test_bad_prompts(prompt, words):
    e = bad(comp, prompt=prompt)
    assert e.param == "prompt" and words in e.message


def test_prompt_ids_outside_vocab_and_text_without_tokenizer():
    e = bad(lambda: P.prompts_of(comp(prompt=[1, V]), TOK, V))
    assert e.param == "prompt" and "outside the vocabulary" in e.message and f"0..{V - 1}" in e.message
    e = bad(lambda: P.prompts_of(comp(prompt=[[1], [2, V + 5]]), None, V))
    assert "prompt[1][1]" in e.message
    e = bad(lambda: P.prompts_of(comp(prompt="hello"), None, V))
    assert e.param == "prompt" and "no tokenizer.json" in e.message and "token ids" in e.message


def test_fanout_cap():
    P.prompts_of(comp(prompt=[[1]] * 2, n=P.MAX_FANOUT // 2), None, V)
    e = bad(lambda: P.prompts_of(comp(prompt=[[1]] * 3, n=P.MAX_FANOUT // 2), None, V))
    assert e.param == "n" and str(P.MAX_FANOUT) in e.message


def test_length_checks():
    P.check_length(10, 6, 16)
    e = bad(lambda: P.check_length(10, 7, 16))
    assert e.message.startswith("This model's maximum context length is 16 tokens. However, you requested "
                                "17 tokens (10 in the messages, 7 in the completion).")
    assert e.code == "context_length_exceeded"
    assert P.resolve_max_tokens(None, 10, 16) == 6
    assert P.resolve_max_tokens(4, 10, 16) == 4
    bad(lambda: P.resolve_max_tokens(None, 16, 16))
    bad(lambda: P.resolve_max_tokens(7, 10, 16))


def test_errors_and_model_check():
    e = APIError.bad_request("nope", "temperature")
    assert P.error_body(e) == {"error": {"message": "nope", "type": "invalid_request_error",
                                         "param": "temperature", "code": None}}
    P.check_model(None, "m")
    P.check_model("m", ["m", "alias"])
    with pytest.raises(APIError) as ei:
        P.check_model("other", "m")
    assert ei.value.status == 404 and "`other`" in ei.value.message and ei.value.code == "model_not_found"
    assert APIError.unauthorized().status == 401


def test_completion_response_shapes():
    lp = P.CompletionLogprobs(TOK, top_n=2, initial_offset=3)
    first = lp([(104, -0.5, ((104, -0.5), (105, -1.5), (106, -2.0))), (105, float("-inf"), ((104, -0.1),))])
    assert first == {"tokens": ["h", "i"], "token_logprobs": [-0.5, P.LOGPROB_FLOOR],
                     "top_logprobs": [{"h": -0.5, "i": -1.5}, {"h": -0.1, "i": P.LOGPROB_FLOOR}],
                     "text_offset": [3, 4]}
    assert lp([(33, -0.2, ())])["text_offset"] == [5]  # carries on across chunks
    choice = P.completion_choice(0, "hi", "length", first)
    resp = P.completion_response("cmpl-1", "m", [choice], P.usage(3, 2), created=7)
    assert list(resp) == ["id", "object", "created", "model", "choices", "usage"]
    assert resp["object"] == "text_completion" and resp["created"] == 7
    assert list(resp["choices"][0]) == ["index", "text", "logprobs", "finish_reason", "stop_reason"]
    assert resp["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert P.new_id("cmpl").startswith("cmpl-") and len(P.new_id("cmpl")) == 5 + 32
    chunk = P.completion_chunk("cmpl-1", "m", 7, 1, "x")
    assert chunk["object"] == "text_completion" and chunk["usage"] is None
    assert chunk["choices"] == [{"index": 1, "text": "x", "logprobs": None, "finish_reason": None,
                                 "stop_reason": None}]
    last = P.usage_chunk("cmpl-1", "m", 7, P.usage(1, 1))
    assert last["choices"] == [] and last["usage"]["total_tokens"] == 2 and last["object"] == "text_completion"
    s = P.sse(chunk)
    assert s.startswith("data: {") and s.endswith("}\n\n") and json.loads(s[6:]) == chunk
    assert P.SSE_DONE == "data: [DONE]\n\n"
    assert "é" in P.sse({"t": "é"})  # UTF-8 kept, not \u-escaped


def test_chat_response_shapes():
    lp = P.chat_logprobs([(195, -0.25, ((195, -0.25), (104, -2.0))), (257, -1.0, ())], TOK, top_n=1)
    c0 = lp["content"][0]
    assert list(c0) == ["token", "logprob", "bytes", "top_logprobs"]
    assert c0["bytes"] == [195] and c0["logprob"] == -0.25
    assert c0["top_logprobs"] == [{"token": c0["token"], "logprob": -0.25, "bytes": [195]}]
    assert lp["content"][1]["token"] == "<eos>"
    choice = P.chat_choice(0, "hello", "stop", lp, stop_reason="\n")
    resp = P.chat_response("chatcmpl-1", "m", [choice], P.usage(4, 2), created=9)
    assert resp["object"] == "chat.completion" and list(resp) == ["id", "object", "created", "model", "choices",
                                                                    "usage"]
    assert resp["choices"][0]["message"] == {"role": "assistant", "content": "hello"}
    assert list(resp["choices"][0]) == ["index", "message", "logprobs", "finish_reason", "stop_reason"]
    first = P.chat_role_chunk("chatcmpl-1", "m", 9, 0)
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["choices"][0]["finish_reason"] is None and first["usage"] is None
    mid = P.chat_chunk("chatcmpl-1", "m", 9, 0, content="he")
    assert mid["choices"][0]["delta"] == {"content": "he"}
    end = P.chat_chunk("chatcmpl-1", "m", 9, 0, finish_reason="length")
    assert end["choices"][0]["delta"] == {} and end["choices"][0]["finish_reason"] == "length"
    assert P.usage_chunk("chatcmpl-1", "m", 9, P.usage(1, 2), chat=True)["object"] == "chat.completion.chunk"
    card = P.model_card("m", 4096, created=1)
    assert P.model_list([card]) == {"object": "list", "data": [
        {"id": "m", "object": "model", "created": 1, "owned_by": "moerun", "root": "m", "parent": None,
         "max_model_len": 4096, "permission": []}]}


def _text(rng) -> str:
    pool = ['a', ' ', '"', '\\', '\n', '\t', '\x00', '\x1f', '\x7f', '\u00e9', '\u2028', '\u4e2d', '\U0001F600',
            '\ud800', '</script>', '{"x": [1]}']
    return "".join(rng.choice(pool) for _ in range(rng.randrange(0, 12)))


@pytest.mark.parametrize("chat", [False, True])
def test_token_chunk_template_is_the_chunk_sse_would_write(chat):
    """TokenChunks writes, byte for byte, what sse() writes for the same chunk dict (with
    token_ids added), for any text: quotes, controls, non-ASCII, a lone surrogate."""
    import random

    rng = random.Random(7 + chat)
    for _ in range(300):
        rid, model, created = P.new_id("chatcmpl" if chat else "cmpl"), _text(rng) or "m", rng.randrange(2**31)
        index, text = rng.randrange(0, 64), _text(rng)
        ids = [rng.randrange(0, 200_000) for _ in range(rng.randrange(0, 5))]
        if chat:
            want = P.chat_chunk(rid, model, created, index, content=text)
        else:
            want = P.completion_chunk(rid, model, created, index, text)
        want["choices"][0]["token_ids"] = ids
        got = P.TokenChunks(rid, model, created, chat)(index, text, ids)
        assert got == P.sse(want)
        assert json.loads(got[len("data: "):]) == want
