"""Deadline-aware admission: the estimate from plain numbers, and on the scheduler (fake runtime)
a request that cannot finish in time refused at once with 503 + Retry-After while the others
stay on time; the client's own shorter deadline over HTTP. MAX_QUEUE=0: no waiting room, on the
fake runtime and on the real model."""

from __future__ import annotations

import time

import pytest

from engine.admission import DeadlineEstimator, DeadlineUnreachable, QueueFull, Workload
from engine.generation import ReplyText, SamplingParams, StopRules
from engine.scheduler import Scheduler
from tests.fake_runtime import FakeRuntime


def measured(step_s: float = 0.02, row_s: float = 0.002, reply: float = 20) -> DeadlineEstimator:
    est = DeadlineEstimator(reply_tokens=reply)
    est.observe_step(0, step_s)
    est.observe_step(100, step_s + 100 * row_s)
    return est


def test_no_estimate_before_the_engine_has_measured_itself():
    est = DeadlineEstimator()
    assert est.seconds(Workload(own_read=3000, own_reply=100, ahead_read=10**6)) is None
    est.observe_step(0, 0.02)
    assert est.seconds(Workload(own_read=3000, own_reply=100, ahead_read=0)) is None  # no prompt step yet


def test_a_class_starting_with_prompts_only_is_estimated_from_its_first_prompt_step():
    est = DeadlineEstimator()
    est.observe_step(500, 1.0)  # no decode step measured yet: all of it counts as reading
    assert est.row_s == pytest.approx(0.002) and est.step == pytest.approx(8 * 0.002)
    assert est.seconds(Workload(own_read=100, own_reply=10, ahead_read=0)) == pytest.approx(0.2 + 10 * 0.016)
    est.observe_step(0, 0.03)
    assert est.step == 0.03


@pytest.mark.parametrize("work,seconds", [
    (Workload(own_read=0, own_reply=20, ahead_read=0), 20 * 0.02),
    (Workload(own_read=100, own_reply=20, ahead_read=0), 100 * 0.002 + 20 * 0.02),
    (Workload(own_read=100, own_reply=20, ahead_read=400), 500 * 0.002 + 20 * 0.02),
    # no free slot: wait for the sequence closest to its end, then read and reply
    (Workload(own_read=100, own_reply=20, ahead_read=0, slot_frees=(15, 5), queue_position=1),
     5 * 0.02 + 100 * 0.002 + 20 * 0.02),
    (Workload(own_read=100, own_reply=20, ahead_read=0, slot_frees=(15, 5), queue_position=2),
     15 * 0.02 + 100 * 0.002 + 20 * 0.02),
    # third in line for two slots: one more reply's worth of waiting
    (Workload(own_read=0, own_reply=20, ahead_read=0, slot_frees=(15, 5), queue_position=3),
     (5 + 20) * 0.02 + 20 * 0.02),
])
def test_estimate(work, seconds):
    assert measured().seconds(work) == pytest.approx(seconds)


def test_moving_averages_follow_the_machine():
    est = measured(step_s=0.02, row_s=0.002)
    for _ in range(30):
        est.observe_step(0, 0.04)  # the machine got slower
        est.observe_step(200, 0.04 + 200 * 0.004)
    assert est.step_s == pytest.approx(0.04, rel=0.01) and est.row_s == pytest.approx(0.004, rel=0.02)
    for _ in range(30):
        est.observe_reply(60)
    assert est.expected_reply(150) == 60 and est.expected_reply(10) == 10


def ask(eng: Scheduler, prompt: str, max_tokens: int, timeout_s: float):
    started = time.perf_counter()
    return eng.submit(eng.tokenize(prompt), SamplingParams(temperature=0, max_tokens=max_tokens),
                      ReplyText(StopRules()), started, started + timeout_s)


def test_a_request_that_cannot_make_its_deadline_is_refused_at_once_and_the_others_stay_on_time():
    """One slot, 10 ms a step, replies of 60 tokens (0.6 s each). After the engine has measured
    itself, requests with a 2 s deadline queue up: the ones that fit are accepted and finish in
    time, the next one is refused at once with a Retry-After, nobody runs late."""
    reply = "x" * 60
    eng = Scheduler(FakeRuntime("a.gguf", n_parallel=1, n_batch=64, n_ctx=512, reply=reply, step_delay_s=0.01),
                    cache_bytes=0, max_queue=16)
    try:
        for i in range(2):  # warm-up: the engine measures its steps and its reply length
            ask(eng, f"calentamiento {i} " * 8, 100, 30).wait()
        accepted, refused = [], []
        for i in range(8):
            try:
                accepted.append(ask(eng, f"estudiante {i} " * 8, 100, 2.0))
            except DeadlineUnreachable as exc:
                refused.append(exc)
                started = time.perf_counter()
        assert 1 <= len(accepted) < 8 and refused
        assert all(exc.status == 503 and int(exc.headers["Retry-After"]) >= 1 for exc in refused)
        assert time.perf_counter() - started < 0.1  # refused at once, not after waiting
        for seq in accepted:
            result = seq.wait()
            assert result.text == reply and result.total_s <= 2.0
    finally:
        eng.close()


def test_the_client_deadline_over_http(tmp_path):
    """`timeout_s` (or X-Request-Timeout) is accepted on the simulator's route; values under a
    second, or not numbers, are a 400 that names the field or header (the refusal itself is
    tested on the scheduler above)."""
    from tests.test_model_manager import Fakes

    f = Fakes(tmp_path)
    try:
        from engine.model_files import ModelSpec

        f.manager.load(ModelSpec(f.dir / "a.gguf"))
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


def test_requests_accepted_before_the_speed_was_known_are_refused_once_it_is():
    """Right after a start the engine has not measured itself and accepts everything. Once the
    first prompt step is measured, what is still waiting or not yet reading and cannot make its
    deadline gets 503 at once, not 504 at the deadline; the one reading keeps its place."""
    eng = Scheduler(FakeRuntime("a.gguf", n_parallel=2, n_batch=64, n_ctx=4096, reply="x" * 40,
                                step_delay_s=0.05), cache_bytes=0, max_queue=16)
    try:
        started = time.perf_counter()
        seqs = [ask(eng, f"caso {i} " * 200, 60, 1.5) for i in range(4)]  # 1,200 tokens each, 64 a step
        ended = {}
        while len(ended) < len(seqs) and time.perf_counter() - started < 10:
            for i, seq in enumerate(seqs):
                if i not in ended and seq.done.is_set():
                    ended[i] = time.perf_counter() - started
            time.sleep(0.005)
        outcomes = []
        for i, seq in enumerate(seqs):
            try:
                outcomes.append(seq.wait().finish_reason)
            except DeadlineUnreachable as exc:
                outcomes.append(("503", ended[i], int(exc.headers["Retry-After"])))
            except Exception as exc:  # noqa: BLE001 - what else came back is the failure
                outcomes.append(type(exc).__name__)
        refused = [o for o in outcomes if isinstance(o, tuple)]
        assert len(refused) >= 2 and all(t < 1.5 and retry >= 1 for _s, t, retry in refused), outcomes
    finally:
        eng.close()


def refused_at_once(eng: Scheduler, prompt: str) -> QueueFull:
    started = time.perf_counter()
    with pytest.raises(QueueFull) as refused:
        ask(eng, prompt, 100, 30)
    assert time.perf_counter() - started < 0.1
    exc = refused.value
    assert exc.status == 503 and int(exc.headers["Retry-After"]) >= 1
    assert "MAX_QUEUE=0" in exc.message and "N_PARALLEL" in exc.message
    return exc


def test_max_queue_0_takes_requests_while_a_slot_is_free_and_lets_none_wait():
    """MAX_QUEUE=0 is no waiting room, not "refuse everything": both slots take a request, a third
    is a 503 with Retry-After at once while they generate, and once they are done a slot takes
    the next one."""
    eng = Scheduler(FakeRuntime("a.gguf", n_parallel=2, n_batch=64, n_ctx=512, reply="x" * 40, step_delay_s=0.005),
                    cache_bytes=0, max_queue=0)
    try:
        first = [ask(eng, f"estudiante {i}", 100, 30) for i in range(2)]
        refused_at_once(eng, "estudiante 2")
        assert [seq.wait().text for seq in first] == ["x" * 40] * 2
        assert ask(eng, "estudiante 3", 100, 30).wait().text == "x" * 40
    finally:
        eng.close()


def test_max_queue_0_on_the_real_model(default_model_file):
    """The same on the real model, two sequences: both generate, the third is refused at once."""
    import llama_cpp as L

    from engine.runtime import LlamaRuntime

    runtime = LlamaRuntime(default_model_file, n_ctx=256, n_parallel=2, n_batch=64, n_threads=2,
                           n_threads_batch=2, n_gpu_layers=0, flash_attn="off", kv_type=L.GGML_TYPE_F16)
    eng = Scheduler(runtime, cache_bytes=0, max_queue=0)
    params = SamplingParams(temperature=0, repeat_penalty=1.0, max_tokens=32)
    try:
        started = time.perf_counter()
        first = [eng.submit(eng.tokenize(f"Números: {n}, {n + 1}, {n + 2},"), params, ReplyText(StopRules()),
                            started, started + 60) for n in (101, 517)]
        refused_at_once(eng, "Números: 7, 8, 9,")
        results = [seq.wait() for seq in first]
        assert all(r.text and r.tokens == 32 for r in results), results
        assert ask(eng, "Números: 7, 8, 9,", 8, 60).wait().tokens == 8
    finally:
        eng.close()
