"""Several real models in one engine, over real HTTP: the default model and a Q8_0 the project
makes from it, answering at once; and the crash that freed a model under running requests,
reproduced by a fixed workload (reloads of the current model and switches between two models
while clients send long prompts, however long that takes on this machine) with no crash, every
request answered, and memory back near where it started once the extra model is gone."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from engine.patient import render_case_prompt
from tests.helpers import DEFAULT_MODEL, link_or_copy, wait_until
from tests.server_process import start_server, stop_server

Q8_MODEL = "gemma-3-270m-q8_0.gguf"
# Reloads in the stress test (the fourth a switch to the other model, the fifth a switch back), and
# requests each client sends at least, going on until the reloads are done.
STRESS_ROUNDS = int(os.environ.get("AI_ENGINE_STRESS_ROUNDS", "6"))


@pytest.fixture(scope="module")
def two_model_dir(tmp_path_factory, default_model_file) -> Path:
    """The default model and a Q8_0 requantization of it (a second model the project makes)."""
    import llama_cpp

    root = tmp_path_factory.mktemp("two-models")
    link_or_copy(default_model_file, root / DEFAULT_MODEL)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True
    assert llama_cpp.llama_model_quantize(str(default_model_file).encode(), str(root / Q8_MODEL).encode(), params) == 0
    return root


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def long_prompt(case: dict, i: int) -> str:
    """A case prompt with a few exchanges: several hundred tokens, different per request."""
    turns = [list(t) for t in case["turnos"]]
    filler = [[["Estudiante", f"Pregunta {i}-{k}: ¿cómo se siente hoy?"], ["Paciente", "Regular, la verdad."]]
              for k in range(12)]
    return render_case_prompt(dict(case, turnos=turns[:-1] + sum(filler, []) + turns[-1:]))


def test_two_real_models_answer_concurrently(two_model_dir, tmp_path, cases):
    srv = start_server({"MODEL_PATH": str(two_model_dir), "MODEL": DEFAULT_MODEL, "N_CTX": "1024",
                        "N_PARALLEL": "4", "RESPONSE_CACHE_SIZE": "0"}, tmp_path / "server.log")
    try:
        def ask(i: int):
            model = DEFAULT_MODEL if i % 2 else Q8_MODEL
            r = requests.post(srv.url + "/generate", timeout=120, json={
                "prompt": render_case_prompt(cases[i % len(cases)]), "model": model, "temperature": 0, "max_length": 24})
            return model, r

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(ask, range(8)))
        for model, r in results:
            assert r.status_code == 200, r.text
            assert r.json()["metadata"]["modelo"] == model and r.json()["texto"]
        ps = requests.get(srv.url + "/api/ps", timeout=10).json()["models"]
        assert {m["model"] for m in ps} == {DEFAULT_MODEL.removesuffix(".gguf") + ":latest",
                                           Q8_MODEL.removesuffix(".gguf") + ":latest"}
        # Each model's own arithmetic: the two quantizations score the same reply differently.
        conf = {model: r.json()["confianza"] for model, r in results[:2]}
        assert conf[DEFAULT_MODEL] != conf[Q8_MODEL]
    finally:
        stop_server(srv)


def test_reloads_and_model_switches_under_load_never_crash(two_model_dir, tmp_path, cases):
    """The crash of the issue: /load-model of the current model again and again while three
    clients send long prompts (the old engine freed the model under their tokenizer and died at
    the second swap), plus switches between two models with room for one (MAX_LOADED_MODELS=1),
    so models are drained and unloaded under load all the time. A fixed workload, not a time: the
    same reloads and requests on any machine."""
    srv = start_server({"MODEL_PATH": str(two_model_dir), "MODEL": DEFAULT_MODEL, "N_CTX": "1024",
                        "N_PARALLEL": "2", "MAX_LOADED_MODELS": "1", "RESPONSE_CACHE_SIZE": "0",
                        "REQUEST_TIMEOUT_S": "30"}, tmp_path / "server.log")
    pid = srv.process.pid
    try:
        warm = requests.post(srv.url + "/generate", json={"prompt": long_prompt(cases[0], 0), "max_length": 8},
                             timeout=60)
        assert warm.status_code == 200
        baseline = rss_bytes(pid)
        reloads_done = threading.Event()
        statuses: Counter = Counter()
        answered: Counter = Counter()  # (who, status)
        problems: list[str] = []
        lock = threading.Lock()

        def record(r: requests.Response, what: str) -> None:
            with lock:
                statuses[r.status_code] += 1
                answered[what, r.status_code] += 1
                if r.status_code != 200:
                    body = r.json()  # always a JSON error, never a dropped connection
                    if "error" not in body or r.status_code not in (503, 504):
                        problems.append(f"{what}: {r.status_code} {body}")
                    if r.status_code == 503 and "Retry-After" not in r.headers:
                        problems.append(f"{what}: 503 without Retry-After")

        def client(n: int) -> None:
            i = 0
            while i < STRESS_ROUNDS or not reloads_done.is_set():
                i += 1
                model = (DEFAULT_MODEL, Q8_MODEL)[(n + i) % 2] if n == 2 else None
                body = {"prompt": long_prompt(cases[(n + i) % len(cases)], i), "max_length": 12}
                if model:
                    body["model"] = model
                record(requests.post(srv.url + "/generate", json=body, timeout=90), f"client {n} {model or 'default'}")

        def reloader() -> None:
            try:
                for i in range(1, STRESS_ROUNDS + 1):
                    name = DEFAULT_MODEL if i % 4 else Q8_MODEL  # mostly the current model, sometimes a switch
                    r = requests.post(srv.url + "/load-model", json={"model_name": name}, timeout=90)
                    record(r, f"reload {name}")
                    time.sleep(0.2)
            finally:
                reloads_done.set()

        threads = [threading.Thread(target=client, args=(n,)) for n in range(3)] + [threading.Thread(target=reloader)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert srv.process.poll() is None, "the engine died:\n" + srv.log()[-3000:]
        assert problems == []
        # The workload happened: every reload and request answered (a thread that lost its connection
        # would have stopped short), both models served under load, and every client was served.
        def count(prefix: str, status: int | None = None) -> int:
            return sum(k for (who, code), k in answered.items() if who.startswith(prefix) and status in (None, code))

        assert count("reload") == STRESS_ROUNDS, answered
        assert count(f"reload {DEFAULT_MODEL}", 200) >= 1, answered
        assert count(f"reload {Q8_MODEL}", 200) + count(f"client 2 {Q8_MODEL}", 200) >= 1, answered
        for n in range(3):
            assert count(f"client {n} ") >= STRESS_ROUNDS and count(f"client {n} ", 200) >= 1, answered
        # Back to one model: the default, idle; the other one unloaded.
        assert requests.post(srv.url + "/load-model", json={"model_name": DEFAULT_MODEL}, timeout=90).status_code == 200

        def one_model() -> list[dict] | None:
            models = requests.get(srv.url + "/api/ps", timeout=10).json()["models"]
            return models if len(models) == 1 else None

        ps = wait_until(one_model, what="one model to be left")
        assert [m["model"] for m in ps] == [DEFAULT_MODEL.removesuffix(".gguf") + ":latest"]
        wait_until(lambda: requests.get(srv.url + "/health", timeout=10).json()["closing"] == [],
                   what="the unloaded model to be closed")
        after = rss_bytes(pid)
        print(f"RSS baseline {baseline / 2**20:.0f} MiB, after {STRESS_ROUNDS} reloads {after / 2**20:.0f} MiB; "
              f"statuses {dict(statuses)}")
        assert after < baseline * 1.25 + (64 << 20), (baseline, after)
        assert requests.get(srv.url + "/health", timeout=10).json()["status"] == "ok"
    finally:
        stop_server(srv)
