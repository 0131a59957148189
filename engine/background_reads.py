"""Reading, while the engine has nothing else to do, the prompts it had to refuse for lack of time.

A slow model refuses a class's first turns at once (503: reading the case prompt would take past
the deadline). Without more, nothing of that case is ever read: every later question on it is
refused too, and the prompt cache on disk never sees it, so the next class is cold as well. So the
prefix of a refused prompt (all but its last `min_rows` and more, which a classmate's question
replaces: the case prompt) is kept here, and read one chunk per scheduler step whenever no request
is waiting or being served. A request arriving meanwhile waits for one chunk at most (the prefill
budget of a step, PREFILL_STEP_S of reading), and then finds what was read so far in a free slot:
its own prompt continues it (SlotPolicy.pick_slot), a classmate's copies it (PrefixSharing), and the
deadline forecast counts it as read. A prefix that two refused requests shared is also saved to the
prompt cache on disk once read whole, as a prefix two requests used is when it is shared.

Plain data and the scheduler's collaborators; called from the scheduler thread only."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from engine.admission import DeadlineEstimator
from engine.prompt_cache import common_prefix
from engine.runtime import Runtime
from engine.slot_cells import SlotCells
from engine.slot_policy import Slot, SlotPolicy

log = logging.getLogger(__name__)

MIN_PREFIX = 256  # shorter prefixes are read with their request at little cost: not worth a background read
MAX_WANTED = 4  # refused prefixes kept (the oldest goes first); a class has a case or two


@dataclass(eq=False)
class Wanted:
    """A prefix to read: `tokens`, of which the first `target` are read (a length a saved state
    restores from, SlotPolicy.state_point), and how many refused requests began with it."""

    tokens: np.ndarray
    target: int
    requests: int = 1


class BackgroundReads:
    """The refused prefixes of one scheduler, and the reading of them when it is idle. `chunk_rows()`:
    the prompt rows a step may read (BatchBuilder.prefill_rows); `prompts`: the prompt cache on disk
    (engine/disk_prompts.py), or None."""

    def __init__(self, runtime: Runtime, policy: SlotPolicy, slots: list[Slot], cells: SlotCells,
                 estimator: DeadlineEstimator, chunk_rows: Callable[[], int], prompts=None, metrics=None) -> None:
        self.runtime, self.policy, self.slots, self.cells = runtime, policy, slots, cells
        self.estimator, self.chunk_rows, self.prompts, self.metrics = estimator, chunk_rows, prompts, metrics
        self.wanted: list[Wanted] = []  # oldest first
        self.tokens_read = 0
        self._lock = threading.Lock()  # `want` comes from request threads, the rest from the scheduler's

    def want(self, prompt: np.ndarray) -> None:
        """A request with this prompt was refused for lack of time: keep its prefix for later (merged
        with a kept one it shares at least MIN_PREFIX tokens with: their common part)."""
        if not self.policy.cache_enabled:  # nothing read could be reused
            return
        with self._lock:
            for entry in self.wanted:
                shared = common_prefix(entry.tokens, prompt)
                if shared >= MIN_PREFIX:
                    if shared < len(entry.tokens):
                        entry.tokens = entry.tokens[:shared]
                        entry.target = min(entry.target, self._target(shared))
                    entry.requests += 1
                    return
            target = self._target(len(prompt))
            if target >= MIN_PREFIX:
                self.wanted.append(Wanted(np.array(prompt, dtype=np.int32), target))
                del self.wanted[:-MAX_WANTED]

    def _target(self, n: int) -> int:
        """How much of a prefix of `n` tokens to read: what a request beginning with it, plus a
        question of its own, can continue from its end (SlotPolicy.resume_point and state_point)."""
        return self.policy.state_point(self.policy.resume_point(n, n))

    def step(self) -> bool:
        """Read one chunk of the oldest prefix not yet held (by a slot, or on disk); False when there
        is none left. Only while no request is waiting or in a slot (the scheduler's call)."""
        while True:
            with self._lock:
                if not self.wanted:
                    return False
                entry = self.wanted[0]
                prefix, requests = entry.tokens[:entry.target], entry.requests
            if self._held(prefix):
                self._drop(entry)
                continue
            slot = self._read_chunk(prefix)
            if slot.n_kv == len(prefix):
                log.info("read a refused prompt's first %d tokens while idle (%d requests began with it)",
                         len(prefix), requests)
                self._drop(entry)
                if self.prompts is not None and requests >= 2 and slot.n_exact == len(prefix):
                    self.prompts.save_slot(prefix, slot)
            return True

    def drop_all(self) -> None:
        with self._lock:
            self.wanted.clear()

    def _drop(self, entry: Wanted) -> None:
        with self._lock:
            if entry in self.wanted:
                self.wanted.remove(entry)

    def _held(self, prefix: np.ndarray) -> bool:
        """Whether a slot holds the prefix, or the disk all but less than MIN_PREFIX of it (a request
        restores that and reads the rest at little cost)."""
        if any(common_prefix(s.kv[:s.n_exact], prefix) >= len(prefix) for s in self.slots):
            return True
        return self.prompts is not None and len(prefix) - self.prompts.saved_prefix(prefix) < MIN_PREFIX

    def _read_chunk(self, prefix: np.ndarray) -> Slot:
        """Read the next chunk of `prefix` into the slot the policy gives it (placed as a request's
        prompt is: SlotCells.place); that slot. A decode that fails leaves the slot empty."""
        rt, policy = self.runtime, self.policy
        slot, keep = self.cells.place(prefix, set())
        end = policy.chunk_end(keep, min(rt.n_batch, max(self.chunk_rows(), policy.min_rows)), len(prefix))
        rt.batch_clear()
        for pos, tok in enumerate(prefix[keep:end].tolist(), keep):
            rt.batch_add(slot.seq_id, tok, pos, False)
        started = time.perf_counter()
        try:
            rt.decode()
        except Exception:
            rt.seq_clear(slot.seq_id)
            slot.clear()
            raise
        self.estimator.observe_step(end - keep, time.perf_counter() - started, 0)
        slot.kv[keep:end] = prefix[keep:end]
        slot.n_kv = end
        slot.n_exact = policy.exact_after(slot.n_exact, keep, end - keep)
        slot.last_used = time.perf_counter()
        self.tokens_read += end - keep
        if self.metrics is not None:
            self.metrics.background_tokens.inc(end - keep)
        return slot
