"""The scheduler thread's watchdog: it counts steps failing in a row (MAX_FAILED_STEPS of them
take the runtime as broken), and once the thread is gone it answers every request it held 503 at
once, refuses those that come later (`check`), and says why for /health (`failure`). Nothing is
left waiting on a thread that is gone."""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Callable

from engine.admission import EngineFailed
from engine.sequence import Sequence
from engine.slot_policy import Slot

log = logging.getLogger(__name__)

MAX_FAILED_STEPS = 3  # steps failing in a row before the runtime is taken as broken and the thread stops


class Watchdog:
    """`name`: the model file's name (in the 503's message); `cond`, `pending` and `slots` are the
    scheduler's lock, queue and slots; `report_queue()` updates the queue-depth gauge."""

    def __init__(self, name: str, cond: threading.Condition, pending: deque[Sequence], slots: list[Slot],
                 report_queue: Callable[[], None]) -> None:
        self.name, self.cond, self.pending, self.slots = name, cond, pending, slots
        self.report_queue = report_queue
        self.failure: str | None = None  # why the thread stopped
        self.failed_steps = 0  # steps failed in a row

    def check(self) -> None:
        """EngineFailed once the thread has stopped (called under the scheduler's lock)."""
        if self.failure is not None:
            raise EngineFailed(self.name, self.failure)

    def step_ok(self) -> None:
        self.failed_steps = 0

    def count_failure(self, exc: Exception) -> None:
        """One more step failed; MAX_FAILED_STEPS in a row stop the thread (then `die`): a runtime
        that fails every batch would otherwise fail each request in turn while /health says ok."""
        self.failed_steps += 1
        if self.failed_steps >= MAX_FAILED_STEPS:
            raise RuntimeError(f"{self.failed_steps} scheduler steps failed in a row, the last with: {exc}") from exc

    def die(self, exc: BaseException) -> None:
        """The loop is gone. Every request it held is answered 503 now, those that come later at
        once (`check`), and `failure` tells /health. The runtime is not touched: it may be what
        broke (it is freed when the scheduler closes)."""
        log.critical("the scheduler of %s stopped; its requests are answered 503 until the engine restarts",
                     self.name, exc_info=exc)
        with self.cond:
            self.failure = f"{type(exc).__name__}: {exc}"
            held = list(self.pending) + [s.seq for s in self.slots if s.seq is not None]
            self.pending.clear()
            for slot in self.slots:
                slot.seq = None
            self.cond.notify_all()
        for seq in held:
            seq.end(EngineFailed(self.name, self.failure))
        self.report_queue()
