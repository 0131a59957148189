"""Hub repo ids go through huggingface_hub, which honours HF_HOME and HF_HUB_OFFLINE.

There is no network here, so the hub cache is laid out by hand, as `snapshot_download` leaves it
(HF_HOME/hub/models--ORG--NAME/{refs/main, snapshots/REV/…}), and the conversion runs offline.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("huggingface_hub")

from convert.gguf_info import read_info  # noqa: E402
from engine.cli import main  # noqa: E402
from tests.convert_fixtures import numpy_llama  # noqa: E402

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "hf-home"
    snapshot = home / "hub" / "models--clinic--tiny-llama" / "snapshots" / REVISION
    numpy_llama(snapshot)
    (snapshot / "README.md").write_text("---\nlicense: mit\nbase_model: meta-llama/Llama-2-7b-hf\n"
                                        "language:\n- es\n- en\n---\n# tiny\n")
    refs = snapshot.parent.parent / "refs"
    refs.mkdir()
    (refs / "main").write_text(REVISION)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    # huggingface_hub reads its environment at import time.
    import importlib

    import huggingface_hub.constants

    importlib.reload(huggingface_hub.constants)
    yield home
    monkeypatch.undo()
    importlib.reload(huggingface_hub.constants)


def test_repo_id_converts_from_the_cache(hf_home, tmp_path, capsys):
    out = tmp_path / "tiny-f16.gguf"
    assert main(["convert", "clinic/tiny-llama", "-o", str(out)]) == 0
    manifest = json.loads((tmp_path / "tiny-f16.gguf.manifest.json").read_text())
    assert manifest["source"] == {"repo_id": "clinic/tiny-llama", "revision": None}
    meta = read_info(out).metadata
    assert meta["general.name"] == "tiny-llama"
    assert meta["general.license"] == "mit"  # from the model card
    assert meta["general.source.repo_url"] == "https://huggingface.co/clinic/tiny-llama"
    assert meta["general.base_model.0.name"] == "meta-llama/Llama-2-7b-hf"


def test_repo_missing_from_cache_offline_is_one_line(hf_home, tmp_path, capsys):
    assert main(["convert", "clinic/other-model", "-o", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ai-engine: error: clinic/other-model is not in the local cache")
    assert "HF_HUB_OFFLINE" in err


def test_repo_without_safetensors_needs_torch_or_says_so(hf_home, tmp_path, capsys, monkeypatch):
    snapshot = hf_home / "hub" / "models--clinic--tiny-llama" / "snapshots" / REVISION
    (snapshot / "model.safetensors").unlink()
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    assert main(["convert", "clinic/tiny-llama", "-o", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "has no .safetensors weights" in err and "pip install torch" in err
    shutil.rmtree(snapshot)
