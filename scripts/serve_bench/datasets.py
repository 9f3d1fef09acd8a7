"""The prompts a serving benchmark sends: random token ids or a JSONL file."""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass


def random_lengths(rng: random.Random, n: int, length: int, ratio: float) -> list[int]:
    """n integer lengths uniform in [length*(1-ratio), length*(1+ratio)], each >= 1."""
    lo = max(1, math.ceil(length * (1 - ratio)))
    hi = max(lo, math.floor(length * (1 + ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


@dataclass
class Prompt:
    prompt: list[int] | str
    max_tokens: int

    @property
    def ids(self) -> list[int] | None:
        return self.prompt if isinstance(self.prompt, list) else None


def random_dataset(n: int, input_len: int, output_len: int, ratio: float, low: int, high: int,
                   seed: int) -> list[Prompt]:
    if not 0 <= ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {ratio}")
    if input_len < 1 or output_len < 1:
        raise ValueError("--random-input-len and --random-output-len must be >= 1")
    if not 0 <= low < high:
        raise ValueError(f"token id range [{low}, {high}) is empty")
    rng = random.Random(seed)
    ins = random_lengths(rng, n, input_len, ratio)
    outs = random_lengths(rng, n, output_len, ratio)
    return [Prompt([rng.randrange(low, high) for _ in range(i)], o) for i, o in zip(ins, outs)]


def jsonl_dataset(path: str, n: int, default_max_tokens: int) -> tuple[list[Prompt], str | None]:
    """The first n lines of a JSONL file of {"prompt": str | "prompt_ids": [...], "max_tokens": n}
    ("max_new_tokens" is read too); repeated in order when the file has fewer lines."""
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: not JSON: {e}") from None
            if "prompt_ids" in obj:
                p = obj["prompt_ids"]
                if not (isinstance(p, list) and p and all(isinstance(t, int) and t >= 0 for t in p)):
                    raise ValueError(f"{path}:{lineno}: prompt_ids must be a non-empty list of ids >= 0")
            elif isinstance(obj.get("prompt"), str) and obj["prompt"]:
                p = obj["prompt"]
            else:
                raise ValueError(f'{path}:{lineno}: needs "prompt" (a string) or "prompt_ids" (a list)')
            m = obj.get("max_tokens", obj.get("max_new_tokens", default_max_tokens))
            if not isinstance(m, int) or m < 1:
                raise ValueError(f"{path}:{lineno}: max_tokens must be an integer >= 1")
            items.append(Prompt(p, m))
            if len(items) >= n:
                break
    if not items:
        raise ValueError(f"{path}: no prompts")
    note = None
    if len(items) < n:
        note = f"{path} has {len(items)} prompts; they repeat in order to make {n}"
        items = [items[i % len(items)] for i in range(n)]
    return items, note
