"""Start-up failures are one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import DEFAULT_MODEL, REPO_ROOT, free_port


def run_engine(env_overrides: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "API_PORT": str(free_port()), **env_overrides}
    return subprocess.run([sys.executable, "-m", "engine", *args], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("model,says", [
    ("missing.gguf", "not found"),
    ("truncated.gguf", "could not load"),
    ("notes.gguf", "not a GGUF"),
])
def test_bad_startup_model_is_a_clear_error(model_dir, model, says):
    result = run_engine({"MODEL_PATH": str(model_dir), "MODEL": model}, "serve")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("ai-engine: error:")]
    assert len(error_lines) == 1 and says in error_lines[0] and model in error_lines[0], result.stderr


@pytest.mark.parametrize("env,says", [
    ({"N_CTX": "lots"}, "N_CTX must be an integer"),
    ({"API_PORT": "70000"}, "API_PORT must be between 1 and 65535"),
    ({"N_GPU_LAYERS": "-2"}, "N_GPU_LAYERS must be >= -1"),
    ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
])
def test_bad_settings_are_a_clear_error(env, says):
    result = run_engine(env, "serve")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert says in result.stderr


def test_port_in_use_is_a_clear_error(model_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_engine({"MODEL_PATH": str(model_dir), "MODEL": DEFAULT_MODEL, "API_PORT": str(port)}, "serve")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_flags_win_over_environment(model_dir):
    result = run_engine({"MODEL_PATH": str(model_dir), "MODEL": "notes.gguf"}, "serve", "--model", "missing.gguf")
    assert result.returncode == 2 and "missing.gguf" in result.stderr


def test_help_lists_every_setting():
    from engine.settings import Settings
    import dataclasses

    result = run_engine({}, "serve", "--help")
    assert result.returncode == 0
    for f in dataclasses.fields(Settings):
        assert f.metadata["env"] in result.stdout and "--" + f.name.replace("_", "-") in result.stdout


def test_ensure_model_is_idempotent(default_model_file):
    result = run_engine({"MODEL_PATH": str(default_model_file.parent)}, "ensure-model")
    assert result.returncode == 0 and result.stdout.strip() == str(default_model_file)
    assert "assembling" not in result.stderr  # already there and intact: nothing rewritten
