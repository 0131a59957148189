"""Caches in front of the token loop.

`ConversationCache`: the llama.cpp KV state of recent prompts (one sequence's state, a few MB),
LRU-bounded by a RAM budget. An interview resends its whole transcript every turn; restoring the
state of its previous turn means only the new tokens are evaluated, even when several interviews
interleave on one context. Entries are keyed by their exact token sequence and only the common
token prefix of an entry and a new prompt is ever reused, so a cached state can never change a
continuation.

`ResponseCache`: whole replies of deterministic requests (temperature 0 or an explicit seed),
keyed by the model and every setting that affects the output.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable

import numpy as np


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common prefix of two int32 token arrays."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


@dataclass
class CachedState:
    tokens: np.ndarray  # int32 token ids whose KV the state holds, in order
    state: bytes  # llama_state_seq_get_data of that sequence

    @property
    def nbytes(self) -> int:
        return len(self.state) + self.tokens.nbytes


class ConversationCache:
    """LRU of sequence states bounded by `budget_bytes` (0 disables it)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self._entries: OrderedDict[int, CachedState] = OrderedDict()
        self._next_key = 0
        self._bytes = 0
        self.hits = 0

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def best(self, prompt: np.ndarray, usable: Callable[[CachedState, int], int] = lambda entry, n: n
             ) -> tuple[CachedState | None, int]:
        """The entry that saves the most of `prompt`, and how much: `usable(entry, shared prefix
        length)` says how many tokens an entry can really save (by default all it shares)."""
        best, best_len = None, 0
        for key, entry in self._entries.items():
            n = usable(entry, common_prefix(entry.tokens, prompt))
            if n > best_len:
                best, best_len, best_key = entry, n, key
        if best is not None:
            self._entries.move_to_end(best_key)
        return best, best_len

    def contains(self, tokens: np.ndarray) -> bool:
        return any(len(e.tokens) == len(tokens) and common_prefix(e.tokens, tokens) == len(tokens)
                   for e in self._entries.values())

    def put(self, tokens: np.ndarray, state: bytes) -> None:
        """Add a state; entries it extends (their tokens are a prefix of its) are dropped."""
        entry = CachedState(tokens=tokens.copy(), state=state)
        if not self.enabled or entry.nbytes > self.budget:
            return
        for key in [k for k, e in self._entries.items()
                    if len(e.tokens) <= len(tokens) and common_prefix(e.tokens, tokens) == len(e.tokens)]:
            self._bytes -= self._entries.pop(key).nbytes
        self._entries[self._next_key] = entry
        self._next_key += 1
        self._bytes += entry.nbytes
        while self._bytes > self.budget:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.nbytes

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0


class ResponseCache:
    """A bounded LRU of finished generations for deterministic requests (size 0 disables it)."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0

    def get(self, key: Hashable) -> Any | None:
        if self.max_entries <= 0:
            return None
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
                self.hits += 1
            return value

    def put(self, key: Hashable, value: Any) -> None:
        if self.max_entries <= 0:
            return
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
