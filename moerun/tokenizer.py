"""Tokenizers: byte-level for the presets (ids 0..255 are bytes, then BOS and EOS), a
checkpoint's ``tokenizer.json`` through the ``tokenizers`` package when present.

    tok = load_tokenizer("tiny", cfg)      # ByteTokenizer
    tok = load_tokenizer(ckpt_dir, cfg)    # HFTokenizer if ckpt_dir/tokenizer.json exists

Both share one small interface (what the generate CLI and the HTTP server use):

    tok.vocab_size                                   # ids are in [0, vocab_size)
    tok.encode(text, add_special_tokens=True)        # -> list[int]; False: no BOS etc.
                                                     #    (a rendered chat template already has them)
    tok.decode(ids, skip_special_tokens=True)        # -> str, invalid UTF-8 as U+FFFD
    tok.id_to_token(i)                               # the vocabulary entry, e.g. "Ġhello", "<0xE6>"
    tok.token_bytes(i)                               # the bytes token i stands for (logprobs' "bytes")
    tok.is_special(i)                                # BOS/EOS/added special tokens
"""
from __future__ import annotations

import codecs
import json
import logging
import re
from pathlib import Path


class ByteTokenizer:
    """Ids 0..255 are the bytes of UTF-8 text; ids from 256 up are special (BOS, EOS, unused)
    and never part of decoded text unless ``skip_special_tokens=False``."""

    def __init__(self, vocab_size: int, bos: int | None = None, eos: tuple[int, ...] = ()):
        if vocab_size < 256:
            raise ValueError(f"a byte-level tokenizer needs vocab_size >= 256, the model has {vocab_size}; "
                             "pass --prompt-ids instead of --prompt")
        self.vocab_size, self.bos, self.eos = vocab_size, bos, tuple(eos)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos] if add_special_tokens and self.bos is not None else []) + ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
        out, run = [], bytearray()
        for i in ids:
            if 0 <= i < 256:
                run.append(i)
            else:
                out.append(run.decode("utf-8", errors="replace"))
                out.append(self.id_to_token(i))
                run = bytearray()
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def is_special(self, i: int) -> bool:
        return not 0 <= i < 256

    def stream_decoder(self, skip_special_tokens: bool = True) -> ByteStreamDecoder:
        """Incremental decoding for streaming (``moerun.serve.detok`` takes it when present)."""
        return ByteStreamDecoder(self, skip_special_tokens)

    def id_to_token(self, i: int) -> str:
        if 0x20 <= i < 0x7F:
            return chr(i)
        if 0 <= i < 256:
            return f"<0x{i:02X}>"
        if i == self.bos:
            return "<bos>"
        if i in self.eos:
            return "<eos>"
        return f"<|special_{i}|>"

    def token_bytes(self, i: int) -> bytes:
        return bytes([i]) if 0 <= i < 256 else self.id_to_token(i).encode()


class ByteStreamDecoder:
    """ByteTokenizer's ids to text one at a time, through Python's incremental UTF-8 decoder:
    a character's bytes wait for its last one, an invalid byte comes out as U+FFFD as soon as
    it is known to be one, and the pieces join to ``ByteTokenizer.decode`` of all the ids
    (specials skipped, or written as their names between runs of bytes). One id costs about a
    microsecond, however long the text has been held back (the window decoding of
    ``IncrementalDetokenizer`` re-decodes held bytes on every id)."""

    def __init__(self, tok: ByteTokenizer, skip_special_tokens: bool = True):
        self.tok, self.skip = tok, skip_special_tokens
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        if 0 <= token_id < 256:
            return self.utf8.decode(bytes((token_id,)))
        if self.skip:
            return ""
        return self.utf8.decode(b"", final=True) + self.tok.id_to_token(token_id)  # decode's runs end here

    def finish(self) -> str:
        """An incomplete character at the end, as decode writes it (U+FFFD)."""
        return self.utf8.decode(b"", final=True)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as a printable character (the ByteLevel
    pre-tokenizer writes tokens in it)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _decoder_types(node) -> set[str]:
    if not isinstance(node, dict):
        return set()
    found = {node.get("type")}
    for child in node.get("decoders") or ():
        found |= _decoder_types(child)
    return found


class HFTokenizer:
    """A checkpoint's tokenizer.json through the ``tokenizers`` package."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(path))
        spec = json.loads(self.tok.to_str())
        kinds = _decoder_types(spec.get("decoder"))
        self._byte_level = "ByteLevel" in kinds
        self._byte_fallback = "ByteFallback" in kinds
        self._unbyte = {c: b for b, c in _bytes_to_unicode().items()} if self._byte_level else {}
        self._added = {t["id"]: t for t in spec.get("added_tokens") or ()}
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def is_special(self, i: int) -> bool:
        return bool(self._added.get(i, {}).get("special"))

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    def token_bytes(self, i: int) -> bytes:
        piece = self.tok.id_to_token(i)
        if piece is None:
            return b""
        if i in self._added:
            return piece.encode()
        if self._byte_level and all(c in self._unbyte for c in piece):
            return bytes(self._unbyte[c] for c in piece)
        if self._byte_fallback and (m := _BYTE_FALLBACK.fullmatch(piece)):
            return bytes([int(m.group(1), 16)])
        return self.tok.decode([i], skip_special_tokens=False).encode()


def load_tokenizer(model: str, cfg, required: bool = True):
    """The checkpoint's tokenizer, bytes for a preset, or None (ids only). A tokenizer.json
    that cannot be read is an error when text must be encoded (``required``); otherwise a
    warning, and the run goes on with token ids."""
    p = Path(model)
    if p.is_dir() and (p / "tokenizer.json").exists():
        try:
            return HFTokenizer(p / "tokenizer.json")
        except ImportError as e:
            raise ValueError(f"{p}/tokenizer.json needs the 'tokenizers' package: pip install tokenizers") from e
        except Exception as e:  # the tokenizers library reports a corrupt file with its own error type
            msg = f"{p / 'tokenizer.json'} cannot be read ({type(e).__name__}: {str(e)[:120]})"
            if required:
                raise ValueError(f"{msg}: replace it, or pass token ids") from None
            logging.getLogger("moerun").warning("%s; going on with token ids only (no text)", msg)
            return None
    if p.is_dir():
        return None  # a checkpoint without tokenizer.json: token ids only
    return ByteTokenizer(cfg.vocab_size, cfg.bos_token_id, tuple(getattr(cfg, "eos_token_ids", ()) or ()))
