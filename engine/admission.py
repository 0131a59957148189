"""Admission: a full queue (503 + Retry-After), a deadline the engine cannot meet (503 +
Retry-After, decided at once from its measured speed), a passed deadline (504), and a model whose
scheduler has stopped (503 at once). The queue itself is the scheduler's (engine/scheduler.py);
`Admission` makes these decisions on its live state."""

from __future__ import annotations

import math
import time
from collections import deque

import numpy as np

from engine.errors import EngineError
from engine.forecast import Job, finish_times
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


class ShuttingDown(Unavailable):
    """The engine was told to stop (SIGTERM, Ctrl-C): it finishes what it received and takes nothing
    new (an open keep-alive connection is closed when the engine stops)."""

    def __init__(self) -> None:
        super().__init__("the engine is shutting down: it finishes the requests it has and takes no new ones; "
                         "retry on another instance or once it has restarted", retry_after=EngineFailed.RESTART_S)


class DeadlineUnreachable(EngineError):
    """The engine's own estimate says the request would finish after its deadline: refused at once
    (503 + Retry-After) instead of running late and slowing the requests that can still make it."""

    status = 503

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after


class DeadlineEstimator:
    """The engine's measured speed, for the forecast (engine/forecast.py): a decode step generating
    for n sequences costs `decode_cost(n)` (a moving average for each n seen; an unseen n is
    extrapolated from the nearest smaller one, each sequence more costing half as much again as the
    average one there: the logits of a big vocabulary make batched tokens far from free on a CPU),
    and each prompt token read in a step adds `row_s`. The reply length is a moving average of real
    replies, capped by the request's own limit. Before a prompt step is measured there is no
    estimate (every request is accepted)."""

    ALPHA = 0.2
    MIN_PREFILL_ROWS = 32  # steps reading fewer prompt tokens say little about the cost of a row
    STEP_ROWS = 8  # before any decode step is measured, one sequence's token costs 8 prompt tokens

    def __init__(self, reply_tokens: float = 48.0) -> None:
        self.decode_s: dict[int, float] = {}  # seconds of a step generating for n sequences, by n
        self.row_s: float | None = None
        self.reply_tokens = reply_tokens

    def observe_step(self, prefill_rows: int, seconds: float, decoding: int = 1) -> None:
        """A decode went in: `prefill_rows` prompt tokens read beside one token of `decoding` sequences."""
        if prefill_rows < self.MIN_PREFILL_ROWS:
            if decoding > 0:
                seconds = max(seconds - prefill_rows * (self.row_s or 0.0), 1e-6)
                old = self.decode_s.get(decoding)
                self.decode_s[decoding] = seconds if old is None else (1 - self.ALPHA) * old + self.ALPHA * seconds
            return
        # A class starts with prompts only: the first steps read them, before any token is decoded.
        row = max(seconds - (self.decode_cost(decoding) if self.decode_s else 0.0), 0.0) / prefill_rows
        self.row_s = row if self.row_s is None else (1 - self.ALPHA) * self.row_s + self.ALPHA * row

    @property
    def ready(self) -> bool:
        """Whether there is an estimate: a prompt step has been measured."""
        return self.row_s is not None

    def decode_cost(self, n: int) -> float:
        """Seconds of a step generating one token for each of `n` sequences."""
        if n <= 0:
            return 0.0
        if n in self.decode_s:
            return self.decode_s[n]
        below = [k for k in self.decode_s if k < n]
        if below:
            k = max(below)
            return self.decode_s[k] * (1 + (n - k) / (2 * k))
        if self.decode_s:
            return self.decode_s[min(self.decode_s)]
        return n * self.STEP_ROWS * (self.row_s or 0.0)

    def cost(self, decoding: int, rows: int) -> float:
        """Seconds of a step generating for `decoding` sequences and reading `rows` prompt tokens."""
        return self.decode_cost(decoding) + rows * (self.row_s or 0.0)

    def observe_reply(self, tokens: int) -> None:
        self.reply_tokens = (1 - self.ALPHA) * self.reply_tokens + self.ALPHA * tokens

    def expected_reply(self, max_tokens: int) -> int:
        return max(1, min(max_tokens, round(self.reply_tokens)))


class Admission:
    """The scheduler's admission decisions, on its live state (`slots` and the `pending` queue are
    the scheduler's own, read under its lock): room in the waiting queue (MAX_QUEUE); deadlines,
    from the forecast of when every request would finish (engine/forecast.py) at the measured speed:
    a request that would finish late, or would make an accepted one late, is refused at once, and
    one accepted before the speed was known is refused as soon as the forecast says it is late;
    what a prompt will not have to read; and the Retry-After of a refusal. `batcher`: the
    scheduler's BatchBuilder (engine/batch.py), whose budget the forecast follows."""

    MARGIN = 1.1  # a forecast finish time counts this much longer: the measured speed moves
    RECHECK_S = 0.25  # how often requests already accepted are forecast again
    MAX_REFUSALS = 8  # refused in one check at most (each one makes the rest sooner)

    def __init__(self, slots: list[Slot], pending: deque[Sequence], estimator: DeadlineEstimator,
                 cache: ConversationCache, disk, metrics, max_queue: int, batcher) -> None:
        """`disk`: the model's prompt cache on disk (engine/disk_cache.py), or None."""
        self.slots, self.pending = slots, pending
        self.estimator = estimator
        self.cache, self.disk = cache, disk
        self.metrics = metrics
        self.max_queue = max_queue
        self.batcher = batcher
        self.recent_s = 2.0  # moving estimate of one request's time, for Retry-After
        self._checked = -math.inf

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
        """Refuse `seq` at once (DeadlineUnreachable) when the forecast says it would finish after
        its deadline, or that taking it would make a request already accepted finish after its own
        (which would otherwise be on time): it then waits its turn with the others."""
        now = time.perf_counter()
        seq.reuse_guess, seq.reuse_from = self.reuse_guess(seq.tokens)
        if not self.estimator.ready:
            return
        seqs = self.held()
        before = self.forecast(seqs, now)
        after = self.forecast(seqs + [seq], now)
        left = seq.deadline - now
        if after[-1] * self.MARGIN > left:
            raise self.too_late(after[-1], left)
        hurt = [i for i, q in enumerate(seqs)
                if before[i] * self.MARGIN <= q.deadline - now < after[i] * self.MARGIN]
        if hurt:
            if self.metrics is not None:
                self.metrics.deadline_rejections.inc()
            retry = max(1, math.ceil(min(before[i] for i in hurt)))
            raise DeadlineUnreachable(
                f"the engine is at capacity: taking this request now would make {len(hurt)} accepted "
                f"request(s) miss their deadline; retry in {retry} s", retry)

    def refuse_the_late(self, now: float, finish, want=None) -> None:
        """Requests accepted before the engine knew its speed (the first ones after a start), or
        whose work grew: those waiting, or still reading their prompt, that the forecast now says
        would finish after their deadline are answered 503 with Retry-After now, rather than 504 at
        the deadline; the latest to come first, and each refusal makes the others sooner. One in a
        slot is ended by `finish(seq, error)` (the scheduler's: a sequence refused while reading
        keeps what it read); `want(prompt)` hears of every refused prompt (BackgroundReads.want).
        Checked every RECHECK_S."""
        if not self.estimator.ready or now - self._checked < self.RECHECK_S:
            return
        self._checked = now
        for _ in range(self.MAX_REFUSALS):
            seqs = self.held()
            done = self.forecast(seqs, now)
            late = [i for i, q in enumerate(seqs)
                    if q.pending_token is None and done[i] * self.MARGIN > q.deadline - now]
            if not late:
                return
            i = max(late, key=lambda i: (seqs[i].started, i))
            seq, error = seqs[i], self.too_late(done[i], seqs[i].deadline - now)
            if want is not None:
                want(seq.tokens)
            if seq.slot is not None:
                finish(seq, error)
            else:
                self.pending.remove(seq)
                seq.end(error)

    def held(self) -> list[Sequence]:
        """Every request the scheduler holds, in the order they are served: the slots' by placement,
        then the queue."""
        return sorted((s.seq for s in self.slots if s.seq is not None), key=lambda q: q.order) + list(self.pending)

    def forecast(self, seqs: list[Sequence], now: float) -> list[float]:
        """Seconds from `now` until each of `seqs` (from `held()`, plus perhaps a newcomer) is answered."""
        est = self.estimator
        index = {id(q): i for i, q in enumerate(seqs)}
        jobs = []
        for q in seqs:
            expected = est.expected_reply(q.params.max_tokens)
            job = Job(read=0, reply=max(1, expected - q.n_tokens), deadline=q.deadline - now, arrival=q.started,
                      in_slot=q.slot is not None)
            if q.slot is None:  # waiting: it reads what no one gives it, after whoever is reading that
                job.read, job.leader = len(q.tokens) - q.reuse_guess, index.get(id(q.reuse_from))
            elif q.pending_token is None:  # reading (or following a classmate who reads)
                job.read = len(q.tokens) - max(q.n_prompt_done, q.target if q.leader is not None else 0)
                job.leader = index.get(id(q.leader)) if q.leader is not None else None
            jobs.append(job)
        n_batch, rows = self.batcher.runtime.n_batch, self.batcher.prefill_rows()
        horizon = max((j.deadline for j in jobs), default=0.0) * self.MARGIN + 1.0
        return finish_times(jobs, slots=len(self.slots), n_batch=n_batch, prefill_rows=rows, cost=est.cost,
                            horizon=horizon)

    def too_late(self, seconds: float, left: float) -> DeadlineUnreachable:
        if self.metrics is not None:
            self.metrics.deadline_rejections.inc()
        work = f"about {seconds:.1f} s" if math.isfinite(seconds) else f"more than {left * self.MARGIN:.1f} s"
        retry = max(1, math.ceil(seconds - left)) if math.isfinite(seconds) else max(1, math.ceil(left))
        return DeadlineUnreachable(
            f"the engine cannot answer within this request's deadline: {work} of work is ahead "
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

    def reuse_guess(self, tokens: np.ndarray) -> tuple[int, Sequence | None]:
        """How much of a prompt will not have to be read: the longest prefix it shares with what a
        slot holds exactly, with a prompt being read or waiting (read once, then shared), or with a
        saved state; and the request still to read that prefix, when it comes from one (None: it is
        there already)."""
        best, provider = 0, None
        for slot in self.slots:
            if slot.n_exact:
                best = max(best, common_prefix(slot.kv[:slot.n_exact], tokens))
        if self.cache.enabled:
            _entry, n = self.cache.best(tokens, lambda e, n: n)
            best = max(best, n)
        if self.disk is not None:
            hit = self.disk.longest(tokens)
            best = max(best, hit[0] if hit else 0)
        for q in [s.seq for s in self.slots if s.seq is not None] + list(self.pending):
            n = common_prefix(q.tokens, tokens)
            if n > best:
                best, provider = n, q
        return min(best, len(tokens) - 1), provider

    def observe_reply(self, seconds: float, tokens: int) -> None:
        """A request ended after `seconds`, having generated `tokens`."""
        self.recent_s = 0.8 * self.recent_s + 0.2 * seconds
        self.estimator.observe_reply(tokens)
