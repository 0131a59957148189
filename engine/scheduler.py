"""Continuous batching: one runtime decoding up to N_PARALLEL sequences per step.

A scheduler thread drives the runtime (engine/runtime.py: the llama.cpp handles). Requests wait
in a bounded FIFO (`MAX_QUEUE`; full → 503 with Retry-After; 0: no waiting, only free slots take
requests) until a sequence slot is free; then
each step builds one batch holding the next token of every decoding sequence plus chunks of the
prompts being read (so a long prompt never stalls the others), runs one decode, and samples every
sequence that has logits with its own sampler chain (plain greedy takes the argmax). Finished,
cancelled and timed-out sequences leave at once.

Each slot is a KV-cache sequence of its own, N_CTX tokens long (the context is split, not shared:
a request's limit does not depend on the others). Which slot a prompt goes to, and how much of it
is reused from that slot or from a state in the conversation cache, is decided by the slot policy
(engine/slot_policy.py) from plain data, so that reuse never changes a reply by a single bit;
this module carries the decisions out. Only the new tokens are evaluated.

Failures: a llama_decode that fails ends the requests whose tokens were in that batch (500) and
the others go on. Should the thread itself die (an exception escaping its loop, or MAX_FAILED_STEPS
steps failing in a row), every request it held is answered 503 at once, later ones too, and
`failed` turns true for /health: nothing is left waiting on a thread that is gone.
"""

from __future__ import annotations

import codecs
import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from engine.admission import (DeadlineEstimator, DeadlineUnreachable, EngineFailed, QueueFull, RequestTimeout,
                              Unavailable, Workload)
from engine.errors import ContextOverflow, EngineError
from engine.generation import Generation, ReplyText, SamplingParams
from engine.prompt_cache import CachedState, ConversationCache, common_prefix
from engine.runtime import Runtime
from engine.slot_policy import MIN_RESTORE_GAIN, Slot, SlotPolicy

log = logging.getLogger(__name__)

MAX_BANNED_ENDS = 8  # end-of-generation tokens a reply that must say something may ban in turn
_DONE = object()
PREFILL_STEP_S = 0.5  # at most this much prompt reading in a step while other requests generate
MAX_FAILED_STEPS = 3  # steps failing in a row before the runtime is taken as broken and the thread stops


class Cancelled(EngineError):
    """The client went away; nobody reads this."""

    status = 499


class _DecodeFailed(Exception):
    """llama_decode failed: `sequences` are those whose tokens (or pending copies) it held."""

    def __init__(self, cause: Exception, sequences: list["Sequence"]) -> None:
        super().__init__(str(cause))
        self.cause, self.sequences = cause, sequences


@dataclass(eq=False)
class Sequence:
    """One request inside the scheduler; its text pieces come out of `stream()`."""

    tokens: np.ndarray
    params: SamplingParams
    reply: ReplyText
    started: float
    deadline: float
    out: queue.Queue = field(default_factory=queue.Queue)
    result: Generation | None = None
    cancelled: bool = False
    # scheduler state
    slot: Slot | None = None
    n_prompt_done: int = 0
    reused: int = 0
    chain: object = None
    pending_token: int | None = None
    disk_save: int = 0  # save the first this-many tokens to the disk cache before reading on
    reuse_guess: int = 0  # prompt tokens some sequence or cache is expected to give it (admission)
    order: int = 0  # placement order: a sequence only follows one placed before it (no cycles)
    leader: "Sequence | None" = None  # a sequence reading the same prefix, which this one waits for
    target: int = 0  # how much of the prompt the leader will give
    n_tokens: int = 0
    logprob_sum: float = 0.0
    emitted: str = ""
    t_first: float | None = None
    t_last: float | None = None
    decoder: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def stream(self) -> Iterator[str]:
        """Stable reply text as it comes (one item per token, often ""); raises the request's error."""
        while True:
            item = self.out.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def wait(self) -> Generation:
        """Block until the request ends; its result, or raises its error. One wake-up at the end
        instead of one per token: on 2 cores a thread woken per token takes a core from llama.cpp
        in the middle of its decode (about 2% of decode speed)."""
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result

    def cancel(self) -> None:
        self.cancelled = True

    def end(self, error: BaseException | None = None) -> None:
        """The scheduler is done with this request (`result` is set, or `error`)."""
        self.error = error
        self.out.put(_DONE if error is None else error)
        self.done.set()


class Scheduler:
    """The request queue of one runtime and the thread that drives it. `close()` finishes the
    accepted requests, then closes the runtime: the scheduler owns it from construction on.

    The runtime is anything with LlamaRuntime's interface (engine.runtime.Runtime): tokens, the
    batch, sampling, and the KV memory of one sequence; it is used from the scheduler thread only,
    but for `tokenize` and `special_token_text`."""

    def __init__(self, runtime: Runtime, *, cache_bytes: int, max_queue: int, metrics=None,
                 prefill_chunk: int = 256, disk=None) -> None:
        """`prefill_chunk`: prompt tokens read per step while other sequences are generating, so that
        a long prompt (a 2,500-token case) slows their tokens down instead of stopping them.
        `disk`: the prompt cache on disk (engine/disk_cache.py) for this model, or None."""
        self.runtime = runtime
        self.disk = disk if disk is not None and disk.enabled else None
        self._disk_writes: queue.Queue = queue.Queue()
        self._disk_writer = None
        if self.disk is not None:
            self._disk_writer = threading.Thread(target=self._write_disk, name="prompt-cache-writer", daemon=True)
            self._disk_writer.start()
        self.prefill_chunk = prefill_chunk
        self.estimator = DeadlineEstimator()
        self.max_queue = max_queue
        self.metrics = metrics
        self.cache = ConversationCache(cache_bytes)
        self.policy = SlotPolicy(n_swa=runtime.n_swa, flash_attn=runtime.flash_attn, cache_enabled=self.cache.enabled)
        self.slots = [Slot(i, np.zeros(runtime.n_ctx, dtype=np.int32)) for i in range(runtime.n_parallel)]
        self._pending: deque[Sequence] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._recent_s = 2.0  # moving estimate of one request's time, for Retry-After
        self.shared_tokens = 0  # prompt tokens copied from another sequence instead of read
        self._placed = 0
        # Slots whose cells a copy reads at the next decode (llama.cpp copies the buffers then): no
        # state may be restored into them before it, or the copy would take the restored cells.
        self._copy_sources: set[int] = set()
        self._copy_targets: set[int] = set()  # slots those copies write: uncertain if the decode fails
        self._failure: str | None = None  # why the thread stopped (see `failed`)
        self._failed_steps = 0  # steps failed in a row
        self._thread = threading.Thread(target=self._run, name=f"scheduler-{Path(runtime.path).name}", daemon=True)
        self._thread.start()

    # -- the model, as the layers above see it ------------------------------------------------
    @property
    def n_ctx(self) -> int:
        """Tokens one request may hold (prompt and reply): N_CTX, per sequence."""
        return self.runtime.n_ctx

    @property
    def n_parallel(self) -> int:
        return self.runtime.n_parallel

    @property
    def metadata(self) -> dict[str, str]:
        return self.runtime.metadata

    def tokenize(self, text: str) -> np.ndarray:
        """The prompt as the model sees it (BOS added when the model wants one)."""
        return self.runtime.tokenize(text)

    def special_token_text(self) -> tuple[str, str, bool]:
        """(BOS text, EOS text, whether the tokenizer adds BOS) for chat templates."""
        return self.runtime.special_token_text()

    def check_fits(self, prompt: np.ndarray, max_tokens: int) -> None:
        if len(prompt) + max_tokens > self.n_ctx:
            raise ContextOverflow(
                f"the prompt is {len(prompt)} tokens and max_length asks for {max_tokens} more, "
                f"but the context holds {self.n_ctx} tokens (N_CTX); shorten the prompt, lower "
                "max_length or raise N_CTX", field="prompt")

    # -- the queue --------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        free = sum(s.seq is None for s in self.slots)
        return max(0, len(self._pending) - free)

    @property
    def active(self) -> int:
        return sum(s.seq is not None for s in self.slots)

    @property
    def failed(self) -> bool:
        """Whether the scheduler thread has stopped after an internal error: every request is
        answered 503 at once from then on, and the model is unhealthy (see `failure`)."""
        return self._failure is not None

    @property
    def failure(self) -> str | None:
        """Why the scheduler thread stopped (the exception, in a line); None while it runs."""
        return self._failure

    @property
    def recent_s(self) -> float:
        """A moving estimate of one request's time, in seconds (for Retry-After)."""
        return self._recent_s

    def submit(self, tokens: np.ndarray, params: SamplingParams, reply: ReplyText, started: float,
               deadline: float) -> Sequence:
        """Queue a request: 503 at once when it would have to wait and MAX_QUEUE requests already
        do (MAX_QUEUE=0: whenever every sequence slot is taken), or when the thread has stopped."""
        self.check_fits(tokens, params.max_tokens)
        seq = Sequence(tokens=tokens, params=params, reply=reply, started=started, deadline=deadline)
        with self._cond:
            if self._failure is not None:
                raise EngineFailed(Path(self.runtime.path).name, self._failure)
            if self._stopping:
                raise Unavailable("the engine is switching models; retry in a moment")
            free = sum(s.seq is None for s in self.slots)
            if len(self._pending) + 1 - free > self.max_queue:  # it would wait, and the waiting room is full
                retry = max(1, round(self._recent_s * (self.waiting + 1) / (2 * self.n_parallel)))
                if self.max_queue == 0:
                    raise QueueFull(f"the engine is busy: all {self.n_parallel} sequence slots (N_PARALLEL) are "
                                    "taken and MAX_QUEUE=0 lets no request wait; retry shortly", retry)
                raise QueueFull(f"the engine is busy: {self.waiting} requests are already waiting "
                                f"(MAX_QUEUE={self.max_queue}); retry shortly", retry)
            self._admit_by_deadline(seq)
            self._pending.append(seq)
            self._cond.notify_all()
        self._report_queue()
        return seq

    def _prefill_rows(self) -> int:
        """Prompt tokens a step may read while others generate: PREFILL_CHUNK, and no more than
        PREFILL_STEP_S of reading at the measured speed (a 1B model on 2 cores reads 256 tokens in
        about 2 s, which would hold every reply to one token per 2 s)."""
        if not self.estimator.ready or self.estimator.row_s <= 0:
            return self.prefill_chunk
        by_time = int(PREFILL_STEP_S / self.estimator.row_s)
        return min(self.prefill_chunk, max(4 * self.policy.min_rows, by_time))

    def _admit_by_deadline(self, seq: Sequence) -> None:
        """Refuse `seq` at once (DeadlineUnreachable) when the engine's estimate says it would
        finish after its deadline: the work ahead of it (prompts still to read, a slot to wait for)
        plus its own. Called under the lock, with the scheduler's state as it is."""
        now = time.perf_counter()
        seq.reuse_guess = self._reuse_guess(seq.tokens)
        active = [s.seq for s in self.slots if s.seq is not None]
        est = self.estimator
        ahead = sum(len(q.tokens) - q.n_prompt_done for q in active if q.pending_token is None and q.leader is None)
        ahead += sum(len(q.tokens) - q.reuse_guess for q in self._pending)
        work = Workload(own_read=len(seq.tokens) - seq.reuse_guess, own_reply=est.expected_reply(seq.params.max_tokens),
                        ahead_read=ahead, queue_position=max(0, len(self._pending) + 1 - (self.n_parallel - len(active))),
                        slot_frees=tuple(max(0, est.expected_reply(q.params.max_tokens) - q.n_tokens) for q in active))
        seconds = est.seconds(work)
        left = seq.deadline - now
        if seconds is not None and seconds > left:
            raise self._too_late(seconds, left)

    def _refuse_the_late(self, now: float) -> None:
        """Requests accepted before the engine knew its speed (the first ones after a start), or
        whose work grew: those still waiting, or not yet reading, that the estimate now says would
        finish after their deadline are answered 503 with Retry-After now, rather than 504 at the
        deadline. A sequence refused while reading keeps what it read (see `_finish`)."""
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
                self._finish(seq, self._too_late(need, seq.deadline - now))
        for seq in list(self._pending):
            ahead += len(seq.tokens) - seq.reuse_guess
            need = ahead * est.row_s + est.expected_reply(seq.params.max_tokens) * est.step
            if now + need > seq.deadline:
                self._pending.remove(seq)
                seq.end(self._too_late(need, seq.deadline - now))

    def _too_late(self, seconds: float, left: float) -> DeadlineUnreachable:
        if self.metrics is not None:
            self.metrics.deadline_rejections.inc()
        retry = max(1, math.ceil(seconds - left))
        return DeadlineUnreachable(
            f"the engine cannot answer within this request's deadline: about {seconds:.1f} s of work is ahead "
            f"of its reply and {max(left, 0):.1f} s are left (REQUEST_TIMEOUT_S or the client's timeout); retry "
            f"in {retry} s", retry)

    def _reuse_guess(self, tokens: np.ndarray) -> int:
        """How much of a prompt will not have to be read: the longest prefix it shares with what a
        slot holds exactly, with a prompt being read or waiting (read once, then shared), or with a
        saved state."""
        best = 0
        for slot in self.slots:
            if slot.n_exact:
                best = max(best, common_prefix(slot.kv[:slot.n_exact], tokens))
        others = [s.seq for s in self.slots if s.seq is not None] + list(self._pending)
        for q in others:
            best = max(best, common_prefix(q.tokens, tokens))
        if self.cache.enabled:
            _entry, n = self.cache.best(tokens, lambda e, n: n)
            best = max(best, n)
        if self.disk is not None:
            hit = self.disk.longest(tokens)
            best = max(best, hit[0] if hit else 0)
        return min(best, len(tokens) - 1)

    def close(self) -> None:
        """Finish what was accepted, stop the thread, then close the runtime (idempotent)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()
        if self._disk_writer is not None:  # the files being written are finished first
            self._disk_writes.put(None)
            self._disk_writer.join()
        self.runtime.close()
        self.cache.clear()  # its KV states belong to this model: no one can restore them now

    def _report_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.waiting)

    # -- the scheduler thread ---------------------------------------------------------------
    def _run(self) -> None:
        """The thread: the loop, and the watchdog for whatever escapes it."""
        try:
            self._loop()
        except BaseException as exc:
            self._die(exc)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self.active and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._pending and not self.active:
                    return
            try:
                self._admit()
                self._step()
            except _DecodeFailed as exc:  # llama.cpp refused a batch: its requests fail, the others go on
                log.error("llama_decode failed (%s): ending the %d requests in its batch", exc.cause,
                          len(exc.sequences))
                self._count_failure(exc.cause)
                for seq in exc.sequences:
                    if seq.slot is not None and seq.slot.seq is seq:
                        self._finish(seq, EngineError(f"generation failed: {exc.cause}"))
            except Exception as exc:  # a bug: fail the requests in the slots (their state is unknown), keep serving
                log.exception("scheduler step failed")
                self._count_failure(exc)
                for slot in self.slots:
                    if slot.seq is not None:
                        self._finish(slot.seq, EngineError(f"generation failed: {exc}"))
            else:
                self._failed_steps = 0

    def _count_failure(self, exc: Exception) -> None:
        """One more step failed; MAX_FAILED_STEPS in a row stop the thread (then `_die`): a runtime
        that fails every batch would otherwise fail each request in turn while /health says ok."""
        self._failed_steps += 1
        if self._failed_steps >= MAX_FAILED_STEPS:
            raise RuntimeError(f"{self._failed_steps} scheduler steps failed in a row, the last with: {exc}") from exc

    def _die(self, exc: BaseException) -> None:
        """The watchdog: the loop is gone. Every request it held is answered 503 now, those that
        come later at once (`submit`), and `failed` tells /health. The runtime is not touched: it
        may be what broke (it is freed by `close`)."""
        name = Path(self.runtime.path).name
        log.critical("the scheduler of %s stopped; its requests are answered 503 until the engine restarts",
                     name, exc_info=exc)
        with self._cond:
            self._failure = f"{type(exc).__name__}: {exc}"
            held = list(self._pending) + [s.seq for s in self.slots if s.seq is not None]
            self._pending.clear()
            for slot in self.slots:
                slot.seq = None
            self._cond.notify_all()
        for seq in held:
            seq.end(EngineFailed(name, self._failure))
        self._report_queue()

    def _admit(self) -> None:
        now = time.perf_counter()
        with self._cond:  # placed under the lock, so `waiting` never undercounts for submit()
            free = sum(s.seq is None for s in self.slots)
            self._refuse_the_late(now)
            for seq in list(self._pending):
                if seq.cancelled or now > seq.deadline:
                    self._pending.remove(seq)
                    self._fail_waiting(seq, now)
                elif free > 0:
                    self._pending.remove(seq)
                    try:
                        self._place(seq)
                    except Exception as exc:  # a llama.cpp or memory failure: this request fails, not silently
                        log.exception("could not place a request")
                        if seq.slot is not None and seq.slot.seq is seq:  # placed halfway: give the slot back
                            self._finish(seq, EngineError(f"generation failed: {exc}"))
                        else:
                            seq.end(EngineError(f"generation failed: {exc}"))
                        continue
                    free -= 1
        self._report_queue()

    def _fail_waiting(self, seq: Sequence, now: float) -> None:
        if seq.cancelled:
            seq.end(Cancelled("cancelled"))
            return
        if self.metrics is not None:
            self.metrics.timeouts.inc()
        seq.end(RequestTimeout("the request timed out waiting in the queue (REQUEST_TIMEOUT_S)"))

    def _place(self, seq: Sequence) -> None:
        """Carry out the policy's placement of `seq` (SlotPolicy.place): save the slot's exact
        prefix, restore a cached state, drop the rest of the slot's cache; then prepare its
        sampler. The policy sees the best cached state's gain and, with a sliding window, the first
        position each free slot still holds."""
        rt, prompt, policy = self.runtime, seq.tokens, self.policy
        entry, restore = None, 0
        if self.cache.enabled:
            entry, restore = self.cache.best(prompt, lambda e, n: policy.restore_point(len(e.tokens), n, len(prompt)))
        first_held = {s.seq_id: rt.seq_pos_min(s.seq_id) for s in self.slots if s.seq is None} if policy.n_swa else {}
        placement = policy.place(self.slots, prompt, restore, first_held)
        slot, keep = placement.slot, placement.keep
        if placement.save:
            self._save(slot, placement.save)
        if placement.restore and slot.seq_id in self._copy_sources:
            keep = 0  # rare: a classmate copies this slot's cells at the next decode; read instead
        elif placement.restore:
            keep = keep if self._restore(slot, entry) else 0
            if keep:
                self.cache.hits += 1
                if self.metrics is not None:
                    self.metrics.cache_hits.labels(cache="conversation").inc()
        keep = self._truncate(slot, keep)
        self._placed += 1
        seq.slot, seq.n_prompt_done, seq.reused, seq.order = slot, keep, keep, self._placed
        seq.chain = rt.new_sampler(seq.params)
        slot.seq, slot.last_used = seq, time.perf_counter()
        self._take_prefix(seq)
        log.debug("placed: slot %d, %d of %d prompt tokens held, following %s (target %d)", slot.seq_id,
                  seq.n_prompt_done, len(prompt), seq.leader.slot.seq_id if seq.leader else None, seq.target)

    def _take_prefix(self, seq: Sequence) -> bool:
        """Take the most of `seq`'s prompt that is to be had without reading it: wait for a
        classmate reading it (if that will give the most), else restore it from the disk cache or
        copy it from another sequence, whichever gives more. True if `seq` now waits for a leader."""
        shared, _donor = self._best_donor(seq)
        hit = self._disk_hit(seq)
        on_disk = hit[0] if hit else 0
        if self._follow(seq, beyond=max(shared, on_disk)):
            return True
        if on_disk > shared and self._load_from_disk(seq, hit):
            return False
        self._share(seq)
        return False

    # -- prefix sharing between sequences ----------------------------------------------------
    def _share(self, seq: Sequence) -> bool:
        """Copy into `seq`'s slot the longest exact prefix of its prompt that another sequence
        holds (a classmate's case prompt), when that saves at least MIN_RESTORE_GAIN tokens over
        what the slot has: the prefix is read once for the whole class. True if it copied."""
        rt, slot = self.runtime, seq.slot
        best, donor = self._best_donor(seq)
        if donor is None or best < seq.n_prompt_done + MIN_RESTORE_GAIN:
            return False
        save = self.policy.state_point(best) if self.disk is not None else 0
        if save and self.disk.contains(seq.tokens[:save]):
            save = 0
        rt.seq_copy(donor.seq_id, slot.seq_id)
        self._copy_sources.add(donor.seq_id)
        self._copy_targets.add(slot.seq_id)
        slot.kv[:donor.n_kv] = donor.kv[:donor.n_kv]
        slot.n_kv, slot.n_exact = donor.n_kv, donor.n_exact
        keep = self._truncate(slot, save or best)
        seq.disk_save = save  # a prefix two requests use: saved for the next class (after the copy lands)
        seq.n_prompt_done = seq.reused = keep
        self.shared_tokens += keep
        if self.metrics is not None:
            self.metrics.cache_hits.labels(cache="shared-prefix").inc()
        return True

    def _disk_hit(self, seq: Sequence):
        """The longest prefix of `seq`'s prompt that the disk cache holds and that it can continue
        from its end: (tokens, file), or None."""
        if self.disk is None:
            return None
        prompt, policy = seq.tokens, self.policy
        return self.disk.longest(prompt, lambda n: policy.restore_point(n, n, len(prompt)) == n)

    def _load_from_disk(self, seq: Sequence, hit) -> bool:
        """Restore the prefix `hit` (from `_disk_hit`: a case prompt saved by an earlier class),
        when that saves MIN_RESTORE_GAIN tokens over what the slot has."""
        if hit is None or seq.slot.seq_id in self._copy_sources or hit[0] < seq.n_prompt_done + MIN_RESTORE_GAIN:
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

    def _write_disk(self) -> None:
        """The disk cache's writer: files are written off the scheduler thread."""
        while True:
            item = self._disk_writes.get()
            if item is None:
                return
            tokens, state = item
            self.disk.put(tokens, state)

    def _best_donor(self, seq: Sequence) -> tuple[int, Slot | None]:
        """The other slot whose cells give the most of `seq`'s prompt now, and how much."""
        rt, policy = self.runtime, self.policy
        best, donor = 0, None
        for other in self.slots:
            if other is seq.slot or not other.n_exact:
                continue
            first = rt.seq_pos_min(other.seq_id) if policy.n_swa else 0
            point = policy.share_point(other, seq.tokens, first)
            if point > best:
                best, donor = point, other
        return best, donor

    def _follow(self, seq: Sequence, beyond: int = 0) -> bool:
        """If another sequence is still reading a prompt that shares a longer prefix with this one
        than any sequence holds now, wait for it (`_step` skips a follower) and copy the prefix
        then, rather than reading it a second time alongside. True if `seq` now follows one. The
        one it follows may itself wait for another, placed earlier still: a sequence only follows
        one placed before it, so no two wait for each other."""
        best, leader = max(beyond, seq.n_prompt_done) + MIN_RESTORE_GAIN - 1, None
        for other in self.slots:
            lead = other.seq
            if lead is None or lead.order >= seq.order or lead.pending_token is not None:
                continue
            point = self.policy.follow_point(lead.tokens, seq.tokens)
            if point > best:
                best, leader = point, lead
        if leader is not None:
            seq.leader, seq.target = leader, best
        return leader is not None

    def _waits_for_leader(self, seq: Sequence) -> bool:
        """Whether a follower still waits: its leader is reading (in its slot, not yet past the
        shared prefix). Once it is past, or gone, the follower copies what it can and reads on."""
        lead = seq.leader
        if lead is None:
            return False
        reading = lead.slot is not None and lead.slot.seq is lead and lead.pending_token is None
        if reading and lead.slot.n_exact < seq.target:
            return True
        seq.leader = None
        # Two cases may open alike (the same role-play rules): what it copies may be only that
        # opening, while a classmate now reads the rest of its own case. Then it waits for that one.
        return self._take_prefix(seq)

    def _step(self) -> None:
        """One decode for every active sequence, then sample those that have logits."""
        now = time.perf_counter()
        for seq in [s.seq for s in self.slots if s.seq is not None]:
            if seq.cancelled:
                self._finish(seq, Cancelled("cancelled"))
            elif now > seq.deadline:
                self._finish(seq, RequestTimeout(
                    f"the request timed out after {now - seq.started:.1f} s with {seq.n_tokens} tokens "
                    "generated (REQUEST_TIMEOUT_S)"))
        rt = self.runtime
        active = [s.seq for s in self.slots if s.seq is not None]
        decoding = [q for q in active if q.pending_token is not None]
        prefilling = sorted((q for q in active if q.pending_token is None), key=lambda q: q.started)
        rt.batch_clear()
        wants: list[tuple[Sequence, int]] = []  # sequences to sample, and where their logits are
        for seq in decoding:  # one token each: decoding never waits for a prompt to be read
            wants.append((seq, rt.batch_add(seq.slot.seq_id, seq.pending_token, seq.slot.n_kv, True)))
        n = len(decoding)
        chunks: list[tuple[Sequence, int]] = []
        # Then prompts, in chunks that fill the rest of the batch; while sequences are generating,
        # at most `prefill_chunk` prompt tokens a step, so that their next tokens are not long in coming.
        budget = min(rt.n_batch, n + self._prefill_rows()) if decoding else rt.n_batch
        saving = []
        for seq in prefilling:
            if self._waits_for_leader(seq):
                continue
            if seq.disk_save:  # it holds exactly the prefix once this decode has made the copy
                saving.append(seq)
                continue
            start, room = seq.n_prompt_done, budget - n
            if room <= 0:
                break
            end = self.policy.chunk_end(start, room, len(seq.tokens))
            last = end == len(seq.tokens)
            for pos, tok in enumerate(seq.tokens[start:end].tolist(), start):
                rt.batch_add(seq.slot.seq_id, tok, pos, last and pos == end - 1)
            n += end - start
            chunks.append((seq, end - start))
            if last:
                wants.append((seq, n - 1))
        placeholder = None
        if n == 0 and saving:
            # Nothing else to decode, but llama.cpp copies the cells only at a decode: decode the
            # saver's next token, and drop it again (it is read properly next step, with its row group).
            placeholder = saving[0]
            rt.batch_add(placeholder.slot.seq_id, int(placeholder.tokens[placeholder.disk_save]),
                         placeholder.disk_save, False)
            n = 1
        if n == 0:
            return
        started = time.perf_counter()
        try:
            rt.decode()
        except Exception as exc:
            # Those whose tokens it held, and those whose cells a copy was to write at it (pending
            # copies: done or not, nobody knows). Those waiting for room or a leader are untouched.
            # The copy sources stay marked: a copy llama.cpp did not make is still due.
            held = decoding + [seq for seq, _k in chunks] + saving
            held += [s.seq for s in self.slots if s.seq_id in self._copy_targets and s.seq not in held]
            self._copy_targets.clear()
            raise _DecodeFailed(exc, [q for q in held if q is not None]) from exc
        self.estimator.observe_step(n - len(decoding), time.perf_counter() - started)
        self._copy_sources.clear()  # the copies are done
        self._copy_targets.clear()
        if placeholder is not None:
            rt.seq_rm(placeholder.slot.seq_id, placeholder.disk_save, -1)
        for seq in saving:
            state = rt.state_get(seq.slot.seq_id)
            if state:
                self._disk_writes.put((seq.tokens[:seq.disk_save].copy(), state))
            seq.disk_save = 0
        for seq in decoding:  # the batch went in: record what each sequence's cache now holds
            slot = seq.slot
            slot.kv[slot.n_kv] = seq.pending_token
            slot.n_kv += 1
            seq.pending_token = None
        for seq, k in chunks:
            slot, start = seq.slot, seq.n_prompt_done
            slot.kv[start:start + k] = seq.tokens[start:start + k]
            slot.n_kv = seq.n_prompt_done = start + k
            slot.n_exact = self.policy.exact_after(slot.n_exact, start, k)
        for seq, index in wants:
            self._sample(seq, index)

    def _sample(self, seq: Sequence, index: int) -> None:
        rt = self.runtime
        logits = rt.logits(index)
        if seq.chain is None:  # plain greedy: the argmax, read in place (see runtime.sampler_chain)
            token = int(logits.argmax())
        else:
            token = rt.sample(seq.chain, index)
        if seq.reply.require_text and rt.is_eog(token) and not seq.reply.text.strip():
            token = self._sample_without_end(seq, index, token)
        now = time.perf_counter()
        seq.t_last = now
        seq.t_first = seq.t_first or now
        if rt.is_eog(token):
            self._finish(seq, finish="eos")
            return
        seq.n_tokens += 1
        if self.metrics is not None:
            self.metrics.generated_tokens.inc()
        seq.logprob_sum += _logprob(logits, token)
        if seq.reply.add(seq.decoder.decode(rt.piece(token))):
            self._finish(seq, finish="stop")
            return
        if seq.n_tokens >= seq.params.max_tokens:
            self._finish(seq, finish="length")
            return
        seq.pending_token = token
        stable = seq.reply.stable()
        seq.out.put(stable[len(seq.emitted):])
        seq.emitted = stable

    def _sample_without_end(self, seq: Sequence, index: int, token: int) -> int:
        """A reply that must say something may not end before its first word: sample again with
        the end-of-generation tokens banned (a fine-tuned persona can learn to stop at once)."""
        banned: list[int] = []
        while self.runtime.is_eog(token) and len(banned) < MAX_BANNED_ENDS:
            banned.append(token)
            token = self.runtime.sample_banning(seq.params, index, banned)
        return token

    def _finish(self, seq: Sequence, error: BaseException | None = None, finish: str = "") -> None:
        """Take `seq` out of its slot and hand its result (or error) to the waiting request. The
        request is answered even if this fails (a runtime that broke): with that failure, which is
        then raised on."""
        slot = seq.slot
        slot.seq = None
        seq.pending_token = None
        try:
            if seq.chain is not None:
                chain, seq.chain = seq.chain, None
                self.runtime.free_sampler(chain)
            if error is not None:
                self._drop(slot, error)
            else:
                self._complete(seq, finish)
        except BaseException as exc:
            if not seq.done.is_set():
                seq.end(error or EngineError(f"generation failed: {exc}"))
            raise
        if error is not None:
            if isinstance(error, RequestTimeout) and self.metrics is not None:
                self.metrics.timeouts.inc()
            seq.end(error)
            return
        seq.end()
        with self._cond:
            self._cond.notify_all()

    def _drop(self, slot: Slot, error: BaseException) -> None:
        """The cells of a request that ended with `error`."""
        if isinstance(error, (RequestTimeout, Cancelled, DeadlineUnreachable)) and slot.n_exact:
            # What it read exactly stays (the reply it began goes): a classmate or the student's
            # next try continues from it, and a slow model's case prompt is not read in vain.
            # The slot's cells are cut back when a request takes it, so its context stays whole.
            self._truncate(slot, slot.n_exact)
        else:  # a failure: nothing of it is trusted
            self.runtime.seq_clear(slot.seq_id)
            slot.clear()

    def _complete(self, seq: Sequence, finish: str) -> None:
        """`seq.result`, and the rest of its text to its stream."""
        if finish != "stop":
            seq.reply.add(seq.decoder.decode(b"", final=True))
        text = seq.reply.final()
        if not text.startswith(seq.emitted):  # would be a bug in ReplyText.stable: make it loud
            log.error("streamed text %r is not a prefix of the reply %r", seq.emitted, text)
        ended = time.perf_counter()
        self._recent_s = 0.8 * self._recent_s + 0.2 * (ended - seq.started)
        self.estimator.observe_reply(seq.n_tokens)
        t_first = seq.t_first or ended
        seq.result = Generation(
            text=text, tokens=seq.n_tokens, prompt_tokens=len(seq.tokens), finish_reason=finish,
            ttft_s=t_first - seq.started, decode_s=(seq.t_last or ended) - t_first, total_s=ended - seq.started,
            mean_logprob=seq.logprob_sum / seq.n_tokens if seq.n_tokens else 0.0, reused_tokens=seq.reused)
        if text[len(seq.emitted):]:
            seq.out.put(text[len(seq.emitted):])

    # -- KV cache of one slot -----------------------------------------------------------------
    def _truncate(self, slot: Slot, keep: int) -> int:
        """Drop what the slot holds past `keep`; returns what it keeps (0 when the cache cannot
        drop a suffix: a sliding-window cache that is not full size, a recurrent one)."""
        if keep >= slot.n_kv:
            return slot.n_kv
        if not self.runtime.seq_rm(slot.seq_id, keep, -1):
            self.runtime.seq_clear(slot.seq_id)
            keep = 0
        slot.cut(keep)
        return keep

    def _save(self, slot: Slot, n: int) -> None:
        """Put the first `n` tokens of the slot's exact prefix into the conversation cache (the
        length comes from SlotPolicy.save_length); the rest of the slot is dropped."""
        if self._truncate(slot, n) < n:  # a cache that cannot drop a suffix (recurrent): nothing to save
            return
        tokens = slot.kv[:n]
        if self.cache.contains(tokens):
            return
        state = self.runtime.state_get(slot.seq_id)
        if state:
            self.cache.put(tokens, state)

    def _restore(self, slot: Slot, entry: CachedState) -> bool:
        rt = self.runtime
        rt.seq_clear(slot.seq_id)
        slot.clear()
        if not rt.state_set(slot.seq_id, entry.state):
            log.warning("could not restore a cached state; evaluating the prompt in full")
            rt.seq_clear(slot.seq_id)
            return False
        slot.restored(entry.tokens)
        return True


def _logprob(logits: np.ndarray, token: int) -> float:
    """log p(token) from a row of llama.cpp's logits, worked on in place: no copy into Python
    and no temporary arrays (262k floats each). It overwrites the row, so it must be the
    row's last reader (sampling is done; the next decode refills it)."""
    top = logits.max()
    chosen = float(logits[token])
    np.subtract(logits, top, out=logits)
    np.exp(logits, out=logits)
    return chosen - float(top) - math.log(float(logits.sum()))
