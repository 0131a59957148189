"""What a generation is: sampling settings, stop rules, the reply text as it grows, the result.

The token loop itself is in engine/scheduler.py. Text is decoded incrementally there (bytes of
each new token through a UTF-8 incremental decoder); `ReplyText` applies the stop rules to the
tail a new piece can complete, never to the whole text again, and says how much of the cleaned
reply is stable enough to stream.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence




@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings. The defaults keep the default model's patient replies from looping
    (a repeat penalty of 1.1 over the last 64 generated tokens) without flattening them."""

    max_tokens: int = 150
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None

    @property
    def deterministic(self) -> bool:
        return self.temperature == 0 or self.seed is not None


@dataclass
class StopRules:
    """Where a reply ends: literal stop strings and regex patterns.

    Each pattern comes with a `partial` regex that fullmatches any text that could still grow
    into a match; streaming holds such a tail back until it is decided. Matching starts only
    once the reply has visible text, so a model that opens its turn with a newline is not cut to
    an empty reply.
    """

    strings: Sequence[str] = ()
    patterns: Sequence[tuple[re.Pattern[str], re.Pattern[str]]] = ()
    lookback: int = field(init=False)

    def __post_init__(self) -> None:
        self.strings = [s for s in self.strings if s]
        # A regex match is looked for in a window this long before the new text.
        self.lookback = max([len(s) for s in self.strings] + [48 if self.patterns else 0])

    def find(self, text: str, content_start: int, new_from: int) -> int:
        """Index where the earliest stop begins in `text`, or -1; only text from `new_from` is new."""
        window_start = max(content_start, new_from - self.lookback)
        best = -1
        for s in self.strings:
            i = text.find(s, window_start)
            if i >= 0 and (best < 0 or i < best):
                best = i
        for full, _partial in self.patterns:
            m = full.search(text, window_start)
            if m and (best < 0 or m.start() < best):
                best = m.start()
        return best

    def undecided_from(self, text: str, content_start: int) -> int:
        """Index from which `text` might still turn out to be the start of a stop."""
        for i in range(max(content_start, len(text) - self.lookback), len(text)):
            tail = text[i:]
            if any(s.startswith(tail) for s in self.strings) or \
                    any(partial.fullmatch(text, i) for _full, partial in self.patterns):
                return i
        return len(text)


class ReplyText:
    """Text generated so far, fed piece by piece.

    `add` says when a stop rule has ended it. `stable()` is the cleaned reply as far as it can no
    longer change, so streamed pieces always add up to the final cleaned reply.
    """

    def __init__(self, stops: StopRules, clean: Callable[[str], str] = str.strip,
                 pending: Callable[[str], bool] = lambda text: False, require_text: bool = False) -> None:
        self.stops = stops
        self.require_text = require_text  # end-of-generation is not accepted before visible text
        self.clean = clean
        self.pending = pending  # True while the start of the text could still be cleaned away
        self.text = ""
        self._content_start = -1  # index of the first visible character, once there is one

    def add(self, piece: str) -> bool:
        """Append `piece`; on a stop, cut the text where the stop begins and return True."""
        if not piece:
            return False
        new_from = len(self.text)
        self.text += piece
        if self._content_start < 0:
            visible = self.text.lstrip()
            if not visible:
                return False
            self._content_start = len(self.text) - len(visible)
        cut = self.stops.find(self.text, self._content_start, new_from)
        if cut < 0:
            return False
        self.text = self.text[:cut]
        return True

    def stable(self) -> str:
        if self._content_start < 0:
            return ""
        decided = self.text[:self.stops.undecided_from(self.text, self._content_start)]
        if self.pending(decided):
            return ""
        return self.clean(decided)

    def final(self) -> str:
        return self.clean(self.text)


@dataclass
class Generation:
    """What one generation produced, with its timings."""

    text: str  # the cleaned reply
    tokens: int
    prompt_tokens: int
    finish_reason: str  # "stop" (a stop rule), "eos" (end of sequence) or "length" (max_tokens)
    ttft_s: float
    decode_s: float
    total_s: float
    mean_logprob: float
    reused_tokens: int = 0  # prompt tokens whose KV came from the context or the cache
    cached: bool = False  # answered from the response cache

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of decoding (prompt processing excluded)."""
        if self.tokens < 2 or self.decode_s <= 0:
            return 0.0
        return (self.tokens - 1) / self.decode_s

    @property
    def confidence(self) -> float:
        """Geometric mean of the sampled tokens' probabilities under the model (0..1)."""
        return math.exp(self.mean_logprob) if self.tokens else 0.0
