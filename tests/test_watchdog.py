"""Failures inside the scheduler: a failed llama_decode ends only the requests in its batch; a
scheduler thread that dies (or whose steps keep failing) answers every request 503 at once and
reports the model unhealthy; loading the model again replaces it. On tests/fake_runtime.py with
injected faults, and on the real model with a batch llama.cpp refuses."""

from __future__ import annotations

import pytest

from engine.admission import EngineFailed
from engine.errors import EngineError
from engine.generation import ReplyText, SamplingParams, StopRules
from engine.scheduler import MAX_FAILED_STEPS, Scheduler
from tests.helpers import Fakes, fake_scheduler, real_scheduler, submit, wait_until

GREEDY = SamplingParams(temperature=0, repeat_penalty=1.0, max_tokens=100)
PROMPTS = ["Estudiante A: " + "¿Cómo dormiste esta semana? " * 3, "Estudiante B: " + "¿Qué te trae por acá? " * 3,
           "Estudiante C: ¿Y tu familia?"]


class LoopBroke(BaseException):
    """Nothing in the scheduler's loop catches this: it stands for a bug that escapes it."""


@pytest.fixture
def make():
    made = []

    def build(*, max_queue=16, **kwargs) -> Scheduler:
        eng = fake_scheduler("fake-w.gguf", max_queue=max_queue, **kwargs)
        made.append(eng)
        return eng

    yield build
    for eng in made:
        eng.close()


def ask(eng: Scheduler, prompt: str, params: SamplingParams = GREEDY):
    return submit(eng, prompt, params, ReplyText(StopRules(), clean=lambda t: t))


def ended(seq, timeout_s: float = 30.0):
    """The request's error (None if it succeeded); fails the test instead of hanging on a dead thread
    (a request left behind would wait for its deadline, 600 s away: see tests/helpers.submit)."""
    assert seq.done.wait(timeout_s), "the request was left hanging"
    return seq.error


def test_a_failed_decode_ends_only_the_requests_in_its_batch(make):
    """A's prompt fills the whole first batch (N_BATCH=16), so B waits for room and C for a slot.
    That decode fails: A gets a 500, B and C get their replies, and the scheduler stays healthy."""
    eng = make(n_parallel=2, n_batch=16, reply="Bien.")
    eng.runtime.inject("decode", EngineError("llama_decode failed with status -3"))
    with eng._cond:  # all three queued before the thread's first step
        a, b, c = (ask(eng, p) for p in PROMPTS)
    assert isinstance(ended(a), EngineError) and ended(a).status == 500 and "status -3" in ended(a).message
    assert ended(b) is None and b.result.text == "Bien."
    assert ended(c) is None and c.result.text == "Bien."
    assert not eng.failed and eng.failure is None
    assert ask(eng, PROMPTS[0]).wait().text == "Bien."  # A's slot, cleared, serves again


@pytest.mark.parametrize("fault", ["escapes the loop", "cleanup fails too"])
def test_a_dead_scheduler_answers_everyone_503_at_once_and_is_unhealthy(make, fault):
    """Two requests generating and one waiting when the thread dies (an exception its loop does not
    catch; or a failed decode whose cleanup fails as well): all three end with 503 at once, so do
    new requests, and `failed` says why."""
    eng = make(n_parallel=2, step_delay_s=0.005, reply="x" * 200)
    running = [ask(eng, p) for p in PROMPTS[:2]]
    wait_until(lambda: eng.active == 2, interval_s=0.001, what="both requests to take a slot")
    waiting = ask(eng, PROMPTS[2])
    if fault == "escapes the loop":
        eng.runtime.inject("decode", LoopBroke("a bug"))
    else:
        eng.runtime.inject("seq_rm", RuntimeError("the context is gone"))
        eng.runtime.inject("decode", EngineError("llama_decode failed with status -3"))
    errors = [ended(seq) for seq in running + [waiting]]
    if fault == "cleanup fails too":  # the first request of the failed decode had its 500 before the cleanup broke
        first = [e for e in errors[:2] if not isinstance(e, EngineFailed)]
        assert len(first) == 1 and first[0].status == 500 and "status -3" in first[0].message
        errors = [e for e in errors if e is not first[0]]
    for error in errors:
        assert isinstance(error, EngineFailed) and error.status == 503 and error.headers["Retry-After"] == "10"
    with pytest.raises(EngineFailed):
        "".join(waiting.stream())
    with pytest.raises(EngineFailed) as refused:  # `submit` itself refuses: nothing waits for a dead thread
        ask(eng, PROMPTS[0])
    assert "fake-w.gguf" in refused.value.message
    assert eng.failed and ("LoopBroke: a bug" in eng.failure if fault == "escapes the loop" else
                           "the context is gone" in eng.failure)
    assert eng.active == eng.waiting == 0


def test_steps_failing_in_a_row_stop_the_scheduler(make):
    """A runtime that fails every decode: the first requests get their 500s, and after
    MAX_FAILED_STEPS failures in a row the scheduler gives up (503 from then on, unhealthy) rather
    than failing each request in turn while looking healthy. A success in between resets the count."""
    eng = make(n_parallel=1, reply="Bien.")
    eng.runtime.inject("decode", *[EngineError("llama_decode failed with status -1")] * (MAX_FAILED_STEPS - 1))
    for _ in range(MAX_FAILED_STEPS - 1):
        assert ended(ask(eng, PROMPTS[0])).status == 500
    assert ask(eng, PROMPTS[0]).wait().text == "Bien." and not eng.failed
    eng.runtime.inject("decode", *[EngineError("llama_decode failed with status -1")] * MAX_FAILED_STEPS)
    errors = [ended(ask(eng, PROMPTS[0])) for _ in range(MAX_FAILED_STEPS)]
    assert [e.status for e in errors] == [500] * (MAX_FAILED_STEPS - 1) + [503]
    assert eng.failed and f"{MAX_FAILED_STEPS} scheduler steps failed in a row" in eng.failure
    with pytest.raises(EngineFailed):
        ask(eng, PROMPTS[0])


def test_the_manager_reports_the_model_unhealthy_and_loading_it_again_heals_it(tmp_path):
    """Through the model manager and HTTP: requests for the failed model are a 503 at once,
    `healthy` is false with the reason, another model still serves; /load-model replaces it."""
    f = Fakes(tmp_path, response_cache_size=0).load("a.gguf")
    try:
        manager = f.manager
        client = f.app().test_client()
        body = {"prompt": "Estudiante: Hola\nPaciente:", "max_length": 20, "temperature": 0}
        assert client.post("/generate", json=body).status_code == 200
        assert manager.healthy and manager.failures() == {} and manager.default.healthy
        f.runtimes[0].inject("decode", LoopBroke("a bug"))
        r = client.post("/generate", json=body)
        assert r.status_code == 503 and r.headers["Retry-After"] and "a.gguf" in r.get_json()["error"]
        assert not manager.healthy and not manager.default.healthy
        assert "LoopBroke" in manager.failures()["a.gguf"]
        health = client.get("/health")  # an orchestrator restarts an engine that says so
        assert health.status_code == 503 and health.get_json()["status"] == "unhealthy"
        assert "LoopBroke" in health.get_json()["failures"]["a.gguf"] and health.get_json()["model_loaded"] is True
        r = client.post("/generate", json=body)
        assert r.status_code == 503, r.get_json()
        assert len(f.runtimes) == 1  # refused at the lease: nothing reloaded behind the operator's back
        other = client.post("/api/generate", json={"model": "b", "prompt": "Hola", "stream": False})
        assert other.status_code == 200, other.get_json()
        assert client.post("/load-model", json={"model_name": "a.gguf"}).status_code == 200
        assert manager.healthy and client.post("/generate", json=body).get_json()["texto"] == "Soy a."
        assert client.get("/health").status_code == 200 and client.get("/health").get_json()["status"] == "ok"
    finally:
        f.manager.close()


# -- the real model ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real(default_model_file):
    eng = real_scheduler(default_model_file, n_ctx=512, n_parallel=2, n_batch=64)
    yield eng
    eng.close()


def test_a_batch_llama_cpp_refuses_ends_only_its_requests_on_the_real_model(real, cases, monkeypatch):
    """llama_decode itself refuses a batch (a token id past the vocabulary): the request whose
    prompt was in it fails, the one still waiting for room in the batch answers exactly as it does
    alone, and the refused request's slot then serves its prompt exactly as before."""
    from engine.patient import render_case_prompt

    params = SamplingParams(temperature=0, repeat_penalty=1.0, max_tokens=12)
    prompt_a, prompt_b = (render_case_prompt(c) for c in cases[:2])
    alone = [ask(real, p, params).wait().text for p in (prompt_a, prompt_b)]
    assert all(alone)
    runtime, add = real.runtime, real.runtime.batch_add
    armed = [True]

    def corrupt_first(seq_id, token, pos, logits):
        if armed[0]:
            armed[0] = False
            token = runtime.n_vocab + 7
        return add(seq_id, token, pos, logits)

    monkeypatch.setattr(runtime, "batch_add", corrupt_first)
    with real._cond:  # both placed at once: A's prompt fills the first batch (N_BATCH=64), B waits for room
        a, b = ask(real, prompt_a, params), ask(real, prompt_b, params)
    assert isinstance(ended(a, 300), EngineError) and a.error.status == 500 and "llama_decode" in a.error.message
    assert ended(b, 300) is None and b.result.text == alone[1]
    assert not real.failed
    assert ask(real, prompt_a, params).wait().text == alone[0]
