"""moerun.serve.chat against transformers: the same template found, the same text rendered,
the same token ids."""
import json
import os

import pytest

from moerun.serve.chat import chat_prompt_ids, load_chat_template, require_chat_template
from moerun.serve.protocol import APIError, ChatCompletionRequest, parse_request
from moerun.tokenizer import HFTokenizer

SPECIAL = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<think>"]

# "string" content format: content is printed as is; a raise_exception branch; namespace, loop vars
CHATML = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('Conversations must start with a user or "
    "system message') }}{% endif %}"
    "{% set ns = namespace(turns=0) %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{% set ns.turns = ns.turns + 1 %}{% endif %}"
    "<|im_start|>{{ message['role'] }}{% if message.name is defined %} ({{ message.name }}){% endif %}\n"
    "{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
    "{% endif %}"
)

# "openai" content format (loops over the parts), trim/lstrip-sensitive layout, tojson, generation block
PARTS = """{{- bos_token -}}
{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
default system {{ {"n": messages | length, "é": true} | tojson }}<|im_end|>
    {% endif %}
<|im_start|>{{ message['role'] }}
    {% if message['content'] is string %}
{{ message['content'] }}
    {%- else %}
        {% for part in message['content'] %}
            {% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}
            {% if not loop.last %} | {% endif %}
        {% endfor %}
    {%- endif %}
    {% if message['role'] == 'assistant' %}{% generation %}{{ eos_token }}{% endgeneration %}{% endif %}
<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

MESSAGE_LISTS = [
    [{"role": "user", "content": "hello wörld"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "hello"}, {"role": "user", "content": "日本語 🙂?"}],
    [{"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]},
     {"role": "assistant", "content": "ok", "name": "bot"}, {"role": "user", "content": "again"}],
]


def _tokenizer_json(path, bos_post_processor=False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=350, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["system user assistant hello world part one two again", "wörld 日本語 🙂"] * 3, trainer)
    if bos_post_processor:  # encode() adds BOS: the chat path must not add it a second time
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(path / "tokenizer.json"))


def _config(path, chat_template, **extra):
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "model_max_length": 4096,
           "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False, "normalized": False,
                         "rstrip": False, "single_word": False, "special": True}, **extra}
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("chat")
    out = {}
    for name in ("config", "jinja", "named", "none"):
        d = base / name
        d.mkdir()
        _tokenizer_json(d, bos_post_processor=(name == "config"))
        out[name] = d
    _config(out["config"], CHATML)
    _config(out["jinja"], CHATML)  # chat_template.jinja wins over this
    (out["jinja"] / "chat_template.jinja").write_text(PARTS)
    _config(out["named"], [{"name": "tool_use", "template": "TOOLS {{ messages | length }}"},
                           {"name": "default", "template": CHATML}])
    _config(out["none"], None)
    return out


def _hf(d):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d))


def _hf_ids(hf, messages):
    out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _joined(messages):
    """What the "string" content format makes of text parts (vLLM joins them with newlines)."""
    return [{**m, "content": "\n".join(p["text"] for p in m["content"])} if isinstance(m["content"], list) else m
            for m in messages]


@pytest.mark.parametrize("which", ["config", "jinja", "named"])
def test_render_and_ids_match_transformers(dirs, which):
    d = dirs[which]
    hf, tmpl, tok = _hf(d), load_chat_template(d), HFTokenizer(d / "tokenizer.json")
    assert tmpl.content_format == ("openai" if which == "jinja" else "string")
    assert tmpl.origin.endswith("chat_template.jinja" if which == "jinja" else "tokenizer_config.json")
    for messages in MESSAGE_LISTS:
        theirs_in = messages if tmpl.content_format == "openai" else _joined(messages)
        expected = hf.apply_chat_template(theirs_in, tokenize=False, add_generation_prompt=True)
        assert tmpl.render(messages) == expected
        assert tmpl.encode(messages, tok) == _hf_ids(hf, theirs_in)
        # through a request, as the server does it
        req = parse_request(ChatCompletionRequest, {"messages": messages})
        assert chat_prompt_ids(req, tmpl, tok, vocab_size=tok.vocab_size) == _hf_ids(hf, theirs_in)
    assert tmpl.render(MESSAGE_LISTS[0], add_generation_prompt=False) == \
        hf.apply_chat_template(MESSAGE_LISTS[0], tokenize=False, add_generation_prompt=False)


def test_bos_written_once(dirs):
    tok = HFTokenizer(dirs["config"] / "tokenizer.json")
    ids = load_chat_template(dirs["config"]).encode(MESSAGE_LISTS[0], tok)
    bos = tok.tok.token_to_id("<s>")
    assert ids[0] == bos and ids.count(bos) == 1
    assert tok.encode("hi")[0] == bos and tok.encode("hi", add_special_tokens=False)[0] != bos


def test_template_kwargs_and_special_tokens(dirs):
    d = dirs["config"]
    hf, tmpl, tok = _hf(d), load_chat_template(d), HFTokenizer(d / "tokenizer.json")
    assert tmpl.special_tokens == {"bos_token": "<s>", "eos_token": "<|im_end|>"}
    msgs = MESSAGE_LISTS[0]
    assert tmpl.render(msgs, enable_thinking=False) == \
        hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert tmpl.render(msgs, enable_thinking=False).endswith("<think></think>")
    req = parse_request(ChatCompletionRequest, {"messages": msgs, "chat_template_kwargs": {"enable_thinking": False}})
    assert chat_prompt_ids(req, tmpl, tok, tok.vocab_size) == \
        _hf_ids(hf, msgs) + tok.encode("<think></think>", add_special_tokens=False)


def test_raise_exception_is_a_400(dirs):
    import jinja2

    d = dirs["config"]
    bad = [{"role": "assistant", "content": "I start"}]
    with pytest.raises(jinja2.exceptions.TemplateError, match="must start with a user"):
        _hf(d).apply_chat_template(bad, tokenize=False, add_generation_prompt=True)
    with pytest.raises(APIError) as e:
        load_chat_template(d).render(bad)
    assert e.value.status == 400 and "must start with a user" in e.value.message and e.value.param == "messages"


def test_strftime_now_and_sandbox(tmp_path):
    from datetime import datetime

    from moerun.serve.chat import ChatTemplate

    assert ChatTemplate("{{ strftime_now('%Y') }}").render([]) == str(datetime.now().year)
    with pytest.raises(Exception):
        ChatTemplate("{% set ns = namespace() %}{% set ns._x = 1 %}").render([])
    with pytest.raises(Exception):  # the sandbox: no attribute walk to Python internals
        ChatTemplate("{{ messages.__class__.__mro__ }}").render([])


def test_missing_template_is_a_400_naming_the_files(dirs):
    assert load_chat_template(dirs["none"]) is None
    assert load_chat_template("tiny") is None
    with pytest.raises(APIError) as e:
        require_chat_template(dirs["none"])
    msg = e.value.message
    assert e.value.status == 400
    assert "chat_template.jinja" in msg and "tokenizer_config.json" in msg and str(dirs["none"]) in msg
    req = parse_request(ChatCompletionRequest, {"messages": MESSAGE_LISTS[0]})
    with pytest.raises(APIError, match="no chat template"):
        chat_prompt_ids(req, None, HFTokenizer(dirs["none"] / "tokenizer.json"), 350)
    with pytest.raises(APIError, match="no tokenizer.json"):
        chat_prompt_ids(req, load_chat_template(dirs["config"]), None, 350)


def test_broken_template_fails_at_load(tmp_path):
    _tokenizer_json(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(APIError) as e:
        load_chat_template(tmp_path)
    assert e.value.status == 500 and "chat_template.jinja" in e.value.message and "does not parse" in e.value.message
