"""A conversion that is killed, terminated or fails leaves no .gguf behind; a finished one is whole.

The checkpoint here is written with numpy alone (a Llama with a 100k-row embedding, ~200 MB), so
a conversion lasts long enough to be interrupted midway.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.cli import main
from engine.default_model import sha256_file
from tests.convert_fixtures import numpy_llama


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory) -> Path:
    return numpy_llama(tmp_path_factory.mktemp("big") / "ckpt", vocab_rows=100_000, hidden=256, layers=1)


def _start(ckpt: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engine", "convert", str(ckpt), "-o", str(out),
                             "--outtype", "f32"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_partial(proc: subprocess.Popen, folder: Path, min_bytes: int = 1 << 20) -> Path:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for path in folder.glob(".*.partial"):
            try:
                if path.stat().st_size >= min_bytes:
                    return path
            except FileNotFoundError:
                pass
        assert proc.poll() is None, "the conversion finished before it could be interrupted"
        time.sleep(0.002)
    raise AssertionError("no partial output appeared")


def _ggufs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".gguf"))


def test_killed_midway_leaves_no_gguf_and_next_run_cleans_up(big_checkpoint, tmp_path):
    out = tmp_path / "model.gguf"
    proc = _start(big_checkpoint, out)
    partial = _wait_for_partial(proc, tmp_path)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    assert _ggufs(tmp_path) == []
    assert partial.exists()  # only a hidden .partial can survive SIGKILL...
    assert main(["convert", str(big_checkpoint), "-o", str(out), "--outtype", "f32"]) == 0
    assert not partial.exists()  # ...and the next run for the same output removes it
    assert _ggufs(tmp_path) == ["model.gguf"]
    assert (tmp_path / "model.gguf.sha256").read_text().split()[0] == sha256_file(out)


def test_terminated_midway_leaves_nothing(big_checkpoint, tmp_path):
    out = tmp_path / "model.gguf"
    proc = _start(big_checkpoint, out)
    _wait_for_partial(proc, tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert b"Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


def test_write_error_midway_is_one_line_and_leaves_nothing(big_checkpoint, tmp_path, monkeypatch, capsys):
    import convert.pipeline as pipeline

    calls = {"n": 0}
    real_encode = pipeline.encode

    def failing_encode(values, qtype):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        return real_encode(values, qtype)

    monkeypatch.setattr(pipeline, "encode", failing_encode)
    status = main(["convert", str(big_checkpoint), "-o", str(tmp_path / "model.gguf")])
    err = capsys.readouterr().err
    assert status == 2
    assert err.strip().splitlines()[-1].startswith("ai-engine: error: writing")
    assert "No space left on device" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_replaced_only_when_complete(big_checkpoint, tmp_path, monkeypatch):
    import convert.pipeline as pipeline

    out = tmp_path / "model.gguf"
    out.write_bytes(b"previous good file")
    monkeypatch.setattr(pipeline, "encode", lambda values, qtype: (_ for _ in ()).throw(OSError(5, "I/O error")))
    assert main(["convert", str(big_checkpoint), "-o", str(out)]) == 2
    assert out.read_bytes() == b"previous good file"


def test_sidecars_describe_the_file(tmp_path):
    ckpt = numpy_llama(tmp_path / "tiny")
    out = tmp_path / "out" / "tiny-q8_0.gguf"
    assert main(["convert", str(ckpt), "-o", str(out), "--outtype", "q8_0", "--license", "apache-2.0"]) == 0
    manifest = json.loads((out.parent / "tiny-q8_0.gguf.manifest.json").read_text())
    assert manifest["sha256"] == sha256_file(out) and manifest["size_bytes"] == out.stat().st_size
    assert manifest["type"] == "q8_0" and manifest["architecture"] == "LlamaForCausalLM"
    assert manifest["source"] == {"path": str(ckpt.resolve())}
    assert manifest["converter_version"]
    from convert.gguf_info import read_info

    meta = read_info(out).metadata
    assert meta["general.license"] == "apache-2.0" and meta["general.name"] == "tiny"
    assert meta["general.file_type"] == 7  # MOSTLY_Q8_0
    assert sorted(os.listdir(out.parent)) == ["tiny-q8_0.gguf", "tiny-q8_0.gguf.manifest.json",
                                              "tiny-q8_0.gguf.sha256"]


# --- temporary and final names that someone else prepared ----------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return numpy_llama(tmp_path_factory.mktemp("tiny") / "tiny")


def test_links_planted_at_temporary_names_are_not_followed(tiny, tmp_path):
    """Temporaries are created exclusively under unpredictable names, so a planted link is never opened."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    # `.NAME.PID.partial` was the whole temporary name once: anyone able to write the folder could
    # guess it and point it at a file of the user's.
    for name in ("model.gguf", "model.gguf.sha256", "model.gguf.manifest.json"):
        (out_dir / f".{name}.{os.getpid()}.partial").symlink_to(victim)
    assert main(["convert", str(tiny), "-o", str(out_dir / "model.gguf"), "--outtype", "f32"]) == 0
    assert victim.read_text() == "keep me"
    out = out_dir / "model.gguf"
    assert not out.is_symlink() and out.read_bytes()[:4] == b"GGUF"
    assert (out_dir / "model.gguf.sha256").read_text().split()[0] == sha256_file(out)


@pytest.mark.parametrize("link", ["model.gguf", "model.gguf.sha256"])
def test_output_that_is_a_link_is_refused_before_writing(tiny, tmp_path, capsys, link):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / link).symlink_to(victim)
    assert main(["convert", str(tiny), "-o", str(out_dir / "model.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ai-engine: error: ") and "is a symbolic link" in err, err
    assert victim.read_text() == "keep me" and (out_dir / link).is_symlink()
    assert sorted(p.name for p in out_dir.iterdir()) == [link]
