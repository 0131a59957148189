"""What the scheduler's slots hold in llama.cpp's KV cache, kept in step with their `Slot`
records: cutting a slot back, saving its exact prefix to the conversation cache and restoring a
saved state into it, clearing what a failed request left, and carrying out the slot policy's
placement of a prompt (engine/slot_policy.py decides; this executes)."""

from __future__ import annotations

import logging

import numpy as np

from engine.admission import DeadlineUnreachable, RequestTimeout
from engine.prompt_cache import CachedState, ConversationCache
from engine.runtime import Runtime
from engine.sequence import Cancelled
from engine.slot_policy import Slot, SlotPolicy

log = logging.getLogger(__name__)


class SlotCells:
    """The KV cells of `slots` on `runtime`, and the conversation `cache` of their states."""

    def __init__(self, runtime: Runtime, policy: SlotPolicy, slots: list[Slot], cache: ConversationCache,
                 metrics=None) -> None:
        self.runtime, self.policy, self.slots, self.cache, self.metrics = runtime, policy, slots, cache, metrics

    def place(self, prompt: np.ndarray, copy_sources: set[int]) -> tuple[Slot, int]:
        """Carry out the policy's placement of `prompt` (SlotPolicy.place): save the slot's exact
        prefix, restore a cached state, drop the rest of the slot's cache. Returns the slot and
        how much of the prompt it holds. The policy sees the best cached state's gain and, with a
        sliding window, the first position each free slot still holds; no state is restored into
        a slot in `copy_sources` (a copy reads its cells at the next decode)."""
        rt, policy = self.runtime, self.policy
        entry, restore = None, 0
        if self.cache.enabled:
            entry, restore = self.cache.best(prompt, lambda e, n: policy.restore_point(len(e.tokens), n, len(prompt)))
        first_held = {s.seq_id: rt.seq_pos_min(s.seq_id) for s in self.slots if s.seq is None} if policy.n_swa else {}
        placement = policy.place(self.slots, prompt, restore, first_held)
        slot, keep = placement.slot, placement.keep
        if placement.save:
            self.save(slot, placement.save)
        if placement.restore and slot.seq_id in copy_sources:
            keep = 0  # rare: a classmate copies this slot's cells at the next decode; read instead
        elif placement.restore:
            keep = keep if self.restore(slot, entry) else 0
            if keep:
                self.cache.hits += 1
                if self.metrics is not None:
                    self.metrics.cache_hits.labels(cache="conversation").inc()
        return slot, self.truncate(slot, keep)

    def truncate(self, slot: Slot, keep: int) -> int:
        """Drop what the slot holds past `keep`; returns what it keeps (0 when the cache cannot
        drop a suffix: a sliding-window cache that is not full size, a recurrent one)."""
        if keep >= slot.n_kv:
            return slot.n_kv
        if not self.runtime.seq_rm(slot.seq_id, keep, -1):
            self.runtime.seq_clear(slot.seq_id)
            keep = 0
        slot.cut(keep)
        return keep

    def save(self, slot: Slot, n: int) -> None:
        """Put the first `n` tokens of the slot's exact prefix into the conversation cache (the
        length comes from SlotPolicy.save_length); the rest of the slot is dropped."""
        if self.truncate(slot, n) < n:  # a cache that cannot drop a suffix (recurrent): nothing to save
            return
        tokens = slot.kv[:n]
        if self.cache.contains(tokens):
            return
        state = self.runtime.state_get(slot.seq_id)
        if state:
            self.cache.put(tokens, state)

    def restore(self, slot: Slot, entry: CachedState) -> bool:
        rt = self.runtime
        rt.seq_clear(slot.seq_id)
        slot.clear()
        if not rt.state_set(slot.seq_id, entry.state):
            log.warning("could not restore a cached state; evaluating the prompt in full")
            rt.seq_clear(slot.seq_id)
            return False
        slot.restored(entry.tokens)
        return True

    def drop(self, slot: Slot, error: BaseException) -> None:
        """The cells of a request that ended with `error`."""
        if isinstance(error, (RequestTimeout, Cancelled, DeadlineUnreachable)) and slot.n_exact:
            # What it read exactly stays (the reply it began goes): a classmate or the student's
            # next try continues from it, and a slow model's case prompt is not read in vain.
            # The slot's cells are cut back when a request takes it, so its context stays whole.
            self.truncate(slot, slot.n_exact)
        else:  # a failure: nothing of it is trusted
            self.runtime.seq_clear(slot.seq_id)
            slot.clear()
