"""The forecast of when each request finishes (engine/forecast.py): the scheduler's steps played
forward on plain numbers, table-driven with a simple cost (20 ms a decoding sequence, 2 ms a
prompt token), and the reading order the batch builder shares with it."""

from __future__ import annotations

import math

import pytest

from engine.forecast import SHORT_READ, Job, finish_times, late, read_order


def cost(decoding: int, rows: int) -> float:
    return 0.02 * decoding + 0.002 * rows


def forecast(jobs, slots=4, n_batch=512, prefill_rows=256, horizon=math.inf):
    return finish_times(jobs, slots=slots, n_batch=n_batch, prefill_rows=prefill_rows, cost=cost, horizon=horizon)


CASES = {
    # One request: its prompt in one step (its last row gives the first token), then 19 tokens.
    "alone": ([Job(read=100, reply=20)], [100 * 0.002 + 19 * 0.02]),
    "generating only": ([Job(read=0, reply=5)], [5 * 0.02]),
    # A reply beside a long read: each of its tokens waits for a 256-token chunk (0.532 s), not 20 ms;
    # 1000 = 3 x 256 + 232, then both generate, then the reply alone.
    "a reply beside a long read": (
        [Job(read=0, reply=10), Job(read=1000, reply=2)],
        [3 * 0.532 + (0.02 + 0.464) + 0.04 + 5 * 0.02,
         3 * 0.532 + (0.02 + 0.464) + 0.04]),
    # A later turn's short read goes before a case still being read, though it came later.
    "short reads first": (
        [Job(read=2000, reply=1, arrival=0), Job(read=50, reply=1, arrival=1)],
        [0.002 * 2050, 0.002 * 512]),  # the short one and 462 of the case in the first step
    # A classmate follows the leader reading the case: it reads its own 20 tokens after it.
    "follower waits for its leader": (
        [Job(read=400, reply=1), Job(read=20, reply=1, leader=0)],
        [0.8, 0.8 + 0.04]),
    # One slot: the second waits for the first to finish.
    "queue": (
        [Job(read=0, reply=3), Job(read=10, reply=2, in_slot=False)],
        [0.06, 0.06 + 0.02 + 0.02]),
    # A follower whose leader waits in the queue reads alone rather than waiting forever.
    "leader not in a slot": (
        [Job(read=10, reply=1, leader=1), Job(read=10, reply=1, in_slot=False)],
        [0.02, 0.04]),
}


@pytest.mark.parametrize("name", CASES)
def test_finish_times(name):
    jobs, expected = CASES[name]
    slots = 1 if name in ("queue", "leader not in a slot") else 4
    assert forecast(jobs, slots=slots) == pytest.approx(expected)


def test_a_read_alone_takes_the_whole_batch_and_beside_replies_only_its_budget():
    alone = forecast([Job(read=1024, reply=1)])[0]
    beside = forecast([Job(read=0, reply=100), Job(read=1024, reply=1)], prefill_rows=128)[1]
    assert alone == pytest.approx(1024 * 0.002)  # two 512-token steps
    assert beside == pytest.approx(8 * (0.02 + 128 * 0.002))  # eight 128-token steps, one token of the other each


def test_beyond_the_horizon_is_inf():
    assert forecast([Job(read=0, reply=1000)], horizon=1.0) == [math.inf]


def test_late_scales_by_the_margin():
    jobs = [Job(read=0, reply=1, deadline=1.0), Job(read=0, reply=1, deadline=1.0)]
    assert late(jobs, [0.9, 0.95], margin=1.1) == [1]


@pytest.mark.parametrize("a,b,a_first", [
    ((SHORT_READ, 5.0), (SHORT_READ + 1, 1.0), True),  # a short read goes first though it came later
    ((3000, 1.0), (2000, 2.0), True),  # long reads: first come, first served
    ((10, 2.0), (20, 1.0), False),  # short reads: first come, first served too
])
def test_read_order(a, b, a_first):
    """(prompt tokens left, arrival) of two reads: whether the first is read first."""
    assert (read_order(*a) < read_order(*b)) is a_first
