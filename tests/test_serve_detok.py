"""moerun.serve.detok: incremental detokenization through a real byte-level BPE (trained here
on multi-byte UTF-8 text) and the byte tokenizer, and stop strings split across deltas."""
import random

import pytest

from moerun.serve.detok import IncrementalDetokenizer, StopStrings, TextStream
from moerun.tokenizer import ByteTokenizer, HFTokenizer

SENTENCES = ["héllo wörld 日本語 🙂", "naïve café, 東京タワー and émojis 🙂🚀", "größer Ärger — ça va?",
             "hello hello world the quick brown fox", "日本語のテキスト 🙂 ok"]
ALPHABET = "abc hé wörld日本語🙂🚀—ça漢🦀"


def _train(tmp_path, kind: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:  # SentencePiece-like: "▁" for spaces, and decode drops the leading one
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(SENTENCES * 3, trainer)
    path = tmp_path / f"{kind}.json"
    tok.save(str(path))
    return HFTokenizer(path)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("bpe"), "bytelevel")


def _run(detok, ids):
    deltas = [detok.add(t) for t in ids]
    deltas.append(detok.finish())
    return deltas


def _check(tok, ids, rng_note=""):
    full = tok.decode(ids)
    deltas = _run(IncrementalDetokenizer(tok), ids)
    assert "".join(deltas) == full, rng_note
    if "\ufffd" not in full:
        assert not any("\ufffd" in d for d in deltas), (rng_note, deltas)


def test_bpe_multibyte_tokens_are_split(bpe):
    # the trained vocabulary has tokens that hold only part of a character
    partial = [i for i in range(bpe.vocab_size) if "\ufffd" in bpe.decode([i])]
    assert partial
    text = "日本語 🙂🚀 wörld 漢字🦀"  # the last two never seen in training: byte by byte
    ids = bpe.encode(text, add_special_tokens=False)
    assert any("\ufffd" in bpe.decode([i]) for i in ids)
    deltas = _run(IncrementalDetokenizer(bpe), ids)
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)
    assert "漢" in deltas and "🦀" in deltas  # each whole, in one delta


def test_bpe_random_texts_and_random_ids(bpe):
    rng = random.Random(0)
    for trial in range(150):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 40)))
        _check(bpe, bpe.encode(text, add_special_tokens=False), text)
    for trial in range(150):  # arbitrary ids: invalid UTF-8 included, and special tokens
        ids = [rng.randrange(bpe.vocab_size) for _ in range(rng.randint(1, 30))]
        _check(bpe, ids, ids)


def test_skip_special_tokens(bpe):
    s, e = bpe.tok.token_to_id("<s>"), bpe.tok.token_to_id("</s>")
    ids = [s, *bpe.encode("café", add_special_tokens=False), e]
    assert "".join(_run(IncrementalDetokenizer(bpe), ids)) == "café"
    assert "".join(_run(IncrementalDetokenizer(bpe, skip_special_tokens=False), ids)) == "<s>café</s>"


def test_byte_tokenizer(tmp_path):
    tok = ByteTokenizer(300, bos=256, eos=(257,))
    rng = random.Random(1)
    for trial in range(200):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 30)))
        ids = tok.encode(text) + [257]
        deltas = _run(IncrementalDetokenizer(tok), ids)
        assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)
        # a 4-byte character comes out whole, at its last byte
    d = IncrementalDetokenizer(tok)
    assert [d.add(b) for b in "🙂".encode()] == ["", "", "", "🙂"]
    for trial in range(200):
        _check(tok, [rng.randrange(300) for _ in range(rng.randint(1, 20))])
    # an incomplete character at the end is flushed as decode writes it
    d = IncrementalDetokenizer(tok)
    assert d.add(0xE6) == "" and d.finish() == "\ufffd"
    # specials written out: they end decode's runs of bytes, an incomplete character before one included
    for trial in range(200):
        ids = [rng.choice([rng.randrange(256), rng.randrange(128), 0xE6, 0x97, 0xA5, 0xF0, 256, 257, 299])
               for _ in range(rng.randint(1, 20))]
        deltas = _run(IncrementalDetokenizer(tok, skip_special_tokens=False), ids)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=False), ids


def test_byte_tokenizer_decodes_each_id_once():
    """The byte tokenizer's stream decoder: a long run of bytes that stays invalid or
    incomplete is not decoded again on every id (the window would be)."""
    tok = ByteTokenizer(300, bos=256, eos=(257,))
    calls = []
    real = tok.decode
    tok.decode = lambda ids, skip_special_tokens=True: calls.append(len(ids)) or real(ids, skip_special_tokens)
    ids = [0xF0, 0x9F] + [0x80] * 200 + list("ok".encode())
    d = IncrementalDetokenizer(tok)
    assert "".join(_run(d, ids)) == real(ids) and not calls


def test_prompt_context_keeps_the_leading_space(tmp_path):
    sp = _train(tmp_path, "metaspace")
    prompt = sp.encode("hello", add_special_tokens=False)
    gen = sp.encode("hello world", add_special_tokens=False)[len(prompt):]
    assert sp.decode(gen).startswith("world")  # decoded alone, the space is gone
    out = "".join(_run(IncrementalDetokenizer(sp, prompt_ids=prompt), gen))
    assert out == " world" == sp.decode(prompt + gen)[len(sp.decode(prompt)):]


def test_window_is_short(bpe):
    """Each token decodes a few ids, not everything so far."""
    calls = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            calls.append(len(ids))
            return bpe.decode(ids, skip_special_tokens)

    ids = bpe.encode("hello world the quick brown fox " * 40, add_special_tokens=False)
    assert "".join(_run(IncrementalDetokenizer(Counting()), ids)) == bpe.decode(ids)
    assert max(calls) <= 4 and sum(calls) <= 6 * len(ids)


def _stop_reference(text, stops):
    """The text before the stop string that completes first, and that string."""
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or (i + len(s), i) < (best[0] + len(best[1]), best[0])):
            best = (i, s)
    return (text, None) if best is None else (text[:best[0]], best[1])


def _feed_split(text, stops, rng):
    ss, out, cuts = StopStrings(stops), "", sorted(rng.sample(range(1, len(text)), rng.randint(0, len(text) - 1))) \
        if len(text) > 1 else []
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    expected, _ = _stop_reference(text, stops)
    for p in pieces:
        got, matched = ss.feed(p)
        out += got
        # nothing emitted is, or is part of, a stop string that matches later
        assert expected.startswith(out)
        assert not any(s in out for s in stops)
        if matched:
            break
    if not matched:
        out += ss.flush()
    return out, ss.matched


def test_stop_strings_random_splits():
    rng = random.Random(2)
    stops_pool = ["\n\n", "STOP", "ab", "aab", "日本", "🙂!", "xyzzy"]
    for trial in range(500):
        stops = rng.sample(stops_pool, rng.randint(1, 3))
        text = "".join(rng.choice(["a", "b", "\n", "S", "TOP", "日", "本", "🙂", "!", "x", "yzzy", " "])
                       for _ in range(rng.randint(1, 25)))
        out, matched = _feed_split(text, stops, rng)
        assert (out, matched) == _stop_reference(text, stops), (text, stops)


def test_stop_string_spanning_many_deltas():
    ss = StopStrings(["<|end|>"])
    outs = [ss.feed(c) for c in "hi <|en"]
    assert "".join(o for o, _ in outs) == "hi " and not any(m for _, m in outs)
    assert ss.feed("d|") == ("", False)
    assert ss.feed(">tail") == ("", True) and ss.matched == "<|end|>"
    assert ss.feed("more") == ("", True) and ss.flush() == ""


def test_stop_false_start_is_released_and_flush():
    ss = StopStrings(["END", "\n\n"])
    assert ss.feed("the EN") == ("the ", False)
    assert ss.feed("D") == ("", True)
    ss = StopStrings(["END"])
    assert ss.feed("EN") == ("", False)
    assert ss.feed("S") == ("ENS", False)
    assert ss.feed("E") == ("", False)
    assert ss.flush() == "E" and ss.matched is None
    assert StopStrings([]).feed("abc") == ("abc", False)


def test_text_stream(bpe):
    ids = bpe.encode("hello wörld 日本語 🙂 ok", add_special_tokens=False)
    ts = TextStream(bpe, stops=["日本"])
    sent = ""
    for t in ids:
        sent += ts.add(t)
        if ts.stopped:
            break
    assert ts.stopped and ts.stop_reason == "日本" and sent == "hello wörld " == ts.text
    assert ts.add(ids[-1]) == "" and ts.finish() == ""
    ts = TextStream(bpe, stops=["nope"])
    sent = "".join(ts.add(t) for t in ids) + ts.finish()
    assert sent == "hello wörld 日本語 🙂 ok" and not ts.stopped


def test_token_bytes(bpe):
    text = "日本語 🙂 wörld 漢字🦀"
    ids = bpe.encode(text, add_special_tokens=False)
    assert b"".join(bpe.token_bytes(i) for i in ids) == text.encode()
    assert any(len(bpe.token_bytes(i).decode("utf-8", errors="ignore")) == 0 for i in ids)  # partial chars
    s = bpe.tok.token_to_id("<s>")
    assert bpe.token_bytes(s) == b"<s>" and bpe.is_special(s) and not bpe.is_special(ids[0])
    assert bpe.decode([bpe.vocab_size + 10]) == "" and bpe.token_bytes(bpe.vocab_size + 10) == b""
    tok = ByteTokenizer(300, bos=256, eos=(257,))
    assert b"".join(tok.token_bytes(i) for i in tok.encode(text, add_special_tokens=False)) == text.encode()
    assert tok.encode("a") == [256, 97] and tok.encode("a", add_special_tokens=False) == [97]
    assert tok.decode([256, 104, 257]) == "h" and tok.decode([256, 104, 257], skip_special_tokens=False) == \
        "<bos>h<eos>"
