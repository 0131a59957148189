"""Request bodies are declared once (engine/api/bodies.py): the handlers' validation and the
OpenAPI document both come from the declaration. A range changed there changes both; and for
every field of every body, the values the handler accepts are exactly those the schema allows."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jsonschema
import pytest

from engine.api import bodies
from engine.api.fields import Body, Field, Integer, Number, Scales, StringList
from engine.errors import BadRequest
from engine.model_files import ModelSpec
from engine.openapi import openapi_document
from tests.test_model_manager import Fakes
from tests.test_openapi import json_schema

PATIENT = "Estudiante: Hola, ¿cómo estás?\nPaciente:"


@pytest.fixture
def fakes(tmp_path):
    f = Fakes(tmp_path)
    f.manager.load(ModelSpec(f.dir / "a.gguf"))
    yield f
    f.manager.close()


def served(f: Fakes, body: str, field: str) -> dict:
    """A request field's schema in the /openapi.json that a new app on `f` serves."""
    document = f.app().test_client().get("/openapi.json").get_json()
    schemas = document["components"]["schemas"]
    return schemas[body]["properties"][field]


def post(f: Fakes, path: str, body: dict):
    return f.app().test_client().post(path, json=body)


def test_a_range_changed_in_the_declaration_changes_validation_and_the_served_schema(fakes, monkeypatch):
    """Narrowed: a request accepted before is refused, naming the new limit, and the document says
    the new maximum. Widened: a request refused before is accepted, and the document says so."""
    body = {"prompt": PATIENT, "max_length": 100}
    assert post(fakes, "/generate", body).status_code == 200
    assert served(fakes, "GenerateRequest", "max_length")["maximum"] == bodies.MAX_NEW_TOKENS

    narrowed = dataclasses.replace(bodies.GENERATE.fields["max_length"], maximum=50)
    monkeypatch.setitem(bodies.GENERATE.fields, "max_length", narrowed)
    refused = post(fakes, "/generate", body)
    assert refused.status_code == 400
    assert refused.get_json()["error"] == "'max_length' must be >= 1 and <= 50, got 100"
    assert served(fakes, "GenerateRequest", "max_length")["maximum"] == 50

    hot = {"prompt": PATIENT, "max_length": 4, "temperature": 3}
    assert post(fakes, "/generate", hot).status_code == 400
    widened = dataclasses.replace(bodies.GENERATE.fields["temperature"], maximum=5)
    monkeypatch.setitem(bodies.GENERATE.fields, "temperature", widened)
    assert post(fakes, "/generate", hot).status_code == 200
    assert served(fakes, "GenerateRequest", "temperature")["maximum"] == 5


def test_a_nested_declaration_changes_both_too(fakes, monkeypatch):
    """Ollama's `options` are a table of their own, read and documented the same way."""
    body = {"model": "a", "prompt": "Hola", "stream": False, "options": {"num_predict": 4, "top_k": 50}}
    assert post(fakes, "/api/generate", body).status_code == 200
    capped = dataclasses.replace(bodies.OLLAMA_OPTIONS.fields["top_k"], maximum=20)
    monkeypatch.setitem(bodies.OLLAMA_OPTIONS.fields, "top_k", capped)
    refused = post(fakes, "/api/generate", body)
    assert refused.status_code == 400 and "'top_k' must be >= 0 and <= 20, got 50" in refused.get_json()["error"]
    assert served(fakes, "OllamaOptions", "top_k")["maximum"] == 20


def test_a_changed_default_reaches_the_request_and_the_document(fakes, monkeypatch):
    """The default a handler uses is the declared one: /generate's metadata reports the
    temperature it sampled with."""
    monkeypatch.setitem(bodies.GENERATE.fields, "temperature",
                        dataclasses.replace(bodies.GENERATE.fields["temperature"], default=0.25))
    reply = post(fakes, "/generate", {"prompt": PATIENT, "max_length": 4})
    assert reply.status_code == 200 and reply.get_json()["metadata"]["temperature"] == 0.25
    assert served(fakes, "GenerateRequest", "temperature")["default"] == 0.25


# -- every field: the handler accepts exactly what the schema allows ------------------------------
# The smallest body each endpoint accepts; each probe sets one field of it.
MINIMAL = {
    "GenerateRequest": {"prompt": "Hola"},
    "LoadModelRequest": {"model_name": "a.gguf"},
    "OllamaOptions": {},
    "OllamaGenerateRequest": {"model": "a"},
    "OllamaChatRequest": {"model": "a", "messages": [{"role": "user", "content": "Hola"}]},
    "OllamaShowRequest": {"model": "a"},
    "OllamaPullRequest": {"model": "hf.co/org/repo"},
    "OllamaDeleteRequest": {"model": "a"},
    "OllamaCopyRequest": {"source": "a", "destination": "b"},
    "OllamaCreateRequest": {"model": "x"},
    "CompletionRequest": {"model": "a", "prompt": "Hola"},
    "ChatCompletionRequest": {"model": "a", "messages": [{"role": "user", "content": "Hola"}]},
    "OllamaEmbedRequest": {"model": "a", "input": "Hola"},
    "OllamaEmbeddingsRequest": {"model": "a", "prompt": "Hola"},
    "EmbeddingRequest": {"model": "a", "input": "Hola"},
}

# Values of every JSON type, empty and not. No integral floats (150.0): the handlers take them for
# integers as JSON means them, OpenAPI 3.0's draft-4 validators do not.
GENERIC = [None, True, False, 0, 1, -1, 2, 0.5, 2**40, -(2**40), "", " ", "x", "5m", [], ["x"], [""], ["x", 1],
           {}, {"type": "text"}, {"role": "user"}, [{"role": "user", "content": "Hola"}], [{"role": "nobody"}]]


def probes(field: Field) -> list[Any]:
    """GENERIC, and the values either side of each bound the field declares."""
    values = list(GENERIC)
    low, high = getattr(field, "minimum", None), getattr(field, "maximum", None)
    step = 1 if isinstance(field, Integer) else 0.25
    for bound, outward in ((low, -step), (high, step)):
        if bound is not None:
            values += [bound, bound + outward, bound - outward]
    if isinstance(field, Scales):
        values += [[low, high], [high + 1], [low - 1, high]]
    if isinstance(field, StringList):
        values += [["s"] * field.max_items, ["s"] * (field.max_items + 1)]
    return [v for v in values if not (isinstance(v, float) and (v.is_integer() or not math.isfinite(v)))]


def accepted(body: Body, value: dict) -> bool:
    try:
        body.parse(value)
    except BadRequest:
        return False
    return True


CASES = [(body, name) for body in bodies.BODIES for name in body.fields]


@pytest.mark.parametrize("body,name", CASES, ids=[f"{b.name}.{n}" for b, n in CASES])
def test_the_handler_accepts_exactly_what_the_schema_allows(body: Body, name: str):
    document = openapi_document()
    validator = jsonschema.Draft4Validator(json_schema(document, document["components"]["schemas"][body.name]))
    minimal = MINIMAL[body.name]
    assert accepted(body, minimal) and validator.is_valid(minimal)
    disagreements = []
    for value in probes(body.fields[name]):
        request = {**minimal, name: value}
        if accepted(body, request) != validator.is_valid(request):
            disagreements.append((value, "handler accepts" if accepted(body, request) else "schema allows"))
    assert not disagreements, f"{body.name}.{name}: {disagreements}"


def test_every_documented_request_body_is_declared():
    """No request schema in the document is written by hand: each is a declared body."""
    document = openapi_document()
    named = {body.name for body in bodies.BODIES}
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if "requestBody" in operation:
                ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                assert ref.removeprefix("#/components/schemas/") in named, f"{method.upper()} {path}"
    assert set(MINIMAL) == named
