"""The slot and cache policy (engine/slot_policy.py) on plain token lists, no model.

These are the rules that keep temperature-0 replies bit-identical with and without the
conversation cache (tests/test_cache_exactness.py checks the outcome on the real model): what is
kept and resumed lies on row-group boundaries with enough rows left to read, prompt parts end on
them, windowed states are saved aligned and continued only from their end, a slot is continued only
by its own conversation, and a cached state is restored only when it saves enough.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.slot_policy import (CONTINUES_WITHIN, MIN_RESTORE_GAIN, MIN_ROWS, MIN_ROWS_FLASH_ATTN, ROW_GROUP,
                                SWA_ALIGN, Placement, Slot, SlotPolicy)

N_CTX = 4096
BUSY = object()  # a request being served


def policy(*, n_swa: int = 0, flash_attn: bool = False, cache: bool = True) -> SlotPolicy:
    return SlotPolicy(n_swa=n_swa, flash_attn=flash_attn, cache_enabled=cache)


def tokens(n: int, seed: int = 0) -> np.ndarray:
    """`n` tokens of one conversation; another seed is another conversation."""
    return np.random.default_rng(seed).integers(10, 30000, size=n, dtype=np.int32)


def slot(seq_id: int, held: np.ndarray = np.zeros(0, np.int32), *, n_exact: int | None = None,
         generated: int = 0, last_used: float = 0.0, busy: bool = False) -> Slot:
    """A slot holding `held` (its exact prefix: the first `n_exact`, all by default) and then
    `generated` tokens of a reply."""
    s = Slot(seq_id, np.zeros(N_CTX, dtype=np.int32), last_used=last_used, seq=BUSY if busy else None)
    s.kv[:len(held)] = held
    s.kv[len(held):len(held) + generated] = 7
    s.n_kv = len(held) + generated
    s.n_exact = len(held) if n_exact is None else n_exact
    return s


def test_the_constants_are_what_llama_cpps_kernels_need():
    """4-row groups, 8 rows at least (64: the flash-attention query tile), windows on 64."""
    assert (ROW_GROUP, MIN_ROWS, MIN_ROWS_FLASH_ATTN, SWA_ALIGN) == (4, 8, 64, 64)
    assert CONTINUES_WITHIN == ROW_GROUP and MIN_RESTORE_GAIN == 16
    assert policy().min_rows == MIN_ROWS and policy(flash_attn=True).min_rows == MIN_ROWS_FLASH_ATTN


# -- resuming -------------------------------------------------------------------------------------
@pytest.mark.parametrize("reuse, n_prompt, flash_attn, expected", [
    (100, 200, False, 100),  # on a boundary, plenty left
    (101, 200, False, 100),  # down to the row group
    (103, 200, False, 100),
    (196, 200, False, 192),  # 8 rows must be left to read
    (195, 200, False, 192),
    (200, 200, False, 192),  # the same prompt again: its last rows are read again
    (300, 200, False, 192),  # a slot holding more than the prompt
    (5, 10, False, 0),
    (3, 4, False, 0),  # a prompt shorter than MIN_ROWS: read whole
    (0, 200, False, 0),
    (196, 200, True, 136),  # flash attention: 64 rows left
    (100, 150, True, 84),
    (100, 60, True, 0),
])
def test_resume_point(reuse, n_prompt, flash_attn, expected):
    keep = policy(flash_attn=flash_attn).resume_point(reuse, n_prompt)
    assert keep == expected
    assert keep % ROW_GROUP == 0 and (keep == 0 or n_prompt - keep >= policy(flash_attn=flash_attn).min_rows)


# -- reading a prompt in parts --------------------------------------------------------------------
@pytest.mark.parametrize("start, room, n_prompt, flash_attn, expected", [
    (0, 512, 300, False, 300),  # fits: read whole
    (292, 512, 300, False, 300),  # the last part
    (0, 100, 300, False, 100),  # on a boundary already
    (0, 102, 300, False, 100),  # ends on a row-group boundary
    (100, 50, 300, False, 148),
    (0, 295, 300, False, 292),  # leaves MIN_ROWS for the last part
    (0, 299, 300, False, 292),
    (0, 2, 300, False, 2),  # N_BATCH below MIN_ROWS: no aligned end fits, read anyway
    (4, 3, 300, False, 7),
    (0, 295, 300, True, 236),  # flash attention: leaves 64
    (0, 512, 300, True, 300),
    (200, 50, 300, True, 236),
])
def test_chunk_end(start, room, n_prompt, flash_attn, expected):
    assert policy(flash_attn=flash_attn).chunk_end(start, room, n_prompt) == expected


@pytest.mark.parametrize("flash_attn", [False, True])
@pytest.mark.parametrize("n_prompt", [9, 64, 65, 300, 1031])
@pytest.mark.parametrize("room", [8, 13, 64, 100, 512])
def test_a_prompt_read_in_parts_keeps_every_part_aligned(flash_attn, n_prompt, room):
    """Every part but the last ends on the furthest row-group boundary that leaves at least
    min_rows to read; only when the room holds no such boundary does a part end elsewhere."""
    p = policy(flash_attn=flash_attn)
    start = 0
    while start < n_prompt:
        end = p.chunk_end(start, room, n_prompt)
        if start + room >= n_prompt:
            assert end == n_prompt  # the rest fits: read it all
        else:
            aligned = [e for e in range(start + 1, start + room + 1)
                       if e % ROW_GROUP == 0 and n_prompt - e >= p.min_rows]
            assert end == (max(aligned) if aligned else start + room)  # the furthest aligned end, if any
        start = end


@pytest.mark.parametrize("n_exact, start, k, flash_attn, expected", [
    (0, 0, 300, False, 300),  # a whole prompt read in one batch
    (0, 0, 301, False, 300),  # its last rows, not a full group, are not exact
    (0, 0, 8, False, 8),
    (0, 0, 7, False, 0),  # a part under MIN_ROWS takes another kernel path
    (100, 100, 10, False, 108),  # a part read right after the exact prefix extends it
    (96, 100, 50, False, 96),  # after a gap (generated tokens, a part not exact): no longer
    (0, 0, 63, True, 0),
    (0, 0, 64, True, 64),
    (0, 0, 66, True, 64),
    (64, 64, 63, True, 64),
])
def test_exact_after(n_exact, start, k, flash_attn, expected):
    assert policy(flash_attn=flash_attn).exact_after(n_exact, start, k) == expected


# -- picking a slot -------------------------------------------------------------------------------
CONVERSATION = tokens(200)
CASE_OPENING = CONVERSATION[:120]
TWIN = np.concatenate([CASE_OPENING, tokens(60, seed=2)])  # the same case, another student


def pick_cases():
    """(name, slots, prompt, cache on, seq_id expected)"""
    return [
        ("continues its conversation over an empty slot",
         [slot(0), slot(1, CONVERSATION[:148], generated=20, last_used=5.0)], CONVERSATION, True, 1),
        ("shares all but CONTINUES_WITHIN exact tokens",
         [slot(0), slot(1, CONVERSATION[:148])],
         np.concatenate([CONVERSATION[:148 - CONTINUES_WITHIN], tokens(50, seed=3)]), True, 1),
        ("one more differing token: not the same conversation",
         [slot(0), slot(1, CONVERSATION[:148])],
         np.concatenate([CONVERSATION[:148 - CONTINUES_WITHIN - 1], tokens(50, seed=3)]), True, 0),
        ("same-case twins keep their own slots",
         [slot(0, CONVERSATION[:180], last_used=1.0), slot(1, TWIN, last_used=2.0)],
         np.concatenate([TWIN, tokens(30, seed=4)]), True, 1),
        ("and the first student comes back to its own",
         [slot(0, CONVERSATION[:180], last_used=1.0), slot(1, TWIN, last_used=2.0)], CONVERSATION, True, 0),
        ("a newcomer on the same case takes the empty slot, not a twin's",
         [slot(0, CONVERSATION[:180]), slot(1, TWIN), slot(2)],
         np.concatenate([CASE_OPENING, tokens(40, seed=5)]), True, 2),
        ("an empty slot before the least recently used",
         [slot(0, tokens(100, seed=6), last_used=1.0), slot(1), slot(2, tokens(100, seed=7), last_used=3.0)],
         CONVERSATION, True, 1),
        ("no empty slot: the least recently used",
         [slot(0, tokens(100, seed=6), last_used=3.0), slot(1, tokens(100, seed=7), last_used=1.0)],
         CONVERSATION, True, 1),
        ("the longest exact prefix when two qualify",
         [slot(0, CONVERSATION[:40]), slot(1, CONVERSATION[:160]), slot(2)], CONVERSATION, True, 1),
        ("a busy slot is never picked",
         [slot(0, CONVERSATION[:148], busy=True), slot(1, tokens(100, seed=6), last_used=1.0)],
         CONVERSATION, True, 1),
        ("what was generated does not count: only the exact prefix",
         [slot(0), slot(1, CONVERSATION[:148], n_exact=0, generated=10)], CONVERSATION, True, 0),
        ("no cache: nothing is continued",
         [slot(0, CONVERSATION[:148], last_used=5.0), slot(1)], CONVERSATION, False, 1),
    ]


@pytest.mark.parametrize("name, slots, prompt, cache, expected", pick_cases(), ids=[c[0] for c in pick_cases()])
def test_pick_slot(name, slots, prompt, cache, expected):
    assert policy(cache=cache).pick_slot(slots, prompt).seq_id == expected


# -- saved states ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n_state, shared, n_prompt, n_swa, expected", [
    (100, 100, 200, 0, 100),  # no window: any shared prefix is usable
    (100, 61, 200, 0, 60),
    (100, 100, 200, 512, 100),  # shorter than the window: the same
    (100, 60, 200, 512, 60),
    (100, 100, 200, 32, 100),  # windowed: continued from its very end
    (100, 60, 200, 32, 0),  # ... and from nowhere else
    (100, 100, 104, 32, 0),  # its end would leave too few rows to read
    (40, 40, 41, 32, 0),
])
def test_restore_point(n_state, shared, n_prompt, n_swa, expected):
    assert policy(n_swa=n_swa).restore_point(n_state, shared, n_prompt) == expected


@pytest.mark.parametrize("n_exact, keep, first_held, n_swa, flash_attn, cache, expected", [
    (200, 0, 0, 0, False, True, 200),  # the whole exact prefix
    (200, 100, 0, 0, False, True, 200),
    (200, 200, 0, 0, False, True, 0),  # the slot keeps it anyway
    (200, 0, 0, 0, False, False, 0),  # no cache
    (0, 0, 0, 0, False, True, 0),
    (200, 0, 0, 0, True, True, 200),  # flash attention without a window: saved
    (200, 0, 0, 32, False, True, 160),  # windowed: 8 rows early, its window on a multiple of 64
    (300, 0, 0, 32, False, True, 288),
    (300, 0, 100, 32, False, True, 288),  # restored before, it still holds that window
    (300, 0, 200, 128, False, True, 0),  # ... not this one: it was restored past it
    (200, 0, 0, 32, True, True, 96),  # flash attention: 64 rows early, saved too (close, not bit for bit)
    (40, 0, 0, 32, False, True, 40),  # 40 - 8 is within the window: saved whole
    (41, 0, 0, 32, False, True, 32),
    (200, 160, 0, 32, False, True, 0),  # the slot keeps more than would be saved
])
def test_save_length(n_exact, keep, first_held, n_swa, flash_attn, cache, expected):
    s = slot(0, tokens(n_exact), generated=12)
    assert policy(n_swa=n_swa, flash_attn=flash_attn, cache=cache).save_length(s, keep, first_held) == expected


@pytest.mark.parametrize("n_swa", [32, 100, 512])
@pytest.mark.parametrize("n_exact", range(8, 1400, 37))
def test_windowed_states_are_saved_aligned_and_end_min_rows_early(n_swa, n_exact):
    p = policy(n_swa=n_swa)
    n = p.save_length(slot(0, tokens(n_exact)), 0)
    if p.windowed(n_exact - MIN_ROWS):
        assert (n - n_swa) % SWA_ALIGN == 0 and n_swa <= n <= n_exact - MIN_ROWS
        assert p.restore_point(n, n, n_exact) == n  # the same prompt again continues it from its end
    else:
        assert n == n_exact


@pytest.mark.parametrize("first_held, keep, n_swa, expected", [
    (0, 100, 32, True),
    (-1, 100, 32, True),  # an empty sequence
    (68, 100, 32, True),  # the window of position 100 starts at 68: held
    (69, 100, 32, False),
    (500, 0, 32, True),  # resuming at 0 drops everything
    (500, 100, 0, True),  # no window: every position is held
])
def test_can_resume(first_held, keep, n_swa, expected):
    assert policy(n_swa=n_swa).can_resume(first_held, keep) == expected


# -- the whole placement --------------------------------------------------------------------------
def place_cases():
    """(name, policy kwargs, slots, prompt, restore, first_held, expected placement as (seq_id, keep, save,
    restore))"""
    conv = CONVERSATION
    return [
        ("no cache: nothing reused nor saved", {"cache": False},
         [slot(0, conv[:150], generated=20)], conv, 0, {}, (0, 0, 0, False)),
        ("continues its slot, drops the reply it generated", {},
         [slot(0, conv[:148], generated=20)], conv, 0, {}, (0, 148, 0, False)),
        ("an exact prefix off the row groups: resumes before it and saves it", {},
         [slot(0, conv[:150], generated=20)], conv, 0, {}, (0, 148, 150, False)),
        ("another conversation: the slot's prefix is saved first", {},
         [slot(0, tokens(200, seed=9), generated=20)], conv, 0, {}, (0, 0, 200, False)),
        ("a cached state saving MIN_RESTORE_GAIN more is restored (the slot's own saved first)", {},
         [slot(0, conv[:40])], conv, 40 + MIN_RESTORE_GAIN, {}, (0, 56, 40, True)),
        ("one token less is not worth it", {},
         [slot(0, conv[:40])], conv, 40 + MIN_RESTORE_GAIN - 1, {}, (0, 40, 0, False)),
        ("into an empty slot", {}, [slot(0)], conv, MIN_RESTORE_GAIN, {}, (0, 16, 0, True)),
        ("under the gain, into an empty slot", {}, [slot(0)], conv, MIN_RESTORE_GAIN - 1, {}, (0, 0, 0, False)),
        ("restoring over another conversation saves it first", {},
         [slot(0, tokens(200, seed=9))], conv, 120, {}, (0, 120, 200, True)),
        ("a restored windowed slot is not cut back into its window", {"n_swa": 32},
         [slot(0, np.concatenate([conv[:60], tokens(100, seed=8)]))], conv, 0, {0: 128}, (0, 0, 0, False)),
        ("... but continued past it", {"n_swa": 32},
         [slot(0, conv[:160])], conv, 0, {0: 128}, (0, 160, 0, False)),
        ("the picked slot's first held position is the one that counts", {"n_swa": 32},
         [slot(0, tokens(100, seed=6), last_used=1.0), slot(1, conv[:100], last_used=0.5)], conv, 0,
         {0: 0, 1: 80}, (1, 0, 0, False)),
    ]


@pytest.mark.parametrize("name, kwargs, slots, prompt, restore, first_held, expected", place_cases(),
                         ids=[c[0] for c in place_cases()])
def test_place(name, kwargs, slots, prompt, restore, first_held, expected):
    placement = policy(**kwargs).place(slots, prompt, restore, first_held)
    seq_id, keep, save, restore = expected
    assert placement == Placement(slots[seq_id], keep, save, restore)
