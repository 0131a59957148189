"""Admission errors: a full queue (503 + Retry-After) and a passed deadline (504). The queue
itself is the scheduler's (engine/scheduler.py)."""

from __future__ import annotations

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


class Unavailable(EngineError):
    """The model is being replaced: retry in a moment."""

    status = 503

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})
