"""The model manager on a fast fake runtime: several models at once, leases, eviction, keep_alive,
aliases, loading once, and the HTTP surfaces around it (the Flask app through WSGI, and the
official `ollama` client on the same app). Real-model tests are in tests/test_models_real.py."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import ollama
import pytest

from engine.model_files import ModelSpec
from engine.model_manager import LoadForbidden, ModelsBusy
from tests.helpers import ALIAS_FILE, Fakes, MiB, tiny_gguf, wait_until


@pytest.fixture
def fakes(tmp_path):
    made: list[Fakes] = []

    def make(**kw) -> Fakes:
        f = Fakes(tmp_path / str(len(made)), **kw)
        made.append(f)
        return f

    yield make
    for f in made:
        f.manager.close()


def generate(client, prompt: str = "Estudiante: ¿Cómo está?\nPaciente:", **body):
    return client.post("/api/generate", json={"prompt": prompt, "stream": False, **body})


# -- several models --------------------------------------------------------------------------

def test_two_models_answer_concurrently_each_with_its_own_output(fakes):
    f = fakes(step_delay_s=0.002)
    f.manager.load(ModelSpec(f.dir / "a.gguf"))
    client = f.app().test_client()

    def ask(i: int):
        model = "a" if i % 2 else "b:latest"
        r = generate(client, model=model, raw=True, options={"temperature": 0})
        return model, r.status_code, r.get_json()["response"]

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(ask, range(12)))
    assert all(status == 200 for _m, status, _t in results)
    for model, _status, text in results:
        assert text == ("Soy a." if model == "a" else "Soy b.")
    assert f.names() == {"a.gguf", "b.gguf"} and sorted(f.loads) == ["a.gguf", "b.gguf"]
    # /generate without a model answers from the default one
    r = client.post("/generate", json={"prompt": "Estudiante: Hola\nPaciente:"})
    assert r.status_code == 200 and r.get_json()["metadata"]["modelo"] == "a.gguf"
    r = client.post("/generate", json={"prompt": "Estudiante: Hola\nPaciente:", "model": "b"})
    assert r.get_json()["metadata"]["modelo"] == "b.gguf"


def test_least_recently_used_idle_model_is_evicted_at_max_loaded_models(fakes):
    f = fakes(max_loaded_models=2)
    client = f.app().test_client()
    for model in ("a", "b", "a", "c"):  # b is the least recently used when c comes
        assert generate(client, model=model).status_code == 200
    assert f.manager.wait_unloaded(5)
    assert f.names() == {"a.gguf", "c.gguf"}
    assert [rt.closed for rt in f.runtimes] == [False, True, False]


def test_memory_budget_evicts_least_recently_used_first(fakes):
    f = fakes(memory_budget_mb=250, sizes={"a.gguf": 100 * MiB, "b.gguf": 100 * MiB, "c.gguf": 120 * MiB})
    client = f.app().test_client()
    for model in ("b", "a"):
        assert generate(client, model=model).status_code == 200
    assert f.names() == {"a.gguf", "b.gguf"}
    assert generate(client, model="c").status_code == 200  # 320 MiB > 250: b goes, a stays
    assert f.manager.wait_unloaded(5)
    assert f.names() == {"a.gguf", "c.gguf"}


def test_a_model_larger_than_the_whole_budget_is_refused_at_once(fakes):
    f = fakes(memory_budget_mb=100, sizes={"c.gguf": 400 * MiB})
    client = f.app().test_client()
    r = generate(client, model="c")
    assert r.status_code == 503
    assert "MEMORY_BUDGET_MB" in r.get_json()["error"] and "400 MiB" in r.get_json()["error"]
    assert f.loads == []


def test_no_room_while_the_resident_model_is_busy_gives_503_with_retry_after(fakes):
    """MAX_LOADED_MODELS=1 and model a in use: a load of b waits for room until its deadline, then
    gets 503 with Retry-After (here a 0.2 s deadline; over HTTP it is REQUEST_TIMEOUT_S or the
    client's timeout_s, at least a second). a is never freed under its lease."""
    f = fakes(max_loaded_models=1)
    busy = f.manager.acquire("a")  # a request that holds model a for the whole test
    try:
        with pytest.raises(ModelsBusy) as refused:
            f.manager.acquire("b", deadline=time.perf_counter() + 0.2)
        assert refused.value.status == 503 and int(refused.value.headers["Retry-After"]) >= 1
        assert "no room to load b.gguf" in refused.value.message
        assert not busy.model.engine.runtime.closed  # never freed under a lease
    finally:
        busy.release()
    # Once a's request ends, a is drained (it took no new requests) and b loads.
    assert generate(f.app().test_client(), model="b").status_code == 200
    assert f.names() == {"b.gguf"}


def test_a_busy_model_drains_and_then_makes_room(fakes):
    """MAX_LOADED_MODELS=1: b's request waits while a finishes what it has, then b loads."""
    f = fakes(max_loaded_models=1)
    busy = f.manager.acquire("a")
    done = {}

    def ask_b():
        done["b"] = f.manager.acquire("b", deadline=time.perf_counter() + 5)

    t = threading.Thread(target=ask_b)
    t.start()
    wait_until(lambda: busy.model.retiring, interval_s=0.01, what="b's load to ask a to stop taking requests")
    with pytest.raises(ModelsBusy):  # a takes no new request now; it would wait for room behind b
        f.manager.acquire("a", deadline=time.perf_counter() + 0.1)
    assert not busy.model.engine.runtime.closed
    busy.release()
    t.join(5)
    assert done["b"].model.name == "b.gguf"
    done["b"].release()
    assert f.manager.wait_unloaded(5) and f.runtimes[0].closed


# -- lifetimes ---------------------------------------------------------------------------------

def test_unloading_waits_for_every_lease(fakes):
    f = fakes()
    lease = f.manager.acquire("a")
    runtime = lease.model.engine.runtime
    assert f.manager.unload("a")
    assert "a.gguf" not in f.names()
    time.sleep(0.05)
    assert not runtime.closed  # still leased: tokenizing or decoding with it is safe
    lease.model.engine.tokenize("hola")
    lease.release()
    assert f.manager.wait_unloaded(5) and runtime.closed
    lease.release()  # twice is harmless


def test_two_concurrent_requests_for_an_unloaded_model_load_it_once(fakes):
    f = fakes(load_delay_s=0.3)
    client = f.app().test_client()
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda _: generate(client, model="b").status_code, range(4)))
    assert statuses == [200] * 4
    assert f.loads == ["b.gguf"]


def test_a_failed_load_reaches_every_waiting_request_and_leaves_others_serving(fakes):
    f = fakes(load_delay_s=0.2)
    f.manager.load(ModelSpec(f.dir / "a.gguf"))
    (f.dir / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 64)
    original = f.runtime

    def failing(spec, n_gpu):
        if spec.path.name == "broken.gguf":
            time.sleep(0.2)
            raise ValueError("Failed to load model from file")
        return original(spec, n_gpu)

    f.manager.loader.runtime_factory = failing
    client = f.app().test_client()
    with ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(lambda _: generate(client, model="broken"), range(3)))
    assert [r.status_code for r in responses] == [422] * 3
    assert "could not load broken.gguf" in responses[0].get_json()["error"]
    assert generate(client, model="a").status_code == 200


def test_keep_alive_zero_unloads_after_the_request(fakes):
    f = fakes()
    client = f.app().test_client()
    assert generate(client, model="b", keep_alive=0).status_code == 200
    assert f.manager.wait_unloaded(5)
    assert "b.gguf" not in f.names() and f.runtimes[0].closed


def test_keep_alive_expiry_and_negative_keeps_it(fakes):
    f = fakes(keep_alive="200ms")
    client = f.app().test_client()
    assert generate(client, model="b").status_code == 200  # KEEP_ALIVE: 200 ms
    assert generate(client, model="c", keep_alive=-1).status_code == 200  # forever
    assert generate(client, model="a", keep_alive="1h").status_code == 200
    wait_until(lambda: "b.gguf" not in f.names(), timeout_s=10, what="b's keep_alive to expire")
    assert f.names() == {"a.gguf", "c.gguf"}
    ps = {m["name"]: m for m in client.get("/api/ps").get_json()["models"]}
    assert ps["c:latest"]["expires_at"] > "2200"  # Ollama's "never"
    assert "2200" > ps["a:latest"]["expires_at"]


def test_keep_alive_zero_without_a_prompt_unloads_as_ollama_stop_does(fakes):
    f = fakes()
    client = f.app().test_client()
    r = client.post("/api/generate", json={"model": "b", "prompt": ""})
    assert r.get_json()["done_reason"] == "load" and "b.gguf" in f.names()
    r = client.post("/api/generate", json={"model": "b", "keep_alive": 0})
    assert r.get_json()["done_reason"] == "unload"
    assert f.manager.wait_unloaded(5) and "b.gguf" not in f.names()


@pytest.mark.parametrize("keep_alive", ["soon", "5 minutes", True, [1]])
def test_a_bad_keep_alive_is_a_400(fakes, keep_alive):
    client = fakes().app().test_client()
    r = generate(client, model="a", keep_alive=keep_alive)
    assert r.status_code == 400 and "keep_alive" in r.get_json()["error"]


def test_default_model_stays_while_others_expire(fakes):
    f = fakes(keep_alive="0s")
    f.manager.load(ModelSpec(f.dir / "a.gguf"))
    client = f.app().test_client()
    assert client.post("/generate", json={"prompt": "Estudiante: Hola\nPaciente:"}).status_code == 200
    assert generate(client, model="b").status_code == 200
    assert f.manager.wait_unloaded(5)
    assert f.names() == {"a.gguf"}


def test_load_model_keeps_its_contract_and_does_not_reload_a_resident_model(fakes):
    f = fakes()
    client = f.app().test_client()
    for _ in range(3):
        r = client.post("/load-model", json={"model_name": "a.gguf"})
        assert r.status_code == 200 and r.get_json()["status"] == "success"
        assert r.get_json()["model_name"] == "a.gguf"
    assert f.loads == ["a.gguf"]
    assert client.get("/health").get_json()["model_loaded"] is True
    r = client.post("/load-model", json={"model_name": "b.gguf"})
    assert r.status_code == 200 and client.get("/models").get_json()["loaded"] == "b.gguf"
    assert f.names() == {"a.gguf", "b.gguf"}


def test_a_changed_file_is_loaded_again_and_the_old_one_freed(fakes):
    f = fakes()
    client = f.app().test_client()
    assert generate(client, model="a").status_code == 200
    tiny_gguf(f.dir / "a.gguf")  # rewritten: new mtime
    import os

    st = (f.dir / "a.gguf").stat()
    os.utime(f.dir / "a.gguf", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert generate(client, model="a").status_code == 200
    assert f.loads == ["a.gguf", "a.gguf"]
    assert f.manager.wait_unloaded(5) and f.runtimes[0].closed and not f.runtimes[1].closed


def test_load_on_request_off_pins_the_models(fakes):
    f = fakes(load_on_request=False)
    f.manager.load(ModelSpec(f.dir / "a.gguf"))
    client = f.app().test_client()
    r = generate(client, model="b")
    assert r.status_code == 403 and "LOAD_ON_REQUEST" in r.get_json()["error"]
    assert generate(client, model="a", keep_alive=0).status_code == 200
    assert f.names() == {"a.gguf"}  # requests cannot unload a pinned model either
    assert client.post("/load-model", json={"model_name": "b.gguf"}).status_code == 200
    with pytest.raises(LoadForbidden):
        f.manager.acquire("c")


# -- names and listings ------------------------------------------------------------------------

def test_ollama_name_tag_alias_resolves_through_the_catalog(fakes):
    f = fakes()
    client = f.app().test_client()
    r = generate(client, model="llama3.1:8b", raw=True)
    assert r.status_code == 200 and r.get_json()["response"] == "Soy Meta-Llama-3.1-8B-Instruct-Q4_K_M."
    assert f.loads == [ALIAS_FILE]
    assert client.get("/v1/models/llama3.1:8b").get_json()["loaded"] is True
    r = generate(client, model="llama3.2:1b")
    assert r.status_code == 404 and "llama3.2:1b" in r.get_json()["error"]


def test_preset_aliases(fakes):
    f = fakes()
    (f.dir / "presets.toml").write_text('[presets.paciente]\nbase = "b.gguf"\naliases = ["paciente:v1"]\n')
    r = generate(f.app().test_client(), model="paciente:v1", raw=True)
    assert r.status_code == 200 and r.get_json()["response"] == "Soy b."


def test_ps_through_the_official_ollama_client(fakes):
    f = fakes()
    f.manager.load(ModelSpec(f.dir / "a.gguf"))
    client = ollama.Client(host="http://localhost", transport=httpx.WSGITransport(app=f.app()))
    client.generate(model="b", prompt="Hola", keep_alive="10m")
    ps = client.ps()
    assert {m.model for m in ps.models} == {"a:latest", "b:latest"}
    for m in ps.models:
        assert m.size == 100 * MiB and m.size_vram == 0 and m.context_length == 256
        assert m.details.format == "gguf" and m.digest
    by_name = {m.model: m for m in ps.models}
    assert by_name["a:latest"].expires_at.year > 2200  # the default model stays
    left = (by_name["b:latest"].expires_at.timestamp() - time.time())
    assert 500 < left <= 600


def test_v1_models_retrieve(fakes):
    f = fakes()
    f.manager.load(ModelSpec(f.dir / "a.gguf"))
    client = f.app().test_client()
    r = client.get("/v1/models/a.gguf")
    assert r.status_code == 200 and r.get_json() == {**r.get_json(), "id": "a.gguf", "object": "model",
                                                       "loaded": True}
    assert "loaded" not in client.get("/v1/models/b").get_json()
    r = client.get("/v1/models/nope")
    assert r.status_code == 404 and r.get_json()["error"]["code"] == "model_not_found"
    # A path no route matches (a newline in the id: found by the schema fuzzer) is still OpenAI's shape.
    for path in ("/v1/models/data%3A%20%5BDONE%5D%0A%0A", "/v1/nothing-here"):
        r = client.get(path)
        assert r.status_code == 404 and r.get_json()["error"]["type"] == "invalid_request_error", path
    assert isinstance(client.get("/nothing-here").get_json()["error"], str)  # the simulator's shape elsewhere


def test_health_and_metrics_report_every_resident_model(fakes):
    f = fakes()
    f.manager.load(ModelSpec(f.dir / "a.gguf"))
    client = f.app().test_client()
    assert generate(client, model="b").status_code == 200
    health = client.get("/health").get_json()
    assert health["status"] == "ok" and health["model_loaded"] and health["model"] == "a.gguf"
    assert {m["model"]: m["default"] for m in health["models"]} == {"a.gguf": True, "b.gguf": False}
    text = client.get("/metrics").get_data(as_text=True)
    assert "ai_engine_models_loaded 2.0" in text
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("ai_engine_model_"))
    for name in ("a.gguf", "b.gguf"):
        assert float(values[f'ai_engine_model_memory_bytes{{name="{name}"}}']) == 100 * MiB
    assert 'ai_engine_model_expires_in_seconds{name="a.gguf"} -1.0' in text
    assert "ai_engine_model_loads_total 2.0" in text
