"""The scheduler on tests/fake_runtime.py: concurrent requests, the conversation cache, and the
fake itself behaving as llama.cpp does where the scheduler relies on it. No model; milliseconds."""

from __future__ import annotations

import threading

import pytest

from engine.admission import RequestTimeout
from engine.errors import EngineError
from engine.generation import ReplyText, SamplingParams, StopRules
from engine.runtime import RuntimeClosed
from engine.scheduler import Scheduler
from tests.fake_runtime import BOS, EOS, FakeRuntime, byte_tokens
from tests.helpers import StepClock, fake_scheduler, submit, wait_until

GREEDY = SamplingParams(temperature=0, repeat_penalty=1.0, max_tokens=100)
SAMPLED = SamplingParams(temperature=0.9, seed=7, max_tokens=100)


@pytest.fixture
def make():
    """make(**FakeRuntime kwargs, cache_bytes=...) → a Scheduler on a FakeRuntime, closed afterwards."""
    made = []

    def build(path="fake-a.gguf", *, cache_bytes=64 << 20, max_queue=16, **kwargs) -> Scheduler:
        eng = fake_scheduler(path, cache_bytes=cache_bytes, max_queue=max_queue, **kwargs)
        made.append(eng)
        return eng

    yield build
    for eng in made:
        eng.close()


def ask(eng: Scheduler, prompt: str, params: SamplingParams = GREEDY, timeout_s: float = 10):
    return submit(eng, prompt, params, timeout_s=timeout_s)


def test_a_step_decodes_the_replies_and_each_prompt_chunk_apart(make):
    """Replies generating while prompts of other lengths are read, in slots side by side: every
    llama_decode holds either one token of each generating sequence or one sequence's prompt chunk
    (llama.cpp would cut a mixed batch at the shortest sequence's length, off the row groups)."""
    eng = make(n_parallel=4, n_batch=64, reply="x" * 30)
    with eng._cond:  # placed together: two short prompts, then two long ones of other lengths
        seqs = [ask(eng, prompt) for prompt in ("Hola.", "¿Qué tal?", "Contame de tu casa. " * 9, "¿Y? " * 31)]
    for seq in seqs:
        seq.wait()
    calls = eng.runtime.decoded
    replies = [rows for rows in calls if len({seq_id for seq_id, *_ in rows}) > 1]
    chunks = [rows for rows in calls if len({seq_id for seq_id, *_ in rows}) == 1 and len(rows) > 1]
    assert all(len({seq_id for seq_id, *_ in rows}) == len(rows) for rows in replies)  # one token each
    assert replies and chunks and len(replies) + len(chunks) <= len(calls)
    assert max(len(rows) for rows in chunks) > 32  # long prompts read in chunks while others generate


def test_concurrent_requests_each_get_the_models_reply(make):
    """Six requests from six threads through two slots, greedy and sampled: every one gets the
    reply whole, and every sampler chain is freed."""
    eng = make(n_parallel=2, reply="Me siento bien, soy fake-a.")
    results = [None] * 6

    def run(i):
        results[i] = ask(eng, f"Estudiante {i}: ¿cómo estás?\nPaciente:", GREEDY if i % 2 else SAMPLED).wait()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert [r.text for r in results] == ["Me siento bien, soy fake-a."] * 6
    assert all(r.finish_reason == "eos" and r.tokens == len(byte_tokens(r.text)) for r in results)
    assert eng.runtime.live_samplers == 0
    assert eng.runtime.decode_calls < 6 * 40  # decoded together, not one request after the other


def test_the_default_reply_names_the_model_and_streams_in_pieces(make):
    """UTF-8 split over byte tokens comes out whole; the streamed pieces add up to the reply."""
    eng = make("modelos/fake-b.gguf", reply="Sí, soy fake-b: ¿qué tal?")
    seq = ask(eng, "Hola")
    assert "".join(seq.stream()) == "Sí, soy fake-b: ¿qué tal?" == seq.result.text
    assert FakeRuntime("modelos/fake-b.gguf").reply == "Me siento bien, soy fake-b."
    assert eng.metadata["general.name"] == "fake-b"


def test_max_tokens_and_stops_end_the_reply(make):
    eng = make(reply="uno, dos, tres")
    cut = ask(eng, "Contá", SamplingParams(temperature=0, max_tokens=4)).wait()
    assert (cut.text, cut.finish_reason) == ("uno,", "length")
    stopped = submit(eng, "Contá", GREEDY, ReplyText(StopRules(strings=[", tres"])), timeout_s=10).wait()
    assert (stopped.text, stopped.finish_reason) == ("uno, dos", "stop")


def test_the_next_turn_continues_the_slot(make):
    """The next turn of a conversation reads only its new tokens from its slot."""
    eng = make(n_parallel=2)
    first = "Estudiante: Hola, ¿cómo estás hoy? Contame qué te trae por acá.\nPaciente:"
    a = ask(eng, first).wait()
    b = ask(eng, f"{first} {a.text}\nEstudiante: ¿Y desde cuándo?\nPaciente:").wait()
    assert a.text == b.text == "Me siento bien, soy fake-a."
    assert a.reused_tokens == 0 and b.reused_tokens >= len(eng.tokenize(first)) - 8
    assert b.reused_tokens % 4 == 0


@pytest.mark.parametrize("n_swa", [0, 48])
def test_interleaved_conversations_through_one_slot_restore_saved_states(make, n_swa):
    """Two conversations share one slot: each turn restores the other's saved state from the
    conversation cache (windowed ones only from their end: the fake refuses a decode whose window
    reaches cells it does not hold) and answers as before. Then a newcomer sharing only the opening
    must not continue the restored state from inside its window."""
    eng = make(n_parallel=1, n_swa=n_swa)
    history = {c: f"Estudiante {c}: " + "Contame de vos, de tu semana y de tu familia. " * 3 for c in "AB"}
    reused = []
    for turn in range(3):
        for c in "AB":
            r = ask(eng, history[c] + "\nPaciente:").wait()
            assert r.text == "Me siento bien, soy fake-a."
            reused.append(r.reused_tokens)
            history[c] += f"\nPaciente: {r.text}\nEstudiante {c}: ¿Y hoy {turn}?"
    assert eng.cache.hits >= 4 and min(reused[2:]) > 100, reused
    newcomer = ask(eng, "Estudiante C: Hola, ¿qué te trae por acá?\nPaciente:").wait()
    assert newcomer.text == "Me siento bien, soy fake-a."


def test_without_the_cache_nothing_is_reused(make):
    eng = make(n_parallel=1, cache_bytes=0)
    prompt = "Estudiante: Hola, ¿cómo estás hoy? Contame qué te trae por acá.\nPaciente:"
    assert [ask(eng, prompt).wait().reused_tokens for _ in range(2)] == [0, 0]


def test_a_slow_decode_runs_into_the_deadline(make, monkeypatch):
    """20 ms a step (StepClock: steps, not the machine, move the time) against a 0.1 s deadline:
    the reply, 28 steps long, is cut by a RequestTimeout and its slot is free again."""
    eng = make(n_parallel=1)
    StepClock(0.02).install(monkeypatch, eng)
    with pytest.raises(RequestTimeout):
        ask(eng, "Hola", timeout_s=0.1).wait()
    assert eng.active == 0


def test_close_finishes_accepted_work_then_closes_the_runtime(make):
    eng = make(n_parallel=1, step_delay_s=0.001)
    seqs = [ask(eng, f"Pregunta {i}") for i in range(3)]
    eng.close()
    assert [s.wait().text for s in seqs] == ["Me siento bien, soy fake-a."] * 3
    assert eng.runtime.closed
    with pytest.raises(RuntimeClosed):
        eng.tokenize("Hola")


# -- the fake itself --------------------------------------------------------------------------------
def test_tokens_are_bytes_after_the_specials():
    rt = FakeRuntime()
    assert rt.tokenize("<bos>é<eos>").tolist() == [BOS, BOS, *byte_tokens("é"), EOS]
    assert b"".join(rt.piece(t) for t in rt.tokenize("¿qué?")) == "¿qué?".encode()
    assert rt.special_token_text() == ("<bos>", "<eos>", True) and rt.is_eog(EOS) and not rt.is_eog(BOS)
    assert rt.tokenize_calls == 2


def test_kv_memory_behaves_like_llama_cpps():
    """Positions in order or the decode fails; suffixes drop; states round-trip; garbage does not
    restore; a windowed state holds only its window."""
    rt = FakeRuntime(n_parallel=2, n_swa=8)
    prompt = rt.tokenize("Hola, ¿qué tal?").tolist()
    rt.batch_clear()
    for pos, tok in enumerate(prompt):
        rt.batch_add(0, tok, pos, pos == len(prompt) - 1)
    rt.decode()
    assert rt.seq_pos_min(0) == 0 and rt.seq_pos_min(1) == -1
    rt.batch_clear()
    rt.batch_add(0, 5, len(prompt) + 1, True)  # a gap
    with pytest.raises(EngineError, match="status -1"):
        rt.decode()
    state = rt.state_get(0)
    assert rt.state_set(1, state) and rt.seq_pos_min(1) == len(prompt) - 8  # only the window's cells
    assert not rt.state_set(1, b"garbage") and rt.seq_pos_min(1) == -1
    assert not rt.seq_rm(0, 2, 4)  # no holes
    assert rt.seq_rm(0, 4, -1) and rt.seq_pos_min(0) == 0
    rt.batch_clear()
    rt.batch_add(0, 5, 4, False)
    rt.decode()
    with pytest.raises(EngineError, match="no logits"):
        rt.logits(0)


def test_every_method_raises_after_close():
    rt = FakeRuntime()
    rt.close()
    rt.close()  # idempotent
    calls = [lambda: rt.tokenize("x"), lambda: rt.piece(5), rt.special_token_text, lambda: rt.is_eog(2),
             rt.batch_clear, lambda: rt.batch_add(0, 5, 0, True), rt.decode, lambda: rt.logits(0),
             lambda: rt.new_sampler(SAMPLED), lambda: rt.seq_rm(0, -1, -1), lambda: rt.seq_clear(0),
             lambda: rt.seq_pos_min(0), lambda: rt.state_get(0), lambda: rt.state_set(0, b""),
             lambda: rt.sample_banning(SAMPLED, 0, [EOS])]
    for call in calls:
        with pytest.raises(RuntimeClosed):
            call()


# -- prefix sharing between sequences --------------------------------------------------------------

CASE = "Sos un paciente simulado. " * 40 + "CASO CLÍNICO: Sofía, 29 años.\nENTREVISTA:\n"


def test_a_class_reads_the_case_prompt_once(make):
    """Six students on one case at once: one reads the case prompt, the others wait for it and
    copy its cells, then read only their own question."""
    eng = make(n_parallel=6, n_batch=64, n_ctx=2048, step_delay_s=0.0)
    seqs = [ask(eng, CASE + f"Estudiante: pregunta número {i}, ¿cómo dormís?\nPaciente:") for i in range(6)]
    results = [s.wait() for s in seqs]
    n_case = len(byte_tokens(CASE))
    assert eng.runtime.copies == 5
    assert sorted(r.reused_tokens >= n_case - 8 for r in results) == [False] + [True] * 5
    read = sum(r.prompt_tokens - r.reused_tokens for r in results)
    assert read < results[0].prompt_tokens + 5 * 64  # the case once, then five questions
    assert eng.shared_tokens == sum(r.reused_tokens for r in results)


def test_a_later_student_copies_from_a_busy_or_finished_classmate(make):
    eng = make(n_parallel=3, n_batch=64, n_ctx=2048)
    first = ask(eng, CASE + "Estudiante: ¿qué te trae por acá?\nPaciente:").wait()
    assert first.reused_tokens == 0
    later = ask(eng, CASE + "Estudiante: contame de tu trabajo\nPaciente:").wait()
    assert later.reused_tokens >= len(byte_tokens(CASE)) - 8 and eng.runtime.copies == 1
    # The first student's slot still holds their whole transcript: their next turn continues it.
    again = ask(eng, CASE + "Estudiante: ¿qué te trae por acá?\nPaciente: " + first.text + "\nEstudiante: ¿y?\nPaciente:").wait()
    assert again.reused_tokens > first.prompt_tokens - 8 and eng.runtime.copies == 1


def test_a_follower_whose_leader_is_cancelled_reads_on_its_own(make):
    eng = make(n_parallel=2, n_batch=16, n_ctx=2048, step_delay_s=0.002)
    leader = ask(eng, CASE + "Estudiante: uno\nPaciente:")
    follower = ask(eng, CASE + "Estudiante: dos\nPaciente:")
    wait_until(lambda: leader.n_prompt_done >= 64, interval_s=0.001, what="the leader to read part of the case")
    leader.cancel()
    result = follower.wait()  # it copies what the leader had read (kept in its slot) and reads on
    assert result.text == "Me siento bien, soy fake-a."
    assert result.reused_tokens >= 64 and result.reused_tokens % 4 == 0, result.reused_tokens


def test_no_sharing_without_the_cache(make):
    eng = make(n_parallel=3, n_batch=64, n_ctx=2048, cache_bytes=0)
    seqs = [ask(eng, CASE + f"Estudiante: {i}\nPaciente:") for i in range(3)]
    assert all(s.wait().reused_tokens == 0 for s in seqs) and eng.runtime.copies == 0


def test_two_cases_that_open_alike_each_read_once_and_nobody_waits_forever(make):
    """Two cases share their opening (the same role-play rules); their students arrive mixed. Each
    case's rest is read once; a student that copied the common opening then waits for the
    classmate reading its own case, and no two students wait for each other."""
    rules = "Reglas del juego de rol para el paciente simulado. " * 12
    cases = [rules + "CASO A: " + "Martina, ataques de pánico. " * 12, rules + "CASO B: " + "Julián, despido. " * 20]
    eng = make(n_parallel=8, n_batch=64, n_ctx=4096, step_delay_s=0.001)
    seqs = [ask(eng, cases[i % 2] + f"\nEstudiante: pregunta {i}\nPaciente:", timeout_s=5) for i in range(8)]
    results = [s.wait() for s in seqs]  # a deadlock would end in RequestTimeout here
    read = sum(r.prompt_tokens - r.reused_tokens for r in results)
    longest = max(r.prompt_tokens for r in results)
    assert read < 2 * longest, (read, longest)  # each case about once, plus the questions
    assert eng.runtime.copies >= 6


def test_a_case_read_beside_short_reads_is_never_cut_into_slivers(make):
    """Short reads go first (a later turn, a question after a copied case), so the case a leader
    reads gets what room they leave in the batch. A part shorter than `min_rows` would leave the
    rest of its prompt inexact, and the classmate waiting to copy it would read the case again:
    the leader waits for the next step instead, and the follower copies the whole case."""
    eng = make(n_parallel=4, n_batch=64, n_ctx=4096)
    with eng._cond:  # all placed together: two short reads fill the batch but for a sliver
        short = [ask(eng, "Hola"), ask(eng, "Estudiante: " + "¿y? " * 12 + "\nPaciente:")]
        leader = ask(eng, CASE + "Estudiante: uno\nPaciente:")
        follower = ask(eng, CASE + "Estudiante: dos\nPaciente:")
    assert all(s.wait().text for s in short)
    assert leader.wait().reused_tokens == 0
    assert follower.wait().reused_tokens >= len(byte_tokens(CASE)) - 8, follower.result.reused_tokens


def test_a_placement_that_fails_halfway_gives_its_slot_back(make, monkeypatch):
    """A failure after the slot was taken (a disk or llama.cpp error) ends that request with an
    error and leaves the slot free and empty: the next requests are served (it was lost before)."""
    eng = make(n_parallel=1, n_batch=64, n_ctx=2048)
    original = eng.sharing.take
    calls = []

    def failing(seq):
        calls.append(seq)
        if len(calls) == 1:
            raise OSError("disk on fire")
        return original(seq)

    monkeypatch.setattr(eng.sharing, "take", failing)
    with pytest.raises(EngineError, match="disk on fire"):
        ask(eng, CASE + "Estudiante: uno\nPaciente:").wait()
    assert eng.slots[0].seq is None and eng.slots[0].n_kv == 0
    assert ask(eng, CASE + "Estudiante: dos\nPaciente:").wait().text
