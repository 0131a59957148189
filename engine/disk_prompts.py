"""The scheduler's glue to the prompt cache on disk (engine/disk_cache.py): the longest saved
prefix a prompt can continue from, restoring it into the prompt's slot, and saving a prefix that
two requests share once its copy has landed, written to disk off the scheduler thread."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable

import numpy as np

from engine.disk_cache import token_key
from engine.runtime import Runtime
from engine.sequence import Sequence
from engine.slot_policy import MIN_RESTORE_GAIN, SlotPolicy

log = logging.getLogger(__name__)


class DiskPrompts:
    """`disk`: the model's DiskCache, enabled; the runtime and policy are the scheduler's."""

    def __init__(self, disk, runtime: Runtime, policy: SlotPolicy, metrics=None) -> None:
        self.disk, self.runtime, self.policy, self.metrics = disk, runtime, policy, metrics
        self._writes: queue.Queue = queue.Queue()
        # Prefixes whose state is queued for the writer but not on disk yet: not saved a second time.
        self._queued: set[str] = set()  # their files' names (disk_cache.token_key)
        self._queued_lock = threading.Lock()
        self._writer = threading.Thread(target=self._write, name="prompt-cache-writer", daemon=True)
        self._writer.start()

    def hit(self, seq: Sequence):
        """The longest prefix of `seq`'s prompt that the disk cache holds and that it can continue
        from its end: (tokens, file), or None."""
        prompt, policy = seq.tokens, self.policy
        return self.disk.longest(prompt, lambda n: policy.restore_point(n, n, len(prompt)) == n)

    def load(self, seq: Sequence, hit) -> bool:
        """Restore the prefix `hit` (from `hit()`: a case prompt saved by an earlier class), when
        that saves MIN_RESTORE_GAIN tokens over what the slot has. The caller makes sure no copy
        reads the slot's cells at the next decode."""
        if hit is None or hit[0] < seq.n_prompt_done + MIN_RESTORE_GAIN:
            return False
        state = self.disk.load(*hit)
        if state is None:
            return False
        slot, rt = seq.slot, self.runtime
        rt.seq_clear(slot.seq_id)
        slot.clear()
        if not rt.state_set(slot.seq_id, state):
            log.warning("could not restore a state from the prompt cache on disk; reading the prompt")
            rt.seq_clear(slot.seq_id)
            seq.n_prompt_done = seq.reused = 0
            return False
        slot.restored(seq.tokens[:hit[0]])
        seq.n_prompt_done = seq.reused = hit[0]
        if self.metrics is not None:
            self.metrics.cache_hits.labels(cache="disk").inc()
        return True

    def save_point(self, tokens: np.ndarray, shared: int, saving: Iterable[Sequence] = ()) -> int:
        """How much of a prefix of `shared` tokens that a copy gives `tokens` to save (0: none, or
        the disk holds it already, or it is on its way there: queued for the writer, or to be
        saved by one of `saving`, the sequences with a save pending): the longest length whose
        state restores exactly."""
        save = self.policy.state_point(shared)
        if not save:
            return 0
        prefix = tokens[:save]
        if any(q.disk_save == save and np.array_equal(q.tokens[:save], prefix) for q in saving):
            return 0
        return 0 if self._saved_or_queued(prefix) else save

    def save(self, savers: list[Sequence]) -> None:
        """After the decode that made their copies: each saver's slot holds exactly the prefix to
        save (`disk_save` tokens); its state is written off the scheduler thread."""
        for seq in savers:
            state = self.runtime.state_get(seq.slot.seq_id)
            if state:
                self._queue(seq.tokens[:seq.disk_save].copy(), state)
            seq.disk_save = 0

    def saved_prefix(self, tokens: np.ndarray) -> int:
        """The longest saved prefix of `tokens` (0: none); not counted as a hit or a miss."""
        hit = self.disk.longest(tokens, count=False)
        return hit[0] if hit is not None else 0

    def save_slot(self, tokens: np.ndarray, slot) -> None:
        """Save the state of `slot`, which holds exactly `tokens` (a prefix read in the background:
        engine/background_reads.py), unless the disk holds it already; written off this thread."""
        tokens = np.array(tokens, dtype=np.int32)
        if slot.n_kv != len(tokens) or self._saved_or_queued(tokens):
            return
        state = self.runtime.state_get(slot.seq_id)
        if state:
            self._queue(tokens, state)

    def _saved_or_queued(self, tokens: np.ndarray) -> bool:
        """Whether the state of `tokens` is on disk or queued for the writer. The writer puts a
        file before it forgets the name, and this looks at the names first: never neither."""
        with self._queued_lock:
            if _file_name(tokens) in self._queued:
                return True
        return self.disk.contains(tokens)

    def _queue(self, tokens: np.ndarray, state: bytes) -> None:
        with self._queued_lock:
            self._queued.add(_file_name(tokens))
        self._writes.put((tokens, state))

    def _write(self) -> None:
        """The writer thread: files are written off the scheduler thread."""
        while True:
            item = self._writes.get()
            if item is None:
                return
            tokens, state = item
            try:
                self.disk.put(tokens, state)  # logs disk errors itself
            except Exception:  # noqa: BLE001 - a bug here must not stop the saves that follow
                log.exception("disk prompt cache: saving %d tokens failed", len(tokens))
            finally:
                with self._queued_lock:
                    self._queued.discard(_file_name(tokens))

    def close(self) -> None:
        """Finish the files being written."""
        self._writes.put(None)
        self._writer.join()


def _file_name(tokens: np.ndarray) -> str:
    """The name the disk cache gives the state of `tokens` (its key)."""
    return token_key(np.ascontiguousarray(tokens, dtype=np.int32))
