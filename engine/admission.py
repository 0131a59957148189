"""Admission: a full queue (503 + Retry-After), a deadline the engine cannot meet (503 +
Retry-After, decided at once from its measured speed), a passed deadline (504), and a model whose
scheduler has stopped (503 at once). The queue itself is the scheduler's (engine/scheduler.py)."""

from __future__ import annotations

from dataclasses import dataclass

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

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after


class EngineFailed(Unavailable):
    """The model's scheduler thread stopped after an internal error: its requests are answered
    503 at once (never left to hang), and /health says the engine is unhealthy, so that an
    orchestrator restarts it (or an operator reloads the model with POST /load-model)."""

    RESTART_S = 10  # Retry-After: about what a restart of the engine takes

    def __init__(self, model: str, reason: str) -> None:
        super().__init__(f"the engine cannot serve {model}: its scheduler stopped after an internal error ({reason}); "
                         "it reports itself unhealthy until it is restarted or the model is loaded again",
                         retry_after=self.RESTART_S)


class DeadlineUnreachable(EngineError):
    """The engine's own estimate says the request would finish after its deadline: refused at once
    (503 + Retry-After) instead of running late and slowing the requests that can still make it."""

    status = 503

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after


@dataclass(frozen=True)
class Workload:
    """What stands between a new request and its reply, as plain numbers the scheduler gathers."""

    own_read: int  # prompt tokens it must read (those no sequence or cache can give it)
    own_reply: int  # tokens it is expected to generate
    ahead_read: int  # prompt tokens that requests before it still have to read
    slot_frees: tuple[int, ...] = ()  # for each sequence generating, its expected tokens left, sorted
    queue_position: int = 0  # requests that need a slot before this one can have one (0: one is free)


class DeadlineEstimator:
    """How long a request will take, from the engine's measured speed: each decode step costs
    `step_s` (one token for every sequence generating) plus `row_s` per prompt token read in it
    (llama.cpp's CPU cost grows with the rows of a batch). Both are moving averages of real steps;
    the reply length is a moving average of real replies, capped by the request's own limit.
    Before any measurement there is no estimate (every request is accepted)."""

    ALPHA = 0.2
    MIN_PREFILL_ROWS = 32  # steps reading fewer prompt tokens say little about the cost of a row

    def __init__(self, reply_tokens: float = 48.0) -> None:
        self.step_s: float | None = None
        self.row_s: float | None = None
        self.reply_tokens = reply_tokens

    STEP_ROWS = 8  # before a decode step is measured, one is taken to cost as much as 8 prompt tokens

    def observe_step(self, prefill_rows: int, seconds: float) -> None:
        if prefill_rows < self.MIN_PREFILL_ROWS:
            self.step_s = seconds if self.step_s is None else (1 - self.ALPHA) * self.step_s + self.ALPHA * seconds
            return
        # A class starts with prompts only: the first steps read them, before any token is decoded.
        row = max(seconds - (self.step_s or 0.0), 0.0) / prefill_rows
        self.row_s = row if self.row_s is None else (1 - self.ALPHA) * self.row_s + self.ALPHA * row

    @property
    def ready(self) -> bool:
        """Whether there is an estimate: a prompt step has been measured."""
        return self.row_s is not None

    @property
    def step(self) -> float:
        """Seconds a decode step takes (measured, else STEP_ROWS prompt tokens' worth)."""
        return self.step_s if self.step_s is not None else self.STEP_ROWS * self.row_s

    def observe_reply(self, tokens: int) -> None:
        self.reply_tokens = (1 - self.ALPHA) * self.reply_tokens + self.ALPHA * tokens

    def expected_reply(self, max_tokens: int) -> int:
        return max(1, min(max_tokens, round(self.reply_tokens)))

    def seconds(self, w: Workload) -> float | None:
        """Seconds until the request would finish; None while the speed is unknown."""
        if not self.ready:
            return None
        wait = 0.0
        if w.queue_position > 0:  # a slot frees when a sequence ahead finishes its reply
            frees = sorted(w.slot_frees)
            rounds, index = divmod(w.queue_position - 1, max(len(frees), 1))
            wait = ((frees[index] if frees else self.reply_tokens) + rounds * self.reply_tokens) * self.step
        return wait + (w.ahead_read + w.own_read) * self.row_s + w.own_reply * self.step
