"""The simulator contract, over real HTTP, against a running engine on the real default model; the
refusals of bad input, which no model takes part in, against the same app and HTTP server on the
fake runtime (`fake_server`)."""

from __future__ import annotations

import json
import re

import pytest
import requests

from engine.patient import SPEAKERS, render_case_prompt
from tests.helpers import DEFAULT_MODEL, post

LABEL = re.compile(r"(^|\n)\s*(%s)\s*:" % "|".join(SPEAKERS), re.IGNORECASE)


def assert_healthy(server):
    r = requests.get(server.url + "/health", timeout=10)
    assert r.status_code == 200 and r.json()["model_loaded"] is True


# -- the contract --------------------------------------------------------------------------

def test_health_shape(server):
    body = requests.get(server.url + "/health", timeout=10).json()
    assert body["status"] == "ok"
    assert body["model_loaded"] is True
    assert isinstance(body["model_path"], str) and body["model_path"]


def test_generate_contract_types(server, cases):
    r = post(server, "/generate", {"prompt": render_case_prompt(cases[0]), "max_length": 150,
                                   "temperature": 0.7})
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    body = r.json()
    assert set(body) >= {"texto", "confianza", "metadata"}
    assert isinstance(body["texto"], str) and body["texto"].strip()
    assert isinstance(body["confianza"], float) and 0.0 < body["confianza"] <= 1.0
    meta = body["metadata"]
    assert isinstance(meta["modelo"], str) and meta["modelo"] == DEFAULT_MODEL
    assert isinstance(meta["tokens"], int) and 0 < meta["tokens"] <= 150
    assert isinstance(meta["temperature"], float) and meta["temperature"] == 0.7
    for key in ("duration_ms", "ttft_ms", "tokens_per_second"):
        assert isinstance(meta[key], (int, float)) and meta[key] >= 0, key
    assert isinstance(meta["prompt_tokens"], int) and meta["prompt_tokens"] > 100
    assert meta["ttft_ms"] <= meta["duration_ms"]


def test_integer_temperature_is_reported_as_float(server, cases):
    body = post(server, "/generate", {"prompt": render_case_prompt(cases[1]), "temperature": 0,
                                      "max_length": 20}).json()
    assert isinstance(body["metadata"]["temperature"], float)


@pytest.mark.parametrize("case_index", [0, 1, 2])
def test_reply_extraction_on_each_case(server, cases, case_index):
    """Each fixture case: a non-empty Spanish line, no speaker labels, no second turn."""
    prompt = render_case_prompt(cases[case_index])
    for temperature in (0, 0.7):
        body = post(server, "/generate", {"prompt": prompt, "max_length": 150,
                                          "temperature": temperature}).json()
        text = body["texto"]
        assert text and text == text.strip(), body
        assert not LABEL.search(text), f"speaker label left in {text!r}"
        assert "\n\n" not in text
        assert body["metadata"]["tokens"] <= 150
        assert body["metadata"]["finish_reason"] in {"stop", "eos", "length"}


def test_reply_is_spanish(server, cases):
    replies = " ".join(
        post(server, "/generate", {"prompt": render_case_prompt(c), "temperature": 0}).json()["texto"]
        for c in cases)
    words = set(re.findall(r"[a-záéíóúñü]+", replies.lower()))
    spanish = {"que", "no", "me", "de", "la", "el", "y", "en", "es", "mi", "lo", "se", "un", "una", "por"}
    assert len(words & spanish) >= 3, replies


def test_temperature_zero_is_deterministic(server_generating, cases):
    """Both replies are generated (the response cache is off on this server: a replay would
    prove nothing)."""
    body = {"prompt": render_case_prompt(cases[0]), "temperature": 0, "max_length": 60}
    first, second = (post(server_generating, "/generate", body).json() for _ in range(2))
    assert first["metadata"]["cached"] is False and second["metadata"]["cached"] is False
    assert first["texto"] and first["texto"] == second["texto"]
    assert first["metadata"]["tokens"] == second["metadata"]["tokens"]
    assert first["confianza"] == second["confianza"]


def test_same_seed_same_reply(server_generating, cases):
    """A seed fixes the sampled reply, generated twice (no response cache), and the seed is what
    fixes it: other seeds give other replies."""
    body = {"prompt": render_case_prompt(cases[2]), "temperature": 1.0, "max_length": 40}
    first, again = (post(server_generating, "/generate", {**body, "seed": 1234}).json() for _ in range(2))
    assert first["metadata"]["cached"] is False and again["metadata"]["cached"] is False
    assert first["texto"] and first["texto"] == again["texto"]
    others = {post(server_generating, "/generate", {**body, "seed": seed}).json()["texto"] for seed in (1, 2, 3)}
    assert others - {first["texto"]}, others


@pytest.mark.parametrize("max_length", [1, 5, 17])
def test_max_length_counts_new_tokens(server, cases, max_length):
    """`stop: []` at temperature 0: the reply runs to exactly max_length new tokens (a limit that
    counted the prompt, over 100 tokens, would leave none)."""
    body = post(server, "/generate", {"prompt": render_case_prompt(cases[0]), "max_length": max_length,
                                      "temperature": 0, "stop": []}).json()
    assert body["metadata"]["finish_reason"] == "length", body
    assert body["metadata"]["tokens"] == max_length


def test_empty_stop_list_runs_to_max_length(server, cases):
    """With `stop: []` only end-of-sequence or max_length end the reply: it runs past turn ends."""
    body = post(server, "/generate", {"prompt": render_case_prompt(cases[0]), "max_length": 80,
                                      "temperature": 0, "stop": []}).json()
    default = post(server, "/generate", {"prompt": render_case_prompt(cases[0]), "max_length": 80,
                                         "temperature": 0}).json()
    assert body["metadata"]["finish_reason"] in {"length", "eos"}
    assert body["metadata"]["tokens"] > default["metadata"]["tokens"]
    assert body["texto"].startswith(default["texto"])


def test_custom_stop_replaces_default(server, cases):
    default = post(server, "/generate", {"prompt": render_case_prompt(cases[0]), "temperature": 0}).json()
    words = default["texto"].split()
    assert len(words) >= 3, default
    stop_word = " " + words[2]
    body = post(server, "/generate", {"prompt": render_case_prompt(cases[0]), "temperature": 0,
                                      "stop": [stop_word]}).json()
    assert body["texto"] == " ".join(words[:2]).strip()
    assert body["metadata"]["finish_reason"] == "stop"


def test_top_p_is_honoured(server, cases):
    """A tiny top_p leaves only the most likely token: sampling at temperature 1 becomes greedy."""
    prompt = render_case_prompt(cases[1])
    greedy = post(server, "/generate", {"prompt": prompt, "temperature": 0, "max_length": 30}).json()
    for seed in (1, 2, 3):
        narrow = post(server, "/generate", {"prompt": prompt, "temperature": 1.0, "top_p": 1e-6,
                                            "seed": seed, "max_length": 30}).json()
        assert narrow["texto"] == greedy["texto"]


# -- bad input ------------------------------------------------------------------------------

BAD_BODIES = [
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": ["a"]}, "prompt"),
    ({"prompt": "Hola", "max_length": 0}, "max_length"),
    ({"prompt": "Hola", "max_length": -5}, "max_length"),
    ({"prompt": "Hola", "max_length": "150"}, "max_length"),
    ({"prompt": "Hola", "max_length": 1.5}, "max_length"),
    ({"prompt": "Hola", "max_length": True}, "max_length"),
    ({"prompt": "Hola", "max_length": 10**9}, "max_length"),
    ({"prompt": "Hola", "temperature": -0.1}, "temperature"),
    ({"prompt": "Hola", "temperature": "hot"}, "temperature"),
    ({"prompt": "Hola", "temperature": 99}, "temperature"),
    ({"prompt": "Hola", "top_p": 0}, "top_p"),
    ({"prompt": "Hola", "top_p": 1.5}, "top_p"),
    ({"prompt": "Hola", "top_p": None, "top_k": -1}, "top_k"),
    ({"prompt": "Hola", "seed": -1}, "seed"),
    ({"prompt": "Hola", "stop": "\n"}, None),  # a single string is accepted as a one-item list
    ({"prompt": "Hola", "stop": [1, 2]}, "stop"),
    ({"prompt": "Hola", "stop": [""]}, "stop"),
]


@pytest.mark.parametrize("body,field", BAD_BODIES)
def test_bad_bodies_are_400_naming_the_field(fake_server, body, field):
    """Validation only, so on the fake runtime (the Ray tests send a few to the real model)."""
    if field is None:
        body = {**body, "max_length": 3}
        assert post(fake_server, "/generate", body).status_code == 200
        return
    r = post(fake_server, "/generate", body)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]
    assert_healthy(fake_server)


@pytest.mark.parametrize("data,content_type", [
    ("not json", "application/json"),
    ('{"prompt": "Hola"', "application/json"),
    ('["prompt"]', "application/json"),
    ('"Hola"', "application/json"),
    ("", "application/json"),
    ('{"prompt": "Hola", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "application/json"),  # RecursionError
    ('{"prompt": "Hola", "x": ' + "[" * 40 + "]" * 40 + "}", "application/json"),
    ('{"prompt": "Hola \\ud800", "max_length": 3}', "application/json"),  # a lone surrogate escape
    ('{"prompt": "Hola", "\\udfff": 1}', "application/json"),
    (b'{"prompt": "Hola \xff\xfe"}', "application/json"),  # not UTF-8
])
def test_non_json_bodies_are_400(fake_server, data, content_type):
    r = requests.post(fake_server.url + "/generate", data=data, headers={"Content-Type": content_type}, timeout=30)
    assert r.status_code == 400, r.text
    assert "JSON" in r.json()["error"] or "surrogate" in r.json()["error"]
    assert_healthy(fake_server)


@pytest.mark.parametrize("path", ["/generate", "/api/generate", "/api/chat", "/v1/chat/completions", "/load-model"])
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; "
                                          "boundary=x", None])
def test_a_body_not_sent_as_json_is_415(fake_server, path, content_type):
    """A web page can POST text/plain, a form or a body without type cross-site with no CORS
    preflight; the engine does not read those as JSON (it once did, like Ollama)."""
    body = json.dumps({"prompt": "Hola", "model": DEFAULT_MODEL, "max_length": 3,
                       "messages": [{"role": "user", "content": "Hola"}], "model_name": DEFAULT_MODEL}).encode()
    headers = {} if content_type is None else {"Content-Type": content_type}
    r = requests.post(fake_server.url + path, data=body, headers=headers, timeout=30)
    assert r.status_code == 415, r.text
    assert "application/json" in json.dumps(r.json())
    ok = requests.post(fake_server.url + "/generate", data=body,
                       headers={"Content-Type": "application/json; charset=utf-8"}, timeout=60)
    assert ok.status_code == 200, ok.text
    assert_healthy(fake_server)


def test_a_request_id_is_kept_only_when_it_looks_like_one(server):
    r = requests.get(server.url + "/models", headers={"X-Request-ID": "abc-123.4:5_6"}, timeout=30)
    assert r.headers["X-Request-ID"] == "abc-123.4:5_6"
    for hostile in ("x" * 8000, "a b", "<script>", "é"):
        r = requests.get(server.url + "/models", headers={"X-Request-ID": hostile.encode("utf-8", "replace")}, timeout=30)
        assert r.status_code == 200 and len(r.headers["X-Request-ID"]) == 16 and r.headers["X-Request-ID"] != hostile
    assert "x" * 200 not in server.log()


def test_prompt_longer_than_context_is_refused_with_both_counts(server):
    prompt = "Estudiante: ¿Cómo dormiste anoche? " * 400  # far more than N_CTX=2048 tokens
    r = post(server, "/generate", {"prompt": prompt, "max_length": 50})
    assert r.status_code == 400
    error = r.json()["error"]
    numbers = [int(n) for n in re.findall(r"\d+", error)]
    assert 2048 in numbers and 50 in numbers and any(n > 2048 for n in numbers), error
    assert_healthy(server)


def test_prompt_plus_max_length_over_context_is_refused(server, cases):
    r = post(server, "/generate", {"prompt": render_case_prompt(cases[0]), "max_length": 2040})
    assert r.status_code == 400 and "2048" in r.json()["error"]


def test_unknown_route_and_method_are_json(fake_server):
    r = requests.get(fake_server.url + "/nope", timeout=10)
    assert r.status_code == 404 and "error" in r.json()
    r = requests.get(fake_server.url + "/generate", timeout=10)
    assert r.status_code == 405 and "error" in r.json()


# -- /models and /load-model -----------------------------------------------------------------

def test_models_lists_gguf_files(server, model_dir):
    body = requests.get(server.url + "/models", timeout=10).json()
    assert body["model_path"] == model_dir.name  # the folder's name: no absolute path without a key
    assert str(model_dir.parent) not in requests.get(server.url + "/models", timeout=10).text
    assert DEFAULT_MODEL in body["models"]
    assert "persona/alt-model.gguf" in body["models"]
    assert all(name.endswith(".gguf") for name in body["models"])


@pytest.mark.parametrize("body,status,says", [
    ({"model_name": "../outside/elsewhere.gguf"}, 400, "MODEL_PATH"),
    ({"model_name": "/etc/passwd"}, 400, "MODEL_PATH"),
    ({"model_name": "x.gguf", "model_path": "/etc"}, 400, "MODEL_PATH"),
    ({"model_name": "escape.gguf"}, 400, "MODEL_PATH"),  # symlink to a file outside
    ({"model_name": "notes.gguf"}, 400, "not a GGUF"),
    ({"model_name": "truncated.gguf"}, 422, "could not load"),
    ({"model_name": "missing.gguf"}, 404, "not found"),
    ({}, 400, "model_name"),
    ({"model_name": 3}, 400, "model_name"),
])
def test_load_model_refusals_keep_current_model(server, body, status, says):
    r = post(server, "/load-model", body)
    assert r.status_code == status, r.text
    assert says in r.json()["error"]
    health = requests.get(server.url + "/health", timeout=10).json()
    assert health["model_loaded"] and health["model"] == DEFAULT_MODEL
    assert post(server, "/generate", {"prompt": "Estudiante: Hola.\nPaciente:", "max_length": 3}).status_code == 200


def test_load_model_success_and_back(server, model_dir, cases):
    r = post(server, "/load-model", {"model_name": "alt-model.gguf", "model_path": str(model_dir / "persona")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "success" and body["model_name"] == "persona/alt-model.gguf"
    assert isinstance(body["message"], str)
    reply = post(server, "/generate", {"prompt": render_case_prompt(cases[0]), "max_length": 20}).json()
    assert reply["metadata"]["modelo"] == "persona/alt-model.gguf"
    r = post(server, "/load-model", {"model_name": DEFAULT_MODEL})
    assert r.status_code == 200 and r.json()["model_name"] == DEFAULT_MODEL
    assert requests.get(server.url + "/health", timeout=10).json()["model"] == DEFAULT_MODEL
