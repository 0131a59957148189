"""Deadline-aware admission: the estimate from plain numbers, and on the scheduler (fake runtime)
a request that cannot finish in time refused at once with 503 + Retry-After while the others
stay on time; the client's own shorter deadline over HTTP. MAX_QUEUE=0: no waiting room, on the
fake runtime and on the real model."""

from __future__ import annotations

import pytest

from engine.admission import DeadlineEstimator, DeadlineUnreachable, QueueFull, RequestTimeout
from engine.generation import SamplingParams
from engine.scheduler import Scheduler
from tests.helpers import Fakes, StepClock, fake_scheduler, real_scheduler, submit


def measured(step_s: float = 0.02, row_s: float = 0.002, reply: float = 20) -> DeadlineEstimator:
    est = DeadlineEstimator(reply_tokens=reply)
    est.observe_step(0, step_s, decoding=1)
    est.observe_step(100, step_s + 100 * row_s, decoding=1)
    return est


def test_no_estimate_before_the_engine_has_measured_itself():
    est = DeadlineEstimator()
    assert not est.ready
    est.observe_step(0, 0.02, decoding=1)
    assert not est.ready  # no prompt step yet
    est.observe_step(100, 0.22, decoding=1)
    assert est.ready and est.row_s == pytest.approx(0.002)


def test_a_class_starting_with_prompts_only_is_estimated_from_its_first_prompt_step():
    est = DeadlineEstimator()
    est.observe_step(500, 1.0, decoding=0)  # no decode step measured yet: all of it counts as reading
    assert est.row_s == pytest.approx(0.002)
    assert est.decode_cost(1) == pytest.approx(8 * 0.002) and est.decode_cost(4) == pytest.approx(4 * 8 * 0.002)
    assert est.cost(2, 100) == pytest.approx(2 * 8 * 0.002 + 100 * 0.002)
    est.observe_step(0, 0.03, decoding=1)
    assert est.decode_cost(1) == 0.03


@pytest.mark.parametrize("seen,n,seconds", [
    ({1: 0.02}, 1, 0.02),
    ({1: 0.02}, 8, 0.02 * (1 + 7 / 2)),  # each sequence more: half the cost of the one seen
    ({1: 0.02, 4: 0.05}, 4, 0.05),
    ({1: 0.02, 4: 0.05}, 6, 0.05 * (1 + 2 / 8)),  # from the nearest smaller batch seen
    ({4: 0.05}, 2, 0.05),  # only bigger batches seen: no cheaper than the smallest
    ({1: 0.02}, 0, 0.0),
])
def test_decode_cost_by_batch_size(seen, n, seconds):
    est = measured()
    est.decode_s = dict(seen)
    assert est.decode_cost(n) == pytest.approx(seconds)


def test_a_short_prompt_step_counts_as_decoding_less_its_rows():
    est = measured(step_s=0.02, row_s=0.002)
    est.observe_step(20, 0.05 + 20 * 0.002, decoding=3)  # a later turn's 20 tokens beside 3 replies
    assert est.decode_cost(3) == pytest.approx(0.05)


def test_moving_averages_follow_the_machine():
    est = measured(step_s=0.02, row_s=0.002)
    for _ in range(30):
        est.observe_step(0, 0.04, decoding=1)  # the machine got slower
        est.observe_step(200, 0.04 + 200 * 0.004, decoding=1)
    assert est.decode_cost(1) == pytest.approx(0.04, rel=0.01) and est.row_s == pytest.approx(0.004, rel=0.02)
    for _ in range(30):
        est.observe_reply(60)
    assert est.expected_reply(150) == 60 and est.expected_reply(10) == 10


def ask(eng: Scheduler, prompt: str, max_tokens: int, timeout_s: float):
    return submit(eng, prompt, SamplingParams(temperature=0, max_tokens=max_tokens), timeout_s=timeout_s)


def test_a_request_that_cannot_make_its_deadline_is_refused_at_once_and_the_others_stay_on_time(monkeypatch):
    """One slot, 10 ms a step (StepClock: steps, not the machine, move the time), replies of 60
    tokens (0.6 s each). After the engine has measured itself, 8 requests with a 2 s deadline
    arrive together: the ones that fit are accepted and all finish (a request past its deadline
    would end with a 504, RequestTimeout), the rest are refused by `submit` itself with a
    Retry-After."""
    reply = "x" * 60
    eng = fake_scheduler("a.gguf", n_parallel=1, n_batch=64, n_ctx=512, reply=reply)
    StepClock(0.01).install(monkeypatch, eng)
    try:
        for i in range(20):  # warm-up: the engine measures its steps and its reply length
            ask(eng, f"calentamiento {i} " * 8, 100, 30).wait()
        accepted, refused = [], []
        with eng._cond:  # all 8 arrive before the scheduler's next step
            for i in range(8):
                try:
                    accepted.append(ask(eng, f"estudiante {i} " * 8, 100, 2.0))
                except DeadlineUnreachable as exc:
                    refused.append(exc)
        assert 2 <= len(accepted) <= 3 and len(refused) == 8 - len(accepted)  # 3 x 0.6 s fit in 2 s, 4 do not
        assert all(exc.status == 503 and int(exc.headers["Retry-After"]) >= 1 for exc in refused)
        assert [seq.wait().text for seq in accepted] == [reply] * len(accepted)
    finally:
        eng.close()


def test_a_request_that_would_make_an_accepted_one_late_is_refused(monkeypatch):
    """Two slots; a step costs 10 ms plus 1 ms a batch row (StepClock). A reply of 40 tokens alone
    takes about 0.44 s and has 1 s. A 1,100-token prompt arriving beside it would be read 63 tokens
    a step, each of the reply's tokens then waiting about 74 ms: the reply would miss its deadline
    (on the old estimate, which added up prompt time and reply time, the newcomer was accepted and
    the reply ended with a 504). The newcomer is refused with Retry-After, the reply is on time, and
    once it is done the same newcomer is accepted."""
    reply = "x" * 40
    eng = fake_scheduler("a.gguf", n_parallel=2, n_batch=64, n_ctx=4096, reply=reply)
    StepClock(0.01, row_s=0.001).install(monkeypatch, eng)
    try:
        for i in range(10):  # warm-up: the engine measures its steps, its rows and its replies
            ask(eng, f"calentamiento {i} " * 40, 100, 30).wait()
        with eng._cond:  # both arrive before the scheduler's next step
            interview = ask(eng, "Estudiante: ¿Cómo dormiste?\nPaciente:", 100, 1.0)
            with pytest.raises(DeadlineUnreachable) as refused:
                ask(eng, "caso nuevo " * 100, 100, 30)
        assert "would make 1 accepted request(s) miss their deadline" in refused.value.message
        assert int(refused.value.headers["Retry-After"]) >= 1
        assert interview.wait().text == reply  # on time: a RequestTimeout (504) would raise here
        assert ask(eng, "caso nuevo " * 100, 100, 30).wait().text == reply
    finally:
        eng.close()


def test_the_client_deadline_over_http(tmp_path):
    """`timeout_s` (or X-Request-Timeout) is accepted on the simulator's route; values under a
    second, or not numbers, are a 400 that names the field or header (the refusal itself is
    tested on the scheduler above)."""
    f = Fakes(tmp_path).load("a.gguf")
    try:
        client = f.app().test_client()
        body = {"prompt": "Estudiante: Hola, ¿cómo estás hoy?\nPaciente:", "max_length": 200, "stop": []}
        assert client.post("/generate", json=body).status_code == 200  # measured once
        assert client.post("/generate", json={**body, "timeout_s": 30}).status_code == 200
        assert client.post("/generate", json=body, headers={"X-Request-Timeout": "2.5"}).status_code == 200
        for bad in ({"timeout_s": 0}, {"timeout_s": "soon"}, {"timeout_s": 0.5}):
            r = client.post("/generate", json={**body, **bad})
            assert r.status_code == 400 and "timeout_s" in r.get_json()["error"]
        r = client.post("/generate", json=body, headers={"X-Request-Timeout": "never"})
        assert r.status_code == 400 and "X-Request-Timeout" in r.get_json()["error"]
    finally:
        f.manager.close()


def test_requests_accepted_before_the_speed_was_known_are_refused_once_it_is(monkeypatch):
    """Right after a start the engine has not measured itself and accepts everything. Once the
    first prompt step is measured, what is still waiting or not yet reading and cannot make its
    deadline gets 503 before it, not 504 at the deadline; the one reading first keeps its place
    and finishes in time."""
    eng = fake_scheduler("a.gguf", n_parallel=2, n_batch=64, n_ctx=4096, reply="x" * 4)
    StepClock(0.05).install(monkeypatch, eng)
    try:
        with eng._cond:  # all 4 accepted before the first step is measured
            seqs = [ask(eng, f"caso {i} " * 200, 6, 1.5) for i in range(4)]  # 1,200 tokens each, 64 a step
        outcomes = []
        for seq in seqs:
            try:
                outcomes.append(seq.wait().finish_reason)
            except DeadlineUnreachable as exc:  # 503 before the deadline, where a 504 would come at it
                outcomes.append(("503", int(exc.headers["Retry-After"])))
            except Exception as exc:  # noqa: BLE001 - what else came back (RequestTimeout: 504) is the failure
                outcomes.append(type(exc).__name__)
        refused = [o for o in outcomes if isinstance(o, tuple)]
        assert len(refused) >= 2 and all(retry >= 1 for _s, retry in refused), outcomes
        assert outcomes[0] == "eos", outcomes
        assert RequestTimeout.__name__ not in outcomes, outcomes
    finally:
        eng.close()


def refused_at_once(eng: Scheduler, prompt: str) -> QueueFull:
    """`submit` itself raises: the request is refused, never queued to wait."""
    waiting = eng.waiting
    with pytest.raises(QueueFull) as refused:
        ask(eng, prompt, 100, 30)
    assert eng.waiting == waiting
    exc = refused.value
    assert exc.status == 503 and int(exc.headers["Retry-After"]) >= 1
    assert "MAX_QUEUE=0" in exc.message and "N_PARALLEL" in exc.message
    return exc


def test_max_queue_0_takes_requests_while_a_slot_is_free_and_lets_none_wait():
    """MAX_QUEUE=0 is no waiting room, not "refuse everything": both slots take a request, a third
    is a 503 with Retry-After at once while they generate, and once they are done a slot takes
    the next one."""
    eng = fake_scheduler("a.gguf", n_parallel=2, n_batch=64, n_ctx=512, reply="x" * 40, max_queue=0)
    try:
        with eng._cond:  # the third arrives before either of the first two can finish
            first = [ask(eng, f"estudiante {i}", 100, 30) for i in range(2)]
            refused_at_once(eng, "estudiante 2")
        assert [seq.wait().text for seq in first] == ["x" * 40] * 2
        assert ask(eng, "estudiante 3", 100, 30).wait().text == "x" * 40
    finally:
        eng.close()


def test_max_queue_0_on_the_real_model(default_model_file):
    """The same on the real model, two sequences: both generate, the third is refused at once."""
    eng = real_scheduler(default_model_file, n_ctx=256, n_parallel=2, n_batch=64, max_queue=0)
    params = SamplingParams(temperature=0, repeat_penalty=1.0, max_tokens=32)
    try:
        with eng._cond:  # the third arrives before either of the first two can finish
            first = [submit(eng, f"Números: {n}, {n + 1}, {n + 2},", params) for n in (101, 517)]
            refused_at_once(eng, "Números: 7, 8, 9,")
        results = [seq.wait() for seq in first]
        assert all(r.text and r.tokens == 32 for r in results), results
        assert ask(eng, "Números: 7, 8, 9,", 8, 600).wait().tokens == 8
    finally:
        eng.close()
