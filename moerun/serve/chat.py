"""A checkpoint's chat template, found and rendered the way transformers 5 does it.

    tmpl = load_chat_template(ckpt_dir)          # ChatTemplate, or None when the model has none
    tmpl = require_chat_template(ckpt_dir)       # the same, APIError(400) naming the files looked for
    text = tmpl.render(messages)                 # add_generation_prompt=True by default
    ids = tmpl.encode(messages, tokenizer)       # render, then tokenize without special tokens
    ids = chat_prompt_ids(req, tmpl, tokenizer, vocab_size)   # a ChatCompletionRequest's prompt

Where the template comes from (transformers' order): ``chat_template.jinja`` (plus named ones in
``additional_chat_templates/*.jinja``) wins over the "chat_template" key of
``tokenizer_config.json`` (a string, or a list of {"name", "template"}); several templates ->
the one named "default". ``chat_template.json`` ({"chat_template": ...}, a processor's file) is
a last resort.

Rendering follows transformers' ``apply_chat_template``: a jinja2 ImmutableSandboxedEnvironment
with trim_blocks and lstrip_blocks, the loopcontrols extension and a ``{% generation %}`` block
that just renders its body; ``raise_exception(msg)``, ``strftime_now(fmt)``, a ``tojson`` that
does not escape HTML, a guarded ``namespace`` and ``dict``; the variables ``messages``,
``tools`` (None), ``documents`` (None), ``add_generation_prompt`` and the special tokens of
tokenizer_config.json (bos_token, eos_token, unk_token, sep_token, pad_token, cls_token,
mask_token and any other "*_token" string), then the request's ``chat_template_kwargs``.
Message keys whose value is null are dropped, and an assistant's ``reasoning_content`` is also
given as ``thinking``, as transformers does. The text is then tokenized WITHOUT adding special
tokens again (the template wrote them), as ``apply_chat_template(tokenize=True)`` does.

Content given as a list of text parts is passed as such to a template that loops over a
message's content ("openai" content format), and joined with "\\n" into one string for a
template that does not ("string" format) -- vLLM's "auto" content format.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from .protocol import APIError

TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
PROCESSOR_TEMPLATE = "chat_template.json"
LOOKED_FOR = (f"{TEMPLATE_FILE}, {TEMPLATE_DIR}/*.jinja, the \"chat_template\" key of {TOKENIZER_CONFIG} "
              f"and {PROCESSOR_TEMPLATE}")
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _token_str(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):  # a serialized AddedToken
        return v["content"]
    return None


def special_tokens_of(model_dir: Path) -> dict[str, str]:
    """The special tokens a template sees, from tokenizer_config.json (and, when that file has
    no "added_tokens_decoder", the legacy special_tokens_map.json on top, as transformers reads
    them)."""
    cfg = _read_json(model_dir / TOKENIZER_CONFIG)
    sources = [cfg]
    if "added_tokens_decoder" not in cfg:
        sources.append(_read_json(model_dir / SPECIAL_TOKENS_MAP))
    out: dict[str, str] = {}
    for src in sources:
        extra = src.get("extra_special_tokens")
        for key, value in {**src, **(extra if isinstance(extra, dict) else {})}.items():
            if key in SPECIAL_TOKEN_NAMES or key.endswith("_token"):
                tok = _token_str(value)
                if tok is not None:
                    out[key] = tok
    return out


def _find_templates(model_dir: Path) -> tuple[dict[str, str], str]:
    """{name: template} and where they came from."""
    templates: dict[str, str] = {}
    if (model_dir / TEMPLATE_FILE).is_file():
        templates["default"] = (model_dir / TEMPLATE_FILE).read_text(encoding="utf-8")
    extra_dir = model_dir / TEMPLATE_DIR
    if extra_dir.is_dir():
        for f in sorted(extra_dir.glob("*.jinja")):
            templates[f.stem] = f.read_text(encoding="utf-8")
    if templates:
        return templates, str(model_dir / (TEMPLATE_FILE if "default" in templates else TEMPLATE_DIR))
    value = _read_json(model_dir / TOKENIZER_CONFIG).get("chat_template")
    origin = str(model_dir / TOKENIZER_CONFIG)
    if value is None:
        value = _read_json(model_dir / PROCESSOR_TEMPLATE).get("chat_template")
        origin = str(model_dir / PROCESSOR_TEMPLATE)
    if isinstance(value, str):
        return {"default": value}, origin
    if isinstance(value, list):
        return {t["name"]: t["template"] for t in value
                if isinstance(t, dict) and isinstance(t.get("template"), str)}, origin
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if isinstance(v, str)}, origin
    return {}, ""


def load_chat_template(model_dir: str | Path | None) -> ChatTemplate | None:
    """The model's chat template, None when it has none (or is not a checkpoint directory)."""
    if model_dir is None or not Path(model_dir).is_dir():
        return None
    d = Path(model_dir)
    templates, origin = _find_templates(d)
    if not templates:
        return None
    if "default" not in templates:
        if len(templates) != 1:
            raise APIError.bad_request(f"{origin} holds several chat templates ({', '.join(sorted(templates))}) "
                                       "and none is named \"default\".")
        templates = {"default": next(iter(templates.values()))}
    tmpl = ChatTemplate(templates["default"], special_tokens_of(d), origin)
    tmpl._compiled  # a template that does not parse fails here, at load, not at the first request
    return tmpl


def require_chat_template(model_dir: str | Path | None) -> ChatTemplate:
    tmpl = load_chat_template(model_dir)
    if tmpl is None:
        where = f"in {model_dir}" if model_dir is not None and Path(model_dir).is_dir() else \
            f"({model_dir} is not a checkpoint directory)"
        raise APIError.bad_request(f"This model has no chat template: looked for {LOOKED_FOR} {where}. "
                                   "Use /v1/completions instead.", "messages")
    return tmpl


# ---------------------------------------------------------------------------------------------
# the jinja environment


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (marks the assistant's tokens for
        training masks in transformers): rendered as its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """jinja's namespace() without underscore-prefixed attributes (no way to CPython internals)."""

        def __init__(*args, **kwargs):
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")

    class DictMaker:
        """``dict(...)`` and ``dict.fromkeys(...)`` and nothing else of the dict type."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=DictMaker(),
                       namespace=Namespace)
    return env


def _loops_over_content(source: str, env) -> bool:
    """Whether the template iterates a message's content (then it takes content parts)."""
    from jinja2 import nodes

    def is_content(node) -> bool:
        while isinstance(node, (nodes.Filter, nodes.Test)):  # e.g. message['content'] | list
            node = node.node
        return (isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and node.arg.value == "content"
                ) or (isinstance(node, nodes.Getattr) and node.attr == "content")

    try:
        ast = env.parse(source)
    except Exception:
        return False
    content_names = {a.target.name for a in ast.find_all(nodes.Assign)
                     if isinstance(a.target, nodes.Name) and is_content(a.node)}
    for loop in ast.find_all(nodes.For):
        it = loop.iter
        while isinstance(it, (nodes.Filter, nodes.Test)):
            it = it.node
        if is_content(it) or (isinstance(it, nodes.Name) and it.name in content_names):
            return True
    return False


@dataclass
class ChatTemplate:
    source: str
    special_tokens: dict[str, str] = field(default_factory=dict)
    origin: str = ""

    @cached_property
    def _env(self):
        return _environment()

    @cached_property
    def _compiled(self):
        import jinja2

        try:
            return self._env.from_string(self.source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise APIError.server_error(f"The chat template of {self.origin} does not parse: {e}") from e

    @cached_property
    def content_format(self) -> str:
        """"openai" (content parts passed as a list) or "string" (text parts joined)."""
        return "openai" if _loops_over_content(self.source, self._env) else "string"

    def template_messages(self, messages: list) -> list[dict]:
        """Request messages (ChatMessage models or dicts) as the template sees them."""
        out = []
        for m in messages:
            d = m.model_dump(exclude_unset=True) if hasattr(m, "model_dump") else dict(m)
            content = d.get("content")
            if isinstance(content, list):
                parts = [p if isinstance(p, dict) else dict(p) for p in content]
                d["content"] = parts if self.content_format == "openai" else "\n".join(p["text"] for p in parts)
            d = {k: v for k, v in d.items() if v is not None}
            reasoning = next((d[k] for k in ("reasoning_content", "thinking", "reasoning") if k in d), None)
            if reasoning is not None:
                d = {"thinking": reasoning, **d, "reasoning_content": reasoning}
            out.append(d)
        return out

    def render(self, messages: list, add_generation_prompt: bool = True, **kwargs) -> str:
        """The conversation as the template writes it; APIError(400) when the template refuses
        it (raise_exception, or any other template error)."""
        import jinja2

        variables = {**self.special_tokens, **kwargs}
        variables.update(messages=self.template_messages(messages), add_generation_prompt=add_generation_prompt)
        variables.setdefault("tools", None)
        variables.setdefault("documents", None)
        template = self._compiled
        try:
            return template.render(**variables)
        except jinja2.exceptions.TemplateError as e:  # raise_exception(...), undefined values, the sandbox
            raise APIError.bad_request(f"The chat template rejected the messages: {e}", "messages") from e
        except Exception as e:  # a template tripping over this conversation (e.g. a str + a list)
            raise APIError.bad_request(f"The chat template failed on these messages: {type(e).__name__}: {e}",
                                       "messages") from e

    def encode(self, messages: list, tokenizer, add_generation_prompt: bool = True, **kwargs) -> list[int]:
        return tokenizer.encode(self.render(messages, add_generation_prompt, **kwargs), add_special_tokens=False)


def chat_prompt_ids(req, template: ChatTemplate | None, tokenizer, vocab_size: int) -> list[int]:
    """A ChatCompletionRequest's prompt token ids: its messages through the template, tokenized."""
    if tokenizer is None:
        raise APIError.bad_request("This model has no tokenizer.json: chat needs one; send token ids to "
                                   "/v1/completions instead.", "messages")
    if template is None:
        raise APIError.bad_request(f"This model has no chat template (looked for {LOOKED_FOR}). "
                                   "Use /v1/completions instead.", "messages")
    reserved = {"messages", "add_generation_prompt"}
    kwargs = {k: v for k, v in (req.chat_template_kwargs or {}).items() if k not in reserved}
    ids = template.encode(req.messages, tokenizer, req.add_generation_prompt, **kwargs)
    if not ids:
        raise APIError.bad_request("The chat template rendered the messages as an empty prompt.", "messages")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise APIError.server_error(f"The tokenizer produced token id {bad}, outside the model's vocabulary "
                                    f"(0..{vocab_size - 1}).")
    return ids
