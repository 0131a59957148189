"""Schemathesis against the OpenAPI document served by a real engine: a bounded number of
generated requests per operation (valid and invalid ones), no 5xx, every response as documented,
every request the schema rejects refused with a 4xx, and the engine healthy afterwards.

The engine under test has a small context (N_CTX=256) so that any valid request generates at most
a couple of hundred tokens and most random `max_length`s are a quick 400, and no response cache so
that every valid request really generates. Its MODEL_PATH holds only the default model: every
surface switches models on request (`/load-model`, and a `model` field naming another GGUF), so a
folder with one model keeps random requests from loading others, while the refusal paths (unknown
names, paths outside MODEL_PATH) are still exercised.

FUZZ_MAX_EXAMPLES (default 20) and FUZZ_SEED (default fixed, for a reproducible CI run) tune it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings

from engine.openapi import openapi_document
from tests.conftest import DEFAULT_MODEL, link_or_copy
from tests.server_process import Server, start_server, stop_server

MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "20"))
SEED = int(os.environ.get("FUZZ_SEED", "20261125"))

CONFIG = {
    "seed": SEED,
    "generation": {"max-examples": MAX_EXAMPLES},
    "phases": {
        # The coverage phase walks every field's boundaries; its valid combinations would each
        # generate (hundreds per operation), so it sends only the invalid ones, and valid
        # requests come from the fuzzing phase, bounded by max-examples.
        "coverage": {"generation": {"mode": "negative"}},
        # The stateful phase needs links between operations, which this API does not have.
        "stateful": {"enabled": False},
    },
    "checks": {
        # A request valid by the schema may still be refused for reasons a schema cannot say: a
        # prompt that does not fit N_CTX with max_length new tokens, an unknown model name, a
        # chat template that refuses the conversation. Those are 4xx, and the other checks hold.
        "positive_data_acceptance": {"enabled": False},
    },
    "request-timeout": 60,
}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, default_model_file: Path) -> Server:
    models = tmp_path_factory.mktemp("fuzz-models")
    link_or_copy(default_model_file, models / DEFAULT_MODEL)
    log_path = tmp_path_factory.mktemp("fuzz-server") / "server.log"
    srv = start_server({"MODEL_PATH": str(models), "MODEL": DEFAULT_MODEL, "N_CTX": "256",
                        "RESPONSE_CACHE_SIZE": "0", "LOG_LEVEL": "WARNING",
                        # One thread: with two, any other busy process on a small CI machine slows
                        # llama.cpp's decoding up to tenfold (spinning barriers); speed is not tested here.
                        "N_THREADS": "1", "N_THREADS_BATCH": "1"}, log_path)
    yield srv
    stop_server(srv)


# Built in-process, so that pytest can collect one test per operation before any server runs
# (schemathesis' lazy `from_fixture` loader breaks on pytest 9); the last test checks that the
# running engine serves this very document.
schema = schemathesis.openapi.from_dict(openapi_document(), config=schemathesis.Config.from_dict(CONFIG))


# Requests that leave their length unset generate until a stop or the context is full (Ollama's
# num_predict -1, OpenAI chat's max_tokens); a small cap keeps each of those to a fraction of a
# second. Explicit lengths stay as generated: large ones are the context-overflow 400.
LENGTH_FIELDS = {"/generate": "max_length", "/api/generate": "num_predict", "/api/chat": "num_predict",
                 "/v1/completions": "max_tokens", "/v1/chat/completions": "max_tokens"}
LENGTH_CAP = 16


def cap_unset_length(case: schemathesis.Case) -> None:
    """Give a request without a length the small cap (schemathesis re-judges the changed body)."""
    name = LENGTH_FIELDS.get(case.operation.path)
    if name is None or not isinstance(case.body, dict):
        return
    if name == "num_predict":  # inside Ollama's `options`, where -1 and -2 also mean "no limit"
        options = case.body.get("options")
        if not options:
            case.body["options"] = {name: LENGTH_CAP}
        elif isinstance(options, dict) and options.get(name) in (None, -1, -2):
            options[name] = LENGTH_CAP
    elif case.body.get(name) is None and case.body.get("max_completion_tokens") is None:
        case.body[name] = LENGTH_CAP


@schema.parametrize()
# No deadline: a valid request really generates. No example database: nothing written to the repo.
# Health checks off: schemas with patterns and anyOf make Hypothesis filter many draws, which is fine.
@settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_fuzz(case: schemathesis.Case, fuzz_server: Server):
    """One operation: its generated requests must get documented answers, never a 5xx."""
    cap_unset_length(case)
    case.call_and_validate(base_url=fuzz_server.url)


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
