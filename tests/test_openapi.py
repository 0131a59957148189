"""The OpenAPI document against the app: same routes and methods, valid OpenAPI 3.0, and real
responses of a running engine that match the documented schemas (requests too)."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest
import requests
from openapi_spec_validator import validate as validate_openapi

from engine.app import create_app
from engine.openapi import openapi_document
from engine.settings import Settings

# Flask adds HEAD to every GET and OPTIONS to every rule by itself; they are not API operations.
IMPLICIT_METHODS = {"HEAD", "OPTIONS"}
MODEL = "gemma-3-270m-q4_k_m.gguf"


@pytest.fixture(scope="module")
def document() -> dict:
    return openapi_document()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    # No model is loaded: the URL map and /openapi.json do not need one.
    return create_app(Settings.load(env={"MODEL_PATH": str(tmp_path_factory.mktemp("no-models"))}))


def _app_operations(app) -> set[tuple[str, str]]:
    ops = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)  # Flask's <int:x> is OpenAPI's {x}
        ops |= {(path, m.lower()) for m in rule.methods - IMPLICIT_METHODS}
    return ops


def _documented_operations(document: dict) -> set[tuple[str, str]]:
    http = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
    return {(path, m) for path, item in document["paths"].items() for m in item if m in http}


def test_every_route_is_documented_and_nothing_else(app, document):
    in_app, in_doc = _app_operations(app), _documented_operations(document)
    assert not in_app - in_doc, f"routes missing from the OpenAPI document: {sorted(in_app - in_doc)}"
    assert not in_doc - in_app, f"documented operations the app does not have: {sorted(in_doc - in_app)}"


def test_document_is_valid_openapi(document):
    validate_openapi(document)
    assert document["openapi"].startswith("3.0.")


def test_served_document_is_the_document(app, document):
    response = app.test_client().get("/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.get_json() == json.loads(json.dumps(document))


def test_health_and_document_need_no_key_everything_else_may(document):
    open_routes = {path for path, item in document["paths"].items()
                   if any(op.get("security") == [] for op in item.values())}
    assert open_routes == {"/health", "/openapi.json"}
    for scheme in document["components"]["securitySchemes"].values():
        assert scheme["type"] in ("http", "apiKey")


# -- real requests, checked against the document -------------------------------------------------
def json_schema(document: dict, schema: Any) -> Any:
    """An OpenAPI 3.0 schema as plain JSON Schema (draft 4): `$ref`s inlined, `nullable` as a null type."""
    if isinstance(schema, list):
        return [json_schema(document, s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/components/schemas/")
        return json_schema(document, document["components"]["schemas"][name])
    out = {k: json_schema(document, v) for k, v in schema.items() if k not in ("nullable", "example")}
    if schema.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"]
            if "enum" in out and None not in out["enum"]:
                out["enum"] = [*out["enum"], None]
        else:
            out = {"anyOf": [out, {"type": "null"}]}
    return out


def operation(document: dict, path: str, method: str) -> dict:
    return document["paths"][path][method]


def response_schema(document: dict, path: str, method: str, status: int) -> dict:
    responses = operation(document, path, method)["responses"]
    assert str(status) in responses, f"{method.upper()} {path} answered {status}, which is not documented"
    return json_schema(document, responses[str(status)]["content"]["application/json"]["schema"])


def check(instance: Any, schema: dict) -> None:
    jsonschema.Draft4Validator(schema).validate(instance)


QUICK = {"temperature": 0, "seed": 7}
CHAT = [{"role": "user", "content": "Hola, ¿cómo estás?"}]
PATIENT = "ENTREVISTA:\nEstudiante: Hola, ¿qué te trae por acá?\nPaciente:"

# (method, path, body, status): replies of every route, successes and the errors of each shape.
REQUESTS = [
    ("get", "/health", None, 200),
    ("get", "/models", None, 200),
    ("get", "/openapi.json", None, 200),
    ("post", "/generate", {"prompt": PATIENT, "max_length": 8, **QUICK}, 200),
    ("post", "/generate", {"prompt": PATIENT, "max_length": 8, "stop": [], "top_k": 0, "min_p": 0.1,
                           "repeat_penalty": 1.0, "top_p": 1, **QUICK}, 200),
    ("post", "/generate", {"prompt": "   "}, 400),
    ("post", "/generate", {"prompt": PATIENT, "max_length": 0}, 400),
    ("post", "/load-model", {"model_name": "no-such-model.gguf"}, 404),
    ("post", "/load-model", {"model_name": "../elsewhere.gguf"}, 400),
    ("post", "/load-model", {"model_name": MODEL, "lora_scale": 11}, 400),
    ("post", "/load-model", {"model_name": MODEL, "lora": "no-such-adapter.gguf"}, 404),
    ("get", "/api/tags", None, 200),
    ("get", "/api/version", None, 200),
    ("post", "/api/show", {"model": "gemma-3-270m-q4_k_m"}, 200),
    ("post", "/api/show", {"model": "no-such-model"}, 404),
    ("post", "/api/generate", {"model": "gemma-3-270m-q4_k_m", "prompt": PATIENT, "stream": False,
                               "options": {"num_predict": 8, **QUICK, "stop": ["\n"]}}, 200),
    ("post", "/api/generate", {"model": "gemma-3-270m-q4_k_m", "prompt": "", "stream": False}, 200),
    ("post", "/api/generate", {"model": "no-such-model", "prompt": "x", "stream": False}, 404),
    ("post", "/api/generate", {"model": "gemma-3-270m-q4_k_m", "prompt": "x",
                               "format": {"type": "integer", "minimum": 1}}, 400),
    ("post", "/api/chat", {"model": "gemma-3-270m-q4_k_m", "messages": CHAT, "stream": False,
                           "options": {"num_predict": 8, **QUICK}}, 200),
    ("get", "/v1/models", None, 200),
    ("post", "/v1/completions", {"model": MODEL, "prompt": "Había una vez", "max_tokens": 8, **QUICK}, 200),
    ("post", "/v1/completions", {"model": MODEL, "prompt": "x", "n": 2}, 400),
    ("post", "/v1/completions", {"model": "no-such-model", "prompt": "x"}, 404),
    ("post", "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 8, **QUICK}, 200),
    ("post", "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "logprobs": True}, 400),
    ("post", "/api/embed", {"model": "gemma-3-270m-q4_k_m", "input": ["Hola", "Adiós"]}, 200),
    ("post", "/api/embed", {"model": "gemma-3-270m-q4_k_m", "input": ""}, 200),
    ("post", "/api/embed", {"model": "gemma-3-270m-q4_k_m", "input": [""]}, 400),
    ("post", "/api/embeddings", {"model": "gemma-3-270m-q4_k_m", "prompt": "Hola"}, 200),
    ("post", "/v1/embeddings", {"model": MODEL, "input": "Hola", "encoding_format": "base64"}, 200),
    ("post", "/v1/embeddings", {"model": MODEL, "input": [[2, 3], [4]], "dimensions": 8}, 200),
    ("post", "/v1/embeddings", {"model": MODEL, "input": []}, 400),
    ("post", "/v1/embeddings", {"model": "no-such-model", "input": "x"}, 404),
    # Faults found by fuzzing and probing, now fixed.
    ("post", "/load-model", {"model_name": "a\u0000b.gguf"}, 400),
    ("post", "/api/show", {"model": "notes"}, 400),
]


def _values(request) -> tuple:
    return request.values if hasattr(request, "values") else request


def _id(request) -> str:
    method, path, _, status = _values(request)
    return f"{method.upper()} {path} {status}"


@pytest.mark.parametrize("method,path,body,status", REQUESTS, ids=[_id(r) for r in REQUESTS])
def test_responses_match_the_document(server, document, method, path, body, status):
    response = requests.request(method, server.url + path, json=body, timeout=60)
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    check(response.json(), response_schema(document, path, method, status))


ACCEPTED = [r for r in map(_values, REQUESTS) if r[2] is not None and r[3] == 200]


@pytest.mark.parametrize("method,path,body,status", ACCEPTED, ids=[_id(r) for r in ACCEPTED])
def test_accepted_requests_match_the_document(document, method, path, body, status):
    """The schema is not narrower than the handler: bodies the engine accepts validate."""
    schema = operation(document, path, method)["requestBody"]["content"]["application/json"]["schema"]
    check(body, json_schema(document, schema))


def test_streamed_reply_matches_the_document(server, document):
    """The last server-sent event of a streaming /generate is the documented reply."""
    body = {"prompt": PATIENT, "max_length": 8, "stream": True, **QUICK}
    with requests.post(server.url + "/generate", json=body, stream=True, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: "):]) for line in response.iter_lines(decode_unicode=True)
                  if line.startswith("data: ")]
    assert all(set(e) == {"text"} for e in events[:-1])
    check(events[-1], response_schema(document, "/generate", "post", 200))


def test_metrics_is_prometheus_text(server, document):
    response = requests.get(server.url + "/metrics", timeout=10)
    assert response.status_code == 200
    documented = operation(document, "/metrics", "get")["responses"]["200"]["content"]
    assert response.headers["Content-Type"].split(";")[0] in documented
    assert "# TYPE " in response.text
