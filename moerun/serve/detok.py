"""Token ids -> text, incrementally, for streaming and stop strings.

    detok = IncrementalDetokenizer(tokenizer, prompt_ids=prompt)   # one per choice
    for tok in generated:
        delta = detok.add(tok)          # new text, "" while a UTF-8 character is incomplete
    tail = detok.finish()               # what was held back, at the end

``IncrementalDetokenizer`` decodes only a short window of ids (vLLM's prefix / read offsets):
the text of ids[prefix:read] was already emitted, the text of ids[prefix:] minus it is new,
and it is emitted only when it does not end in U+FFFD (a character still incomplete). So the
deltas join to ``tokenizer.decode(all_ids)`` and never split a character. With ``prompt_ids``
the last few prompt ids are context for the window, so the first token's leading space is
kept by tokenizers that strip it at the start of a text (SentencePiece), as vLLM does.

A tokenizer with a ``stream_decoder(skip_special_tokens)`` (the byte tokenizer of the presets)
decodes incrementally itself, with the same guarantees; the window is not used then.

``StopStrings`` is fed those deltas and holds back text that could still become a stop
string; on a match it returns the text before the stop string (the stop string itself is
left out, as OpenAI does; of several, the one that completes first) and the request ends
there (finish_reason "stop", stop_reason the string). ``TextStream`` chains the two for one choice::

    ts = TextStream(tokenizer, stops, prompt_ids=prompt)
    text = ts.add(tok)                  # safe to send; ts.stopped: a stop string matched, abort it
    text = ts.finish()                  # when the engine finished the request (EOS, length)
"""
from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT = 5  # prompt ids the window starts with (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True, prompt_ids: Sequence[int] = ()):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.text = ""  # everything emitted
        self.finished = False
        make = getattr(tokenizer, "stream_decoder", None)
        self.stream = make(skip_special_tokens) if make is not None else None
        if self.stream is not None:
            return  # no window
        ctx = list(prompt_ids[-PROMPT_CONTEXT:])
        # context that ends mid-character would shift every later delta: start without it
        if ctx and self._decode(ctx).endswith(REPLACEMENT):
            ctx = []
        self.ids = ctx
        self.prefix_offset, self.read_offset = 0, len(ctx)
        self._prefix_text = self._decode(ctx) if ctx else ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def add(self, token_id: int) -> str:
        """The text ``token_id`` completes ("" while it is held back)."""
        if self.stream is not None:
            delta = self.stream.add(token_id)
            self.text += delta
            return delta
        self.ids.append(token_id)
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) <= len(self._prefix_text) or new_text.endswith(REPLACEMENT):
            return ""
        delta = new_text[len(self._prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self._prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        self.text += delta
        return delta

    def add_many(self, token_ids: Sequence[int]) -> str:
        return "".join(self.add(t) for t in token_ids)

    def finish(self) -> str:
        """The held-back text (an incomplete character comes out as U+FFFD, as decode writes it)."""
        if self.finished:
            return ""
        self.finished = True
        if self.stream is not None:
            delta = self.stream.finish()
            self.text += delta
            return delta
        if self.read_offset == len(self.ids):
            return ""
        new_text = self._decode(self.ids[self.prefix_offset:])
        delta = new_text[len(self._prefix_text):]
        self.read_offset = len(self.ids)
        self.text += delta
        return delta


class StopStrings:
    """Fed text deltas; returns (text safe to emit now, matched). Text that could be the start
    of a stop string is held until it is not; on a match the text before the earliest stop
    string is returned with matched=True (``self.matched`` is the stop string) and nothing
    more comes out. ``flush()`` at the end returns what was held back."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.matched: str | None = None

    def feed(self, delta: str) -> tuple[str, bool]:
        if self.matched is not None:
            return "", True
        if not self.stops:
            return delta, False
        buf = self.held + delta
        hits = [(i, s) for s in self.stops if (i := buf.find(s)) >= 0]
        if hits:
            # the stop string that completes first (then the longest of those): the same answer
            # however the text is split into deltas
            i, s = min(hits, key=lambda h: (h[0] + len(h[1]), h[0]))
            self.matched, self.held = s, ""
            return buf[:i], True
        keep = self._partial(buf)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def _partial(self, buf: str) -> int:
        """The length of the longest end of ``buf`` that some stop string starts with."""
        longest = min(len(buf), max(len(s) for s in self.stops) - 1)
        for k in range(longest, 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def flush(self) -> str:
        if self.matched is not None:
            return ""
        out, self.held = self.held, ""
        return out


class TextStream:
    """One choice's text: IncrementalDetokenizer then StopStrings. ``add`` / ``finish`` return
    the text to send; ``stopped`` turns True when a stop string matched (``stop_reason`` is
    the string); ``text`` is everything returned so far."""

    def __init__(self, tokenizer, stops: Sequence[str] = (), skip_special_tokens: bool = True,
                 prompt_ids: Sequence[int] = ()):
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens, prompt_ids)
        self.stop = StopStrings(stops)
        self.text = ""

    @property
    def stopped(self) -> bool:
        return self.stop.matched is not None

    @property
    def stop_reason(self) -> str | None:
        return self.stop.matched

    def add(self, token_id: int) -> str:
        if self.stopped:
            return ""
        out, _ = self.stop.feed(self.detok.add(token_id))
        self.text += out
        return out

    def finish(self) -> str:
        if self.stopped:
            return ""
        out, matched = self.stop.feed(self.detok.finish())
        if not matched:
            out += self.stop.flush()
        self.text += out
        return out
