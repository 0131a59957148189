"""Admission: a full queue (503 + Retry-After), a deadline the engine cannot meet (503 +
Retry-After, decided at once from its measured speed), a passed deadline (504), and a model whose
scheduler has stopped (503 at once). The queue itself is the scheduler's (engine/scheduler.py);
`Admission` makes these decisions on its live state."""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from engine.errors import EngineError
from engine.prompt_cache import ConversationCache, common_prefix
from engine.sequence import Cancelled, Sequence
from engine.slot_policy import Slot


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


class Admission:
    """The scheduler's admission decisions, on its live state (`slots` and the `pending` queue are
    the scheduler's own, read under its lock): room in the waiting queue (MAX_QUEUE), a deadline the
    measured speed cannot meet (at once, and again for requests accepted before the speed was
    known), what a prompt will not have to read, and the Retry-After of a refusal."""

    def __init__(self, slots: list[Slot], pending: deque[Sequence], estimator: DeadlineEstimator,
                 cache: ConversationCache, disk, metrics, max_queue: int) -> None:
        """`disk`: the model's prompt cache on disk (engine/disk_cache.py), or None."""
        self.slots, self.pending = slots, pending
        self.estimator = estimator
        self.cache, self.disk = cache, disk
        self.metrics = metrics
        self.max_queue = max_queue
        self.recent_s = 2.0  # moving estimate of one request's time, for Retry-After

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        free = sum(s.seq is None for s in self.slots)
        return max(0, len(self.pending) - free)

    def check_room(self) -> None:
        """QueueFull when one more request would have to wait and MAX_QUEUE requests already do
        (MAX_QUEUE=0: whenever every sequence slot is taken)."""
        free = sum(s.seq is None for s in self.slots)
        if len(self.pending) + 1 - free <= self.max_queue:
            return
        n_parallel = len(self.slots)
        retry = max(1, round(self.recent_s * (self.waiting + 1) / (2 * n_parallel)))
        if self.max_queue == 0:
            raise QueueFull(f"the engine is busy: all {n_parallel} sequence slots (N_PARALLEL) are "
                            "taken and MAX_QUEUE=0 lets no request wait; retry shortly", retry)
        raise QueueFull(f"the engine is busy: {self.waiting} requests are already waiting "
                        f"(MAX_QUEUE={self.max_queue}); retry shortly", retry)

    def admit_by_deadline(self, seq: Sequence) -> None:
        """Refuse `seq` at once (DeadlineUnreachable) when the engine's estimate says it would
        finish after its deadline: the work ahead of it (prompts still to read, a slot to wait for)
        plus its own."""
        now = time.perf_counter()
        seq.reuse_guess = self.reuse_guess(seq.tokens)
        active = [s.seq for s in self.slots if s.seq is not None]
        free = len(self.slots) - len(active)
        est = self.estimator
        ahead = sum(len(q.tokens) - q.n_prompt_done for q in active if q.pending_token is None and q.leader is None)
        ahead += sum(len(q.tokens) - q.reuse_guess for q in self.pending)
        work = Workload(own_read=len(seq.tokens) - seq.reuse_guess, own_reply=est.expected_reply(seq.params.max_tokens),
                        ahead_read=ahead, queue_position=max(0, len(self.pending) + 1 - free),
                        slot_frees=tuple(max(0, est.expected_reply(q.params.max_tokens) - q.n_tokens) for q in active))
        seconds = est.seconds(work)
        left = seq.deadline - now
        if seconds is not None and seconds > left:
            raise self.too_late(seconds, left)

    def refuse_the_late(self, now: float, finish) -> None:
        """Requests accepted before the engine knew its speed (the first ones after a start), or
        whose work grew: those still waiting, or not yet reading, that the estimate now says would
        finish after their deadline are answered 503 with Retry-After now, rather than 504 at the
        deadline. One in a slot is ended by `finish(seq, error)` (the scheduler's: a sequence
        refused while reading keeps what it read)."""
        est = self.estimator
        if not est.ready:
            return
        ahead = 0
        for seq in sorted((s.seq for s in self.slots if s.seq is not None and s.seq.pending_token is None),
                          key=lambda q: q.order):
            # A follower waits for its leader (counted before it) and then reads only past the target.
            ahead += len(seq.tokens) - (seq.target if seq.leader else seq.n_prompt_done)
            need = ahead * est.row_s + est.expected_reply(seq.params.max_tokens) * est.step
            if now + need > seq.deadline:
                finish(seq, self.too_late(need, seq.deadline - now))
        for seq in list(self.pending):
            ahead += len(seq.tokens) - seq.reuse_guess
            need = ahead * est.row_s + est.expected_reply(seq.params.max_tokens) * est.step
            if now + need > seq.deadline:
                self.pending.remove(seq)
                seq.end(self.too_late(need, seq.deadline - now))

    def too_late(self, seconds: float, left: float) -> DeadlineUnreachable:
        if self.metrics is not None:
            self.metrics.deadline_rejections.inc()
        retry = max(1, math.ceil(seconds - left))
        return DeadlineUnreachable(
            f"the engine cannot answer within this request's deadline: about {seconds:.1f} s of work is ahead "
            f"of its reply and {max(left, 0):.1f} s are left (REQUEST_TIMEOUT_S or the client's timeout); retry "
            f"in {retry} s", retry)

    def expire(self, now: float, finish) -> None:
        """End, by `finish(seq, error)`, the sequences in slots whose client went away or whose
        deadline has passed."""
        for seq in [s.seq for s in self.slots if s.seq is not None]:
            if seq.cancelled:
                finish(seq, Cancelled("cancelled"))
            elif now > seq.deadline:
                finish(seq, RequestTimeout(
                    f"the request timed out after {now - seq.started:.1f} s with {seq.n_tokens} tokens "
                    "generated (REQUEST_TIMEOUT_S)"))

    def fail_waiting(self, seq: Sequence, now: float) -> None:
        """End `seq`, taken out of the queue before it had a slot: cancelled, or past its deadline."""
        if seq.cancelled:
            seq.end(Cancelled("cancelled"))
            return
        if self.metrics is not None:
            self.metrics.timeouts.inc()
        seq.end(RequestTimeout("the request timed out waiting in the queue (REQUEST_TIMEOUT_S)"))

    def reuse_guess(self, tokens: np.ndarray) -> int:
        """How much of a prompt will not have to be read: the longest prefix it shares with what a
        slot holds exactly, with a prompt being read or waiting (read once, then shared), or with a
        saved state."""
        best = 0
        for slot in self.slots:
            if slot.n_exact:
                best = max(best, common_prefix(slot.kv[:slot.n_exact], tokens))
        others = [s.seq for s in self.slots if s.seq is not None] + list(self.pending)
        for q in others:
            best = max(best, common_prefix(q.tokens, tokens))
        if self.cache.enabled:
            _entry, n = self.cache.best(tokens, lambda e, n: n)
            best = max(best, n)
        if self.disk is not None:
            hit = self.disk.longest(tokens)
            best = max(best, hit[0] if hit else 0)
        return min(best, len(tokens) - 1)

    def observe_reply(self, seconds: float, tokens: int) -> None:
        """A request ended after `seconds`, having generated `tokens`."""
        self.recent_s = 0.8 * self.recent_s + 0.2 * seconds
        self.estimator.observe_reply(tokens)
