"""The Ollama and OpenAI surfaces, driven by the real `openai` and `ollama` Python clients and a
Node client written like the simulator's Ollama backend, against a running engine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import ollama
import openai
import pytest
import requests

from engine.patient import render_case_prompt
from tests.helpers import DEFAULT_MODEL

MODEL_ID = DEFAULT_MODEL  # what /v1/models lists
OLLAMA_NAME = DEFAULT_MODEL.removesuffix(".gguf") + ":latest"  # what /api/tags lists
MESSAGES = [{"role": "system", "content": "Sos Sofía, una paciente cansada."},
            {"role": "user", "content": "Hola Sofía, ¿cómo dormiste anoche?"}]


@pytest.fixture(scope="module")
def oa(server_generating):
    return openai.OpenAI(base_url=server_generating.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ol(server_generating):
    return ollama.Client(host=server_generating.url, timeout=120)


# -- OpenAI ----------------------------------------------------------------------------------

def test_openai_models(oa):
    assert MODEL_ID in [m.id for m in oa.models.list().data]


def test_openai_chat_streaming_equals_non_streaming(oa):
    full = oa.chat.completions.create(model=MODEL_ID, messages=MESSAGES, temperature=0, max_tokens=40)
    text = full.choices[0].message.content
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    assert text.strip() and full.choices[0].finish_reason in {"stop", "length"}
    assert full.usage.completion_tokens <= 40 and full.usage.prompt_tokens > 10
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    chunks = list(oa.chat.completions.create(model=MODEL_ID, messages=MESSAGES, temperature=0, max_tokens=40,
                                             stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_openai_completions_streaming_equals_non_streaming(oa, cases):
    prompt = render_case_prompt(cases[0])
    full = oa.completions.create(model=MODEL_ID, prompt=prompt, temperature=0, max_tokens=30, stop=["\nEstudiante:"])
    assert full.object == "text_completion" and full.choices[0].text.strip()
    assert "Estudiante:" not in full.choices[0].text
    streamed = "".join(c.choices[0].text for c in oa.completions.create(
        model=MODEL_ID, prompt=prompt, temperature=0, max_tokens=30, stop=["\nEstudiante:"], stream=True)
        if c.choices)
    assert streamed == full.choices[0].text


def test_openai_default_max_tokens_is_16(oa):
    r = oa.completions.create(model=MODEL_ID, prompt="Había una vez", temperature=0.5, stop=[])
    assert r.usage.completion_tokens <= 16


def test_openai_errors(oa, server_generating):
    with pytest.raises(openai.NotFoundError) as err:
        oa.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        oa.chat.completions.create(model=MODEL_ID, messages=[{"role": "wizard", "content": "x"}])
    assert "role" in err.value.body["message"] and err.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        oa.chat.completions.create(model=MODEL_ID, messages=MESSAGES, n=2)
    with pytest.raises(openai.BadRequestError):
        oa.completions.create(model=MODEL_ID, prompt="x", temperature=5)
    assert requests.get(server_generating.url + "/health", timeout=10).json()["model_loaded"]


# -- Ollama ----------------------------------------------------------------------------------

def test_ollama_list(ol):
    models = ol.list().models
    entry = next(m for m in models if m.model == OLLAMA_NAME)
    assert entry.size > 200_000_000 and len(entry.digest) == 64
    assert entry.details.format == "gguf" and entry.details.family == "gemma3"
    assert entry.details.quantization_level == "Q4_K_M" and entry.details.parameter_size == "270M"


def test_ollama_generate_streaming_equals_non_streaming(ol, cases):
    prompt = render_case_prompt(cases[1])
    options = {"temperature": 0, "num_predict": 60, "stop": ["\nEstudiante:", "\n\n"]}
    full = ol.generate(model=OLLAMA_NAME, prompt=prompt, options=options)
    assert full.done and full.done_reason in {"stop", "length"} and full.response.strip()
    assert 0 < full.eval_count <= 60 and full.prompt_eval_count > 0
    assert full.total_duration >= full.eval_duration > 0  # nanoseconds
    parts = list(ol.generate(model=OLLAMA_NAME, prompt=prompt, options=options, stream=True))
    assert "".join(p.response for p in parts) == full.response
    assert parts[-1].done and parts[-1].eval_count == full.eval_count and not any(p.done for p in parts[:-1])


def test_ollama_chat_streaming_equals_non_streaming(ol):
    options = {"temperature": 0, "num_predict": 40}
    full = ol.chat(model=OLLAMA_NAME, messages=MESSAGES, options=options)
    assert full.message.role == "assistant" and full.message.content.strip()
    parts = list(ol.chat(model=OLLAMA_NAME, messages=MESSAGES, options=options, stream=True))
    assert "".join(p.message.content for p in parts) == full.message.content


def test_ollama_show_and_version(ol, server_generating):
    shown = ol.show(OLLAMA_NAME)
    assert shown.details.family == "gemma3" and shown.modelinfo["general.architecture"] == "gemma3"
    assert shown.modelfile.strip() == f"FROM {DEFAULT_MODEL}"  # relative to MODEL_PATH: no absolute path
    assert requests.get(server_generating.url + "/api/version", timeout=10).json()["version"]


def test_ollama_errors(ol, server_generating):
    with pytest.raises(ollama.ResponseError) as err:
        ol.generate(model="llama3:8b", prompt="hola")
    assert err.value.status_code == 404 and "not found" in err.value.error
    r = requests.post(server_generating.url + "/api/generate", json={"model": OLLAMA_NAME, "prompt": "x",
                                                                     "options": {"temperature": "hot"}}, timeout=10)
    assert r.status_code == 400 and "temperature" in r.json()["error"]
    r = requests.post(server_generating.url + "/api/generate", json={"prompt": "x"}, timeout=10)
    assert r.status_code == 400 and "model" in r.json()["error"]
    # An empty prompt loads the model, as in Ollama.
    assert ol.generate(model=OLLAMA_NAME, prompt="").done_reason == "load"


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_node_ollama_backend_client(server_generating, cases, tmp_path):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(render_case_prompt(cases[0]), encoding="utf-8")
    result = subprocess.run(["node", str(Path(__file__).parent / "node" / "ollama_backend_client.mjs"), str(prompt_file)],
                            env={**os.environ, "AI_ENGINE_URL": server_generating.url, "OLLAMA_MODEL": OLLAMA_NAME},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["model"] == OLLAMA_NAME and OLLAMA_NAME in out["models"]
    assert out["response"] and "Estudiante:" not in out["response"] and "\n\n" not in out["response"]
    assert 0 < out["eval_count"] <= 150 and out["total_duration"] > 0


# -- one generation path ------------------------------------------------------------------------

def test_same_text_on_every_surface(server_generating, oa, ol, cases):
    """The same raw prompt and greedy settings give the same text through all three surfaces."""
    prompt = render_case_prompt(cases[2])
    stops = ["\nEstudiante:", "\n\n"]
    sim = requests.post(server_generating.url + "/generate", timeout=60, json={
        "prompt": prompt, "temperature": 0, "max_length": 40, "stop": stops, "repeat_penalty": 1.0,
        "top_k": 0, "min_p": 0}).json()["texto"]
    oai = oa.completions.create(model=MODEL_ID, prompt=prompt, temperature=0, max_tokens=40, stop=stops).choices[0].text
    oll = ol.generate(model=OLLAMA_NAME, prompt=prompt, options={
        "temperature": 0, "num_predict": 40, "stop": stops, "repeat_penalty": 1.0, "top_k": 0}).response
    assert sim == oai.strip() == oll.strip()
