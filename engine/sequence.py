"""One request inside the scheduler (engine/scheduler.py): its prompt and sampling, where it is
(slot, prompt read so far, a leader it waits for), what it has generated, and the queue its text
pieces go out through. The scheduler thread writes it; the request's thread reads `stream()` or
`wait()`."""

from __future__ import annotations

import codecs
import queue
import threading
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from engine.errors import EngineError
from engine.generation import Generation, ReplyText, SamplingParams
from engine.slot_policy import Slot

_DONE = object()


class Cancelled(EngineError):
    """The client went away; nobody reads this."""

    status = 499


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
    reuse_from: "Sequence | None" = None  # the request still to read that prefix, if one is (admission)
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
