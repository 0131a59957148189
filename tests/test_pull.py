"""`ai-engine pull` and `POST /api/pull` against a local stand-in of the hub (tests/hub_standin.py,
reached through HF_ENDPOINT), serving GGUFs the project's converter made: Ollama's progress lines,
a resume after a cut connection and after a failed pull, a corrupted download refused with nothing
left under MODEL_PATH, and the pulled model then answering /api/generate by its hf.co name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import requests

pytest.importorskip("huggingface_hub")

from engine.errors import BadRequest, ModelNotFound  # noqa: E402
from engine.hub_names import parse_ref, pick_file, pulled_name, quant_tag  # noqa: E402
from tests.convert_fixtures import numpy_llama  # noqa: E402
from tests.helpers import DEFAULT_MODEL, link_or_copy, server_fixture  # noqa: E402
from tests.hub_standin import HubStandIn  # noqa: E402
from tests.server_process import REPO_ROOT  # noqa: E402

REPO = "clinic/tiny-llama-GGUF"
# A fixed memory budget and few sequences: the pulled or created models load beside the default
# model whatever RAM the (shared) machine has free when the engine starts.
ROOMY = {"MEMORY_BUDGET_MB": "8192", "N_PARALLEL": "2"}
NODE_CLIENT = Path(__file__).parent / "node" / "ollama_models.mjs"
STATUSES = ["pulling manifest", "verifying sha256 digest", "writing manifest", "success"]


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory) -> dict[str, bytes]:
    """A tiny Llama converted by the project's converter, quantized to Q4_K_M and Q8_0."""
    from engine.cli import main

    work = tmp_path_factory.mktemp("convert")
    ckpt = numpy_llama(work / "ckpt")
    assert main(["convert", str(ckpt), "-o", str(work / "tiny-llama-F16.gguf"), "--quantize", "Q4_K_M,Q8_0"]) == 0
    return {"tiny-llama-Q4_K_M.gguf": (work / "tiny-llama-q4_k_m.gguf").read_bytes(),
            "tiny-llama-Q8_0.gguf": (work / "tiny-llama-q8_0.gguf").read_bytes(),
            "README.md": b"# tiny\n"}


@pytest.fixture(scope="module")
def hub(ggufs):
    with HubStandIn({REPO: dict(ggufs)}) as stand_in:
        yield stand_in


@pytest.fixture(autouse=True)
def _healthy_hub(request):
    """Each test starts with a hub that serves correct bytes without cutting connections."""
    if "hub" in request.fixturenames:
        stand_in = request.getfixturevalue("hub")
        stand_in.cut_after.clear()
        stand_in.corrupt = False


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf-cache")


@pytest.fixture(scope="module")
def pull_models(tmp_path_factory, default_model_file) -> Path:
    root = tmp_path_factory.mktemp("pull-models")
    link_or_copy(default_model_file.resolve(), root / DEFAULT_MODEL)  # a file, not a link out
    return root


@pytest.fixture(scope="module")
def pull_server(pull_models, hub, hf_cache, tmp_path_factory):
    yield from server_fixture(pull_models, tmp_path_factory, HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(hf_cache),
                              HF_HUB_DISABLE_TELEMETRY="1", N_CTX="512",
                              **ROOMY)


def pull_lines(server, body: dict) -> list[dict]:
    with requests.post(server.url + "/api/pull", json=body, stream=True, timeout=120) as r:
        assert r.status_code == 200, r.text
        assert r.headers["Content-Type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in r.iter_lines() if line]


def tree(root: Path) -> set[str]:
    """Every path under `root`, hidden ones too."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


# -- names ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,quant,repo,tag", [
    ("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M", None, "bartowski/Llama-3.2-1B-Instruct-GGUF", "Q4_K_M"),
    ("huggingface.co/org/repo", None, "org/repo", None),
    ("https://huggingface.co/org/repo:q8_0", None, "org/repo", "q8_0"),
    ("hf.co/org/repo:latest", None, "org/repo", None),
    ("org/repo", "IQ4_XS", "org/repo", "IQ4_XS"),
])
def test_names_parse(name, quant, repo, tag):
    ref = parse_ref(name, quant)
    assert (ref.repo_id, ref.quant) == (repo, tag)


@pytest.mark.parametrize("name", ["hf.co/org", "hf.co/org/repo/extra", "hf.co/../etc:Q4_K_M", "hf.co/org/re..po",
                                  "hf.co/-org/repo", "hf.co/org/repo:Q4 K", "", "hf.co/org/re%2fpo"])
def test_bad_names_are_400(name):
    with pytest.raises(BadRequest):
        parse_ref(name)


@pytest.mark.parametrize("filename,tag", [
    ("Llama-3.2-1B-Instruct-Q4_K_M.gguf", "Q4_K_M"), ("model.q8_0.gguf", "Q8_0"), ("x-IQ4_XS.gguf", "IQ4_XS"),
    ("gemma-3-270m-it-BF16.gguf", "BF16"), ("phi-f16.gguf", "F16"), ("model.gguf", None)])
def test_quant_tags(filename, tag):
    assert quant_tag(filename) == tag


FILES = ["a-Q4_K_M.gguf", "a-Q8_0.gguf", "a-Q4_K_S.gguf", "a-Q6_K-00001-of-00002.gguf", "mmproj-a-F16.gguf",
         "README.md"]


@pytest.mark.parametrize("files,quant,expected", [
    (FILES, None, "a-Q4_K_M.gguf"), (FILES, "q8_0", "a-Q8_0.gguf"), (["only-Q5_K_M.gguf"], None, "only-Q5_K_M.gguf")])
def test_pick_file(files, quant, expected):
    assert pick_file("o/r", files, quant) == expected


@pytest.mark.parametrize("files,quant,says", [
    (FILES, "Q2_K", "no file matches quant Q2_K"), (FILES, "Q6_K", "no file matches quant Q6_K"),
    (["a-Q8_0.gguf", "b-Q8_0.gguf"], "Q8_0", "2 files match quant Q8_0"),
    (["a-Q8_0.gguf", "a-Q5_K_M.gguf"], None, "no Q4_K_M file"), (["README.md"], None, "no single-file GGUF")])
def test_pick_file_refusals_list_the_repo(files, quant, says):
    with pytest.raises(ModelNotFound) as err:
        pick_file("o/r", files, quant)
    assert says in err.value.message
    if len(files) > 1 and "README.md" not in files[:1]:
        assert "Q8_0 (a-Q8_0.gguf)" in err.value.message


def test_pulled_names():
    assert pulled_name("hf.co/org/repo/model-Q4_K_M.gguf") == "hf.co/org/repo:Q4_K_M"
    assert pulled_name("persona/alt-model.gguf") is None


# -- the pull itself, in process --------------------------------------------------------------------
@pytest.fixture
def in_process(hub, monkeypatch, tmp_path):
    import engine.hub_pull as hub_pull

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub_pull, "RETRY_PAUSE_S", 0.0)
    (tmp_path / "models").mkdir()
    return tmp_path


def test_a_failed_pull_leaves_nothing_under_model_path_and_resumes_next_time(in_process, hub, ggufs, monkeypatch):
    from engine.hub_pull import HubError, Pull, plan

    models = in_process / "models"
    hub.cut_after.extend([40_000] + [0] * 6)  # 40 kB, then connections that bring nothing: the pull gives up
    p = plan(parse_ref(f"hf.co/{REPO}:Q8_0"))
    with pytest.raises(HubError, match="pull again to resume"):
        Pull(p, models).run(lambda e: None)
    assert tree(models) == set()
    partial = in_process / "cache" / "ai-engine-pulls" / f"{p.sha256}.partial"
    assert partial.stat().st_size == 40_000 and stat.S_IMODE(partial.stat().st_mode) == 0o600
    hub.requests.clear()
    events = []
    real_replace = os.replace

    def across_file_systems(src, dst):  # the staging folder on another file system: copied, then renamed
        if str(src).endswith(".partial"):
            raise OSError(18, "Invalid cross-device link")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", across_file_systems)
    target = Pull(p, models).run(events.append)
    assert [r[2] for r in hub.gets()] == ["bytes=40000-"]  # only the rest was asked for
    assert hashlib.sha256(target.read_bytes()).hexdigest() == p.sha256
    assert events[1]["completed"] == 40_000 and events[-1] == {"status": "success"}
    assert not partial.exists() and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert tree(models) == {"hf.co", "hf.co/clinic", "hf.co/clinic/tiny-llama-GGUF",
                            "hf.co/clinic/tiny-llama-GGUF/tiny-llama-Q8_0.gguf"}  # no temporary file left


def test_a_second_pull_of_the_same_file_at_once_is_a_409(in_process, hub):
    import fcntl

    from engine.hub_pull import PullInProgress, Pull, plan, staging_dir

    p = plan(parse_ref(f"hf.co/{REPO}:Q8_0"))
    staging_dir().mkdir(parents=True)
    with open(staging_dir() / f"{p.sha256}.lock", "w") as held:  # what a running pull holds
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(PullInProgress) as err:
            Pull(p, in_process / "models").run(lambda e: None)
    assert err.value.status == 409 and "being pulled already" in err.value.message
    assert tree(in_process / "models") == set()
    assert Pull(p, in_process / "models").run(lambda e: None).is_file()  # once it is free


def test_folders_that_cannot_be_written_are_named_without_absolute_paths(in_process, hub, monkeypatch):
    from engine.hub_pull import PullFailed, Pull, plan

    p = plan(parse_ref(f"hf.co/{REPO}:Q8_0"))
    models = in_process / "models"
    (models / "hf.co").write_text("a file where the folder would go")
    with pytest.raises(PullFailed) as err:
        Pull(p, models).run(lambda e: None)
    assert err.value.message.startswith("MODEL_PATH/hf.co/clinic/tiny-llama-GGUF/tiny-llama-Q8_0.gguf cannot be written")
    assert str(in_process) not in err.value.message
    (models / "hf.co").unlink()
    assert Pull(p, models).run(lambda e: None).is_file()  # the verified download was kept for this
    (in_process / "not-a-folder").write_text("")
    monkeypatch.setenv("HF_HUB_CACHE", str(in_process / "not-a-folder"))
    (models / "hf.co" / "clinic" / "tiny-llama-GGUF" / "tiny-llama-Q8_0.gguf").unlink()
    with pytest.raises(PullFailed, match="staging folder .* cannot be written.*set HF_HUB_CACHE"):
        Pull(p, models).run(lambda e: None)


@pytest.mark.parametrize("stated", ["../../../etc/passwd", "", "0" * 63, "f" * 64])
def test_metadata_that_cannot_be_checked_or_does_not_match_is_refused(in_process, hub, stated):
    from engine.hub_pull import HubError, Pull, plan

    hub.sha256["tiny-llama-Q8_0.gguf"] = stated
    try:
        with pytest.raises(HubError):
            Pull(plan(parse_ref(f"hf.co/{REPO}:Q8_0")), in_process / "models").run(lambda e: None)
    finally:
        hub.sha256.clear()
    assert tree(in_process / "models") == set()
    assert not list((in_process / "cache").rglob("*.partial"))


# -- over HTTP, on a real engine ------------------------------------------------------------------
def test_pull_streams_ollama_progress_and_the_model_then_answers(pull_server, pull_models, hub, ggufs):
    lines = pull_lines(pull_server, {"model": f"hf.co/{REPO}"})  # no tag: Q4_K_M
    data = ggufs["tiny-llama-Q4_K_M.gguf"]
    sha = hashlib.sha256(data).hexdigest()
    assert [line["status"] for line in lines if "digest" not in line] == STATUSES
    progress = [line for line in lines if "digest" in line]
    assert progress and all(line == {"status": f"pulling {sha[:12]}", "digest": f"sha256:{sha}", "total": len(data),
                                     "completed": line["completed"]} for line in progress)
    completed = [line["completed"] for line in progress]
    assert completed == sorted(completed) and completed[-1] == len(data)
    target = pull_models / "hf.co" / "clinic" / "tiny-llama-GGUF" / "tiny-llama-Q4_K_M.gguf"
    assert target.read_bytes() == data
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o700
    assert not [p for p in tree(pull_models) if Path(p).name.startswith(".")]
    tags = requests.get(pull_server.url + "/api/tags", timeout=30).json()["models"]
    assert f"hf.co/{REPO}:Q4_K_M" in [m["name"] for m in tags]
    for name in (f"hf.co/{REPO}:Q4_K_M", f"hf.co/{REPO}:q4_k_m", f"huggingface.co/{REPO}"):
        r = requests.post(pull_server.url + "/api/generate", json={
            "model": name, "prompt": "hola", "stream": False, "options": {"num_predict": 4, "temperature": 0}},
            timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == f"hf.co/{REPO}:Q4_K_M" and r.json()["eval_count"] >= 1


def test_pull_resumes_after_the_connection_is_cut(pull_server, pull_models, hub, ggufs):
    hub.requests.clear()
    hub.cut_after.append(50_000)
    assert requests.post(pull_server.url + "/api/pull", json={"model": f"hf.co/{REPO}:Q8_0", "stream": False},
                         timeout=120).json() == {"status": "success"}
    assert [r[2] for r in hub.gets()] == ["", "bytes=50000-"]
    target = pull_models / "hf.co" / "clinic" / "tiny-llama-GGUF" / "tiny-llama-Q8_0.gguf"
    assert target.read_bytes() == ggufs["tiny-llama-Q8_0.gguf"]


def test_a_corrupted_download_is_refused_and_leaves_nothing(pull_server, pull_models, hub, hf_cache, ggufs):
    data = ggufs["tiny-llama-Q8_0.gguf"]
    target = pull_models / "hf.co" / "clinic" / "tiny-llama-GGUF" / "tiny-llama-Q8_0.gguf"
    target.unlink(missing_ok=True)
    before = tree(pull_models)
    hub.corrupt = True
    lines = pull_lines(pull_server, {"model": f"hf.co/{REPO}:Q8_0"})
    assert lines[-1].keys() == {"error"} and "sha256" in lines[-1]["error"] and "discarded" in lines[-1]["error"]
    assert {"status": "verifying sha256 digest"} in lines and {"status": "success"} not in lines
    r = requests.post(pull_server.url + "/api/pull", json={"model": f"hf.co/{REPO}:Q8_0", "stream": False}, timeout=120)
    assert r.status_code == 502 and "sha256" in r.json()["error"]
    assert tree(pull_models) == before
    assert not list(hf_cache.rglob("*.partial"))  # the bad bytes are not kept for a resume either
    hub.corrupt = False
    assert pull_lines(pull_server, {"model": f"hf.co/{REPO}:Q8_0"})[-1] == {"status": "success"}
    assert target.read_bytes() == data


@pytest.mark.parametrize("body,status,says", [
    ({"model": "hf.co/clinic/nothing-here"}, 404, "not found on the hub"),
    ({"model": f"hf.co/{REPO}:Q2_K"}, 404, "no file matches quant Q2_K"),
    ({"model": "hf.co/../../etc"}, 400, "not a Hugging Face repo"),
    ({"model": 5}, 400, "'model' must be a string"),
    ({}, 400, "'model' (or 'name') is required"),
    ({"model": f"hf.co/{REPO}", "stream": "yes"}, 400, "'stream' must be true or false"),
])
def test_pull_refusals_come_before_the_stream(pull_server, pull_models, body, status, says):
    before = tree(pull_models)
    r = requests.post(pull_server.url + "/api/pull", json=body, timeout=60)
    assert r.status_code == status and says in r.json()["error"], r.text
    assert tree(pull_models) == before


def test_python_ollama_client_pulls_with_progress(pull_server, ggufs):
    import ollama

    client = ollama.Client(host=pull_server.url)
    events = list(client.pull(f"hf.co/{REPO}:Q8_0", stream=True))
    assert events[0].status == "pulling manifest" and events[-1].status == "success"
    done = [e for e in events if e.digest]
    assert done[-1].completed == done[-1].total == len(ggufs["tiny-llama-Q8_0.gguf"])
    assert client.pull(f"hf.co/{REPO}:Q8_0").status == "success"
    with pytest.raises(ollama.ResponseError) as err:
        client.pull("hf.co/clinic/nothing-here")
    assert err.value.status_code == 404


def test_cli_pull_shows_progress_and_places_the_file(hub, ggufs, tmp_path):
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "cache"), "MODEL_PATH": "/nonexistent"}
    result = subprocess.run([sys.executable, "-m", "engine", "pull", REPO, "--quant", "q8_0",
                             "--model-path", str(tmp_path / "models")],
                            env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    target = tmp_path / "models" / "hf.co" / "clinic" / "tiny-llama-GGUF" / "tiny-llama-Q8_0.gguf"
    assert result.stdout.strip() == str(target)
    assert target.read_bytes() == ggufs["tiny-llama-Q8_0.gguf"]
    for status in STATUSES:
        assert status in result.stderr
    assert "100%" in result.stderr  # the progress bar
    bad = subprocess.run([sys.executable, "-m", "engine", "pull", f"hf.co/{REPO}", "--quant", "Q3_K_S",
                          "--model-path", str(tmp_path / "models")],
                         env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("ai-engine: error: hf.co/clinic/tiny-llama-GGUF: no file")


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_node_ollama_client_pulls_and_manages_models(pull_server, ggufs):
    if not (NODE_CLIENT.parent / "node_modules" / "ollama").is_dir():
        pytest.skip("tests/node/node_modules is not installed (npm ci in tests/node)")
    result = subprocess.run(["node", str(NODE_CLIENT)], capture_output=True, text=True, timeout=120, env={
        **os.environ, "AI_ENGINE_URL": pull_server.url, "PULL_MODEL": f"hf.co/{REPO}:Q8_0"})
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["statuses"][0] == "pulling manifest" and out["last"] == {"status": "success"}
    assert out["totals"][-1]["completed"] == out["totals"][-1]["total"] == len(ggufs["tiny-llama-Q8_0.gguf"])
    assert out["created"] == out["copied"] == out["deleted"] == "success"
    assert {"sofia-node:latest", "sofia-node-2:latest"} <= set(out["names"])
    assert out["after"] == ["sofia-node-2:latest"] and 1 <= out["reply_count"] <= 3
    assert out["missing"] == 404 and "not found" in out["missing_error"]


def test_deleting_pulled_models_removes_their_files_and_folders(pull_server, pull_models):
    import ollama

    client = ollama.Client(host=pull_server.url)
    for quant in ("Q4_K_M", "Q8_0"):
        assert client.pull(f"hf.co/{REPO}:{quant}").status == "success"
    client.create("uses-q8", from_=f"hf.co/{REPO}:Q8_0")
    with pytest.raises(ollama.ResponseError) as err:
        client.delete(f"hf.co/{REPO}:Q8_0")
    assert err.value.status_code == 409 and "uses-q8" in err.value.error
    for name in ("uses-q8", "sofia-node-2", f"hf.co/{REPO}:q8_0", f"hf.co/{REPO}:Q4_K_M"):
        try:
            client.delete(name)
        except ollama.ResponseError as exc:  # sofia-node-2 exists only when the Node test ran
            assert exc.status_code == 404 and name == "sofia-node-2"
    assert not (pull_models / "hf.co").exists()
    assert (pull_models / DEFAULT_MODEL).is_file()
    assert not [m.model for m in client.list().models if m.model.startswith("hf.co/")]
