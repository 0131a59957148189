"""Shared fixtures: the real default model, a model folder with good and bad files, a real server.

The server fixture starts `python -m engine serve` as a separate process on a free port, exactly
as `scripts/serve.sh` does, and talks to it over real HTTP. Every file a fixture writes is under a
temporary folder: the default model too (the repository's models/ is only read). Plain helpers
shared by the test files are in tests/helpers.py.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.default_model import ensure_default_model
from engine.settings import REPO_ROOT
# DATA, DEFAULT_MODEL, link_or_copy, load_cases and _server_fixture stay importable from here for
# the test files that still do so; their home is tests/helpers.py.
from tests.helpers import DATA, DEFAULT_MODEL, Fakes, link_or_copy, load_cases, server_fixture, tiny_gguf  # noqa: F401
from tests.server_process import free_port

_server_fixture = server_fixture


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
def default_model_file(tmp_path_factory) -> Path:
    """The embedded default model in a session folder of its own. A copy the set-up (README:
    `scripts/test.sh`) already put in the repository's models/ is linked from there; otherwise it
    is assembled from its package. Either way its sha256 is checked, and nothing is written to
    models/."""
    folder = tmp_path_factory.mktemp("default-model")
    placed = REPO_ROOT / "models" / DEFAULT_MODEL
    if placed.is_file():
        link_or_copy(placed, folder / DEFAULT_MODEL)
    return ensure_default_model(folder)


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


@pytest.fixture(scope="session")
def server(model_dir, tmp_path_factory):
    """A real engine on the real default model, shared by the HTTP tests (default settings)."""
    yield from server_fixture(model_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def server_generating(model_dir, tmp_path_factory):
    """Conversation cache on, response cache off: every request really generates."""
    yield from server_fixture(model_dir, tmp_path_factory, RESPONSE_CACHE_SIZE="0")


@pytest.fixture(scope="session")
def server_uncached(model_dir, tmp_path_factory):
    """No caches at all: every prompt is evaluated in full, every request generates. The prompt
    cache on disk is off too (its folder is shared by the session's servers: another server's
    saved case prompt would be restored here)."""
    yield from server_fixture(model_dir, tmp_path_factory, RESPONSE_CACHE_SIZE="0", CACHE_RAM_MB="0",
                              PROMPT_CACHE_MB="0")


@pytest.fixture(scope="session")
def fake_server(tmp_path_factory):
    """The engine's app behind its waitress server, built as `serve` builds them, in this process
    on fake runtimes (tests/helpers.py `Fakes`, with a GGUF header under the default model's name
    as the default): for HTTP behaviour that does not depend on the model, in milliseconds.
    `url` as a server fixture has, and `fakes` to look inside."""
    from engine.http_server import build_server, close_from_another_thread

    root = tmp_path_factory.mktemp("fake-engine")
    tiny_gguf(root / "models" / DEFAULT_MODEL)
    fakes = Fakes(root, n_ctx=2048, api_host="127.0.0.1", api_port=free_port()).load(DEFAULT_MODEL)
    server = build_server(fakes.app(), fakes.settings)
    loop = threading.Thread(target=server.run, name="fake-server", daemon=True)
    loop.start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{server.effective_port}", fakes=fakes)
    close_from_another_thread(server)
    loop.join(timeout=30)
    fakes.manager.close()


@pytest.fixture(scope="session")
def cases() -> list[dict]:
    return load_cases()
