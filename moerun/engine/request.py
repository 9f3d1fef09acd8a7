"""A request as the engine tracks it, and the per-step instructions the leader sends.

Shape of a step: the leader's plan for one tick holds, for each DP replica, either
``None`` (the replica's stages idle this tick: a pipeline bubble) or a list of
``SeqStep``: feed tokens ``[start, start + n)`` of a request, whose KV lives in
``blocks``, and sample a token after them when ``sample`` is set. What the engine
reports back to its caller is a ``TokenEvent`` per request per step.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ..options import SamplingParams


def check_prompt(prompt: list[int], vocab_size: int) -> None:
    """A prompt must have at least one token, all inside the vocabulary."""
    if not prompt:
        raise ValueError("a prompt needs at least one token")
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (0..{vocab_size - 1})")


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    replica: int = 0
    micro_batch: int = -1
    status: Status = Status.WAITING
    output: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in the cache
    blocks: list[int] = field(default_factory=list)
    in_flight: bool = False
    aborted: bool = False

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def max_len(self) -> int:
        return len(self.prompt) + self.params.max_new_tokens


@dataclass(frozen=True)
class SeqStep:
    req_id: int
    blocks: tuple[int, ...]
    start: int
    tokens: tuple[int, ...]  # the tokens fed: positions [start, start + len(tokens))
    sample: bool
    params: SamplingParams | None = None  # with every step that samples: the sampler needs it


@dataclass(frozen=True)
class TokenEvent:
    """What one step did for one request: its new token (None when it ended without one,
    e.g. aborted), the token's log probability and top-N when asked for, and whether this
    was the request's last event (then it has left the engine)."""
    req_id: int
    token: int | None
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort" when finished
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
