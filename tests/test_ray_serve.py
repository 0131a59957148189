"""The engine as Ray Serve replicas on a local 2-node Ray cluster (one CPU each, loopback only):
the simulator contract through Ray's HTTP proxy, requests answered by both replicas, streaming,
the other API surfaces, backpressure (503 + Retry-After), and a replica killed under load.

Select or skip them with `-m ray` / `-m "not ray"`; they take about two minutes.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import requests

from engine.patient import render_case_prompt
from engine.ray_options import RayOptions, engine_capacity
from engine.settings import Settings
from tests import test_simulator_api as contract
from tests.helpers import DEFAULT_MODEL, sse_events
from tests.server_process import free_port

pytest.importorskip("ray.serve")
pytestmark = pytest.mark.ray

SHORT_PROMPT = "Estudiante: Hola, ¿cómo se siente hoy?\nPaciente:"
ENGINE_ENV = {
    "MODEL": "",  # the embedded default, placed once per node under a lock file
    "N_CTX": "512", "N_THREADS": "1", "N_THREADS_BATCH": "1", "N_BATCH": "64", "N_GPU_LAYERS": "0",
    "N_PARALLEL": "2", "MAX_QUEUE": "2", "LOG_LEVEL": "WARNING",
}


@dataclass
class RayEngine:
    """The deployed engine as the contract tests see a server: its URL (Ray's proxy)."""

    url: str
    settings: Settings
    options: RayOptions
    app_name: str = "ai-engine"


@pytest.fixture(scope="module")
def ray_engine(model_dir):
    """A 2-node Ray cluster on this machine with the engine deployed as 2 replicas (one per node).
    Every Ray process is stopped at the end."""
    import ray
    from ray import serve
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    from engine import ray_serve

    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    # Ray writes the cluster's address to /tmp/ray whatever temp_dir says; on a fresh machine the
    # folder does not exist yet.
    os.makedirs(os.path.join(tempfile.gettempdir(), "ray"), exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        # Ray turns 127.0.0.1 in an address into the machine's network address unless it runs
        # as a single-machine setup; this keeps every Ray process of the test on loopback.
        mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        # Ray's proxy prefers a replica on its own node until it is full: the engine turns that off.
        mp.setenv("RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING", "0")
        node = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "temp_dir": temp_dir}
        cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
        try:
            cluster.add_node(**node)
            ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)
            settings = Settings.load(env={**ENGINE_ENV, "MODEL_PATH": str(model_dir), "API_HOST": "127.0.0.1",
                                          "API_PORT": str(free_port())})
            # Room for the fault test's load on one replica; the backpressure test overflows it.
            options = RayOptions(replicas=2, replica_cpus=1, max_queued_requests=8, proxy_location="HeadOnly")
            url = ray_serve.deploy(settings, options)
            yield RayEngine(url, settings, options)
        finally:
            if ray.is_initialized():  # serve.shutdown() would otherwise start connecting anew
                serve.shutdown()
            ray.shutdown()
            cluster.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)


def generate(engine: RayEngine, body: dict, timeout: float = 60) -> requests.Response:
    return requests.post(engine.url + "/generate", json=body, timeout=timeout)


def replica_of(response: requests.Response) -> str:
    """The answering replica, by header and by metadata, which must agree."""
    header = response.headers["X-AI-Engine-Replica"]
    assert response.json()["metadata"]["replica"] == header
    return header


# -- the simulator contract, the single engine's own assertions over Ray's URL ----------------------

CONTRACT_CHECKS = [
    (contract.test_health_shape, {}),
    (contract.test_generate_contract_types, {}),
    (contract.test_integer_temperature_is_reported_as_float, {}),
    (contract.test_max_length_counts_new_tokens, {"max_length": 5}),
    (contract.test_unknown_route_and_method_are_json, {}),
    (contract.test_models_lists_gguf_files, {}),
    (contract.test_non_json_bodies_are_400, {"data": "not json", "content_type": "application/json"}),
    *[(contract.test_bad_bodies_are_400_naming_the_field, {"body": body, "field": name})
      for body, name in contract.BAD_BODIES if name in ("prompt", "temperature", "top_p")][:6],
]


@pytest.mark.parametrize("check,params", CONTRACT_CHECKS,
                         ids=[f"{c.__name__.removeprefix('test_')}-{i}" for i, (c, _) in enumerate(CONTRACT_CHECKS)])
def test_simulator_contract_through_ray(ray_engine, cases, model_dir, check, params):
    available = {"server": ray_engine, "fake_server": ray_engine, "cases": cases, "model_dir": model_dir, **params}
    check(**{name: available[name] for name in inspect.signature(check).parameters})


def test_replies_name_their_replica_and_both_replicas_answer(ray_engine, cases):
    bodies = [{"prompt": render_case_prompt(cases[i % len(cases)]), "max_length": 8} for i in range(8)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: generate(ray_engine, b), bodies))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    replicas = {replica_of(r) for r in responses}
    assert len(replicas) == 2, replicas
    assert all(name.startswith("engine#") for name in replicas)


def test_generate_streams_through_ray(ray_engine, cases):
    """Server-sent events arrive one by one through the WSGI bridge and Ray's proxy: spread over
    the time the replica spent generating them (its own measure, so any machine's speed), not in
    one piece at the end."""
    with requests.post(ray_engine.url + "/generate", stream=True, timeout=60, json={
            "prompt": render_case_prompt(cases[0]), "max_length": 40, "stop": [], "stream": True,
            "temperature": 0}) as r:
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        replica = r.headers["X-AI-Engine-Replica"]
        arrivals = [(time.perf_counter(), event) for event in sse_events(r.iter_lines())]
    tokens = [event for _, event in arrivals if "text" in event]
    final = arrivals[-1][1]
    # An event per token, but the last one's text comes only when something is left of it after
    # the reply is cleaned (its trailing whitespace is stripped).
    assert final["metadata"]["finish_reason"] == "length"
    assert final["metadata"]["tokens"] - 1 <= len(tokens) <= final["metadata"]["tokens"] == 40
    assert final["texto"] == "".join(e["text"] for e in tokens).strip()
    assert final["metadata"]["replica"] == replica
    generating_s = (final["metadata"]["duration_ms"] - final["metadata"]["ttft_ms"]) / 1000
    first_token, last_token = arrivals[0][0], arrivals[-2][0]
    assert last_token - first_token > generating_s / 4, "the events came in one piece, not as they were generated"


def test_ollama_ndjson_streams_and_other_surfaces_answer(ray_engine):
    with requests.post(ray_engine.url + "/api/generate", stream=True, timeout=60, json={
            "model": DEFAULT_MODEL, "prompt": SHORT_PROMPT, "options": {"num_predict": 12, "stop": []}}) as r:
        assert r.status_code == 200 and "X-AI-Engine-Replica" in r.headers
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert len(lines) >= 3 and lines[-1]["done"] is True and lines[-1]["eval_count"] >= 1
    for path in ("/api/tags", "/api/version", "/v1/models", "/openapi.json", "/metrics"):
        r = requests.get(ray_engine.url + path, timeout=30)
        assert r.status_code == 200, (path, r.text)
        assert r.headers["X-AI-Engine-Replica"].startswith("engine#")
    reply = requests.post(ray_engine.url + "/v1/chat/completions", timeout=60, json={
        "model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Hola"}], "max_tokens": 8}).json()
    assert reply["choices"][0]["message"]["role"] == "assistant"


def test_request_id_header_appears_once(ray_engine):
    r = requests.get(ray_engine.url + "/health", headers={"X-Request-ID": "trace-me-ray"}, timeout=30)
    assert r.headers["X-Request-ID"] == "trace-me-ray"


def test_full_cluster_answers_503_with_retry_after(ray_engine):
    """Past what the replicas admit plus Ray's proxy queue, requests are refused at once with
    503 and Retry-After, as a single engine refuses past its queue; the rest are served."""
    capacity = 2 * engine_capacity(ray_engine.settings) + ray_engine.options.max_queued_requests
    body = {"prompt": SHORT_PROMPT, "max_length": 16, "stop": [], "temperature": 0.7}
    barrier = threading.Barrier(capacity * 2)

    def send(_: int) -> requests.Response:
        barrier.wait()
        return generate(ray_engine, body, timeout=120)

    with ThreadPoolExecutor(capacity * 2) as pool:
        responses = list(pool.map(send, range(capacity * 2)))
    statuses = [r.status_code for r in responses]
    refused = [r for r in responses if r.status_code == 503]
    assert refused and set(statuses) <= {200, 503}, statuses
    assert all(int(r.headers["Retry-After"]) >= 1 for r in refused)
    assert statuses.count(200) >= 2 * engine_capacity(ray_engine.settings) // 2, statuses
    assert generate(ray_engine, {"prompt": SHORT_PROMPT, "max_length": 4}).status_code == 200


def stream_generate(engine: RayEngine, body: dict) -> tuple[int | str, str | None]:
    """A streamed /generate: its outcome (200 with the final event, an HTTP status, or what went
    wrong) and the replica, known from the headers once the first token is out."""
    replica = None
    try:
        with requests.post(engine.url + "/generate", json={**body, "stream": True}, stream=True, timeout=60) as r:
            replica = r.headers.get("X-AI-Engine-Replica")
            if r.status_code != 200:
                return r.status_code, replica
            events = list(sse_events(r.iter_lines()))
            return (200 if events and "texto" in events[-1] else "truncated"), replica
    except requests.RequestException as exc:
        return type(exc).__name__, replica


def test_killed_replica_only_fails_its_own_requests_and_is_replaced(ray_engine):
    """Kill one replica's actor while clients keep one replica's worth of requests going: only
    requests in flight on it may fail, later ones are all answered, and Ray starts a new replica
    so that two are running again. Requests stream, so each one knows its replica early."""
    import ray

    from engine.ray_serve import replica_states

    clients = engine_capacity(ray_engine.settings)  # all of them fit the surviving replica
    body = {"prompt": SHORT_PROMPT, "max_length": 24, "stop": [], "temperature": 0.7}
    records: list[tuple[float, float, int | str, str | None]] = []  # start, end, outcome, replica
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            outcome, replica = stream_generate(ray_engine, body)
            records.append((started, time.perf_counter(), outcome, replica))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        deadline = time.perf_counter() + 30
        while len({rec[3] for rec in records if rec[2] == 200}) < 2 and time.perf_counter() < deadline:
            time.sleep(0.2)
        victim = next(rec[3] for rec in records if rec[2] == 200)
        actor = ray.get_actor(f"SERVE_REPLICA::{ray_engine.app_name}#{victim}", namespace="serve")
        time.sleep(1.0)
        killed_at = time.perf_counter()
        ray.kill(actor, no_restart=True)
        time.sleep(8.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=90)

    failed = [rec for rec in records if rec[2] != 200]
    after = [rec for rec in records if rec[0] > killed_at]
    # Failures: only requests in flight at the kill, on the victim (or not yet started streaming
    # there: no replica header yet), and no more than one replica admits.
    assert all(start < killed_at < end and replica in (victim, None) for start, end, _, replica in failed), failed
    assert len(failed) <= engine_capacity(ray_engine.settings), failed
    assert len(after) >= 3 and all(rec[2] == 200 and rec[3] != victim for rec in after), after

    deadline = time.monotonic() + 90
    while replica_states(ray_engine.app_name) != {"RUNNING": 2} and time.monotonic() < deadline:
        time.sleep(1.0)
    assert replica_states(ray_engine.app_name) == {"RUNNING": 2}
    # The proxy hears of the new replica a moment after the controller: a few rounds at most.
    replicas: set[str] = set()
    for _ in range(5):
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda _: generate(ray_engine, {"prompt": SHORT_PROMPT, "max_length": 8}),
                                      range(8)))
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        replicas |= {replica_of(r) for r in responses}
        if len(replicas) == 2:
            break
    assert len(replicas) == 2 and victim not in replicas, replicas
