"""Where a request goes and how much of its prompt is already computed: the scheduler's slot and
conversation-cache decisions, from plain data (token arrays, slot records), with no llama.cpp and
no threads. The scheduler (engine/scheduler.py) executes them on the runtime.

The conversation cache must not change a reply by a single bit, so prompt positions are always
computed along the same kernel path as when the whole prompt is read at once. llama.cpp's CPU
matrix kernels take a batch of 8 rows or more in groups of 4, and its last `rows % 4` rows along
another summation path; a batch under 8 rows (under 64 with flash attention, whose kernel tiles
64 query rows) takes another path altogether. So a kept prefix ends, and reading resumes, at a
multiple of ROW_GROUP, and every part of a prompt is read in batches of at least MIN_ROWS.
Generated tokens (decoded one at a time) are never kept for a later prompt either: a slot's
`n_exact` counts only positions read as prompt, in row groups.

A model with a sliding window (Gemma 3: 512 tokens) saves, in a state, only the window's last
cells; restored at cell 0, they line up with the SIMD lanes of llama.cpp's attention as in a full
read only when the window starts on a multiple of SWA_ALIGN. Such a state is continued only from
its very end, and a slot restored from one is never cut back into its window.

With flash attention (the engine's default), such a restored state is the one place
where the cache is not bit for bit: the flash-attention decode kernel splits its work by the
number of cells the sequence holds, and a restored window holds fewer than a full read. It is
saved anyway (a class's case prompt is past the window, and reading it again costs seconds): on
the fixture cases the reply's text at temperature 0 is the cold read's, and its mean
log-probability differs by at most 2.4e-3 (tests/test_cache_exactness.py holds it to 1e-2).
Everything else (a slot's own prefix, a classmate's copied cells, states within the window) stays
exact with flash attention too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from engine.prompt_cache import common_prefix

ROW_GROUP = 4
MIN_ROWS = 8
MIN_ROWS_FLASH_ATTN = 64
SWA_ALIGN = 64
CONTINUES_WITHIN = ROW_GROUP  # a prompt sharing all but this many of a slot's exact tokens continues it
MIN_RESTORE_GAIN = 16  # restore a cached state only when it saves at least this many tokens


@dataclass(eq=False)
class Slot:
    """One KV-cache sequence of the context, as the scheduler knows it."""

    seq_id: int
    kv: np.ndarray  # tokens whose KV this sequence holds, positions 0..n_kv-1
    n_kv: int = 0
    # Positions 0..n_exact-1 hold exactly the KV that reading the prompt in full computes for them
    # (read as prompt, in row groups); generated tokens (decoded one at a time) never count.
    n_exact: int = 0
    seq: Any = None  # the request it serves (engine.scheduler.Sequence); None while free
    last_used: float = 0.0

    def cut(self, n: int) -> None:
        """The sequence now holds its first `n` tokens only."""
        self.n_kv = n
        self.n_exact = min(self.n_exact, n)

    def clear(self) -> None:
        self.n_kv = self.n_exact = 0

    def restored(self, tokens: np.ndarray) -> None:
        """The sequence now holds a saved state of `tokens` (only exact prefixes are saved)."""
        self.kv[:len(tokens)] = tokens
        self.n_kv = self.n_exact = len(tokens)


@dataclass(frozen=True)
class Placement:
    """How a prompt is placed, in the order the scheduler carries it out: first save the slot's
    exact prefix, cut to `save` tokens, to the conversation cache (0: nothing to save); then, if
    `restore`, load the chosen cached state into the slot; then drop what the slot holds past
    `keep` and read the prompt from there."""

    slot: Slot
    keep: int
    save: int = 0
    restore: bool = False


class SlotPolicy:
    """The scheduler's decisions for one context: `n_swa` is the model's sliding window (0: none),
    `flash_attn` whether the context uses flash attention, `cache_enabled` whether there is a
    conversation cache (without one, nothing is ever reused)."""

    def __init__(self, *, n_swa: int, flash_attn: bool, cache_enabled: bool) -> None:
        self.n_swa = n_swa
        self.flash_attn = flash_attn
        self.cache_enabled = cache_enabled
        self.min_rows = MIN_ROWS_FLASH_ATTN if flash_attn else MIN_ROWS

    # -- placing a prompt ---------------------------------------------------------------------
    def place(self, slots: list[Slot], prompt: np.ndarray, restore: int = 0,
              first_held: Mapping[int, int] | None = None) -> Placement:
        """Where `prompt` goes and what of it is reused. `restore` is how much of it the best
        cached state would save (`restore_point`; 0: none); `first_held` maps a free slot's seq_id
        to the first position its sequence still holds (seq_pos_min; missing: 0). At least one
        slot must be free."""
        slot = self.pick_slot(slots, prompt)
        first = (first_held or {}).get(slot.seq_id, 0)
        shared = common_prefix(slot.kv[:slot.n_exact], prompt) if self.cache_enabled else 0
        keep = self.resume_point(shared, len(prompt))
        if not self.can_resume(first, keep):
            keep = 0
        if self.cache_enabled and restore >= keep + MIN_RESTORE_GAIN:
            return Placement(slot, restore, save=self.save_length(slot, 0, first), restore=True)
        save = self.save_length(slot, keep, first) if keep < slot.n_kv else 0
        return Placement(slot, keep, save=save)

    def share_point(self, donor: Slot, prompt: np.ndarray, first_held: int = 0) -> int:
        """How much of `prompt` another sequence (`donor`, busy or free) can give by a copy of its
        cells: its exact prefix shared with the prompt, on a row-group boundary with `min_rows`
        left to read (0 when the donor no longer holds what that position attends to). Copied cell
        for cell, the prefix is the same bits as in the donor, so reading on from there is exact
        by the same rules as a slot continuing its own prefix."""
        if not self.cache_enabled or not donor.n_exact:
            return 0
        keep = self.resume_point(common_prefix(donor.kv[:donor.n_exact], prompt), len(prompt))
        return keep if self.can_resume(first_held, keep) else 0

    def follow_point(self, leader_prompt: np.ndarray, prompt: np.ndarray) -> int:
        """How much of `prompt` a sequence still reading `leader_prompt` will be able to give once it
        has read it: requests that arrive together with the same case prompt read it once, the
        others wait for it and copy it."""
        if not self.cache_enabled:
            return 0
        return self.resume_point(common_prefix(leader_prompt, prompt), len(prompt))

    def pick_slot(self, slots: list[Slot], prompt: np.ndarray) -> Slot:
        """The free slot whose exact prefix this prompt continues (the same conversation, one turn
        on), else an empty slot, else the least recently used one. Conversations that only share an
        opening (a system prompt, or two students on the same case) do not evict each other while
        there are slots for all of them."""
        free = [s for s in slots if s.seq is None]
        if self.cache_enabled:
            for s in sorted(free, key=lambda s: -s.n_exact):
                if s.n_exact and common_prefix(s.kv[:s.n_exact], prompt) >= s.n_exact - CONTINUES_WITHIN:
                    return s
        empty = [s for s in free if s.n_kv == 0]
        return empty[0] if empty else min(free, key=lambda s: s.last_used)

    def resume_point(self, reuse: int, n_prompt: int) -> int:
        """Where reading a prompt of `n_prompt` tokens resumes when `reuse` of them are cached: on
        a row-group boundary, with at least `min_rows` prompt tokens left to read."""
        keep = max(0, min(reuse, n_prompt - self.min_rows))
        return keep - keep % ROW_GROUP

    def restore_point(self, n_state: int, shared: int, n_prompt: int) -> int:
        """Where reading a prompt would resume from a saved state of `n_state` tokens sharing
        `shared` of its tokens; 0 when it cannot: a state longer than the sliding window holds only
        the window's last cells, so it is only continued from its very end."""
        keep = self.resume_point(shared, n_prompt)
        return keep if keep == n_state or not self.windowed(n_state) else 0

    def windowed(self, n: int) -> bool:
        """Whether a saved state of `n` tokens keeps only the sliding window's last cells."""
        return 0 < self.n_swa < n

    def can_resume(self, first_held: int, keep: int) -> bool:
        """Whether a sequence holding positions from `first_held` on still holds what a token at
        position `keep` attends to: a state restored from the conversation cache lacks the cells
        before its last sliding window (llama.cpp saves only those), so it cannot be cut back into
        that window."""
        if keep == 0 or not self.n_swa:
            return True
        return first_held <= max(0, keep - self.n_swa)

    def state_point(self, n: int) -> int:
        """The longest length up to `n` at which a saved state restores exactly: `n` itself within
        the sliding window; past it, a length whose window starts on a multiple of SWA_ALIGN (only
        the window's cells are saved, and restored at cell 0). With flash attention a state past
        the window restores close but not bit for bit (see above)."""
        if not self.windowed(n):
            return n
        return n - (n - self.n_swa) % SWA_ALIGN

    def save_length(self, slot: Slot, keep: int, first_held: int = 0) -> int:
        """How many tokens of the slot's exact prefix go into the conversation cache before the
        slot is reused (0: none), when the slot itself keeps `keep` of them anyway. A state longer
        than the sliding window is continued only from its end, even by the same prompt again, so
        it ends `min_rows` early and its window starts on a multiple of SWA_ALIGN."""
        n = slot.n_exact
        if self.windowed(n - self.min_rows):
            n = self.state_point(n - self.min_rows)
        if not self.cache_enabled or n <= keep or not self.can_resume(first_held, n):
            return 0
        return n

    # -- reading a prompt ---------------------------------------------------------------------
    def chunk_end(self, start: int, room: int, n_prompt: int) -> int:
        """Where the part of a prompt read in this step ends, reading from `start` with `room`
        rows left in the batch: on a row-group boundary, leaving at least `min_rows` to read,
        unless the room is too small for that (N_BATCH below MIN_ROWS: the prompt is still read,
        inexactly, rather than waiting for room that cannot come)."""
        end = min(start + room, n_prompt)
        if end < n_prompt:
            aligned = min(end, n_prompt - self.min_rows)
            aligned -= aligned % ROW_GROUP
            end = aligned if aligned > start else end
        return end

    def exact_after(self, n_exact: int, start: int, k: int) -> int:
        """A slot's `n_exact` after `k` prompt tokens were read from position `start`: exact up to
        the last full row group when the part was read in a batch of at least `min_rows` right
        after the exact prefix. A part read beside other sequences' tokens counts too (llama.cpp
        then splits the batch its own way): requests decoded together are not bit-exact against
        the same requests alone anyway, and not reusing their prompts would make the next turn of
        every interview under load read its whole transcript again."""
        if n_exact == start and k >= self.min_rows:
            return start + k - (start + k) % ROW_GROUP
        return n_exact
