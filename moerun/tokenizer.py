"""Tokenizers: byte-level for the presets (ids 0..255 are bytes, then BOS and EOS), a
checkpoint's ``tokenizer.json`` through the ``tokenizers`` package when present.

    tok = load_tokenizer("tiny", cfg)      # ByteTokenizer
    tok = load_tokenizer(ckpt_dir, cfg)    # HFTokenizer if ckpt_dir/tokenizer.json exists
"""
from __future__ import annotations

from pathlib import Path


class ByteTokenizer:
    def __init__(self, vocab_size: int, bos: int | None = None):
        if vocab_size < 256:
            raise ValueError(f"a byte-level tokenizer needs vocab_size >= 256, the model has {vocab_size}; "
                             "pass --prompt-ids instead of --prompt")
        self.vocab_size, self.bos = vocab_size, bos

    def encode(self, text: str) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos] if self.bos is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


def load_tokenizer(model: str, cfg):
    """The checkpoint's tokenizer, bytes for a preset, or None (ids only)."""
    p = Path(model)
    if p.is_dir() and (p / "tokenizer.json").exists():
        try:
            return HFTokenizer(p / "tokenizer.json")
        except ImportError as e:
            raise ValueError(f"{p}/tokenizer.json needs the 'tokenizers' package: pip install tokenizers") from e
    if p.is_dir():
        return None  # a checkpoint without tokenizer.json: token ids only
    return ByteTokenizer(cfg.vocab_size, cfg.bos_token_id)
