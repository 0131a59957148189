"""The conversation cache changes nothing, bit for bit, on the real model in process.

llama.cpp's kernels do not give the same bits for a position read in a batch of 20 as in a batch of
300, nor for a generated token, nor after a state is restored at other cells. The scheduler keeps
and resumes only what reading the prompt in full computes (see ROW_GROUP, MIN_ROWS, SWA_ALIGN in
engine/slot_policy.py); these tests hold it to that, including long interviews past Gemma 3's
512-token sliding window, states saved and restored with one slot for several interviews, and
flash attention (where a restored state past the window is close, not bit for bit).
"""

from __future__ import annotations

import pytest

from engine.generation import SamplingParams
from engine.patient import render_case_prompt, reply_text
from engine.scheduler import Scheduler
from tests.helpers import SIMULATOR_GREEDY, cache_scheduler, long_history, real_scheduler, simulator_reply, submit

QUESTIONS = ["¿Desde cuándo te pasa?", "¿Cómo afecta eso a tu trabajo?", "¿Hablaste con alguien de esto?",
             "¿Qué te gustaría que cambie?"]


def interview(cached: Scheduler, fresh: Scheduler, cases: list[dict], turns: int, exchanges: int) -> list[float]:
    """Interviews interleaved turn by turn, each reply fed back as the simulator does; asserts the
    same reply and the same `confianza` bits with and without the cache. → reused share per turn."""
    history = {c["id"]: long_history(c, exchanges) for c in cases}
    reused = []
    for turn in range(turns):
        for case in cases:
            prompt = render_case_prompt(dict(case, turnos=history[case["id"]]))
            a, b = simulator_reply(cached, prompt), simulator_reply(fresh, prompt)
            assert (a.text, a.mean_logprob) == (b.text, b.mean_logprob), (turn, case["id"])
            assert b.reused_tokens == 0
            if turn > 0:
                reused.append(a.reused_tokens / a.prompt_tokens)
            history[case["id"]] += [["Paciente", a.text], ["Estudiante", QUESTIONS[turn % len(QUESTIONS)]]]
    return reused


@pytest.fixture(scope="module")
def fresh(default_model_file):
    eng = cache_scheduler(default_model_file, cache=False, n_parallel=1)
    yield eng
    eng.close()


def test_long_interviews_each_in_its_slot(default_model_file, fresh, cases):
    """Four interviews past the sliding window, four slots: each keeps its own slot, also the two
    students on the same case whose transcripts differ only from their last question on; each reads
    a handful of tokens a turn and answers as without the cache."""
    twin = dict(cases[0], id="twin", turnos=cases[0]["turnos"][:-1] + [["Estudiante", "¿Y tu familia qué dice?"]])
    eng = cache_scheduler(default_model_file, cache=True, n_parallel=4)
    try:
        reused = interview(eng, fresh, cases + [twin], turns=3, exchanges=20)
        assert min(reused) > 0.95, reused
        assert eng.cache.hits == 0  # no state had to be restored
    finally:
        eng.close()


def test_long_interviews_through_saved_states(default_model_file, fresh, cases):
    """One slot for three interviews past the sliding window: every turn restores its interview's
    state from the conversation cache (only the window's last cells are kept). Then a new interview
    that shares only the opening lands in that slot: it must not continue from the restored state,
    which lacks the opening's cells in its sliding-window layers."""
    eng = cache_scheduler(default_model_file, cache=True, n_parallel=1)
    try:
        reused = interview(eng, fresh, cases, turns=3, exchanges=20)
        assert min(reused) > 0.85, reused
        assert eng.cache.hits >= 6
        newcomer = render_case_prompt(cases[0])  # the first case's first turn: shares the opening
        a, b = simulator_reply(eng, newcomer), simulator_reply(fresh, newcomer)
        assert (a.text, a.mean_logprob) == (b.text, b.mean_logprob)
    finally:
        eng.close()


def test_flash_attention_keeps_the_cache_exact(default_model_file, cases):
    """With flash attention every prompt part is read in batches of at least 64 rows (its kernel's
    query tile), so interviews in their own slots stay exact there too."""
    fresh = cache_scheduler(default_model_file, cache=False, n_parallel=1, flash_attn="on")
    try:
        cached = cache_scheduler(default_model_file, cache=True, n_parallel=4, flash_attn="on")
        try:
            assert min(interview(cached, fresh, cases, turns=3, exchanges=0)) > 0.6
        finally:
            cached.close()
    finally:
        fresh.close()


def test_flash_attention_restores_windowed_states_close(default_model_file, cases):
    """The one place the cache is not bit for bit (engine/slot_policy.py): with flash attention, a
    state past the sliding window, restored, holds only the window's cells, and the flash-attention
    decode kernel splits its work by the number of cells. One slot for three long interviews: every
    later turn restores its interview's state, and its reply at temperature 0 is the cold read's
    text, with a mean log-probability within 1e-2 of it (measured here: at most 2.4e-3)."""
    fresh = cache_scheduler(default_model_file, cache=False, n_parallel=1, flash_attn="on")
    cached = cache_scheduler(default_model_file, cache=True, n_parallel=1, flash_attn="on")
    try:
        history = {c["id"]: long_history(c, 20) for c in cases}
        differences = []
        for turn in range(3):
            for case in cases:
                prompt = render_case_prompt(dict(case, turnos=history[case["id"]]))
                a, b = simulator_reply(cached, prompt), simulator_reply(fresh, prompt)
                assert a.text == b.text, (turn, case["id"])
                differences.append(abs(a.mean_logprob - b.mean_logprob))
                if turn:
                    assert a.reused_tokens > a.prompt_tokens - 200, (a.reused_tokens, a.prompt_tokens)
                history[case["id"]] += [["Paciente", a.text], ["Estudiante", QUESTIONS[turn % len(QUESTIONS)]]]
        assert cached.cache.hits >= 6
        assert max(differences) < 1e-2, differences
    finally:
        cached.close()
        fresh.close()


@pytest.mark.parametrize("n_batch", [2, 4, 12])
def test_a_batch_smaller_than_the_minimum_rows_still_reads_the_prompt(default_model_file, n_batch):
    """N_BATCH below MIN_ROWS: prompt parts cannot keep the exactness rules, and must not wait for
    room that never comes (the request timed out with no token before)."""
    eng = real_scheduler(default_model_file, n_ctx=512, n_parallel=2, n_batch=n_batch, cache_bytes=64 << 20)
    try:
        prompt = "Estudiante: Hola, ¿cómo estás? Contame qué te trae por acá hoy.\nPaciente:"
        # The deadline only keeps a regression from hanging the suite: a prompt that never fits times out.
        seq = submit(eng, prompt, SamplingParams(temperature=0, max_tokens=8), reply_text(None), timeout_s=30)
        assert seq.wait().tokens > 0
    finally:
        eng.close()


def test_prompts_read_in_the_same_step_on_adjacent_slots_keep_the_cache_exact(default_model_file, cases):
    """Two students' prompts read in the same step, in slots with consecutive ids: the next turn of
    each, asked alone, continues its cached prefix and answers as a cold read. In one llama_decode,
    llama.cpp cut such a step into ubatches of equal length per sequence (66 rows read as 65 and 1),
    off the row groups, and 2 of these 6 next turns answered otherwise (mean log-probability off by
    up to 1.5e-2); each chunk is now decoded alone."""
    eng = cache_scheduler(default_model_file, cache=True, n_parallel=2, flash_attn="on")
    fresh = cache_scheduler(default_model_file, cache=False, n_parallel=1, flash_attn="on")
    try:
        for first, second, more_a, more_b in [(0, 1, 3, 1), (1, 2, 5, 0), (2, 0, 2, 6)]:
            prompts = [render_case_prompt(dict(cases[c], turnos=long_history(cases[c], n)))
                       for c, n in ((first, more_a), (second, more_b))]
            with eng._cond:  # both placed, and read, at the same step
                seqs = [submit(eng, p, SIMULATOR_GREEDY, reply_text(None)) for p in prompts]
            for prompt, seq in zip(prompts, seqs):
                following = prompt + " " + seq.wait().text + "\nEstudiante: ¿Y cómo dormís?\nPaciente:"
                a, b = simulator_reply(eng, following), simulator_reply(fresh, following)
                assert a.reused_tokens > 0
                assert (a.text, a.mean_logprob) == (b.text, b.mean_logprob), (first, second)
    finally:
        eng.close()
        fresh.close()
