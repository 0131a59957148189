"""Embeddings (/api/embed, /api/embeddings, /v1/embeddings) on a real engine over real HTTP.

The default model (Gemma 3 270M, a causal LM without pooling metadata) gives last-token vectors; a
tiny random Llama, converted by the project's own converter, is served twice: with
`llama.pooling_type = mean` written into its GGUF (pooled by llama.cpp, as a dedicated embedding
model is) and without it (the causal-LM default, last token). Both are checked against
transformers' hidden states of the same checkpoint for the same token ids, so the pooling cannot
be faked. The clients are the real ones: ollama and openai (Python and Node), LangChain.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.helpers import DEFAULT_MODEL, link_or_copy, server_fixture, wait_until

OLLAMA_NAME = DEFAULT_MODEL.removesuffix(".gguf")
N_CTX = 256
TEXTS = ["El paciente no duerme desde hace meses.", "Hoy hace sol en la costa.", "¿Qué te trae por acá?"]
LONG = "palabra " * 400  # more tokens than N_CTX


# -- the models and the server ----------------------------------------------------------------------

def _with_pooling(src: Path, dst: Path, pooling: int) -> Path:
    """A copy of the GGUF `src` with `<arch>.pooling_type` set (gguf's own metadata copier)."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(str(dst), arch=arch, endianess=reader.endianess)
    key = gguf.Keys.LLM.POOLING_TYPE.format(arch=arch)
    copy_with_new_metadata(reader, writer, {key: MetadataDetails(gguf.GGUFValueType.UINT32, pooling)}, [])
    return dst


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A random LlamaForCausalLM checkpoint (hidden 64, vocab 700)."""
    from tests.convert_fixtures import numpy_llama

    return numpy_llama(tmp_path_factory.mktemp("tiny-ckpt") / "ckpt")


@pytest.fixture(scope="module")
def models(tmp_path_factory, default_model_file, tiny) -> Path:
    """MODEL_PATH: the default model; tiny-last.gguf (no pooling metadata: the causal-LM default)
    and tiny-embed.gguf (the same weights, pooling_type mean) made by `ai-engine convert`."""
    from engine.cli import main

    root = tmp_path_factory.mktemp("embed-models")
    link_or_copy(default_model_file, root / DEFAULT_MODEL)
    assert main(["convert", str(tiny), "-o", str(root / "tiny-last.gguf"), "--outtype", "f32"]) == 0
    _with_pooling(root / "tiny-last.gguf", root / "tiny-embed.gguf", 1)
    return root


@pytest.fixture(scope="module")
def srv(models, tmp_path_factory):
    """MAX_QUEUE=0: a request that would wait is refused (the admission test needs it; the others
    send one request at a time). No response cache: a repeated generation really generates."""
    yield from server_fixture(models, tmp_path_factory, N_CTX=str(N_CTX), MAX_QUEUE="0", REQUEST_TIMEOUT_S="900",
                                RESPONSE_CACHE_SIZE="0")


def post(srv, path: str, body: dict, **kwargs) -> requests.Response:
    return requests.post(srv.url + path, json=body, timeout=300, **kwargs)


def embed(srv, inputs, model: str = OLLAMA_NAME, **body) -> dict:
    r = post(srv, "/api/embed", {"model": model, "input": inputs, **body})
    assert r.status_code == 200, r.text
    return r.json()


def vectors(reply: dict) -> np.ndarray:
    return np.asarray(reply["embeddings"], dtype=np.float64)


def resident(srv) -> list[str]:
    return [m["name"] for m in requests.get(srv.url + "/api/ps", timeout=30).json()["models"]]


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x)


# -- what every vector must satisfy -----------------------------------------------------------------

def test_ollama_embed_is_normalized_deterministic_and_in_order(srv):
    reply = embed(srv, [TEXTS[0], TEXTS[1], TEXTS[0]])
    v = vectors(reply)
    assert reply["model"] == OLLAMA_NAME + ":latest" and v.shape == (3, 640)
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-6)
    assert np.array_equal(v[0], v[2])  # the same text twice: the same vector, bit for bit
    assert not np.allclose(v[0], v[1], atol=1e-3)
    assert reply["prompt_eval_count"] > 3 and reply["total_duration"] >= reply["load_duration"] >= 0
    reverse = vectors(embed(srv, TEXTS[::-1]))
    assert np.array_equal(reverse[::-1][[0, 1]], vectors(embed(srv, TEXTS[:2])))


def test_a_batch_equals_the_inputs_one_by_one(srv):
    batch = vectors(embed(srv, TEXTS))
    single = np.stack([vectors(embed(srv, text))[0] for text in TEXTS])
    assert np.allclose(batch, single, atol=1e-6)


def test_legacy_route_is_not_normalized(srv):
    import ollama

    raw = np.asarray(ollama.Client(host=srv.url).embeddings(model=OLLAMA_NAME, prompt=TEXTS[0]).embedding)
    assert abs(np.linalg.norm(raw) - 1) > 0.1  # as the model gives it
    assert np.allclose(unit(raw), vectors(embed(srv, TEXTS[0]))[0], atol=1e-6)
    # An empty prompt only loads the model, as Ollama's does.
    assert post(srv, "/api/embeddings", {"model": OLLAMA_NAME, "prompt": ""}).json() == {"embedding": []}


def test_empty_input_only_loads_the_model(srv):
    for empty in ("", []):
        reply = post(srv, "/api/embed", {"model": OLLAMA_NAME, "input": empty}).json()
        assert reply["embeddings"] == [] and reply["model"] == OLLAMA_NAME + ":latest"


def test_openai_float_base64_and_usage(srv):
    r = post(srv, "/v1/embeddings", {"model": DEFAULT_MODEL, "input": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == DEFAULT_MODEL
    assert [d["index"] for d in body["data"]] == [0, 1, 2] and {d["object"] for d in body["data"]} == {"embedding"}
    floats = np.asarray([d["embedding"] for d in body["data"]])
    assert np.allclose(np.linalg.norm(floats, axis=1), 1, atol=1e-6)
    assert np.allclose(floats, vectors(embed(srv, TEXTS)), atol=1e-6)  # the same vectors as /api/embed
    ollama_tokens = embed(srv, TEXTS)["prompt_eval_count"]
    assert body["usage"] == {"prompt_tokens": ollama_tokens, "total_tokens": ollama_tokens}
    b64 = post(srv, "/v1/embeddings", {"model": DEFAULT_MODEL, "input": TEXTS, "encoding_format": "base64"}).json()
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in b64["data"]])
    assert np.array_equal(decoded, floats.astype(np.float32))


def test_token_arrays(srv):
    one = post(srv, "/v1/embeddings", {"model": DEFAULT_MODEL, "input": [2, 9259, 236764]}).json()["data"]
    many = post(srv, "/v1/embeddings", {"model": DEFAULT_MODEL, "input": [[2, 9259, 236764], [2, 818]]}).json()
    assert len(one) == 1 and np.allclose(one[0]["embedding"], many["data"][0]["embedding"], atol=1e-6)
    assert many["usage"]["prompt_tokens"] == 5


def test_dimensions_shorten_and_normalize_again(srv):
    full = vectors(embed(srv, TEXTS[0]))[0]
    short = vectors(embed(srv, TEXTS[0], dimensions=16))[0]
    assert short.shape == (16,) and np.allclose(short, unit(full[:16]), atol=1e-6)
    oa = post(srv, "/v1/embeddings", {"model": DEFAULT_MODEL, "input": TEXTS[0], "dimensions": 16}).json()
    assert np.allclose(oa["data"][0]["embedding"], short, atol=1e-6)


def test_truncate(srv):
    r = post(srv, "/api/embed", {"model": OLLAMA_NAME, "input": ["hola", LONG], "truncate": False})
    assert r.status_code == 400 and "input[1]" in r.json()["error"] and "context" in r.json()["error"]
    cut = embed(srv, LONG)
    assert cut["prompt_eval_count"] == N_CTX  # cut to the context, keeping its start
    assert embed(srv, LONG, options={"num_ctx": 32})["prompt_eval_count"] == 32
    # OpenAI refuses an input longer than the context; the legacy route cuts it.
    r = post(srv, "/v1/embeddings", {"model": DEFAULT_MODEL, "input": LONG})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    legacy = post(srv, "/api/embeddings", {"model": OLLAMA_NAME, "prompt": LONG}).json()["embedding"]
    assert np.allclose(unit(np.asarray(legacy)), vectors(cut)[0], atol=1e-6)


# -- bad requests: a clear 4xx naming the field, and the engine goes on --------------------------------
M, O = OLLAMA_NAME, DEFAULT_MODEL
BAD = [
    ("/api/embed", {"model": M, "input": [""]}, "input"),
    ("/api/embed", {"model": M, "input": 5}, "input"),
    ("/api/embed", {"model": M, "input": ["a", 1]}, "input"),
    ("/api/embed", {"model": M, "input": {"text": "a"}}, "input"),
    ("/api/embed", {"model": M, "input": ["a"] * 2049}, "at most 2048"),
    ("/api/embed", {"model": M, "input": "a", "truncate": "yes"}, "truncate"),
    ("/api/embed", {"model": M, "input": "a", "dimensions": 0}, "dimensions"),
    ("/api/embed", {"model": M, "input": "a", "dimensions": 641}, "embedding size"),
    ("/api/embed", {"input": "a"}, "model"),
    ("/api/embed", {"model": M, "input": LONG, "truncate": False}, "context holds"),
    ("/api/embeddings", {"model": M, "prompt": ["a"]}, "prompt"),
    ("/v1/embeddings", {"model": O, "input": ""}, "input"),
    ("/v1/embeddings", {"model": O, "input": []}, "input"),
    ("/v1/embeddings", {"model": O, "input": [[]]}, "input"),
    ("/v1/embeddings", {"model": O, "input": [-1]}, "input"),
    ("/v1/embeddings", {"model": O, "input": [True]}, "input"),
    ("/v1/embeddings", {"model": O, "input": ["a", [1]]}, "input"),
    ("/v1/embeddings", {"model": O}, "input"),
    ("/v1/embeddings", {"model": O, "input": ["a"] * 2049}, "at most 2048"),
    ("/v1/embeddings", {"model": O, "input": [[2, 10 ** 9]]}, "vocabulary holds"),
    ("/v1/embeddings", {"model": O, "input": "a", "encoding_format": "int8"}, "encoding_format"),
    ("/v1/embeddings", {"model": O, "input": "a", "dimensions": 10 ** 6}, "embedding size"),
    ("/v1/embeddings", {"model": O, "input": LONG}, "context holds"),
]


@pytest.mark.parametrize("path,body,words", BAD, ids=[f"{p} {json.dumps(b)[:60]}" for p, b, _ in BAD])
def test_bad_requests(srv, path, body, words):
    r = post(srv, path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    message = error["message"] if path.startswith("/v1") else error
    assert words in message, message
    assert requests.get(srv.url + "/health", timeout=30).status_code == 200


def test_a_deadline_that_passes_while_reading_is_a_504(srv):
    many = [f"{i} " + "palabra " * 200 for i in range(30)]  # seconds of work on 2 cores
    r = post(srv, "/api/embed", {"model": OLLAMA_NAME, "input": many, "timeout_s": 1})
    assert r.status_code == 504 and "timed out" in r.json()["error"], r.text
    r = post(srv, "/v1/embeddings", {"model": DEFAULT_MODEL, "input": many}, headers={"X-Request-Timeout": "1"})
    assert r.status_code == 504 and r.json()["error"]["type"] == "server_error", r.text
    assert vectors(embed(srv, "hola")).shape == (1, 640)  # and the next request is served


def test_a_deadline_the_measured_speed_cannot_meet_is_refused_at_once(srv):
    """Once the model has read a prompt (the scheduler measures its cost per token), a request
    whose tokens cannot be read by its deadline is refused before any work, with Retry-After."""
    prompt = "Estudiante: Hola, ¿qué te trae por acá? " * 12 + "\nPaciente:"
    assert post(srv, "/api/generate", {"model": OLLAMA_NAME, "prompt": prompt, "stream": False,
                                       "options": {"num_predict": 2}}).status_code == 200
    many = [f"{i} " + "palabra " * 200 for i in range(30)]
    r = post(srv, "/api/embed", {"model": OLLAMA_NAME, "input": many, "timeout_s": 1})
    assert r.status_code == 503 and "deadline" in r.json()["error"], r.text
    assert int(r.headers["Retry-After"]) >= 1
    metrics = requests.get(srv.url + "/metrics", timeout=30).text
    line = next(x for x in metrics.splitlines() if x.startswith("ai_engine_deadline_rejections_total"))
    assert float(line.split()[-1]) >= 1


def test_a_body_over_max_body_bytes_is_a_413_in_each_shape(srv):
    big = ["palabra " * 200] * 700  # about 1.1 MB: over the default MAX_BODY_BYTES (1 MiB)
    r = post(srv, "/api/embed", {"model": OLLAMA_NAME, "input": big})
    assert r.status_code == 413 and isinstance(r.json()["error"], str)
    r = post(srv, "/v1/embeddings", {"model": DEFAULT_MODEL, "input": big})
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_model_is_a_404_in_each_shape(srv):
    assert post(srv, "/api/embed", {"model": "no-such", "input": "a"}).status_code == 404
    r = post(srv, "/v1/embeddings", {"model": "no-such", "input": "a"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


# -- a dedicated embedding GGUF, and the causal-LM default, against transformers ---------------------

def _reference(tiny: Path, ids: list[int]) -> np.ndarray:
    """The final-norm hidden states of the checkpoint for `ids` (transformers, f32)."""
    import torch
    from transformers import LlamaModel

    model = LlamaModel.from_pretrained(tiny, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).last_hidden_state[0].double().numpy()


@pytest.mark.parametrize("name,pool", [("tiny-embed.gguf", "mean"), ("tiny-last.gguf", "last")])
def test_pooling_from_the_gguf_metadata(srv, tiny, name, pool):
    ids = [1, 45, 300, 12, 77, 5, 640, 2]
    r = post(srv, "/v1/embeddings", {"model": name, "input": [ids]})
    assert r.status_code == 200, r.text
    got = np.asarray(r.json()["data"][0]["embedding"])
    hidden = _reference(tiny, ids)
    want = unit(hidden.mean(axis=0) if pool == "mean" else hidden[-1])
    assert got.shape == (64,) and np.allclose(got, want, atol=1e-4), float(got @ want)
    other = unit(hidden[-1] if pool == "mean" else hidden.mean(axis=0))
    assert not np.allclose(got, other, atol=1e-2)  # the other pooling would not pass


def test_dedicated_model_by_name_on_every_route(srv):
    reply = embed(srv, TEXTS, model="tiny-embed")
    assert reply["model"] == "tiny-embed:latest" and vectors(reply).shape == (3, 64)
    raw = post(srv, "/api/embeddings", {"model": "tiny-embed", "prompt": TEXTS[0]}).json()["embedding"]
    assert np.allclose(unit(np.asarray(raw)), vectors(reply)[0], atol=1e-6)


def test_the_embedding_context_counts_in_the_memory_budget(srv):
    """A model's embedding context is made on its first embedding request and added to the
    model's planned memory (/health's memory_bytes, /api/ps's size)."""
    def memory() -> int:
        models = requests.get(srv.url + "/health", timeout=30).json()["models"]
        return next(m["memory_bytes"] for m in models if m["model"] == "tiny-last.gguf")

    post(srv, "/api/generate", {"model": "tiny-last", "prompt": "", "keep_alive": 0})  # a fresh load, below
    wait_until(lambda: "tiny-last:latest" not in resident(srv), what="tiny-last unloaded")
    assert post(srv, "/api/generate", {"model": "tiny-last", "prompt": "", "keep_alive": -1}).status_code == 200
    before = memory()
    embed(srv, "hola", model="tiny-last")
    grown = memory()
    embed(srv, "adiós", model="tiny-last")
    assert grown > before and memory() == grown  # once, on the first embedding request
    post(srv, "/api/generate", {"model": "tiny-last", "prompt": "", "keep_alive": 0})


def test_room_for_an_embedding_context_unloads_idle_models(tmp_path):
    """Residency.grow on fake models of 100 MiB each: an idle model is unloaded to make room; when
    only busy ones are left, the request gets 503 (ModelsBusy) and the budget is unchanged."""
    import time

    from engine.model_residency import ModelsBusy
    from tests.helpers import Fakes

    mib = 1 << 20
    fakes = Fakes(tmp_path, memory_budget_mb=300).load("a.gguf").load("b.gguf")
    lease = fakes.manager.acquire("a.gguf")
    try:
        fakes.manager.grow(lease.model, 150 * mib, deadline=time.perf_counter() + 30)
        assert lease.model.ram_bytes == 250 * mib and fakes.names() == {"a.gguf"}
        with pytest.raises(ModelsBusy) as refused:
            fakes.manager.grow(lease.model, 100 * mib, deadline=time.perf_counter())
        assert "MEMORY_BUDGET_MB" in refused.value.message and lease.model.ram_bytes == 250 * mib
    finally:
        lease.release()
        fakes.manager.close()


def test_turn_is_first_come_first_served_and_skips_who_gave_up():
    """runtime.Turn: the scheduler's decode steps and the embedding decodes, in arrival order; a
    waiter that gives up (its deadline) does not block the ones after it."""
    from engine.runtime import Turn

    turn, order = Turn(), []
    assert turn.acquire()
    assert not turn.acquire(timeout=0.01)  # gives up: its ticket is skipped when its turn comes
    threads = []
    for i in range(3):
        t = threading.Thread(target=lambda i=i: (turn.acquire(), order.append(i), turn.release()))
        t.start()
        threads.append(t)
        wait_until(lambda n=i: turn._next == n + 3, what=f"waiter {i} queued")
    turn.release()
    for t in threads:
        t.join(timeout=30)
    assert order == [0, 1, 2]
    assert turn.acquire(timeout=5)  # free again
    turn.release()


def test_generation_and_embeddings_take_turns_without_changing_either(srv):
    """A greedy generation running while embeddings are read gives the same text as alone, and the
    embeddings the same vectors: the decode steps and the embedding decodes interleave."""
    body = {"model": OLLAMA_NAME, "stream": False, "prompt": "Estudiante: Hola, ¿cómo dormís?\nPaciente:",
            "options": {"temperature": 0, "num_predict": 48, "stop": []}}
    alone = post(srv, "/api/generate", body).json()
    reference = vectors(embed(srv, TEXTS))
    done: dict = {}
    worker = threading.Thread(target=lambda: done.update(r=post(srv, "/api/generate", body)))
    worker.start()
    during = []
    while worker.is_alive() or not during:
        during.append(vectors(embed(srv, TEXTS)))
    worker.join()
    assert done["r"].json()["response"] == alone["response"] and done["r"].json()["eval_count"] == 48
    assert all(np.array_equal(v, reference) for v in during)


# -- the real clients ----------------------------------------------------------------------------------

def test_python_clients(srv):
    import ollama
    from openai import OpenAI

    reference = vectors(embed(srv, TEXTS))
    client = ollama.Client(host=srv.url)
    got = client.embed(model=OLLAMA_NAME, input=TEXTS)
    assert np.allclose(got.embeddings, reference, atol=1e-6) and got.prompt_eval_count > 0
    oa = OpenAI(base_url=srv.url + "/v1", api_key="not-needed")
    by_default = oa.embeddings.create(model=DEFAULT_MODEL, input=TEXTS)  # asks for base64, decodes it
    as_float = oa.embeddings.create(model=DEFAULT_MODEL, input=TEXTS, encoding_format="float")
    assert np.allclose([d.embedding for d in by_default.data], reference, atol=1e-6)
    assert [d.embedding for d in by_default.data] == [d.embedding for d in as_float.data]
    assert by_default.usage.prompt_tokens == got.prompt_eval_count


def test_langchain_ollama_embeddings(srv):
    from langchain_ollama import OllamaEmbeddings

    emb = OllamaEmbeddings(model=OLLAMA_NAME, base_url=srv.url)
    documents = emb.embed_documents(TEXTS)
    query = emb.embed_query(TEXTS[1])
    assert np.allclose(documents, vectors(embed(srv, TEXTS)), atol=1e-6)
    assert np.allclose(query, documents[1], atol=1e-6)


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_node_clients(srv):
    script = Path(__file__).parent / "node" / "embeddings_client.mjs"
    result = subprocess.run(["node", str(script), *TEXTS], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "AI_ENGINE_URL": srv.url, "OLLAMA_MODEL": OLLAMA_NAME,
                                 "OPENAI_MODEL": DEFAULT_MODEL})
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    reference = vectors(embed(srv, TEXTS))
    assert np.allclose(out["ollama"]["embeddings"], reference, atol=1e-6)
    assert np.allclose([d["embedding"] for d in out["openai_default"]["data"]], reference, atol=1e-6)
    assert [d["embedding"] for d in out["openai_default"]["data"]] == \
        [list(np.float32(d["embedding"]).astype(float)) for d in out["openai_float"]["data"]] or \
        np.allclose([d["embedding"] for d in out["openai_float"]["data"]], reference, atol=1e-6)
    assert out["openai_default"]["usage"]["prompt_tokens"] == out["ollama"]["prompt_eval_count"]


# -- admission, metrics and leases: the generation path's rules ------------------------------------------

def test_queue_limit_metrics_and_the_lease(srv):
    """With MAX_QUEUE=0, a request that would wait for the busy embedding context is refused with
    503 and Retry-After (in each surface's error shape); a request that unloads the model while a
    long embedding runs does not free it from under that embedding; the metrics count both."""
    many = [f"{i} " + "palabra " * 200 for i in range(30)]
    expected = vectors(embed(srv, many[:1]))[0]
    done: dict = {}

    def long_request():  # until it gets in (a probe below may hold the context when it arrives)
        while (r := post(srv, "/api/embed", {"model": OLLAMA_NAME, "input": many})).status_code == 503:
            pass
        done["r"] = r

    worker = threading.Thread(target=long_request)
    worker.start()

    def refused():
        # The probes go one at a time: a 503 means the long request holds the context.
        r = post(srv, "/v1/embeddings", {"model": DEFAULT_MODEL, "input": "hola"})
        assert r.status_code in (200, 503), r.text
        assert worker.is_alive() or r.status_code == 503, f"the long request ended before any refusal: {done}"
        return [r] if r.status_code == 503 else None  # (a Response of a 503 is falsy)

    [r] = wait_until(refused, timeout_s=300, what="a 503 while the embedding context is busy")
    assert int(r.headers["Retry-After"]) >= 1 and "MAX_QUEUE" in r.json()["error"]["message"]
    unload = post(srv, "/api/generate", {"model": OLLAMA_NAME, "prompt": "", "keep_alive": 0})
    assert unload.json()["done_reason"] == "unload"
    worker.join(timeout=600)
    assert done["r"].status_code == 200, done["r"].text
    got = vectors(done["r"].json())
    assert got.shape == (30, 640) and np.allclose(got[0], expected, atol=1e-6)
    wait_until(lambda: OLLAMA_NAME + ":latest" not in resident(srv), timeout_s=120,
               what="the model unloaded once the embedding ended")
    metrics = requests.get(srv.url + "/metrics", timeout=30).text
    assert 'ai_engine_requests_total{endpoint="/v1/embeddings",status="503"}' in metrics
    rejections = next(line for line in metrics.splitlines() if line.startswith("ai_engine_queue_rejections_total"))
    assert float(rejections.split()[-1]) >= 1
    tokens = next(line for line in metrics.splitlines() if line.startswith("ai_engine_embedding_tokens_total"))
    assert float(tokens.split()[-1]) > 30 * 200
