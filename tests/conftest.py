"""Shared fixtures: the real default model, a model folder with good and bad files, a real server.

The server fixture starts `python -m engine serve` as a separate process on a free port, exactly
as `scripts/serve.sh` does, and talks to it over real HTTP.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from engine.default_model import ensure_default_model
from engine.settings import REPO_ROOT
from tests.server_process import start_server, stop_server

DATA = Path(__file__).parent / "data"
DEFAULT_MODEL = "gemma-3-270m-q4_k_m.gguf"


def load_cases() -> list[dict]:
    with (DATA / "patient_cases.json").open(encoding="utf-8") as f:
        return json.load(f)["cases"]


def link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


@pytest.fixture(scope="session", autouse=True)
def prompt_cache_dir(tmp_path_factory) -> Path:
    """The prompt cache on disk of every engine the tests start (servers inherit the environment)
    lives in a temporary folder, never in the user's cache directory."""
    folder = tmp_path_factory.mktemp("prompt-cache")
    previous = os.environ.get("PROMPT_CACHE_DIR")
    os.environ["PROMPT_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("PROMPT_CACHE_DIR", None)
    else:
        os.environ["PROMPT_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def default_model_file() -> Path:
    """The embedded default model, assembled into the repo's models/ folder if not there yet."""
    return ensure_default_model(REPO_ROOT / "models")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, default_model_file) -> Path:
    """A MODEL_PATH with the default model, a second name for it, and files that must be refused."""
    root = tmp_path_factory.mktemp("models")
    link_or_copy(default_model_file, root / DEFAULT_MODEL)
    link_or_copy(default_model_file, root / "persona" / "alt-model.gguf")
    with default_model_file.open("rb") as f:
        (root / "truncated.gguf").write_bytes(f.read(4 << 20))  # valid header, data cut short
    (root / "notes.gguf").write_text("these are not model weights\n")
    outside = tmp_path_factory.mktemp("outside")
    link_or_copy(default_model_file, outside / "elsewhere.gguf")
    (root / "escape.gguf").symlink_to(outside / "elsewhere.gguf")
    return root


def _server_fixture(model_dir, tmp_path_factory, **env):
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    srv = start_server({"MODEL_PATH": str(model_dir), "MODEL": DEFAULT_MODEL, "N_CTX": "2048",
                        "LOG_LEVEL": "INFO", **env}, log_path)
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def server(model_dir, tmp_path_factory):
    """A real engine on the real default model, shared by the HTTP tests (default settings)."""
    yield from _server_fixture(model_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def server_generating(model_dir, tmp_path_factory):
    """Conversation cache on, response cache off: every request really generates."""
    yield from _server_fixture(model_dir, tmp_path_factory, RESPONSE_CACHE_SIZE="0")


@pytest.fixture(scope="session")
def server_uncached(model_dir, tmp_path_factory):
    """No caches at all: every prompt is evaluated in full, every request generates."""
    yield from _server_fixture(model_dir, tmp_path_factory, RESPONSE_CACHE_SIZE="0", CACHE_RAM_MB="0")


@pytest.fixture(scope="session")
def cases() -> list[dict]:
    return load_cases()
