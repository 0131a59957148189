"""When each request in the scheduler would finish: its next steps played forward on plain numbers.

Admission (engine/admission.py) asks this before it accepts a request, and again while requests
wait: every sequence in a slot and every request in the queue becomes a `Job` (prompt tokens it
still has to read itself, tokens it is expected to generate, its deadline, a classmate whose read
it waits for), and `finish_times` steps through the batches the scheduler would build
(engine/batch.py, whose reading order `read_order` is also this module's): each step holds one
token of every job generating plus prompt chunks within the step's budget, and costs what the
engine measured (`cost(decoding, rows)`). A prompt read beside replies slows those replies down, and
replies slow the read: the estimate holds both, where a sum of prompt time and reply time would
take a reply beside a long read to be as fast as one alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

SHORT_READ = 128  # prompt tokens left: a read this short goes before longer ones (a turn after a shared case)
MAX_STEPS = 20_000  # a forecast stops here (what is left unfinished gets inf)


def read_order(left: int, arrival: float) -> tuple[bool, float]:
    """The order prompts are read in: short reads first (a student's own question after a case a
    classmate read, or a later turn: a few dozen tokens, so their replies start at once), then first
    come, first served, so that a long read is never passed by another long one."""
    return (left > SHORT_READ, arrival)


@dataclass
class Job:
    """One request, as the forecast sees it."""

    read: int  # prompt tokens it still has to read itself
    reply: int  # tokens it still has to generate (at least 1)
    deadline: float = math.inf  # seconds from now
    in_slot: bool = True  # False: waiting in the queue for a slot
    leader: int | None = None  # index of the job whose read it waits for (a classmate's shared case)
    arrival: float = 0.0  # first come, first served among equals


def finish_times(jobs: list[Job], *, slots: int, n_batch: int, prefill_rows: int,
                 cost: Callable[[int, int], float], horizon: float = math.inf) -> list[float]:
    """Seconds from now until each job's reply is complete (inf beyond `horizon` or MAX_STEPS).
    `jobs` in queue order; `prefill_rows`: prompt tokens a step may read while others generate;
    `cost(decoding, rows)`: seconds of a step generating for `decoding` jobs and reading `rows`."""
    read = [j.read for j in jobs]
    reply = [max(1, j.reply) for j in jobs]
    done = [math.inf] * len(jobs)
    placed = [j.in_slot for j in jobs]
    leaders = [j.leader for j in jobs]
    queue = [i for i, j in enumerate(jobs) if not j.in_slot]
    free = max(0, slots - sum(placed))
    t, steps = 0.0, 0
    while steps < MAX_STEPS and t <= horizon:
        while free > 0 and queue:
            placed[queue.pop(0)] = True
            free -= 1
        live = [i for i in range(len(jobs)) if placed[i] and done[i] == math.inf]
        if not live:
            break
        decoding = [i for i in live if read[i] == 0]
        readers = sorted((i for i in live if read[i] > 0 and _may_read(leaders[i], read, done)),
                         key=lambda i: read_order(read[i], jobs[i].arrival))
        budget = min(n_batch, len(decoding) + prefill_rows) if decoding else n_batch
        rows, finished_reading = 0, []
        for i in readers:
            room = budget - len(decoding) - rows
            if room <= 0:
                break
            take = min(read[i], room)
            read[i] -= take
            rows += take
            if read[i] == 0:
                finished_reading.append(i)  # its last prompt token gives its first reply token
        if not decoding and rows == 0:  # only followers of a leader that is not in a slot: read alone
            for i in live:
                leaders[i] = None
            continue
        t += cost(len(decoding), rows)
        steps += 1
        for i in decoding + finished_reading:
            reply[i] -= 1
            if reply[i] == 0:
                done[i] = t
                free += 1
    return done


def _may_read(leader: int | None, read: list[int], done: list[float]) -> bool:
    """Whether a job may read: it follows no one, or its leader has read its prompt (or ended)."""
    return leader is None or read[leader] == 0 or done[leader] < math.inf


def late(jobs: list[Job], finish: list[float], margin: float) -> list[int]:
    """The jobs that would finish after their deadline (finish times scaled by `margin`)."""
    return [i for i, j in enumerate(jobs) if finish[i] * margin > j.deadline]
