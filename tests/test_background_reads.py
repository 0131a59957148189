"""Refused prompts are read while the engine is idle (engine/background_reads.py): the next request
on the same case finds it read, and a case two refused requests shared is saved to disk for the
next start. On the fake runtime with a clock the steps move (fast, exact about what is read), and on
the real model (the reply from a prefix read in the background is a cold read's, bit for bit)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from engine.admission import DeadlineUnreachable
from engine.background_reads import MAX_WANTED, MIN_PREFIX, BackgroundReads
from engine.disk_cache import DiskCache
from engine.generation import SamplingParams
from engine.prompt_cache import common_prefix
from engine.scheduler import Scheduler
from engine.slot_policy import Slot, SlotPolicy
from tests.helpers import StepClock, fake_scheduler, simulator_reply, submit

CASE = "Sos Martina, 34 años, consultás por ataques de pánico en el subte. " * 40


def ask(eng: Scheduler, prompt: str, timeout_s: float, max_tokens: int = 100):
    return submit(eng, prompt, SamplingParams(temperature=0, max_tokens=max_tokens), timeout_s=timeout_s)


def wait_idle(eng: Scheduler, limit_s: float = 60) -> None:
    """Until the engine has read every refused prompt (a bound on real time only against a hang)."""
    end = time.monotonic() + limit_s
    while eng.background_reads and time.monotonic() < end:
        time.sleep(0.01)
    assert eng.background_reads == 0


def measured_engine(monkeypatch, disk=None) -> Scheduler:
    """Two slots; a step costs 10 ms plus 1 ms a batch row (StepClock), replies of 10 tokens. Warmed
    up, so that it knows its speed: a 1,000-token case then takes about 1.3 s to read."""
    eng = fake_scheduler("a.gguf", n_parallel=2, n_batch=64, n_ctx=4096, reply="x" * 10, cache_bytes=64 << 20,
                         disk=disk)
    StepClock(0.01, row_s=0.001).install(monkeypatch, eng)
    for i in range(10):
        ask(eng, f"calentamiento {i} " * 40, 30).wait()
    return eng


def refuse_both(eng: Scheduler) -> None:
    """Two students open the case with a 1 s deadline, both before the scheduler's next step."""
    with eng._cond:
        for question in ("¿Qué te pasa?", "¿Desde cuándo?"):
            with pytest.raises(DeadlineUnreachable):
                ask(eng, CASE + "Estudiante: " + question + "\nPaciente:", 1.0)


def test_a_refused_case_is_read_while_idle_and_the_next_student_is_served(monkeypatch):
    """Two students open a case with a deadline of 1 s: reading it takes longer, so both are refused
    (503). While nothing else is asked, the engine reads the case; the next student's question on
    it, with the same 1 s, is accepted and reads only its own part."""
    eng = measured_engine(monkeypatch)
    try:
        n_case = len(eng.tokenize(CASE))
        assert n_case > 900
        refuse_both(eng)
        wait_idle(eng)
        assert n_case - 128 <= eng.background.tokens_read <= n_case + 8
        third = ask(eng, CASE + "Estudiante: ¿Con quién vivís?\nPaciente:", 1.0).wait()
        assert third.text == "x" * 10  # on time: a 504 would raise
        assert third.reused_tokens >= n_case - 128
        assert eng.background.tokens_read <= n_case + 8  # nothing read twice
    finally:
        eng.close()


def test_a_request_arriving_meanwhile_comes_first_and_the_read_goes_on(monkeypatch):
    """The background read yields to a request: one that arrives while a case is being read is
    served (it waits one chunk at most), and the case is read whole afterwards."""
    eng = measured_engine(monkeypatch)
    try:
        eng.runtime.step_delay_s = 0.002  # real time for the request to arrive in
        with pytest.raises(DeadlineUnreachable):
            ask(eng, CASE + "Estudiante: ¿Qué te pasa?\nPaciente:", 1.0)
        other = ask(eng, "Otra consulta, nada que ver. " * 4, 30).wait()
        assert other.text == "x" * 10 and other.reused_tokens == 0
        wait_idle(eng)
        case = eng.tokenize(CASE)
        assert max(common_prefix(s.kv[:s.n_exact], case) for s in eng.slots) >= len(case) - 128
    finally:
        eng.close()


def test_a_case_two_refused_requests_shared_is_saved_for_the_next_start(monkeypatch, tmp_path):
    """Read while idle, a case that two refused requests began with goes to the prompt cache on disk
    (a prefix several requests used); after a restart, a student's first turn restores it."""
    eng = measured_engine(monkeypatch, DiskCache(tmp_path, 1 << 30, "fake"))
    try:
        refuse_both(eng)
        wait_idle(eng)
    finally:
        eng.close()  # the file being written is finished first
    assert len(list(tmp_path.glob("fake/*.kv"))) == 1
    eng = fake_scheduler("a.gguf", n_parallel=2, n_batch=64, n_ctx=4096, reply="x" * 10, cache_bytes=64 << 20,
                         disk=DiskCache(tmp_path, 1 << 30, "fake"))
    try:
        first = ask(eng, CASE + "Estudiante: ¿Con quién vivís?\nPaciente:", 30).wait()
        assert first.reused_tokens >= len(eng.tokenize(CASE)) - 128 and eng.disk.stats["hits"] == 1
    finally:
        eng.close()


def test_one_refused_request_is_not_saved_to_disk(monkeypatch, tmp_path):
    """A prefix only one refused request began with is read (its next try finds it) but not saved:
    the disk keeps prefixes several requests used."""
    eng = measured_engine(monkeypatch, DiskCache(tmp_path, 1 << 30, "fake"))
    try:
        with pytest.raises(DeadlineUnreachable):
            ask(eng, CASE + "Estudiante: ¿Qué te pasa?\nPaciente:", 1.0)
        wait_idle(eng)
        assert eng.background.tokens_read > 900
    finally:
        eng.close()
    assert not list(tmp_path.glob("fake/*.kv"))


def test_a_case_saved_from_a_later_turn_serves_the_next_class_first_turn(tmp_path):
    """A student's later turn copies the case from a classmate: the two share the case and a little
    more, and the saved prefix ends min_rows before they part, so that after a restart a new
    student's first turn, whose own question is shorter than min_rows (64 rows with flash attention),
    still continues it from its end (saved where they part, it was of no use to a first turn, and
    the restarted class read the case again)."""
    def make():
        return fake_scheduler("a.gguf", n_parallel=2, n_batch=512, n_ctx=8192, reply="x" * 4, cache_bytes=64 << 20,
                              flash_attn="on", disk=DiskCache(tmp_path, 1 << 30, "fake"))

    eng = make()
    try:
        ask(eng, CASE + "Estudiante: ¿Qué te pasa?\nPaciente:", 60).wait()
        later = CASE + "Estudiante: ¿Cómo dormís?\nPaciente: Mal.\nEstudiante: " + "¿Y en el trabajo? " * 10
        assert ask(eng, later, 60).wait().reused_tokens > len(eng.tokenize(CASE)) - 64
    finally:
        eng.close()
    eng = make()
    try:
        first = ask(eng, CASE + "Estudiante: ¿Y?\nPaciente:", 60).wait()
        assert eng.disk.stats["hits"] == 1 and first.reused_tokens >= len(eng.tokenize(CASE)) - 128
    finally:
        eng.close()


# -- what is kept, as plain data -------------------------------------------------------------------
class _NoRuntime:
    n_batch = 512


def reads(cache: bool = True) -> BackgroundReads:
    policy = SlotPolicy(n_swa=0, flash_attn=False, cache_enabled=cache)
    slots = [Slot(0, np.zeros(4096, dtype=np.int32))]
    return BackgroundReads(_NoRuntime(), policy, slots, None, None, lambda: 256)


def tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(10, 30000, n).astype(np.int32)


def test_refused_prompts_are_kept_by_their_common_prefix():
    bg, case = reads(), tokens(2000)
    bg.want(np.concatenate([case, tokens(15, 1)]))
    bg.want(np.concatenate([case, tokens(20, 2)]))
    assert len(bg.wanted) == 1 and bg.wanted[0].requests == 2
    assert bg.wanted[0].target == 2000 - 8 - 2000 % 4 and len(bg.wanted[0].tokens) == 2000  # the case, less min_rows
    bg.want(np.concatenate([tokens(60, 5), tokens(1500, 3)]))  # another case
    assert len(bg.wanted) == 2


@pytest.mark.parametrize("n, kept", [(MIN_PREFIX - 1, 0), (MIN_PREFIX + 8, 1), (3000, 1)])
def test_short_prompts_are_not_worth_a_background_read(n, kept):
    bg = reads()
    bg.want(tokens(n))
    assert len(bg.wanted) == kept


def test_without_a_conversation_cache_nothing_is_kept():
    """CACHE_RAM_MB=0: nothing read is ever reused, so nothing is read in the background."""
    bg = reads(cache=False)
    bg.want(tokens(3000))
    assert not bg.wanted


def test_only_the_latest_refused_prefixes_are_kept():
    bg = reads()
    for i in range(MAX_WANTED + 2):
        bg.want(tokens(1000, seed=i))
    assert len(bg.wanted) == MAX_WANTED
    assert np.array_equal(bg.wanted[-1].tokens, tokens(1000, seed=MAX_WANTED + 1))


# -- the real model ---------------------------------------------------------------------------------
def test_on_the_real_model_a_case_read_while_idle_answers_as_a_cold_read(default_model_file, cases):
    """The real default model, a fixture case prompt: a first turn with a deadline too short to read
    it is refused; the engine reads the case while idle; the next student's turn reads only its
    own question, and its reply at temperature 0 is the one a cold read gives, bit for bit."""
    from engine.patient import render_case_prompt
    from tests.helpers import cache_scheduler, long_history

    history = long_history(cases[1], 20)[:-1]  # past the sliding window
    case = dict(cases[1], turnos=history + [["Estudiante", "¿Cómo estás hoy?"]])
    other = dict(cases[1], turnos=history + [["Estudiante", "¿Dormís bien?"]])
    eng = cache_scheduler(default_model_file, cache=True, n_parallel=2)
    fresh = cache_scheduler(default_model_file, cache=False, n_parallel=1)
    try:
        simulator_reply(eng, render_case_prompt(cases[0]))  # the engine measures its speed on a prompt
        prompt = render_case_prompt(case)
        with pytest.raises(DeadlineUnreachable):
            submit(eng, prompt, SamplingParams(temperature=0, max_tokens=24), timeout_s=1.0)
        wait_idle(eng, 300)
        assert eng.background.tokens_read > 400
        a, b = simulator_reply(eng, render_case_prompt(other)), simulator_reply(fresh, render_case_prompt(other))
        assert (a.text, a.mean_logprob) == (b.text, b.mean_logprob)
        assert a.reused_tokens > a.prompt_tokens - 24 - 64
    finally:
        eng.close()
        fresh.close()


def test_a_failing_background_read_leaves_the_engine_serving(monkeypatch):
    """A decode that fails while reading in the background drops the refused prompts (logged) and
    the engine goes on serving."""
    eng = measured_engine(monkeypatch)
    try:
        failed = threading.Event()

        def broken() -> None:
            failed.set()
            raise RuntimeError("llama_decode returned -3")

        with eng._cond:  # before the scheduler's next step
            with pytest.raises(DeadlineUnreachable):
                ask(eng, CASE + "Estudiante: ¿Qué te pasa?\nPaciente:", 1.0)
            monkeypatch.setattr(eng.runtime, "decode", broken)
        wait_idle(eng)
        assert failed.is_set() and not eng.failed
    finally:
        monkeypatch.undo()
    try:
        assert ask(eng, "Hola " * 8, 30).wait().text == "x" * 10
    finally:
        eng.close()
