"""Real weights: Gemma 3 270M, from a Hugging Face checkpoint to f16, Q8_0 and Q4_K_M.

The checkpoint is made offline from the embedded GGUF with transformers' GGUF loader (see
convert/reference_checkpoint.py; cached after the first run). The whole path runs through the
CLI exactly as a user would: `ai-engine convert CKPT -o OUT --quantize Q8_0,Q4_K_M --verify`.
Greedy text at temperature 0 must equal transformers' for f16; NMSE and KL are reported per type
(in the test output and in each file's .verify.json).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from convert.reference_checkpoint import cached_checkpoint_from_gguf  # noqa: E402


@pytest.fixture(scope="module")
def gemma_checkpoint(default_model_file):
    return cached_checkpoint_from_gguf(default_model_file)


@pytest.fixture(scope="module")
def verified(gemma_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("gemma") / "gemma-3-270m-f16.gguf"
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "convert", str(gemma_checkpoint), "-o", str(out),
         "--quantize", "Q8_0,Q4_K_M", "--verify"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    rows = {}
    for name in ("gemma-3-270m-f16.gguf", "gemma-3-270m-q8_0.gguf", "gemma-3-270m-q4_k_m.gguf"):
        report = json.loads((out.parent / f"{name}.verify.json").read_text())
        rows[name.removeprefix("gemma-3-270m-").removesuffix(".gguf")] = report["rows"][0]
    return out, rows, proc.stdout


def test_cli_writes_every_output_with_sidecars(verified):
    out, _, stdout = verified
    for name in ("gemma-3-270m-f16.gguf", "gemma-3-270m-q8_0.gguf", "gemma-3-270m-q4_k_m.gguf"):
        path = out.parent / name
        assert path.is_file() and str(path) in stdout
        manifest = json.loads((out.parent / f"{name}.manifest.json").read_text())
        assert manifest["architecture"] == "Gemma3ForCausalLM"
        assert (out.parent / f"{name}.sha256").read_text().split()[0] == manifest["sha256"]
    assert "| file | type |" in stdout  # the verification table


def test_f16_greedy_text_equals_transformers(verified):
    _, rows, _ = verified
    f16 = rows["f16"]
    assert f16["greedy_same"] == 1.0, f16
    assert f16["top1_hf"] == 1.0
    assert f16["nmse_max"] < 1e-3


def test_quantized_types_close_to_f16(verified):
    _, rows, _ = verified
    for qtype in ("q8_0", "q4_k_m"):
        row = rows[qtype]
        print(f"{qtype}: NMSE vs HF {row['nmse_mean']:.2e}, KL vs f16 {row['kl_mean']:.5f}, "
              f"top-1 vs f16 {row['top1_ref']:.1%}, {row['size_mb']} MB")
        assert row["kl_mean"] < 0.05 and row["top1_ref"] > 0.8
        assert row["nmse_max"] < 2e-2
    assert rows["q4_k_m"]["size_mb"] < rows["q8_0"]["size_mb"] < rows["f16"]["size_mb"]
