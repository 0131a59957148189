"""Serving with LoRA adapters: LORA at start-up, /load-model with an adapter, presets by name."""

from __future__ import annotations

import pytest
import requests

from convert.lora import convert_lora
from convert.metadata import SourceInfo
from convert.pipeline import convert
from tests.convert_fixtures import KINDS, build
from tests.server_process import start_server, stop_server
from tests.test_lora import ATTN_MLP, random_peft_adapter


@pytest.fixture(scope="module")
def lora_models(tmp_path_factory):
    """MODEL_PATH with a tiny Gemma 3 base, its LoRA adapter, and a preset combining them."""
    pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("lora-serving")
    kind = next(k for k in KINDS if k.id == "gemma3")
    folder = build(kind, root / "hf", root / "work")
    models = root / "models"
    models.mkdir()
    convert(SourceInfo(folder), models / "tiny.gguf", "f32")
    random_peft_adapter(folder, root / "adapter", ATTN_MLP)
    convert_lora(root / "adapter", folder, models / "persona-lora.gguf", "f32")
    (models / "presets.toml").write_text(
        '[presets.persona]\nbase = "tiny.gguf"\nlora = ["persona-lora.gguf"]\nscale = 0.8\n', encoding="utf-8")
    return models


@pytest.fixture(scope="module")
def lora_server(lora_models, tmp_path_factory):
    srv = start_server({"MODEL_PATH": str(lora_models), "MODEL": "tiny.gguf", "LORA": "persona-lora.gguf",
                        "N_CTX": "256", "RESPONSE_CACHE_SIZE": "0"},
                       tmp_path_factory.mktemp("lora-log") / "server.log")
    yield srv
    stop_server(srv)


def greedy(server, **extra) -> dict:
    r = requests.post(server.url + "/generate", timeout=60, json={
        "prompt": "hola amigo cómo estás hoy", "max_length": 12, "temperature": 0, "stop": [], **extra})
    assert r.status_code == 200, r.text
    return r.json()


def test_adapter_at_startup_is_reported_and_changes_the_output(lora_server):
    health = requests.get(lora_server.url + "/health", timeout=10).json()
    assert health["lora"] == [{"name": "persona-lora.gguf", "scale": 1.0}]
    with_adapter = greedy(lora_server)
    assert with_adapter["metadata"]["lora"] == [{"name": "persona-lora.gguf", "scale": 1.0}]
    r = requests.post(lora_server.url + "/load-model", json={"model_name": "tiny.gguf"}, timeout=60)
    assert r.status_code == 200 and r.json()["lora"] == []
    without = greedy(lora_server)
    assert "lora" not in without["metadata"]
    assert (with_adapter["texto"], with_adapter["confianza"]) != (without["texto"], without["confianza"])
    r = requests.post(lora_server.url + "/load-model", timeout=60,
                      json={"model_name": "tiny.gguf", "lora": "persona-lora.gguf", "lora_scale": 0.5})
    assert r.status_code == 200 and r.json()["lora"] == [{"name": "persona-lora.gguf", "scale": 0.5}]
    bad = requests.post(lora_server.url + "/load-model", timeout=60,
                        json={"model_name": "tiny.gguf", "lora": "../escape.gguf"})
    assert bad.status_code == 400 and "MODEL_PATH" in bad.json()["error"]


def test_presets_are_models_on_ollama_and_openai(lora_server):
    tags = requests.get(lora_server.url + "/api/tags", timeout=10).json()["models"]
    names = [m["name"] for m in tags]
    assert "persona:latest" in names and "persona-lora:latest" not in names  # adapters are not models
    ids = [m["id"] for m in requests.get(lora_server.url + "/v1/models", timeout=10).json()["data"]]
    assert "persona" in ids
    r = requests.post(lora_server.url + "/v1/completions", timeout=60,
                      json={"model": "persona", "prompt": "hola", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    health = requests.get(lora_server.url + "/health", timeout=10).json()  # resident beside the default
    preset = next(m for m in health["models"] if m["preset"] == "persona")
    assert preset["lora"] == [{"name": "persona-lora.gguf", "scale": 0.8}] and not preset["default"]


def test_a_model_created_with_an_adapter_applies_it(lora_server, lora_models):
    """POST /api/create with a Modelfile's ADAPTER: a preset whose replies carry the adapter (#20)."""
    r = requests.post(lora_server.url + "/api/create", timeout=60, json={
        "model": "persona-created", "modelfile": "FROM tiny.gguf\nADAPTER persona-lora.gguf\nPARAMETER temperature 0",
        "stream": False})
    assert r.status_code == 200 and r.json() == {"status": "success"}, r.text
    assert "[presets.persona]" in (lora_models / "presets.toml").read_text()  # the hand-written one is kept

    def reply(model: str) -> dict:
        r = requests.post(lora_server.url + "/api/generate", timeout=60, json={
            "model": model, "prompt": "hola amigo cómo estás hoy", "raw": True, "stream": False,
            "options": {"num_predict": 12, "temperature": 0}})
        assert r.status_code == 200, r.text
        return r.json()

    created, base = reply("persona-created"), reply("tiny")
    assert created["model"] == "persona-created:latest"
    assert created["response"] != base["response"]
    health = requests.get(lora_server.url + "/health", timeout=10).json()
    resident = next(m for m in health["models"] if m["preset"] == "persona-created")
    assert resident["lora"] == [{"name": "persona-lora.gguf", "scale": 1.0}]
