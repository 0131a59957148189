"""Schemathesis against the OpenAPI document served by a real engine, in positive and negative
modes: a bounded number of generated requests per operation, no 5xx, every response as
documented, every request the schema rejects refused with a 4xx, every request it accepts answered
with a 2xx, and the engine healthy afterwards.

A valid request may still be refused for the few reasons a schema cannot state, each said in the
field's description: a prompt that does not fit N_CTX with the new tokens asked for, a chat
template that refuses the conversation (roles that do not alternate), stop strings over the
character total. Those are 400s whose message says so (EXPLAINED_REFUSALS), and only those are
excused from the acceptance check. The names of models and files are narrowed in the fuzzed copy
of the document to what this engine's MODEL_PATH holds (fuzz_document), so an unknown name (404)
is never a valid request here.

The engine under test has a small context (N_CTX=256), so that most random lengths are a quick
400, valid requests are capped to a few new tokens (cap_length), and no response cache, so that
every valid request really generates. Its MODEL_PATH holds only the default model: every surface
switches models on request (`/load-model`, and a `model` field naming another GGUF), so a folder
with one model keeps random requests from loading others, while the refusal paths (unknown names,
paths outside MODEL_PATH) are still exercised by the invalid requests, drawn from the document as
served.

FUZZ_MAX_EXAMPLES (default 20 per operation and mode), FUZZ_SEED (default fixed, for a reproducible
CI run) and FUZZ_COVERAGE_POSITIVE (see below) tune it.
"""

from __future__ import annotations

import copy
import os
from collections import Counter
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance

from engine.openapi import openapi_document
from tests.conftest import DEFAULT_MODEL, link_or_copy
from tests.server_process import Server, start_server, stop_server

MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "20"))
SEED = int(os.environ.get("FUZZ_SEED", "20261125"))
# The coverage phase walks every field's boundaries and their combinations: its valid requests each
# generate (about 570 of them, 3 minutes on 2 busy cores), so by default it sends only invalid
# ones; the values at each declared boundary are checked in-process by tests/test_request_fields.py.
# FUZZ_COVERAGE_POSITIVE=1 sends the valid ones too.
COVERAGE_POSITIVE = os.environ.get("FUZZ_COVERAGE_POSITIVE", "") not in ("", "0")



def config(mode: str) -> schemathesis.Config:
    """One generation mode in every phase (examples, coverage, fuzzing)."""
    return schemathesis.Config.from_dict({
        "seed": SEED,
        "generation": {"max-examples": MAX_EXAMPLES, "mode": mode},
        "phases": {
            "coverage": {"enabled": mode == "negative" or COVERAGE_POSITIVE},
            # The stateful phase needs links between operations, which this API does not have.
            "stateful": {"enabled": False},
        },
        "checks": {
            # A valid request must succeed: 2xx only (schemathesis' default also lets 401, 403, 404,
            # 409 and 429 pass). The refusals a schema cannot express are excused one by one in
            # test_valid_requests_are_accepted.
            "positive_data_acceptance": {"expected-statuses": ["2xx"]},
        },
        "request-timeout": 60,
    })


# (status, words of the error message): valid requests a schema cannot tell from refused ones;
# each is said in the description of the field concerned.
EXPLAINED_REFUSALS = (
    (400, "context holds"),  # the prompt plus the new tokens asked for exceed N_CTX (scheduler.check_fits)
    (400, "chat template refused"),  # e.g. Gemma's template: roles must alternate user/assistant
    (400, "are allowed in all"),  # stop strings (with a chat template's own): more than MAX_STOP_CHARS together
    # structured output (format, json_schema, response_format): a schema the meta-schema refuses, or one
    # that uses what the grammar cannot enforce (engine/grammar.py)
    (400, "is not a valid JSON schema"),
    (400, "the grammar cannot enforce it"),
    (400, "cannot be turned into a grammar"),
    (400, "could not parse the grammar"),
    (400, "vocabulary holds"),  # /v1/embeddings: a token id beyond the model's vocabulary
    (400, "embedding size"),  # `dimensions` above the model's embedding size
)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, default_model_file: Path) -> Server:
    models = tmp_path_factory.mktemp("fuzz-models")
    link_or_copy(default_model_file, models / DEFAULT_MODEL)
    log_path = tmp_path_factory.mktemp("fuzz-server") / "server.log"
    srv = start_server({"MODEL_PATH": str(models), "MODEL": DEFAULT_MODEL, "N_CTX": str(N_CTX),
                        "RESPONSE_CACHE_SIZE": "0", "LOG_LEVEL": "WARNING",
                        # One thread: with two, any other busy process on a small CI machine slows
                        # llama.cpp's decoding up to tenfold (spinning barriers); speed is not tested here.
                        "N_THREADS": "1", "N_THREADS_BATCH": "1"}, log_path)
    yield srv
    stop_server(srv)


# The names this engine's MODEL_PATH answers to (it holds the default model only).
SERVED_MODELS = [DEFAULT_MODEL, DEFAULT_MODEL.removesuffix(".gguf"), DEFAULT_MODEL.removesuffix(".gguf") + ":latest"]
MODEL_FIELDS = {"GenerateRequest": ("model",), "OllamaGenerateRequest": ("model",), "OllamaChatRequest": ("model",),
                "OllamaShowRequest": ("model", "name"), "CompletionRequest": ("model",),
                "ChatCompletionRequest": ("model",), "OllamaEmbedRequest": ("model",),
                "OllamaEmbeddingsRequest": ("model",), "EmbeddingRequest": ("model",)}


def fuzz_document() -> dict:
    """The served document with names narrowed to this engine's files: a `model` is one of
    SERVED_MODELS, /load-model loads the default model (from MODEL_PATH or a folder spelled `.`)
    without adapters (so one scale at most), and a client deadline leaves time to generate (a
    shorter one is the documented 503 at once). Every other field is fuzzed as documented."""
    document = copy.deepcopy(openapi_document())
    schemas = document["components"]["schemas"]

    def narrow(body: str, field: str, **schema) -> None:
        schemas[body]["properties"][field] = {**schemas[body]["properties"][field], **schema}

    for body, fields in MODEL_FIELDS.items():
        for field in fields:
            narrow(body, field, enum=SERVED_MODELS + ([None] if schemas[body]["properties"][field].get("nullable")
                                                      else []))
    narrow("LoadModelRequest", "model_name", enum=[DEFAULT_MODEL])
    narrow("LoadModelRequest", "model_path", enum=[".", DEFAULT_MODEL, None])
    schemas["LoadModelRequest"]["properties"]["lora"] = {"type": "array", "items": {}, "maxItems": 0, "nullable": True}
    narrow("LoadModelRequest", "lora_scale", anyOf=[{"type": "number", "minimum": 0, "maximum": 10},
                                                    {"type": "array", "maxItems": 1,
                                                     "items": {"type": "number", "minimum": 0, "maximum": 10}}])
    for body in ("GenerateRequest", "OllamaGenerateRequest", "OllamaChatRequest", "CompletionRequest",
                 "ChatCompletionRequest", "OllamaEmbedRequest", "OllamaEmbeddingsRequest", "EmbeddingRequest"):
        narrow(body, "timeout_s", minimum=60)
    model_id = document["paths"]["/v1/models/{model_id}"]["get"]["parameters"][0]
    model_id["schema"] = {**model_id["schema"], "enum": SERVED_MODELS}
    return document


# Built in-process, so that pytest can collect one test per operation before any server runs
# (schemathesis' lazy `from_fixture` loader breaks on pytest 9); the last test checks that the
# running engine serves this very document. Valid requests come from the narrowed copy; invalid
# ones from the document as served (narrowed, a real model name would pass for an invalid one).
# Model management is left out of the valid requests: a valid /api/pull reaches the Hugging Face hub
# (tests/test_pull.py runs it against a local stand-in), and valid /api/create, /api/copy and
# /api/delete requests change MODEL_PATH (tests/test_model_admin.py). Their invalid requests are fuzzed.
MANAGEMENT = r"^/api/(pull|create|copy|delete)$"
positive = schemathesis.openapi.from_dict(fuzz_document(), config=config("positive")).exclude(path_regex=MANAGEMENT)
negative = schemathesis.openapi.from_dict(openapi_document(), config=config("negative"))
SENT: Counter = Counter()  # (phase, mode, outcome) of every request sent, for the last test


# Requests that leave their length unset generate until a stop or the context is full (Ollama's
# num_predict -1, OpenAI chat's max_tokens), and any length that fits the context may generate
# hundreds of tokens; a small cap keeps each valid request to a fraction of a second. Lengths that
# cannot fit N_CTX stay as generated: they are the context-overflow 400.
N_CTX = 256
LENGTH_FIELDS = {"/generate": ("max_length",), "/api/generate": ("num_predict",), "/api/chat": ("num_predict",),
                 "/v1/completions": ("max_tokens", "max_completion_tokens"),
                 "/v1/chat/completions": ("max_tokens", "max_completion_tokens")}
LENGTH_CAP = 16


def cap_length(case: schemathesis.Case) -> None:
    """Give a request without a length, or with one between LENGTH_CAP and N_CTX, the small cap
    (schemathesis re-judges the changed body: a valid request stays valid, an invalid one invalid)."""
    names = LENGTH_FIELDS.get(case.operation.path)
    if names is None or not isinstance(case.body, dict):
        return
    holder = case.body
    if names == ("num_predict",):  # inside Ollama's `options`, where -1 and -2 also mean "no limit"
        if not holder.get("options"):
            holder["options"] = {}
        holder = holder["options"]
        if not isinstance(holder, dict):
            return
        if holder.get("num_predict") in (-1, -2):
            holder["num_predict"] = None
    given = [n for n in names if holder.get(n) is not None]
    if not given:
        holder[names[0]] = LENGTH_CAP
    for name in given:
        value = holder[name]
        if isinstance(value, int) and not isinstance(value, bool) and LENGTH_CAP < value < N_CTX:
            holder[name] = LENGTH_CAP


# No deadline: a valid request really generates. No example database: nothing written to the repo.
# Health checks off: schemas with patterns and anyOf make Hypothesis filter many draws, which is fine.
HYPOTHESIS = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))


@positive.parametrize()
@HYPOTHESIS
def test_valid_requests_are_accepted(case: schemathesis.Case, fuzz_server: Server):
    """One operation's valid requests: a documented 2xx, unless refused for a reason in
    EXPLAINED_REFUSALS (a documented 400 then); never a 5xx."""
    cap_length(case)
    response = case.call(base_url=fuzz_server.url)
    explained = explained_refusal(response)
    count(case, "explained" if explained else f"{response.status_code // 100}xx")
    case.validate_response(response, excluded_checks=[positive_data_acceptance] if explained else None)


@negative.parametrize()
@HYPOTHESIS
def test_invalid_requests_are_refused(case: schemathesis.Case, fuzz_server: Server):
    """One operation's invalid requests: a documented 4xx, never a 5xx."""
    cap_length(case)
    response = case.call(base_url=fuzz_server.url)
    count(case, f"{response.status_code // 100}xx")
    case.validate_response(response)


def count(case: schemathesis.Case, outcome: str) -> None:
    meta = case.meta
    phase, mode = (meta.phase.name.value, meta.generation.mode.value) if meta is not None else ("explicit", "?")
    SENT[(phase, mode, outcome)] += 1


def explained_refusal(response: requests.Response) -> bool:
    """A 400 whose message (either error shape) gives one of EXPLAINED_REFUSALS' reasons."""
    try:
        error = response.json().get("error")
    except ValueError:
        return False
    message = error.get("message", "") if isinstance(error, dict) else str(error)
    return any(response.status_code == status and words in message for status, words in EXPLAINED_REFUSALS)


def test_engine_healthy_after_fuzzing(fuzz_server: Server):
    """Still up, ready and answering normally; no unhandled error logged; the document it serves
    is the one fuzzed."""
    assert fuzz_server.process.poll() is None, fuzz_server.log()
    health = requests.get(fuzz_server.url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["ready"], health.text
    reply = requests.post(fuzz_server.url + "/generate", timeout=60, json={
        "prompt": "ENTREVISTA:\nEstudiante: Hola, ¿cómo dormiste anoche?\nPaciente:",
        "max_length": 24, "temperature": 0})
    assert reply.status_code == 200, reply.text
    assert reply.json()["texto"].strip()
    assert "Traceback" not in fuzz_server.log()
    served = requests.get(fuzz_server.url + "/openapi.json", timeout=10)
    assert served.status_code == 200 and served.json() == openapi_document()


def test_both_modes_ran():
    """The fuzzing was not vacuous: valid requests were sent and accepted in each phase, invalid
    ones refused (counts by phase, mode and outcome in the test's output)."""
    print("\nrequests sent (phase, mode, outcome):", dict(sorted(SENT.items())))
    for phase in ("coverage", "fuzzing"):
        if phase == "fuzzing" or COVERAGE_POSITIVE:
            assert SENT[(phase, "positive", "2xx")] > 0, SENT
        assert SENT[(phase, "negative", "4xx")] > 0, SENT
