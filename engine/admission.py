"""Admission control in front of the model: one generation at a time, a bounded FIFO queue.

Requests take a ticket; they run in arrival order. When `max_queue` requests are already waiting,
a new one is refused at once (503 + Retry-After) instead of piling up. Waiting counts against the
request's deadline. A model swap takes the context between two generations without queueing.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from typing import Callable, Iterator

from engine.errors import EngineError


class QueueFull(EngineError):
    """Too many requests are waiting: try again shortly."""

    status = 503

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after


class RequestTimeout(EngineError):
    """The request's deadline (REQUEST_TIMEOUT_S) passed while it waited or generated."""

    status = 504


class Admission:
    """A FIFO of waiting requests in front of one llama context."""

    def __init__(self, max_queue: int, on_change: Callable[[int], None] | None = None) -> None:
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._waiting: deque[object] = deque()
        self._busy = False
        self._on_change = on_change or (lambda depth: None)
        self._recent_run_s = 2.0  # moving estimate of one generation, for Retry-After

    @property
    def depth(self) -> int:
        return len(self._waiting)

    @property
    def busy(self) -> bool:
        return self._busy

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the queue ahead of it, at the recent pace."""
        return max(1, round(self._recent_run_s * (len(self._waiting) + 1) / 2))

    @contextlib.contextmanager
    def slot(self, deadline: float) -> Iterator[None]:
        """Wait (in arrival order, until `deadline` on the perf_counter clock) for the context."""
        with self._cond:
            if self._busy or self._waiting:
                if len(self._waiting) >= self.max_queue:
                    raise QueueFull(f"the engine is busy: {len(self._waiting)} requests are already waiting "
                                    f"(MAX_QUEUE={self.max_queue}); retry shortly", self.retry_after())
            ticket = object()
            self._waiting.append(ticket)
            self._on_change(len(self._waiting))
            try:
                while self._busy or self._waiting[0] is not ticket:
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        raise RequestTimeout("the request timed out waiting in the queue (REQUEST_TIMEOUT_S)")
                    self._cond.wait(remaining)
            except BaseException:
                self._waiting.remove(ticket)
                self._on_change(len(self._waiting))
                self._cond.notify_all()
                raise
            self._waiting.popleft()
            self._busy = True
            self._on_change(len(self._waiting))
        started = time.perf_counter()
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._recent_run_s = 0.8 * self._recent_run_s + 0.2 * (time.perf_counter() - started)
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """The context between two generations, ahead of the queue (a model swap)."""
        with self._cond:
            while self._busy:
                self._cond.wait()
            self._busy = True
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
