"""Operations over real HTTP: queue limits, deadlines, disconnects, readiness, metrics, API key,
CORS, body limit, logs."""

from __future__ import annotations

import json
import re
import threading

import pytest
import requests

from engine.patient import render_case_prompt
from tests.helpers import DEFAULT_MODEL, server_fixture, sse_events, wait_until

KEY = "s3cret-key"
# Counting never reaches an end-of-sequence token: a generation that only its limits can stop.
LONG = {"prompt": "Números: 1, 2, 3, 4, 5,", "max_length": 1500, "stop": [], "temperature": 0, "repeat_penalty": 1.0}


@pytest.fixture(scope="module")
def secured(model_dir, tmp_path_factory):
    yield from server_fixture(model_dir, tmp_path_factory, ENGINE_API_KEY=KEY)


@pytest.fixture(scope="module")
def limited(model_dir, tmp_path_factory):
    yield from server_fixture(model_dir, tmp_path_factory, N_PARALLEL="1", MAX_QUEUE="1", REQUEST_TIMEOUT_S="120",
                              MAX_BODY_BYTES="8192", RESPONSE_CACHE_SIZE="0")


@pytest.fixture(scope="module")
def hurried(model_dir, tmp_path_factory):
    yield from server_fixture(model_dir, tmp_path_factory, REQUEST_TIMEOUT_S="3", RESPONSE_CACHE_SIZE="0")


@pytest.fixture(scope="module")
def history(model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("history") / "prompts.jsonl"
    for srv in server_fixture(model_dir, tmp_path_factory, ENGINE_LOG_PROMPTS=str(path)):
        yield srv, path


def metric(server, name: str, labels: str = "") -> float:
    text = requests.get(server.url + "/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def healthy(server) -> bool:
    return requests.get(server.url + "/health", timeout=10).status_code == 200


# -- access control ------------------------------------------------------------------------------

def test_api_key_required_except_health(secured):
    body = {"prompt": "Estudiante: Hola.\nPaciente:", "max_length": 3}
    r = requests.post(secured.url + "/generate", json=body, timeout=30)
    assert r.status_code == 401 and "API key" in r.json()["error"] and "Bearer" in r.headers["WWW-Authenticate"]
    assert requests.post(secured.url + "/generate", json=body, headers={"Authorization": "Bearer wrong"},
                         timeout=30).status_code == 401
    assert requests.post(secured.url + "/generate", json=body, headers={"Authorization": f"Bearer {KEY}"},
                         timeout=30).status_code == 200
    assert requests.post(secured.url + "/generate", json=body, headers={"X-API-Key": KEY}, timeout=30).status_code == 200
    assert requests.get(secured.url + "/health", timeout=10).status_code == 200
    for path in ("/models", "/metrics", "/api/tags", "/v1/models"):
        assert requests.get(secured.url + path, timeout=10).status_code == 401, path
    r = requests.get(secured.url + "/v1/models", timeout=10)
    assert r.json()["error"]["type"] == "invalid_request_error"  # the OpenAI surface's error shape


def test_cors(server):
    allowed = requests.options(server.url + "/generate", timeout=10, headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "Content-Type"})
    assert allowed.status_code == 204
    assert allowed.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    assert "Content-Type" in allowed.headers["Access-Control-Allow-Headers"]
    other = requests.options(server.url + "/generate", timeout=10, headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in other.headers
    r = requests.get(server.url + "/health", headers={"Origin": "http://localhost:5173"}, timeout=10)
    assert r.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"


def test_body_too_large_is_413(limited):
    r = requests.post(limited.url + "/generate", json={"prompt": "x" * 10000}, timeout=30)
    assert r.status_code == 413 and "error" in r.json()
    assert healthy(limited)


def health(server) -> dict:
    return requests.get(server.url + "/health", timeout=10).json()


# -- load limits -------------------------------------------------------------------------------

def test_full_queue_is_503_with_retry_after(limited):
    """MAX_QUEUE=1: one generating, one waiting, the third is refused at once: its 503 comes
    back while the waiting one is still unanswered."""
    results: dict[str, requests.Response] = {}

    def call(name, body):
        results[name] = requests.post(limited.url + "/generate", json=body, timeout=300)

    body = {**LONG, "max_length": 50}
    # The first generates long enough for the others to be sent while it runs, however slow they are.
    first = threading.Thread(target=call, args=("first", {**body, "max_length": 400}))
    first.start()
    wait_until(lambda: health(limited)["busy"], what="the first request to generate")
    second = threading.Thread(target=call, args=("second", body))
    second.start()
    wait_until(lambda: health(limited)["queue_depth"] >= 1, what="the second request to wait")
    rejected_before = metric(limited, "ai_engine_queue_rejections_total")
    r = requests.post(limited.url + "/generate", json=body, timeout=60)
    assert r.status_code == 503 and "second" not in results  # not queued behind it: refused first
    assert int(r.headers["Retry-After"]) >= 1 and "MAX_QUEUE" in r.json()["error"]
    r = requests.post(limited.url + "/v1/completions", json={"model": DEFAULT_MODEL, "prompt": "x"}, timeout=60)
    assert r.status_code == 503 and r.headers["Retry-After"] and r.json()["error"]["message"]
    first.join()
    second.join()
    assert results["first"].status_code == 200 and results["second"].status_code == 200
    assert metric(limited, "ai_engine_queue_rejections_total") == rejected_before + 2


def test_deadline_stops_generation_with_504(hurried):
    """REQUEST_TIMEOUT_S=3 against a count that fills the context: 504, cut short (the error says
    how many tokens it had), the slot free again and the engine serving."""
    body = {**LONG, "max_length": 2000}  # N_CTX=2048: only a machine over ~650 tokens/s could finish in 3 s
    r = requests.post(hurried.url + "/generate", json=body, timeout=60)
    assert r.status_code == 504 and "REQUEST_TIMEOUT_S" in r.json()["error"]
    generated = int(re.search(r"with (\d+) tokens generated", r.json()["error"]).group(1))
    assert 0 < generated < body["max_length"], r.json()
    wait_until(lambda: health(hurried)["active"] == 0, what="the timed-out request's slot to free")
    assert healthy(hurried)
    # One token: it has to fit in REQUEST_TIMEOUT_S=3 even on a busy machine.
    assert requests.post(hurried.url + "/generate", json={"prompt": "Estudiante: Hola.\nPaciente:", "max_length": 1},
                         timeout=30).status_code == 200


def test_streaming_disconnect_stops_generation(limited):
    """The client reads 5 tokens of a 1,500-token stream and closes the connection: the slot is
    freed after a few more tokens, not at max_length, and the next request is served."""
    before = metric(limited, "ai_engine_generated_tokens_total")
    with requests.post(limited.url + "/generate", json={**LONG, "stream": True}, stream=True, timeout=30) as r:
        events = sse_events(r.iter_lines())
        for _ in range(5):
            assert "text" in next(events)  # a token event, not the final one
    wait_until(lambda: health(limited)["active"] == 0, timeout_s=300, what="the abandoned stream's slot to free")
    generated = metric(limited, "ai_engine_generated_tokens_total") - before
    assert 5 <= generated < LONG["max_length"] / 2, generated
    short = {"prompt": render_case_prompt_like(), "max_length": 20, "temperature": 0}
    assert requests.post(limited.url + "/generate", json=short, timeout=60).status_code == 200


def test_a_non_streaming_request_whose_client_left_stops(limited):
    """The backend gave up (its 30 s timeout) and closed the connection: the generation stops
    within about a second instead of running to max_length, and the access log says 499."""
    import socket

    before = metric(limited, "ai_engine_generated_tokens_total")
    body = json.dumps(LONG).encode()
    host, port = limited.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"X-Request-ID: client-gone-1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_until(lambda: metric(limited, "ai_engine_generated_tokens_total") >= before + 10, timeout_s=120,
                   what="the generation to start")
    # A 1,500-token reply takes minutes here: a slot freed long before then was freed by the disconnect.
    wait_until(lambda: health(limited)["active"] == 0, timeout_s=300, what="the abandoned request's slot to free")
    generated = metric(limited, "ai_engine_generated_tokens_total") - before
    assert generated < LONG["max_length"] / 2, generated
    lines = [json.loads(line) for line in limited.log().splitlines() if "client-gone-1" in line]
    assert [line["status"] for line in lines if "status" in line] == [499], lines


def render_case_prompt_like() -> str:
    from tests.helpers import load_cases

    return render_case_prompt(load_cases()[1])


# -- readiness and metrics -----------------------------------------------------------------------

def test_health_stays_ok_while_another_model_loads_and_becomes_the_default(server):
    """/load-model of another model: the current default keeps serving (and /health says ok,
    with `loading` true while the load runs); then the new one is the default, the old one stays
    resident beside it."""
    seen: list[tuple[int, bool]] = []
    swap = threading.Thread(target=lambda: requests.post(
        server.url + "/load-model", json={"model_name": "persona/alt-model.gguf"}, timeout=60))
    swap.start()
    while True:  # at least once, even if the load is over before the first look
        r = requests.get(server.url + "/health", timeout=10)
        seen.append((r.status_code, r.json()["loading"]))
        assert r.json()["model_loaded"] is True and "model_path" in r.json()
        if not swap.is_alive():
            break
    swap.join()
    assert {status for status, _ in seen} == {200}
    health = requests.get(server.url + "/health", timeout=10).json()
    assert health["model"] == "persona/alt-model.gguf" and health["loading"] is False
    assert {m["model"] for m in health["models"]} >= {"persona/alt-model.gguf", DEFAULT_MODEL}
    back = requests.post(server.url + "/load-model", json={"model_name": DEFAULT_MODEL}, timeout=60)
    assert back.status_code == 200 and "already resident" in back.json()["message"]
    assert requests.get(server.url + "/health", timeout=10).json()["model"] == DEFAULT_MODEL


def test_metrics_move_as_requests_are_served(server):
    def snapshot() -> dict[str, float]:
        return {key: metric(server, name, labels) for key, (name, labels) in {
            "ok": ("ai_engine_requests_total", '{endpoint="/generate",status="200"}'),
            "bad": ("ai_engine_requests_total", '{endpoint="/generate",status="400"}'),
            "generated": ("ai_engine_generated_tokens_total", ""), "prompt": ("ai_engine_prompt_tokens_total", ""),
            "ttft": ("ai_engine_time_to_first_token_seconds_count", "")}.items()}

    before = snapshot()
    ok = requests.post(server.url + "/generate", json={"prompt": "Estudiante: ¿Cómo va todo?\nPaciente:",
                                                       "max_length": 8, "temperature": 0.9}, timeout=30).json()
    requests.post(server.url + "/generate", json={"prompt": ""}, timeout=30)
    # Request counters move when the server closes the response, just after the client has it.
    after = wait_until(lambda: (now := snapshot())["bad"] >= before["bad"] + 1 and now, what="the 400 to be counted")
    assert after["ok"] >= before["ok"] + 1 and after["bad"] >= before["bad"] + 1
    assert after["generated"] >= before["generated"] + ok["metadata"]["tokens"]
    assert after["prompt"] >= before["prompt"] + ok["metadata"]["prompt_tokens"]
    assert after["ttft"] >= before["ttft"] + 1
    text = requests.get(server.url + "/metrics", timeout=10).text
    assert f'ai_engine_model_info{{gpu_layers="0",name="{DEFAULT_MODEL}",quantization="Q4_K_M"}} 1.0' in text
    assert "process_resident_memory_bytes" in text and "ai_engine_queue_depth" in text


# -- logs ------------------------------------------------------------------------------------------

def test_default_logs_have_no_prompt_or_reply_text(server):
    """The request is in the access log (id, status, counts), its prompt and its reply are not.
    The reply is checked to be there to look for: an empty one is in every log."""
    marker = "MARCADOR-PRIVADO-7731"
    r = requests.post(server.url + "/generate", timeout=60, headers={"X-Request-ID": "trace-me-1"}, json={
        "prompt": f"Estudiante: {marker}, ¿cómo te sentís hoy?\nPaciente:", "max_length": 16, "temperature": 0})
    assert r.status_code == 200 and r.headers["X-Request-ID"] == "trace-me-1"
    reply = r.json()["texto"]
    assert len(reply) >= 12, reply
    access = wait_until(lambda: [json.loads(line) for line in server.log().splitlines() if '"trace-me-1"' in line],
                        what="the access log line")
    assert access[0]["status"] == 200 and access[0]["tokens"] == r.json()["metadata"]["tokens"]
    assert access[0]["duration_ms"] > 0 and access[0]["prompt_tokens"] > 0
    log = server.log()
    quoted = {reply, json.dumps(reply)[1:-1], json.dumps(reply, ensure_ascii=False)[1:-1]}  # as a JSON log has it
    assert marker not in log and not [form for form in quoted if form in log]


def test_prompt_history_is_opt_in(history):
    server, path = history
    marker = "MARCADOR-HISTORIA-4410"
    r = requests.post(server.url + "/generate", json={"prompt": f"Estudiante: {marker}\nPaciente:", "max_length": 5},
                      timeout=30)

    def entries() -> list[dict]:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []

    wait_until(lambda: any(marker in e["prompt"] for e in entries()), what="the history entry")
    assert any(marker in e["prompt"] and e["reply"] == r.json()["texto"] for e in entries())
    assert marker not in server.log()
