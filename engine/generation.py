"""What a generation is: sampling settings, stop rules, the reply text as it grows, the result.

The token loop itself is in engine/scheduler.py. Text is decoded incrementally there (bytes of
each new token through a UTF-8 incremental decoder); `ReplyText` applies the stop rules to the
tail a new piece can complete, never to the whole text again, and says how much of the cleaned
reply is stable enough to stream.
"""

from __future__ import annotations

import functools
import math
import re
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

from engine.errors import BadRequest


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
    grammar: str | None = None  # GBNF the reply must follow (structured output, engine/grammar.py)

    @property
    def deterministic(self) -> bool:
        return self.temperature == 0 or self.seed is not None


MAX_STOPS = 16  # stop strings one request may give (OpenAI's surface allows 4)
MAX_STOP_CHARS = 1024  # characters of all a request's stop strings together
PATTERN_WINDOW = 48  # a regex stop is looked for this far back from the new text


def check_stops(stops: Sequence[str] | None, field: str = "stop") -> None:
    """A request's own stop strings: at most MAX_STOPS of them, MAX_STOP_CHARS characters in all,
    none empty; a 400 naming `field` otherwise. The matcher's cost per token does not grow with
    them (see StopRules), but building it does, on the request's thread, and no real stop list
    comes near these limits."""
    if not stops:
        return
    if any(not s for s in stops):
        raise BadRequest(f"'{field}' must not contain empty strings", field=field)
    if len(stops) > MAX_STOPS:
        raise BadRequest(f"'{field}' has {len(stops)} entries; at most {MAX_STOPS} are allowed", field=field)
    _check_stop_chars(stops, field, "")


def _check_stop_chars(stops: Sequence[str], field: str, note: str) -> None:
    total = sum(len(s) for s in stops)
    if total > MAX_STOP_CHARS:
        raise BadRequest(f"'{field}' strings come to {total:,} characters{note}; at most {MAX_STOP_CHARS:,} are "
                         "allowed in all: shorten them", field=field)


class _StopAutomaton:
    """Aho-Corasick over a set of stop strings: fed the reply one character at a time, its state
    is the longest tail of the text that could still grow into a stop, and it says when one
    ends. Each character costs O(1) amortized, however many and however long the stops are.
    Built once per stop list (`_automaton`) and only read afterwards: shared between requests."""

    def __init__(self, strings: tuple[str, ...]) -> None:
        goto: list[dict[str, int]] = [{}]
        depth = [0]  # length of the text a node stands for (a prefix of some stop)
        ends = [0]  # length of the stop that is exactly this node's text (0: none)
        for s in strings:
            node = 0
            for ch in s:
                nxt = goto[node].get(ch)
                if nxt is None:
                    nxt = goto[node][ch] = len(goto)
                    goto.append({})
                    depth.append(depth[node] + 1)
                    ends.append(0)
                node = nxt
            ends[node] = len(s)
        fail = [0] * len(goto)
        match = list(ends)  # the longest stop that ends at this node: its own text, else via `fail`
        queue = deque(goto[0].values())
        while queue:  # breadth first: a node's fail link is shallower, so already final
            node = queue.popleft()
            for ch, child in goto[node].items():
                f = fail[node]
                while f and ch not in goto[f]:
                    f = fail[f]
                fail[child] = goto[f].get(ch, 0)
                match[child] = ends[child] or match[fail[child]]
                queue.append(child)
        self.goto, self.fail, self.depth, self.match = goto, fail, depth, match
        self.longest = max(map(len, strings), default=0)

    def scan(self, node: int, text: str, start: int) -> tuple[int, int]:
        """Feed `text[start:]` from state `node`: (the new state, where the earliest-starting stop
        that ends in it begins, or -1)."""
        goto, fail, match = self.goto, self.fail, self.match
        best = -1
        for i in range(start, len(text)):
            ch = text[i]
            while node and ch not in goto[node]:
                node = fail[node]
            node = goto[node].get(ch, 0)
            if match[node]:
                begin = i + 1 - match[node]
                if best < 0 or begin < best:
                    best = begin
        return node, best


_automaton = functools.lru_cache(maxsize=64)(_StopAutomaton)  # a backend sends the same stops every time


@dataclass
class StopRules:
    """Where a reply ends: literal stop strings and regex patterns.

    Each pattern comes with a `partial` regex that fullmatches any text that could still grow
    into a match; streaming holds such a tail back until it is decided. Matching starts only
    once the reply has visible text, so a model that opens its turn with a newline is not cut to
    an empty reply. Stop strings go through an automaton fed only the new text (a token's cost
    does not grow with the reply or the stops); patterns look PATTERN_WINDOW characters back.
    More than MAX_STOP_CHARS characters of stop strings (a chat template's own included) is a
    400, whichever surface built the rules.
    """

    strings: Sequence[str] = ()
    patterns: Sequence[tuple[re.Pattern[str], re.Pattern[str]]] = ()

    def __post_init__(self) -> None:
        self.strings = tuple(s for s in self.strings if s)
        _check_stop_chars(self.strings, "stop", " (with any the chat template adds)")
        self.automaton = _automaton(self.strings) if self.strings else None
        # `partial` anchored at the end: one search finds the earliest tail it fullmatches.
        self.partial_tails = [re.compile(f"(?:{partial.pattern})\\Z", partial.flags)
                               for _full, partial in self.patterns]


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
        self._node = 0  # the stop automaton's state: the text from `_content_start` on, fed to it

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
            self._content_start = new_from = len(self.text) - len(visible)
        cut = self._find(new_from)
        if cut < 0:
            return False
        self.text = self.text[:cut]
        if self.stops.automaton is not None:  # the state of the text as cut (it ends here, in practice)
            back = max(self._content_start, cut - self.stops.automaton.longest)
            self._node, _ = self.stops.automaton.scan(0, self.text, back)
        return True

    def _find(self, new_from: int) -> int:
        """Where the earliest stop that ends in the new text `self.text[new_from:]` begins, or -1."""
        best = -1
        rules, text = self.stops, self.text
        if rules.automaton is not None:
            self._node, best = rules.automaton.scan(self._node, text, new_from)
        window_start = max(self._content_start, new_from - PATTERN_WINDOW)
        for full, _partial in rules.patterns:
            m = full.search(text, window_start)
            if m and (best < 0 or m.start() < best):
                best = m.start()
        return best

    def _undecided_from(self) -> int:
        """Index from which the text might still turn out to be the start of a stop."""
        text, rules = self.text, self.stops
        undecided = len(text)
        if rules.automaton is not None:
            undecided -= rules.automaton.depth[self._node]
        window_start = max(self._content_start, len(text) - PATTERN_WINDOW)
        for tail in rules.partial_tails:
            m = tail.search(text, window_start)
            if m:
                undecided = min(undecided, m.start())
        return undecided

    def stable(self) -> str:
        if self._content_start < 0:
            return ""
        decided = self.text[:self._undecided_from()]
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
