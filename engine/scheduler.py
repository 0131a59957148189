"""Continuous batching: one runtime decoding up to N_PARALLEL sequences per step.

A scheduler thread drives the runtime (engine/runtime.py: the llama.cpp handles). Requests wait
in a bounded FIFO (`MAX_QUEUE`; full → 503 with Retry-After; 0: no waiting, only free slots take
requests) until a sequence slot is free; then
each step builds one batch holding the next token of every decoding sequence plus chunks of the
prompts being read (so a long prompt never stalls the others), decodes it in parts (the replies'
tokens, then each prompt chunk alone: engine/batch.py), and after each part samples every sequence
that has logits with its own sampler chain (plain greedy takes the argmax). Finished,
cancelled and timed-out sequences leave at once.

Each slot is a KV-cache sequence of its own, N_CTX tokens long (the context is split, not shared:
a request's limit does not depend on the others). Which slot a prompt goes to, and how much of it
is reused from that slot or from a state in the conversation cache, is decided by the slot policy
(engine/slot_policy.py) from plain data, so that reuse never changes a reply by a single bit;
this module carries the decisions out. Only the new tokens are evaluated.

The Scheduler owns the queue, the thread and each step's order; it composes collaborators for the
rest: `Admission` (engine/admission.py: room in the queue, deadlines, refusals), `SlotCells`
(engine/slot_cells.py: the slots' KV cells, the conversation cache's saves and restores, a
placement carried out), `PrefixSharing` (engine/prefix_sharing.py: copying a classmate's prefix,
following one still reading it), `DiskPrompts` (engine/disk_prompts.py: the prompt cache on disk),
`BatchBuilder` (engine/batch.py: each step's batch within the prefill budget), `Replier`
(engine/replying.py: sampling and the reply) and `Watchdog` (engine/watchdog.py).

Failures: a llama_decode that fails ends the requests whose tokens were in that part (500) and
the others go on. Should the thread itself die (an exception escaping its loop, or MAX_FAILED_STEPS
steps failing in a row), every request it held is answered 503 at once, later ones too, and
`failed` turns true for /health: nothing is left waiting on a thread that is gone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

from engine.admission import Admission, DeadlineEstimator, DeadlineUnreachable, RequestTimeout, Unavailable
from engine.background_reads import BackgroundReads
from engine.batch import PREFILL_STEP_S, BatchBuilder, DecodeFailed
from engine.disk_prompts import DiskPrompts
from engine.errors import ContextOverflow, EngineError
from engine.generation import ReplyText, SamplingParams
from engine.prefix_sharing import PrefixSharing
from engine.prompt_cache import ConversationCache
from engine.replying import MAX_BANNED_ENDS, Replier
from engine.runtime import Runtime
from engine.sequence import Cancelled, Sequence
from engine.slot_cells import SlotCells
from engine.slot_policy import Slot, SlotPolicy
from engine.watchdog import MAX_FAILED_STEPS, Watchdog

log = logging.getLogger(__name__)

__all__ = ["Cancelled", "MAX_BANNED_ENDS", "MAX_FAILED_STEPS", "PREFILL_STEP_S", "Scheduler", "Sequence"]


class ModelView:
    """The model, as the layers above see it: context size, metadata, tokens (the scheduler's
    runtime, read from any thread)."""

    runtime: Runtime

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


class Scheduler(ModelView):
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
        self.metrics = metrics
        self.estimator = DeadlineEstimator()
        self.cache = ConversationCache(cache_bytes)
        self.policy = SlotPolicy(n_swa=runtime.n_swa, flash_attn=runtime.flash_attn, cache_enabled=self.cache.enabled)
        self.slots = [Slot(i, np.zeros(runtime.n_ctx, dtype=np.int32)) for i in range(runtime.n_parallel)]
        self.disk = disk if disk is not None and disk.enabled else None
        self.prompts = DiskPrompts(self.disk, runtime, self.policy, metrics) if self.disk is not None else None
        self._pending: deque[Sequence] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._placed = 0
        self.cells = SlotCells(runtime, self.policy, self.slots, self.cache, metrics)
        self.sharing = PrefixSharing(runtime, self.policy, self.slots, self.prompts, self.cells.truncate, metrics)
        self.batcher = BatchBuilder(runtime, self.policy, self.estimator, prefill_chunk, self.sharing.waits_for_leader)
        self.admission = Admission(self.slots, self._pending, self.estimator, self.cache, self.disk, metrics, max_queue,
                                   self.batcher)
        self.replier = Replier(runtime, self.admission.observe_reply, metrics)
        self.background = BackgroundReads(runtime, self.policy, self.slots, self.cells, self.estimator,
                                          self.batcher.prefill_rows, self.prompts, metrics)
        name = Path(runtime.path).name
        self.watchdog = Watchdog(name, self._cond, self._pending, self.slots, self._report_queue)
        self._thread = threading.Thread(target=self._run, name=f"scheduler-{name}", daemon=True)
        self._thread.start()

    # -- the queue --------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        return self.admission.waiting

    @property
    def active(self) -> int:
        return sum(s.seq is not None for s in self.slots)

    @property
    def failed(self) -> bool:
        """Whether the scheduler thread has stopped after an internal error: every request is
        answered 503 at once from then on, and the model is unhealthy (see `failure`)."""
        return self.watchdog.failure is not None

    @property
    def failure(self) -> str | None:
        """Why the scheduler thread stopped (the exception, in a line); None while it runs."""
        return self.watchdog.failure

    @property
    def recent_s(self) -> float:
        """A moving estimate of one request's time, in seconds (for Retry-After)."""
        return self.admission.recent_s

    @property
    def background_reads(self) -> int:
        """Refused prompts' prefixes waiting to be read while the engine is idle."""
        return len(self.background.wanted)

    @property
    def shared_tokens(self) -> int:
        """Prompt tokens copied from another sequence instead of read."""
        return self.sharing.shared_tokens

    def submit(self, tokens: np.ndarray, params: SamplingParams, reply: ReplyText, started: float,
               deadline: float) -> Sequence:
        """Queue a request: 503 at once when it would have to wait and MAX_QUEUE requests already
        do (MAX_QUEUE=0: whenever every sequence slot is taken), or when the thread has stopped."""
        self.check_fits(tokens, params.max_tokens)
        seq = Sequence(tokens=tokens, params=params, reply=reply, started=started, deadline=deadline)
        with self._cond:
            self.watchdog.check()
            if self._stopping:
                raise Unavailable("the engine is switching models; retry in a moment")
            self.admission.check_room()  # it would wait, and the waiting room is full
            try:
                self.admission.admit_by_deadline(seq)  # with the scheduler's state as it is, under the lock
            except DeadlineUnreachable:
                self.background.want(tokens)  # read while idle: its next try, or a classmate's, finds it
                self._cond.notify_all()
                raise
            self._pending.append(seq)
            self._cond.notify_all()
        self._report_queue()
        return seq

    def close(self) -> None:
        """Finish what was accepted, stop the thread, then close the runtime (idempotent)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()
        if self.prompts is not None:  # the files being written are finished first
            self.prompts.close()
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
            self.watchdog.die(exc)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self.active and not self._stopping and not self.background.wanted:
                    self._cond.wait()
                if self._stopping and not self._pending and not self.active:
                    return
                idle = not self._pending and not self.active
            if idle:  # nothing to serve: a chunk of a refused prompt (BackgroundReads)
                try:
                    self.background.step()
                except Exception:
                    log.exception("reading refused prompts in the background failed; dropping them")
                    self.background.drop_all()
                continue
            try:
                self._admit()
                self._step()
            except DecodeFailed as exc:  # llama.cpp refused a batch: its requests fail, the others go on
                log.error("llama_decode failed (%s): ending the %d requests in its batch", exc.cause,
                          len(exc.sequences))
                self.watchdog.count_failure(exc.cause)
                for seq in exc.sequences:
                    if seq.slot is not None and seq.slot.seq is seq:
                        self._finish(seq, EngineError(f"generation failed: {exc.cause}"))
            except Exception as exc:  # a bug: fail the requests in the slots (their state is unknown), keep serving
                log.exception("scheduler step failed")
                self.watchdog.count_failure(exc)
                for slot in self.slots:
                    if slot.seq is not None:
                        self._finish(slot.seq, EngineError(f"generation failed: {exc}"))
            else:
                self.watchdog.step_ok()

    def _admit(self) -> None:
        now = time.perf_counter()
        with self._cond:  # placed under the lock, so `waiting` never undercounts for submit()
            free = sum(s.seq is None for s in self.slots)
            self.admission.refuse_the_late(now, self._finish, self.background.want)
            for seq in list(self._pending):
                if seq.cancelled or now > seq.deadline:
                    self._pending.remove(seq)
                    self.admission.fail_waiting(seq, now)
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

    def _place(self, seq: Sequence) -> None:
        """Place `seq` in a slot (SlotCells.place: the policy's placement, carried out), prepare its
        sampler, then take what it can of its prompt without reading it (PrefixSharing.take)."""
        slot, keep = self.cells.place(seq.tokens, self.sharing.copy_sources)
        self._placed += 1
        seq.slot, seq.n_prompt_done, seq.reused, seq.order = slot, keep, keep, self._placed
        seq.chain = self.runtime.new_sampler(seq.params)
        slot.seq, slot.last_used = seq, time.perf_counter()
        self.sharing.take(seq)
        log.debug("placed: slot %d, %d of %d prompt tokens held, following %s (target %d)", slot.seq_id,
                  seq.n_prompt_done, len(seq.tokens), seq.leader.slot.seq_id if seq.leader else None, seq.target)

    def _step(self) -> None:
        """One step for every active sequence: its batch decoded part by part, each part's
        sequences with logits sampled before the next part's decode overwrites them."""
        self.admission.expire(time.perf_counter(), self._finish)
        batch = self.batcher.build([s.seq for s in self.slots if s.seq is not None])
        if batch.n == 0:
            return
        started, aside = time.perf_counter(), 0.0
        for k, part in enumerate(batch.parts):  # the decodes, then each prompt chunk alone (engine/batch.py)
            try:
                self.runtime.decode(part.start, part.end)
            except Exception as exc:
                # Those whose tokens it held, and at the first part those whose cells a copy was to
                # write (pending copies: done or not, nobody knows) and the savers waiting on the
                # copies. Earlier parts went in; those in later parts or waiting are untouched.
                held = part.held()
                if k == 0:
                    for q in batch.saving + self.sharing.copies_failed():
                        if q not in held:  # a saver is also a copy's target: once
                            held.append(q)
                raise DecodeFailed(exc, [q for q in held if q is not None]) from exc
            if k == 0:
                self.sharing.copies_done()
                self.batcher.drop_placeholder(batch)
                if batch.saving:  # a copy of the prefix's state, now and once: not a step's cost
                    saved = time.perf_counter()
                    self.prompts.save(batch.saving)
                    aside += time.perf_counter() - saved
            self.batcher.record(part)
            for seq, index in part.wants:
                finish = self.replier.sample(seq, index)
                if finish:
                    self._finish(seq, finish=finish)
        self.estimator.observe_step(batch.prefill_rows, time.perf_counter() - started - aside, len(batch.decoding))

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
                self.cells.drop(slot, error)
            else:
                self.replier.complete(seq, finish)
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
