"""Structured output (#20): Ollama's `format`, OpenAI's `response_format`, the simulator's
`json_schema`, held to a llama.cpp grammar per sequence inside the running batch.

On the real default model over real HTTP (and through the official Python clients): replies parse
and validate against their schema unless they end at the token limit, and then the reply says so;
50 generations at temperature 0.7 against three schemas (nested objects, arrays, enums), sent
concurrently so that constrained and free sequences share the batch, all validate. Schemas the
grammar cannot enforce are 400s naming the field, on every surface; a grammar llama.cpp refuses
fails its request only; no grammar sampler outlives its sequence; the response cache never
answers a constrained request with an unconstrained reply or the other way round.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Literal

import jsonschema
import pydantic
import pytest
import requests

from engine.errors import BadRequest
from engine.generation import ReplyText, SamplingParams, StopRules
from engine.grammar import live_grammars, structured_output
from tests.helpers import DEFAULT_MODEL, real_scheduler, server_fixture, submit
from tests.helpers import post as _post

MODEL = DEFAULT_MODEL.removesuffix(".gguf")

# -- the three schemas of "What it must show" 2 ---------------------------------------------------
NESTED = {  # nested objects
    "type": "object",
    "properties": {
        "student": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 30},
            "level": {"type": "string", "enum": ["inicial", "intermedio", "avanzado"]}},
            "required": ["name", "level"], "additionalProperties": False},
        "scores": {"type": "object", "properties": {
            "empathy": {"type": "integer"}, "open_questions": {"type": "integer"}},
            "required": ["empathy", "open_questions"], "additionalProperties": False},
        "summary": {"type": "string", "maxLength": 120},
    },
    "required": ["student", "scores", "summary"], "additionalProperties": False,
}
ARRAYS = {  # arrays of strings and of objects
    "type": "object",
    "properties": {
        "strengths": {"type": "array", "items": {"type": "string", "maxLength": 60}, "minItems": 1, "maxItems": 3},
        "improvements": {"type": "array", "maxItems": 3, "items": {
            "type": "object", "properties": {"area": {"enum": ["empatía", "preguntas", "encuadre", "cierre"]},
                                             "tip": {"type": "string", "maxLength": 80}},
            "required": ["area", "tip"]}},
    },
    "required": ["strengths", "improvements"],
}
ENUMS = {  # enums, a boolean and a nullable field
    "type": "object",
    "properties": {
        "risk": {"type": "string", "enum": ["bajo", "medio", "alto"]},
        "emotion": {"enum": ["tristeza", "ansiedad", "enojo", "calma"]},
        "revealed_history": {"type": "boolean"},
        "next_step": {"anyOf": [{"enum": ["explorar", "validar", "cerrar"]}, {"type": "null"}]},
    },
    "required": ["risk", "emotion", "revealed_history", "next_step"],
}
SCHEMAS = {"nested": NESTED, "arrays": ARRAYS, "enums": ENUMS}
FEEDBACK_PROMPT = ("Evaluación de una entrevista clínica de práctica.\n"
                   "Estudiante: ¿Cómo ha dormido esta semana?\nPaciente: Casi nada, me despierto a las cuatro.\n"
                   "Estudiante: Eso suena agotador. ¿Qué piensa cuando se despierta?\n"
                   "Paciente: En el trabajo, en todo lo que no hice.\n\n"
                   "Devuelve la evaluación del estudiante como JSON.\nJSON: ")


def _validates(text: str, schema: dict) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


def _validates_or_cut(reply: dict, schema: dict) -> None:
    """A /generate reply held to `schema`: valid JSON, or cut at max_length and saying so (greedy
    replies differ with the attention kernel; an array may run past the limit)."""
    if reply["metadata"].get("json_complete", True):
        _validates(reply["texto"], schema)
    else:
        assert reply["texto"].startswith(("{", "[")) and reply["metadata"].get("warning")


# -- bad schemas: a 400 naming the field, on every surface (fake runtime: no model needed) ---------
BAD_SCHEMAS = [  # (schema, words of the refusal)
    ({"type": "integer", "minimum": 0}, "'minimum'"),
    ({"type": "object", "properties": {"a": {"type": "number", "maximum": 5}}}, "properties/a"),
    ({"not": {"type": "string"}}, "'not'"),
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "'uniqueItems'"),
    ({"type": "strin"}, "is not a valid JSON schema"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}, "'b'"),
    ({"$ref": "https://example.com/schema.json"}, "only local ones"),
    ({"type": "string", "format": "email"}, "'email'"),
    ({"type": "string", "pattern": "[a-z]+"}, "^ at its start"),
    ({"allOf": [{"type": "object"}, {"required": ["a"]}]}, "several schemas"),
    ({"type": "string", "maxLength": 100000}, "above 1000"),
    ({"type": "string", "pattern": "^a{2,100000}$"}, "above 1000"),
    ({"if": {"type": "string"}, "then": {"maxLength": 3}}, "'if'"),
    ({"type": "object", "patternProperties": {"^a": {}}}, "'patternProperties'"),
    ({"anyOf": [{"type": "string"}], "properties": {"a": {}}}, "together with"),
]
SURFACES = [  # (path, body with the schema in it, how the error names the field)
    ("/api/generate", lambda s: {"model": "a", "prompt": "x", "stream": False, "format": s}, "format"),
    ("/api/chat", lambda s: {"model": "a", "messages": [{"role": "user", "content": "x"}], "format": s}, "format"),
    ("/v1/chat/completions", lambda s: {"model": "a", "messages": [{"role": "user", "content": "x"}],
                                        "response_format": {"type": "json_schema",
                                                            "json_schema": {"name": "r", "schema": s}}},
     "response_format.json_schema.schema"),
    ("/v1/completions", lambda s: {"model": "a", "prompt": "x", "response_format": {
        "type": "json_schema", "json_schema": {"name": "r", "schema": s, "strict": True}}},
     "response_format.json_schema.schema"),
    ("/generate", lambda s: {"prompt": "Paciente:", "json_schema": s}, "json_schema"),
]


def _error(response: requests.Response) -> tuple[str, str | None]:
    body = response.json()
    if isinstance(body.get("error"), dict):  # OpenAI's shape
        return body["error"]["message"], body["error"]["param"]
    return body["error"], None


@pytest.mark.parametrize("schema,words", BAD_SCHEMAS, ids=[w for _s, w in BAD_SCHEMAS])
@pytest.mark.parametrize("path,body,field", SURFACES, ids=[p for p, _b, _f in SURFACES])
def test_a_schema_the_grammar_cannot_enforce_is_a_400_naming_the_field(fake_server, path, body, field, schema, words):
    r = requests.post(fake_server.url + path, json=body(schema), timeout=30)
    assert r.status_code == 400, r.text
    message, param = _error(r)
    assert f"'{field}" in message and words in message, message
    if param is not None:
        assert param == field


BAD_FORMATS = [  # (path, body, field named, words)
    ("/api/generate", {"model": "a", "prompt": "x", "format": "yaml"}, "format", "\"json\" or a JSON schema"),
    ("/api/chat", {"model": "a", "messages": [{"role": "user", "content": "x"}], "format": ["json"]}, "format",
     "a list"),
    ("/generate", {"prompt": "Paciente:", "json_schema": "json"}, "json_schema", "a JSON schema (an object)"),
    ("/v1/chat/completions", {"model": "a", "messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "xml"}}, "response_format.type", "json_object"),
    ("/v1/chat/completions", {"model": "a", "messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_schema"}}, "response_format.json_schema", "'name'"),
    ("/v1/chat/completions", {"model": "a", "messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
     "response_format.json_schema.name", "letters"),
    ("/v1/completions", {"model": "a", "prompt": "x", "response_format": {
        "type": "json_schema", "json_schema": {"name": "r", "strict": "yes"}}},
     "response_format.json_schema.strict", "true or false"),
    ("/v1/completions", {"model": "a", "prompt": "x", "response_format": "json"}, "response_format", "json_object"),
]


@pytest.mark.parametrize("path,body,field,words", BAD_FORMATS, ids=[f"{p}-{f}" for p, _b, f, _w in BAD_FORMATS])
def test_a_malformed_format_field_is_a_400_naming_it(fake_server, path, body, field, words):
    r = requests.post(fake_server.url + path, json=body, timeout=30)
    assert r.status_code == 400, r.text
    message, param = _error(r)
    assert words in message, message
    assert (param or field) == field and f"'{field}" in message, message


class Patient(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=30)
    age: int | None = None
    mood: Literal["sad", "calm"]


class Visit(pydantic.BaseModel):  # bounded, so that a reply ends well before the token limit
    patient: Patient
    notes: list[Annotated[str, pydantic.StringConstraints(max_length=40)]] = pydantic.Field(max_length=3)


GOOD_SCHEMAS = [
    {}, {"type": "object"}, {"type": ["string", "null"], "maxLength": 5}, Visit.model_json_schema(),
    {"type": "object", "properties": {"when": {"type": "string", "format": "date"},
                                      "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
     "required": ["when", "code"], "unknownKeyword": 1},
    {"type": "array", "prefixItems": [{"type": "integer"}, {"const": "x"}], "items": False},
    {"allOf": [{"$ref": "#/$defs/a"}], "$defs": {"a": {"type": "object", "properties": {"b": {"type": "boolean"}}}}},
    {"$defs": {"node": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"},
                                                                  "maxItems": 2}}}}, "$ref": "#/$defs/node"},
]


@pytest.mark.parametrize("schema", GOOD_SCHEMAS, ids=range(len(GOOD_SCHEMAS)))
def test_schemas_the_grammar_enforces_become_a_grammar_llama_cpp_parses(schema):
    out = structured_output(schema, "format")
    assert "root ::=" in out.grammar and out.schema == schema
    assert structured_output("json", "format").schema is None


def test_a_grammar_llama_cpp_refuses_fails_its_request_only(default_model_file):
    """A grammar that reaches the scheduler and does not parse (the API checks it first, so only a
    caller below the API can send one) ends that request; the scheduler goes on serving."""
    eng = real_scheduler(default_model_file, n_parallel=2)
    try:
        bad = submit(eng, "Hola", SamplingParams(max_tokens=4, grammar="root ::= undefined-rule\n"))
        with pytest.raises(Exception) as refused:
            bad.wait()
        assert "grammar" in str(refused.value)
        good = submit(eng, "Hola", SamplingParams(max_tokens=4, temperature=0))
        assert good.wait().tokens >= 1 and not eng.failed
        assert live_grammars() == 0
    finally:
        eng.close()


def test_grammar_samplers_are_freed_with_their_sequences(default_model_file):
    """Finished, cut at the limit and cancelled constrained sequences all free their grammar; the
    output of each finished one parses."""
    grammar = structured_output(ENUMS, "format").grammar
    eng = real_scheduler(default_model_file, n_parallel=4)
    try:
        before = live_grammars()
        seqs = [submit(eng, FEEDBACK_PROMPT, SamplingParams(max_tokens=n, temperature=0.7, grammar=grammar),
                       ReplyText(StopRules())) for n in (200, 200, 3, 3, 200, 200)]
        seqs[-1].cancel()
        for seq in seqs[:-1]:
            r = seq.wait()
            if r.finish_reason == "length":
                assert r.tokens == 3
            else:
                _validates(r.text, ENUMS)
        with pytest.raises(Exception):
            seqs[-1].wait()
        assert live_grammars() == before
    finally:
        eng.close()


# -- the real model over HTTP ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """A real engine (response cache on) whose deadline leaves time for 50 replies on two busy cores:
    what is tested is what comes back, not how fast."""
    yield from server_fixture(model_dir, tmp_path_factory, REQUEST_TIMEOUT_S="1800")


def post(server, path: str, body: dict) -> requests.Response:
    """A request that must be answered 200 (the refusal's text otherwise)."""
    r = _post(server, path, body, timeout=1800)
    assert r.status_code == 200, r.text
    return r


def test_simulator_json_schema_50_generations_at_temperature_07_all_validate(server):
    """What it must show, 2: 50 replies against the three schemas at temperature 0.7, eight at a
    time beside free-text requests in the same batch. Each one that ended on its own parses and
    validates; one that met max_length says so (finish_reason, json_complete, warning)."""
    def constrained(i: int) -> tuple[str, dict]:
        name = list(SCHEMAS)[i % 3]
        body = {"prompt": FEEDBACK_PROMPT, "json_schema": SCHEMAS[name], "max_length": 400, "temperature": 0.7}
        return name, post(server, "/generate", body).json()

    def free(_i: int) -> dict:
        return post(server, "/generate", {"prompt": "Estudiante: ¿Cómo está?\nPaciente:", "temperature": 0.7,
                                          "max_length": 30}).json()

    with ThreadPoolExecutor(8) as pool:
        frees = [pool.submit(free, i) for i in range(6)]
        results = list(pool.map(constrained, range(50)))
    valid, cut = 0, 0
    for name, reply in results:
        meta = reply["metadata"]
        if meta["finish_reason"] == "length":
            cut += 1
            assert meta["json_complete"] is False and "incomplete" in meta["warning"]
        else:
            assert meta["json_complete"] is True and "warning" not in meta
            _validates(reply["texto"], SCHEMAS[name])
            valid += 1
    print(f"50 generations: {valid} validate, {cut} cut at max_length")
    assert valid + cut == 50 and valid >= 45, (valid, cut)
    for f in frees:  # the free-text requests in the same batch are not held to any grammar
        assert "texto" in f.result() and not f.result()["texto"].lstrip().startswith("{")


def test_simulator_json_cut_at_max_length_is_reported(server):
    reply = post(server, "/generate", {"prompt": FEEDBACK_PROMPT, "json_schema": NESTED, "max_length": 4,
                                       "temperature": 0}).json()
    meta = reply["metadata"]
    assert meta["finish_reason"] == "length" and meta["tokens"] == 4
    assert meta["json_complete"] is False and "incomplete" in meta["warning"]
    with pytest.raises(json.JSONDecodeError):
        json.loads(reply["texto"])


def test_simulator_stream_with_json_schema_adds_up_to_the_json(server):
    with requests.post(server.url + "/generate", json={"prompt": FEEDBACK_PROMPT, "json_schema": ENUMS,
                                                       "stream": True, "max_length": 200}, stream=True,
                       timeout=1800) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    final = events[-1]
    assert "".join(e["text"] for e in events[:-1]) == final["texto"]
    _validates(final["texto"], ENUMS)


def test_the_response_cache_keeps_constrained_and_free_replies_apart(server):
    """Deterministic requests are cached; the same prompt and settings with and without a schema
    (or with another schema) are different requests."""
    base = {"prompt": FEEDBACK_PROMPT, "temperature": 0, "max_length": 60}
    free = [post(server, "/generate", base).json() for _ in range(2)]
    assert free[1]["metadata"]["cached"] is True
    held = post(server, "/generate", {**base, "json_schema": ENUMS, "max_length": 200}).json()
    held_again = post(server, "/generate", {**base, "json_schema": ENUMS, "max_length": 200}).json()
    assert held["metadata"]["cached"] is False and held_again["metadata"]["cached"] is True
    _validates_or_cut(held, ENUMS)
    other = post(server, "/generate", {**base, "json_schema": ARRAYS, "max_length": 200}).json()
    assert other["metadata"]["cached"] is False
    _validates_or_cut(other, ARRAYS)
    again_free = post(server, "/generate", base).json()
    assert again_free["texto"] == free[0]["texto"]  # the free reply was not replaced by a JSON one
    # The same on Ollama's surface: format "json" and no format, same seed.
    ask = {"model": MODEL, "prompt": "Describe a patient.", "stream": False,
           "options": {"seed": 7, "num_predict": 40}}
    plain = post(server, "/api/generate", ask).json()["response"]
    as_json = post(server, "/api/generate", {**ask, "format": "json"}).json()
    assert as_json["response"].startswith("{") and as_json["response"] != plain
    assert as_json["done_reason"] == "length" or isinstance(json.loads(as_json["response"]), dict)
    assert post(server, "/api/generate", ask).json()["response"] == plain


def test_stop_strings_do_not_cut_json(server):
    """A client's stop strings would cut JSON short: with a format they do not apply."""
    body = {"model": MODEL, "stream": False, "format": ENUMS,
            "messages": [{"role": "user", "content": "Evalúa la entrevista como JSON."}],
            "options": {"temperature": 0.7, "num_predict": 200, "stop": [",", "\"", "}"]}}
    reply = post(server, "/api/chat", body).json()
    assert reply["done_reason"] == "stop", reply
    _validates(reply["message"]["content"], ENUMS)


# -- the official clients ----------------------------------------------------------------------------
def test_ollama_python_client_format_json_and_pydantic_schema(server):
    import ollama

    client = ollama.Client(host=server.url, timeout=1800)
    out = client.generate(model=MODEL, prompt="List a patient's name and age as JSON.",
                          format="json", options={"num_predict": 300, "temperature": 0.7})
    assert out.done_reason in ("stop", "length")
    if out.done_reason == "stop":
        assert isinstance(json.loads(out.response), dict)
    chat = client.chat(model=MODEL, format=Visit.model_json_schema(),
                       messages=[{"role": "user", "content": "Summarise the visit as JSON."}],
                       options={"num_predict": 400, "temperature": 0.7})
    assert chat.done_reason == "stop", chat
    visit = Visit.model_validate_json(chat.message.content)
    assert visit.patient.mood in ("sad", "calm")
    streamed = "".join(part.message.content for part in client.chat(
        model=MODEL, format=ENUMS, stream=True, options={"num_predict": 200},
        messages=[{"role": "user", "content": "Evaluate as JSON."}]))
    _validates(streamed, ENUMS)


def test_openai_python_client_json_object_json_schema_and_parse(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=1800, max_retries=0)
    messages = [{"role": "user", "content": "Describe the patient as JSON."}]
    obj = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=300,
                                         response_format={"type": "json_object"})
    assert obj.choices[0].finish_reason in ("stop", "length")
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    strict = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=300, temperature=0.7,
        response_format={"type": "json_schema", "json_schema": {"name": "evaluation", "schema": ENUMS, "strict": True}})
    assert strict.choices[0].finish_reason == "stop"
    _validates(strict.choices[0].message.content, ENUMS)
    parsed = client.chat.completions.parse(model=MODEL, messages=messages, max_tokens=400, temperature=0.7,
                                           response_format=Visit)
    assert isinstance(parsed.choices[0].message.parsed, Visit)
    legacy = client.completions.create(model=MODEL, prompt=FEEDBACK_PROMPT, max_tokens=300,
                                       extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                           "name": "evaluation", "schema": ARRAYS}}})
    assert legacy.choices[0].finish_reason == "stop"
    _validates(legacy.choices[0].text, ARRAYS)
    cut = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0,
                                         response_format={"type": "json_object"})
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 3
    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(model=MODEL, messages=messages, max_tokens=3,
                                      response_format=Visit)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=messages, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 1}}})
    assert refused.value.body["param"] == "response_format.json_schema.schema"


def test_langchain_chat_ollama_format_json(server):
    from langchain_ollama import ChatOllama

    llm = ChatOllama(model=MODEL, base_url=server.url, format="json", num_predict=300,
                     temperature=0.7)
    reply = llm.invoke("Describe the patient's mood as JSON.")
    if reply.response_metadata.get("done_reason") != "length":
        assert isinstance(json.loads(reply.content), dict)
    schema_llm = ChatOllama(model=MODEL, base_url=server.url, format=ENUMS, num_predict=200)
    _validates(schema_llm.invoke("Evaluate the interview.").content, ENUMS)


NODE_CLIENT = Path(__file__).parent / "node" / "structured_output.mjs"


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_node_ollama_and_openai_clients(server, tmp_path):
    """ollama-js (format "json", a schema, streamed) and openai-node (json_object, json_schema
    strict, a refused schema), as tests/node/structured_output.mjs uses them."""
    if not (NODE_CLIENT.parent / "node_modules" / "ollama").is_dir():
        pytest.skip("the JavaScript clients are not installed (npm ci in tests/node)")
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(ENUMS))
    done = subprocess.run(["node", str(NODE_CLIENT), str(schema_file)], capture_output=True, text=True,
                          env={**os.environ, "AI_ENGINE_URL": server.url, "MODEL": MODEL}, timeout=3600)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    for key, finish in (("ollama_json", "done_reason"), ("openai_object", "finish_reason")):
        if out[key][finish] != "length":
            assert isinstance(json.loads(out[key]["text"]), dict), out[key]
    assert out["ollama_schema"]["done_reason"] == "stop" and out["openai_strict"]["finish_reason"] == "stop"
    for key in ("ollama_schema", "ollama_stream", "openai_strict"):
        _validates(out[key]["text"], ENUMS)
    refusal = out["refusal"]
    assert refusal["status"] == 400 and refusal["param"] == "response_format.json_schema.schema", refusal
    assert "'minimum'" in refusal["message"]


def test_the_server_stays_healthy_after_refusals(server):
    for schema, _words in BAD_SCHEMAS:
        assert _post(server, "/api/generate", {"model": MODEL, "prompt": "x", "format": schema}).status_code == 400
    health = requests.get(server.url + "/health", timeout=30).json()
    assert health["status"] == "ok"


def test_structured_output_module_refuses_non_schema_values_and_deep_nesting():
    """(Over HTTP a body nested that deep is refused before: more than 32 levels.)"""
    for value in ("yaml", 3, ["json"], None):
        with pytest.raises(BadRequest):
            structured_output(value, "format")
    for depth in (70, 500):
        with pytest.raises(BadRequest, match="deeper than 64"):
            structured_output(json.loads('{"items": ' * depth + "{}" + "}" * depth), "format")


def test_properties_come_out_in_the_order_they_are_declared():
    """As in Ollama and llama.cpp: a reply's keys follow the schema's order (not sorted)."""
    schema = {"type": "object", "properties": {"riesgo": {"enum": ["bajo"]}, "empatia": {"type": "boolean"}},
              "required": ["riesgo", "empatia"]}
    root = next(line for line in structured_output(schema, "format").grammar.splitlines() if line.startswith("root"))
    assert root.index("riesgo") < root.index("empatia")
