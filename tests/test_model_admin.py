"""/api/create, /api/copy and /api/delete: presets kept in MODEL_PATH/presets.toml, GGUF files
deleted only under MODEL_PATH. Rules on the fake runtime behind the engine's app; what a preset
changes in a reply, and the official clients (Python and Node `ollama`), on a real engine."""

from __future__ import annotations

import json
import stat
import tomllib
from pathlib import Path

import pytest
import requests

from tests.helpers import DEFAULT_MODEL, Fakes, link_or_copy, server_fixture, tiny_gguf

# A fixed memory budget and few sequences: the pulled or created models load beside the default
# model whatever RAM the (shared) machine has free when the engine starts.
ROOMY = {"MEMORY_BUDGET_MB": "8192", "N_PARALLEL": "2"}
MODELFILE = '''# a patient for the simulator
FROM a.gguf
PARAMETER temperature 0.2
PARAMETER stop "Estudiante:"
PARAMETER stop "Terapeuta:"
PARAMETER num_predict 5
SYSTEM """Eres Sofía,
una paciente."""
'''


def adapter_gguf(path: Path) -> Path:
    """A GGUF whose general.type is `adapter` (a LoRA), metadata only."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", 16.0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def fakes(tmp_path) -> Fakes:
    f = Fakes(tmp_path).load("a.gguf")
    adapter_gguf(f.dir / "lora-sofia.gguf")
    return f


@pytest.fixture
def client(fakes):
    return fakes.app().test_client()


def presets(fakes) -> dict:
    path = fakes.dir / "presets.toml"
    return tomllib.loads(path.read_text()).get("presets", {}) if path.exists() else {}


def names(client) -> set[str]:
    return {m["name"] for m in client.get("/api/tags").get_json()["models"]}


# -- create ---------------------------------------------------------------------------------------
def test_create_from_a_modelfile_keeps_a_preset(client, fakes):
    r = client.post("/api/create", json={"model": "sofia", "modelfile": MODELFILE})
    assert r.status_code == 200 and r.mimetype == "application/x-ndjson"
    lines = [json.loads(x) for x in r.get_data(as_text=True).splitlines()]
    assert lines[0] == {"status": "parsing modelfile"} and lines[-1] == {"status": "success"}
    assert presets(fakes)["sofia"] == {"base": "a.gguf", "system": "Eres Sofía,\nuna paciente.", "parameters": {
        "temperature": 0.2, "stop": ["Estudiante:", "Terapeuta:"], "num_predict": 5}}
    assert stat.S_IMODE((fakes.dir / "presets.toml").stat().st_mode) == 0o600
    assert not [p for p in fakes.dir.iterdir() if p.name.endswith(".tmp")]
    assert "sofia:latest" in names(client)
    show = client.post("/api/show", json={"model": "sofia"}).get_json()
    assert show["system"] == "Eres Sofía,\nuna paciente."
    assert "temperature 0.2" in show["parameters"] and "stop Terapeuta:" in show["parameters"]


def test_create_with_ollamas_newer_fields(client, fakes):
    r = client.post("/api/create", json={
        "model": "sofia-lora:latest", "from": "a", "adapters": {"lora-sofia.gguf": "sha256:00"},
        "parameters": {"top_k": 20, "seed": 7}, "system": "Eres Sofía.", "template": "{{ messages[-1].content }}",
        "stream": False})
    assert r.status_code == 200 and r.get_json() == {"status": "success"}
    assert presets(fakes)["sofia-lora"] == {"base": "a.gguf", "lora": ["lora-sofia.gguf"], "scale": [1.0],
                                            "system": "Eres Sofía.", "template": "{{ messages[-1].content }}",
                                            "parameters": {"top_k": 20, "seed": 7}}
    # FROM a preset starts from what it has.
    assert client.post("/api/create", json={"model": "sofia-2", "modelfile": "FROM sofia-lora\nPARAMETER top_k 5",
                                            "stream": False}).status_code == 200
    second = presets(fakes)["sofia-2"]
    assert second["lora"] == ["lora-sofia.gguf"] and second["parameters"] == {"top_k": 5, "seed": 7}
    assert second["system"] == "Eres Sofía."


@pytest.mark.parametrize("body,status,says", [
    ({"model": "x", "modelfile": "FROM a.gguf\nMESSAGE user hola"}, 400, "line 2: MESSAGE is not supported"),
    ({"model": "x", "modelfile": "PARAMETER top_k 3"}, 400, "no FROM line"),
    ({"model": "x", "modelfile": 'FROM a.gguf\nSYSTEM """never closed'}, 400, "not closed"),
    ({"model": "x", "modelfile": "FROM a.gguf\nPARAMETER mirostat 2"}, 400, "mirostat not supported"),
    ({"model": "x", "modelfile": "FROM a.gguf\nPARAMETER top_k many"}, 400, "is not a number"),
    ({"model": "x", "from": "a", "parameters": {"temperature": -1}}, 400, "'temperature' must be >= 0"),
    ({"model": "x", "from": "a", "template": "{{ .Prompt }}"}, 400, "Go template"),
    ({"model": "x", "from": "a", "template": "{% if %}"}, 400, "TEMPLATE"),
    ({"model": "x", "from": "nothing-like-it"}, 404, "not found"),
    ({"model": "x", "from": "../../etc/passwd"}, 400, "only files under MODEL_PATH"),
    ({"model": "x", "from": "lora-sofia.gguf"}, 400, "is a LoRA adapter"),
    ({"model": "x", "from": "a", "adapters": ["b.gguf"]}, 400, "not a LoRA adapter"),
    ({"model": "x", "from": "a", "adapters": ["../outside.gguf"]}, 400, "only files under MODEL_PATH"),
    ({"model": "x", "from": "a", "files": {"m.gguf": "sha256:00"}}, 400, "'files'"),
    ({"model": "x", "from": "a", "quantize": "q4_K_M"}, 400, "'quantize'"),
    ({"model": "b", "from": "a"}, 409, "name of a GGUF file"),
    ({"model": "../escape", "from": "a"}, 400, "is not a model name"),
    ({"model": "hf.co/org/repo", "from": "a"}, 400, "pulled from the hub"),
    ({"from": "a"}, 400, "'model' (or 'name') is required"),
])
def test_create_refusals(client, fakes, body, status, says):
    r = client.post("/api/create", json=body)
    assert r.status_code == status and says in r.get_json()["error"], r.get_json()
    assert "x" not in presets(fakes)


# -- copy -----------------------------------------------------------------------------------------
def test_copy_names_a_file_or_a_preset_without_copying_files(client, fakes):
    before = sorted(p.name for p in fakes.dir.glob("*.gguf"))
    assert client.post("/api/copy", json={"source": "a:latest", "destination": "paciente"}).status_code == 200
    client.post("/api/create", json={"model": "sofia", "modelfile": MODELFILE})
    assert client.post("/api/copy", json={"source": "sofia", "destination": "sofia-copia"}).status_code == 200
    got = presets(fakes)
    assert got["paciente"] == {"base": "a.gguf"}
    assert got["sofia-copia"] == got["sofia"]
    assert sorted(p.name for p in fakes.dir.glob("*.gguf")) == before
    assert {"paciente:latest", "sofia-copia:latest"} <= names(client)


@pytest.mark.parametrize("body,status", [
    ({"source": "nothing", "destination": "y"}, 404), ({"source": "a", "destination": "c.gguf"}, 409),
    ({"source": "a", "destination": "../../y"}, 400), ({"source": "a"}, 400), ({"source": "../a.gguf",
                                                                              "destination": "y"}, 404)])
def test_copy_refusals(client, fakes, body, status):
    assert client.post("/api/copy", json=body).status_code == status
    assert "y" not in presets(fakes)


# -- delete ---------------------------------------------------------------------------------------
def test_deleting_a_preset_keeps_its_file_and_a_used_file_is_refused(client, fakes):
    client.post("/api/create", json={"model": "sofia", "modelfile": MODELFILE.replace("a.gguf", "b.gguf")})
    r = client.delete("/api/delete", json={"model": "b.gguf"})
    assert r.status_code == 409 and "used by preset(s) sofia" in r.get_json()["error"]
    assert client.delete("/api/delete", json={"model": "sofia:latest"}).status_code == 200
    assert "sofia" not in presets(fakes) and (fakes.dir / "b.gguf").is_file()
    assert client.delete("/api/delete", json={"model": "b"}).status_code == 200
    assert not (fakes.dir / "b.gguf").exists() and "b:latest" not in names(client)


def test_deleting_a_resident_model_unloads_it_first(client, fakes):
    lease = fakes.manager.acquire("c")
    lease.release()
    assert "c.gguf" in fakes.names()
    assert client.delete("/api/delete", json={"name": "c"}).status_code == 200
    assert "c.gguf" not in fakes.names() and not (fakes.dir / "c.gguf").exists()


def test_delete_refusals_touch_nothing(client, fakes, tmp_path):
    outside = tiny_gguf(tmp_path / "outside.gguf")
    (fakes.dir / "link.gguf").symlink_to(outside)
    before = sorted(p.name for p in fakes.dir.iterdir())
    r = client.delete("/api/delete", json={"model": "a"})
    assert r.status_code == 409 and "default model" in r.get_json()["error"]
    for name in ("nothing", "../outside.gguf", str(outside), "link", "presets.toml", ""):
        r = client.delete("/api/delete", json={"model": name})
        assert r.status_code in (400, 404), (name, r.get_json())
    assert sorted(p.name for p in fakes.dir.iterdir()) == before and outside.is_file()


def test_the_routes_need_the_api_key(tmp_path):
    client = Fakes(tmp_path, api_key="s3cret").app().test_client()
    calls = [("post", "/api/pull", {"model": "hf.co/o/r"}), ("delete", "/api/delete", {"model": "a"}),
             ("post", "/api/copy", {"source": "a", "destination": "x"}), ("post", "/api/create",
                                                                          {"model": "x", "from": "a"})]
    for method, path, body in calls:
        assert getattr(client, method)(path, json=body).status_code == 401
    assert client.post("/api/copy", json={"source": "a", "destination": "x"},
                       headers={"Authorization": "Bearer s3cret"}).status_code == 200


# -- on a real engine, with the official clients ------------------------------------------------
@pytest.fixture(scope="module")
def admin_server(tmp_path_factory, default_model_file):
    root = tmp_path_factory.mktemp("admin-models")
    link_or_copy(default_model_file.resolve(), root / DEFAULT_MODEL)  # a file, not a link out
    yield from server_fixture(root, tmp_path_factory, N_CTX="512", **ROOMY)


def _generate(server, model: str, **extra) -> dict:
    r = requests.post(server.url + "/api/generate", json={
        "model": model, "prompt": "Hola, ¿cómo estás?", "stream": False, "options": {"temperature": 0}, **extra},
        timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_created_model_answers_with_its_parameters_system_and_template(admin_server):
    import ollama

    client = ollama.Client(host=admin_server.url)
    base = _generate(admin_server, "gemma-3-270m-q4_k_m", options={"temperature": 0, "num_predict": 12})
    client.create("paciente", from_="gemma-3-270m-q4_k_m", parameters={"num_predict": 2, "temperature": 0})
    reply = _generate(admin_server, "paciente", options={})
    assert reply["eval_count"] <= 2 and reply["model"] == "paciente:latest"  # PARAMETER num_predict
    assert _generate(admin_server, "paciente", options={"num_predict": 6})["eval_count"] > 2  # the request wins
    client.create("con-sistema", from_="paciente", system="Eres Sofía, una paciente de 34 años con insomnio.")
    assert _generate(admin_server, "con-sistema")["prompt_eval_count"] > base["prompt_eval_count"] + 5
    client.create("plantilla", from_="paciente", template="Pregunta: {{ messages[-1]['content'] }}\nRespuesta:")
    templated = _generate(admin_server, "plantilla")
    assert templated["prompt_eval_count"] != base["prompt_eval_count"]
    assert client.show("con-sistema").modelfile.startswith("FROM gemma-3-270m-q4_k_m.gguf")
    client.copy("paciente", "paciente-2")
    assert {"paciente:latest", "paciente-2:latest"} <= {m.model for m in client.list().models}
    assert client.delete("paciente-2").status == "success"
    with pytest.raises(ollama.ResponseError) as err:
        client.delete("paciente-2")
    assert err.value.status_code == 404


def test_presets_toml_keeps_what_the_operator_wrote_and_is_never_rewritten_unread(client, fakes):
    path = fakes.dir / "presets.toml"
    path.write_text('# mine\n[presets.hand]\nbase = "b.gguf"\nnote = "made by hand"\naliases = ["mano", "hand:v1"]\n'
                    '[other]\nkept = [1, 2]\n')
    assert client.post("/api/copy", json={"source": "hand", "destination": "hand-2"}).status_code == 200
    assert client.delete("/api/delete", json={"model": "mano"}).status_code == 200  # an alias: only it goes
    data = tomllib.loads(path.read_text())
    assert data["presets"]["hand"] == {"base": "b.gguf", "note": "made by hand", "aliases": ["hand:v1"]}
    assert data["presets"]["hand-2"] == {"base": "b.gguf", "note": "made by hand"}
    assert data["other"] == {"kept": [1, 2]}
    broken = 'this is [not toml\n'
    path.write_text(broken)
    r = client.post("/api/create", json={"model": "x", "from": "a"})
    assert r.status_code == 409 and "presets.toml cannot be read" in r.get_json()["error"]
    assert path.read_text() == broken
