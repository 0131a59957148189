"""Safe by default on a clinic's network (#18): health data at rest is private whatever the umask,
callers without a key learn no absolute paths (and nothing about files outside MODEL_PATH), and the
Ray setup authenticates its members and keeps the API key out of the deployment's arguments."""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from engine import logs
from engine.disk_cache import DiskCache, token_key
from engine.errors import SettingsError
from engine.settings import REPO_ROOT, Settings
from tests.helpers import DEFAULT_MODEL
from tests.server_process import Server, free_port, stop_server

UMASKS = [0o022, 0o000]


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


@pytest.fixture
def restore_logging():
    """configure_logging replaces the root handlers (pytest's among them): put them back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in logs.prompt_log.handlers:
        handler.close()
    logs.prompt_log.handlers.clear()
    root.handlers[:] = handlers
    root.setLevel(level)


# -- data at rest: the prompt history ---------------------------------------------------------

@pytest.mark.parametrize("umask", UMASKS, indirect=True)
def test_prompt_history_and_its_rotations_are_private(tmp_path, umask, monkeypatch, restore_logging):
    monkeypatch.setattr(logs, "PROMPT_LOG_BYTES", 400)  # a rotation every few entries
    os.chmod(tmp_path, 0o755)  # an existing folder (like /tmp or a user's own) is left as it is
    path = tmp_path / "new" / "history" / "prompts.jsonl"
    logs.configure_logging("WARNING", prompt_file=str(path))
    for i in range(12):
        logs.log_prompt(f"r{i}", "/generate", "Estudiante: ¿Cómo durmió?\nPaciente:", "Mal, doctor.", DEFAULT_MODEL)
    files = sorted(path.parent.iterdir())
    assert len(files) == 1 + logs.PROMPT_LOG_BACKUPS, files  # rotated until every backup exists
    assert {f.name: mode(f) for f in files} == {f.name: 0o600 for f in files}
    assert mode(tmp_path / "new") == mode(path.parent) == 0o700
    assert mode(tmp_path) == 0o755


def test_a_readable_history_left_from_before_is_made_private(tmp_path, restore_logging, caplog):
    path = tmp_path / "prompts.jsonl"
    for name in (path, Path(f"{path}.1"), Path(f"{path}.3")):
        name.write_text('{"prompt": "..."}\n')
        os.chmod(name, 0o644)
    with caplog.at_level(logging.WARNING, logger="engine.logs"):
        logs.configure_logging("WARNING", prompt_file=str(path))
        logging.getLogger().addHandler(caplog.handler)  # configure_logging replaced it
        logs.log_prompt("r1", "/generate", "prompt", "reply", DEFAULT_MODEL)
    assert [mode(p) for p in (path, Path(f"{path}.1"), Path(f"{path}.3"))] == [0o600] * 3
    assert path.read_text().count("\n") == 2  # appended, not replaced


def test_a_link_at_the_history_name_is_refused(tmp_path, restore_logging):
    target = tmp_path / "elsewhere.jsonl"
    target.write_text("")
    (tmp_path / "prompts.jsonl").symlink_to(target)
    with pytest.raises(SettingsError, match="ENGINE_LOG_PROMPTS.*symbolic link"):
        logs.configure_logging("WARNING", prompt_file=str(tmp_path / "prompts.jsonl"))


# -- data at rest: the prompt cache on disk ---------------------------------------------------

@pytest.mark.parametrize("umask", UMASKS, indirect=True)
def test_a_readable_saved_prompt_state_is_made_private(tmp_path, umask):
    tokens = np.arange(200, dtype=np.int32)
    cache = DiskCache(tmp_path / "cache", 1 << 20, "m1")
    cache.put(tokens, b"state" * 100)
    saved = cache.dir / token_key(tokens)
    assert mode(saved) == 0o600 and mode(cache.dir) == 0o700
    os.chmod(saved, 0o644)  # copied in, or left by an older version
    again = DiskCache(tmp_path / "cache", 1 << 20, "m1")
    assert mode(saved) == 0o600
    assert again.load(200, again.longest(tokens)[1]) == b"state" * 100


# -- disclosure: what callers without a key see -------------------------------------------------

@pytest.fixture(scope="module")
def engine_app(model_dir, tmp_path_factory):
    """The Flask app on a real ModelManager with the real default model loaded."""
    from engine.app import create_app
    from engine.model_files import ModelFiles
    from engine.model_manager import ModelManager

    cache = tmp_path_factory.mktemp("prompt-cache")
    settings = Settings.load(env={"PROMPT_CACHE_DIR": str(cache)}, model_path=model_dir, model=DEFAULT_MODEL,
                             n_ctx=256, n_parallel=1, n_batch=64, n_threads=2, cache_ram_mb=0, n_gpu_layers="0")
    host = ModelManager(settings)
    host.load(ModelFiles(settings).startup_spec())
    yield create_app(settings, host)
    host.close()


@pytest.fixture
def client(engine_app):
    return engine_app.test_client()


def strings(value):
    """Every string in a JSON value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


def assert_no_absolute_path(body, model_dir: Path):
    for text in strings(body):
        for root in {str(model_dir), str(model_dir.resolve()), tempfile.gettempdir()}:
            assert root not in text, text
        assert not text.startswith("/"), text


def test_health_keeps_the_simulators_fields_without_absolute_paths(client, model_dir):
    r = client.get("/health")
    body = r.get_json()
    assert r.status_code == 200 and body["status"] == "ok" and body["model_loaded"] is True
    assert body["model_path"] == model_dir.name  # still a non-empty string
    assert body["model_file"] == DEFAULT_MODEL and body["models"][0]["model_file"] == DEFAULT_MODEL
    assert_no_absolute_path(body, model_dir)


@pytest.mark.parametrize("body,status,says", [
    ({"model_name": "missing.gguf"}, 404, "not found under MODEL_PATH"),
    ({"model_name": "truncated.gguf"}, 422, "could not load"),
    ({"model_name": "escape.gguf"}, 400, "MODEL_PATH"),  # a link inside to a file outside
    ({"model_name": "alt-model.gguf", "model_path": "../outside-nothing"}, 400, "MODEL_PATH"),
])
def test_load_model_errors_name_no_absolute_path(client, model_dir, body, status, says):
    r = client.post("/load-model", json=body)
    assert r.status_code == status, r.get_json()
    assert says in r.get_json()["error"]
    assert_no_absolute_path(r.get_json(), model_dir)
    assert client.get("/health").get_json()["model"] == DEFAULT_MODEL  # the current model stays


@pytest.mark.parametrize("path,body", [
    ("/api/generate", {"model": "truncated.gguf", "prompt": "Hola", "stream": False}),
    ("/v1/chat/completions", {"model": "truncated.gguf", "messages": [{"role": "user", "content": "Hola"}]}),
    ("/generate", {"model": "truncated.gguf", "prompt": "Hola"}),
])
def test_a_load_by_a_model_field_names_no_absolute_path(client, model_dir, path, body):
    r = client.post(path, json=body)
    assert r.status_code == 422, r.get_json()
    assert_no_absolute_path(r.get_json(), model_dir)


def test_other_routes_name_no_absolute_path(client, model_dir):
    for r in (client.get("/models"), client.post("/api/show", json={"model": DEFAULT_MODEL}), client.get("/api/tags"),
              client.get("/v1/models"), client.get("/api/ps")):
        assert r.status_code == 200
        assert_no_absolute_path(r.get_json(), model_dir)


def test_a_load_failure_keeps_the_full_path_in_the_log(client, model_dir, caplog):
    with caplog.at_level(logging.WARNING):
        assert client.post("/load-model", json={"model_name": "truncated.gguf"}).status_code == 422
    assert str(model_dir.resolve() / "truncated.gguf") in caplog.text


def test_outside_model_path_one_refusal_whatever_exists(client, model_dir, tmp_path):
    """Folders and files outside MODEL_PATH, existing or not, named by model_path or model_name,
    absolute or through `..`: the same status and the same message but for the echoed request."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    up = Path(os.path.relpath(tmp_path, model_dir.resolve()))  # the same places through `..`
    paths = [tmp_path / "folder", tmp_path / "nothing", tmp_path / "file.gguf", tmp_path / "nothing.gguf"]
    given = [str(p) for p in paths] + [str(up / p.name) for p in paths] + ["/etc", "/etc/passwd"]
    answers = {}
    for path in given:
        for body in ({"model_name": "x.gguf", "model_path": path}, {"model_name": path}):
            r = client.post("/load-model", json=body)
            answers[(path, tuple(body))] = (r.status_code, r.get_json()["error"].replace(repr(path), "<P>"))
    assert len(set(answers.values())) == 2, answers  # one answer for model_path, one for model_name
    assert all(status == 400 and "MODEL_PATH" in error for status, error in answers.values())


@pytest.mark.skipif(os.geteuid() == 0, reason="root searches any folder")
def test_outside_a_folder_this_process_cannot_search_is_the_same_refusal(client, tmp_path):
    locked = tmp_path / "locked"
    (locked / "inside").mkdir(parents=True)
    os.chmod(locked, 0)
    try:
        given = {p: client.post("/load-model", json={"model_name": "x.gguf", "model_path": str(locked / p)})
                 for p in ("inside", "nothing")}
    finally:
        os.chmod(locked, 0o700)
    assert {r.status_code for r in given.values()} == {400}


# -- Ray: token authentication and the API key ------------------------------------------------

def ray_serve_module():
    pytest.importorskip("ray.serve")
    from engine import ray_serve

    return ray_serve


KEY = "clinic-key-8f3a9c2e71d4"


def deployed_arguments(monkeypatch, settings: Settings) -> bytes:
    """What `deploy` hands Ray for the replicas (the bound application's init arguments), pickled
    as Ray stores them; no cluster is needed."""
    ray_serve = ray_serve_module()
    from ray import cloudpickle
    from ray.serve import Application

    from engine.ray_options import RayOptions

    seen = []
    monkeypatch.setattr(ray_serve.serve, "start", lambda **kwargs: None)
    monkeypatch.setattr(ray_serve.serve, "run", lambda app, **kwargs: seen.append(app))
    monkeypatch.setattr(ray_serve, "_warn_if_unschedulable", lambda values: None)
    ray_serve.deploy(settings, RayOptions(replicas=2))
    assert len(seen) == 1 and isinstance(seen[0], Application)
    bound = seen[0]._bound_deployment
    return cloudpickle.dumps((bound.init_args, bound.init_kwargs))


@pytest.mark.parametrize("how", ["ENGINE_API_KEY", "ENGINE_API_KEY_FILE"])
def test_the_api_key_is_not_among_the_deployment_arguments(monkeypatch, tmp_path, how):
    key_file = tmp_path / "engine_api_key"
    key_file.write_text(KEY + "\n")
    settings = Settings.load(env={how: KEY if how == "ENGINE_API_KEY" else str(key_file)})
    assert settings.api_key == KEY
    pickled = deployed_arguments(monkeypatch, settings)
    assert KEY.encode() not in pickled


def test_a_replica_reads_the_key_on_its_node(tmp_path):
    ray_serve = ray_serve_module()
    key_file = tmp_path / "engine_api_key"
    key_file.write_text(KEY)
    other = tmp_path / "other_key"
    other.write_text("another-key-000")
    settings = Settings.load(env={"ENGINE_API_KEY_FILE": str(key_file)})
    sent = ray_serve.ReplicaKey.of(settings)
    public = Settings.load(env={})
    assert KEY not in repr(sent)
    assert sent.replica_settings(public, environ={}).api_key == KEY  # the deployer's file, read here
    from_env = ray_serve.ReplicaKey.of(Settings.load(env={"ENGINE_API_KEY": KEY}))
    assert from_env.replica_settings(public, environ={"ENGINE_API_KEY": KEY}).api_key == KEY
    assert from_env.replica_settings(public, environ={"ENGINE_API_KEY_FILE": str(key_file)}).api_key == KEY
    with pytest.raises(SettingsError, match="this node has none"):
        from_env.replica_settings(public, environ={})
    with pytest.raises(SettingsError, match="differs"):
        from_env.replica_settings(public, environ={"ENGINE_API_KEY_FILE": str(other)})
    key_file.unlink()
    with pytest.raises(SettingsError, match="cannot read"):
        sent.replica_settings(public, environ={})
    # No key in the deployment: none on the replica, whatever its node has.
    assert ray_serve.ReplicaKey.of(public).replica_settings(public, environ={"ENGINE_API_KEY": KEY}).api_key == ""


def test_a_local_cluster_uses_a_token_that_is_never_written(monkeypatch, tmp_path):
    ray_serve = ray_serve_module()
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(ray_serve, "RAY_TOKEN_FILE", tmp_path / ".ray" / "auth_token")
    monkeypatch.setattr(ray_serve.ray, "is_initialized", lambda: False)
    seen = {}
    monkeypatch.setattr(ray_serve.ray, "init", lambda **kwargs: seen.update(os.environ, init=kwargs))
    assert ray_serve.connect() is True
    assert re.fullmatch(r"[0-9a-f]{64}", seen["RAY_AUTH_TOKEN"])  # Ray turns token mode on (the e2e test)
    assert seen["init"]["_node_ip_address"] == "127.0.0.1" and seen["init"]["include_dashboard"] is False
    assert not (tmp_path / ".ray").exists()


def test_joining_a_cluster_without_token_authentication_warns(monkeypatch, caplog):
    ray_serve = ray_serve_module()
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setattr(ray_serve.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_serve.ray, "init", lambda **kwargs: None)
    with caplog.at_level(logging.WARNING, logger="engine.ray_serve"):
        assert ray_serve.connect("10.0.0.5:6379") is False
    assert "without token authentication" in caplog.text


def test_serve_ray_beyond_loopback_needs_a_key(monkeypatch, restore_logging):
    ray_serve = ray_serve_module()
    from engine.ray_options import RayOptions

    monkeypatch.setattr(ray_serve, "connect", lambda *a: pytest.fail("connected without a key"))
    with pytest.raises(SettingsError, match="API_HOST=0.0.0.0"):
        ray_serve.serve_ray(Settings.load(env={"API_HOST": "0.0.0.0"}), RayOptions())


def test_the_ray_image_and_compose_file_authenticate_and_keep_secrets_in_files():
    dockerfile = (REPO_ROOT / "Dockerfile.ray").read_text(encoding="utf-8")
    assert re.search(r"^ENV .*RAY_AUTH_MODE=token", dockerfile, re.M)
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.ray.yml").read_text(encoding="utf-8"))
    secrets = compose["secrets"]
    for name in ("ray_auth_token", "engine_api_key"):
        assert secrets[name]["file"].endswith("/" + name) and "${" in secrets[name]["file"]
    for service in compose["services"].values():
        env = service["environment"]
        assert env["RAY_AUTH_MODE"] == "token"
        assert env["RAY_AUTH_TOKEN_PATH"] == "/run/secrets/ray_auth_token"
        assert env["ENGINE_API_KEY_FILE"] == "/run/secrets/engine_api_key"
        assert {"ray_auth_token", "engine_api_key"} <= set(service["secrets"])
        assert "RAY_AUTH_TOKEN" not in env and "ENGINE_API_KEY" not in env  # never a value in the file
    docs = (REPO_ROOT / "docs" / "ray.md").read_text(encoding="utf-8")
    assert "RAY_AUTH_MODE=token" in docs and "ENGINE_API_KEY=" not in docs


def start_ray_server(env: dict[str, str], log_path: Path, timeout: float = 240) -> Server:
    """`serve --ray` as a process, up once /health answers 200 (Ray's start can make a health
    request time out: waited out here, unlike a connection refused)."""
    port = free_port()
    with log_path.open("wb") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "engine", "serve", "--ray", "--replicas", "1",
                                    "--replica-cpus", "1"], env={**os.environ, **env, "API_PORT": str(port),
                                                                 "API_HOST": "127.0.0.1"},
                                   stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if requests.get(server.url + "/health", timeout=5).status_code == 200:
                return server
        except requests.RequestException:
            pass
        time.sleep(0.5)
    stop_server(server)
    raise RuntimeError(f"serve --ray did not come up; its output:\n{server.log()}")


def local_gcs(ray_tmp: str) -> tuple[str, dict[str, str]]:
    """The address and the environment of the GCS of the local cluster whose session is in `ray_tmp`."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            if not args[0].endswith(b"gcs_server") or ray_tmp.encode() not in b" ".join(args):
                continue
            environ = dict(item.split("=", 1) for item in (proc / "environ").read_bytes().decode().split("\0")
                           if "=" in item)
        except OSError:  # gone meanwhile
            continue
        ip = next(a for a in args if a.startswith(b"--node-ip-address=")).decode().split("=", 1)[1]
        port = next((Path(ray_tmp) / "ray" / "session_latest").glob("gcs_server_port_*")).read_text().strip()
        return f"{ip}:{port}", environ
    raise AssertionError(f"no GCS with its session in {ray_tmp}")


@pytest.mark.ray
def test_local_ray_serve_with_a_key_file_and_token_authentication(model_dir, tmp_path, monkeypatch):
    """`serve --ray` end to end on a local cluster: the replica finds the key in the file, callers
    without it get 401 (but /health), and a Ray client without the cluster's token cannot join."""
    ray_serve_module()
    key_file = tmp_path / "engine_api_key"
    key_file.write_text(KEY + "\n")
    ray_tmp = tempfile.mkdtemp(prefix="r-", dir="/tmp")  # Ray's socket paths must fit 107 bytes
    home = tmp_path / "home"
    home.mkdir()
    env = {"RAY_TMPDIR": ray_tmp, "HOME": str(home), "MODEL_PATH": str(model_dir), "MODEL": DEFAULT_MODEL,
           "ENGINE_API_KEY_FILE": str(key_file), "N_CTX": "512", "N_THREADS": "1", "N_THREADS_BATCH": "1",
           "N_PARALLEL": "1", "MAX_QUEUE": "2", "LOG_LEVEL": "WARNING", "RAY_USAGE_STATS_ENABLED": "0"}
    env.update(RAY_ADDRESS="", ENGINE_API_KEY="")  # empty: as if unset
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        # The command must choose its own token: not one that an in-process cluster of an earlier
        # test left in this process's environment (engine.ray_serve._local_token sets it there).
        monkeypatch.delenv(name, raising=False)
    server = start_ray_server(env, tmp_path / "serve.log")
    try:
        assert requests.get(server.url + "/health", timeout=30).status_code == 200
        body = {"prompt": "Estudiante: Hola.\nPaciente:", "max_length": 3}
        assert requests.post(server.url + "/generate", json=body, timeout=60).status_code == 401
        r = requests.post(server.url + "/generate", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        assert r.status_code == 200 and r.headers["X-AI-Engine-Replica"].startswith("engine#")
        address, gcs_env = local_gcs(ray_tmp)
        token = gcs_env.get("RAY_AUTH_TOKEN", "")
        assert gcs_env.get("RAY_AUTH_MODE") == "token" and re.fullmatch(r"[0-9a-f]{64}", token)
        for given, joins in ((token, True), ("0" * 64, False)):
            joined = subprocess.run(
                [sys.executable, "-c", f"import ray; ray.init(address={address!r}); print('joined')"],
                env={**os.environ, "RAY_TMPDIR": ray_tmp, "HOME": str(home), "RAY_AUTH_MODE": "token",
                     "RAY_AUTH_TOKEN": given}, capture_output=True, text=True, timeout=120)
            assert ("joined" in joined.stdout) is joins, joined.stdout + joined.stderr[-3000:]
            assert joins or "InvalidAuthToken" in joined.stderr or "AuthenticationError" in joined.stderr
    finally:
        stop_server(server)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not (home / ".ray" / "auth_token").exists()
    assert KEY not in server.log()
