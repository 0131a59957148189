"""Every refusal is a non-zero exit and one line saying why (and what to do), never a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from engine.cli import main
from tests.convert_fixtures import numpy_llama


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return numpy_llama(tmp_path_factory.mktemp("good") / "ckpt")


def _copy(good: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(good, dst)
    return dst


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def unsupported_arch(folder: Path) -> None:
    _edit_config(folder, architectures=["GPT2LMHeadModel"])


def no_config(folder: Path) -> None:
    (folder / "config.json").unlink()


def prequantized(folder: Path) -> None:
    _edit_config(folder, quantization_config={"quant_method": "gptq", "bits": 4})


def wrong_hidden_size(folder: Path) -> None:
    _edit_config(folder, hidden_size=96, intermediate_size=192)


def fewer_layers_in_weights(folder: Path) -> None:
    _edit_config(folder, num_hidden_layers=3)


def truncated_weights(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])


def missing_shard(folder: Path) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "model.safetensors",
                        "lm_head.weight": "model-00002-of-00002.safetensors"}}))


def no_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()


def no_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.model").unlink()


def unknown_pretokenizer(folder: Path) -> None:
    from tests.convert_fixtures import byte_level_bpe

    (folder / "tokenizer.model").unlink()
    (folder / "tokenizer_config.json").unlink()
    byte_level_bpe(folder, r"\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+|\s+")


def lowercase_normalizer(folder: Path) -> None:
    from convert.pretokenizers import LLAMA3_REGEX
    from tests.convert_fixtures import byte_level_bpe

    (folder / "tokenizer.model").unlink()
    (folder / "tokenizer_config.json").unlink()
    byte_level_bpe(folder, LLAMA3_REGEX, normalizer="Lowercase")


def unlisted_tensor(folder: Path) -> None:
    from tests.convert_fixtures import write_safetensors
    import numpy as np

    write_safetensors(folder / "extra.safetensors", {"model.vision_tower.proj.weight": np.zeros((4, 4))})


CASES: list[tuple[str, Callable[[Path], None], str]] = [
    ("unsupported architecture", unsupported_arch,
     "architecture GPT2LMHeadModel is not supported; supported: Gemma2ForCausalLM, Gemma3ForCausalLM"),
    ("no config.json", no_config, "has no config.json"),
    ("pre-quantized weights", prequantized, "pre-quantized weights (gptq)"),
    ("shape differs from config", wrong_hidden_size, "but config.json implies"),
    ("layer count differs", fewer_layers_in_weights, "config.json has 3 layers"),
    ("truncated safetensors", truncated_weights, "is truncated"),
    ("missing shard", missing_shard, "is missing"),
    ("no weights", no_weights, "has no weights"),
    ("no tokenizer", no_tokenizer, "has no tokenizer"),
    ("unknown BPE pre-tokenizer", unknown_pretokenizer, "unrecognised BPE pre-tokenizer"),
    ("normalizer llama.cpp lacks", lowercase_normalizer, "normalizer Lowercase has no llama.cpp equivalent"),
    ("tensor with no GGUF name", unlisted_tensor, "model.vision_tower.proj.weight [4, 4] has no GGUF counterpart"),
]


@pytest.mark.parametrize("name,breaks,message", CASES, ids=[c[0] for c in CASES])
def test_bad_checkpoint_is_refused_in_one_line(name, breaks, message, good, tmp_path, capsys):
    ckpt = _copy(good, tmp_path)
    breaks(ckpt)
    out = tmp_path / "out.gguf"
    assert main(["convert", str(ckpt), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ai-engine: error: ") and message in err[-1], err[-1]
    assert not out.exists() and not list(tmp_path.glob("*.gguf*"))


@pytest.mark.parametrize("args,message", [
    (["quantize", "{gguf}", "{tmp}/x.gguf", "--type", "IQ2_XS"], "IQ2_XS needs an importance matrix"),
    (["quantize", "{gguf}", "{tmp}/x.gguf", "--type", "Q9_K"], "unknown quantization type Q9_K"),
    (["quantize", "{tmp}/missing.gguf", "{tmp}/x.gguf", "--type", "Q4_0"], "does not exist"),
    (["quantize", "{gguf}", "{gguf}", "--type", "Q4_0"], "must be a different file"),
    (["convert", "{ckpt}", "-o", "{tmp}/x.bin"], "must end in .gguf"),
    (["convert", "{ckpt}", "-o", "{tmp}/x.gguf", "--quantize", "Q4_K_M,IQ1_S"], "IQ1_S needs an importance matrix"),
    (["convert", "{tmp}/nowhere", "-o", "{tmp}/x.gguf"], "neither a folder nor a Hugging Face repo id"),
    (["verify", "{tmp}/notes.gguf"], "is not a GGUF file"),
    (["verify", "{tmp}/half.gguf"], "llama.cpp cannot load"),
], ids=["imatrix type", "unknown type", "missing input", "same file", "not .gguf", "imatrix in --quantize",
        "no such source", "verify non-gguf", "verify truncated"])
def test_bad_arguments_are_refused_in_one_line(args, message, good, tmp_path, capsys):
    gguf = tmp_path / "in.gguf"
    assert main(["convert", str(good), "-o", str(gguf)]) == 0
    (tmp_path / "notes.gguf").write_text("not a model")
    (tmp_path / "half.gguf").write_bytes(gguf.read_bytes()[: gguf.stat().st_size // 2])
    capsys.readouterr()
    argv = [a.format(gguf=gguf, tmp=tmp_path, ckpt=good) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ai-engine: error: ") and message in err[-1], err[-1]
    assert not (tmp_path / "x.gguf").exists()


def test_pytorch_bin_without_torch_says_what_to_install(good, tmp_path):
    ckpt = _copy(good, tmp_path)
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"\0" * 16)
    fake = tmp_path / "no_torch"
    fake.mkdir()
    (fake / "torch.py").write_text("raise ImportError('torch is not installed')\n")
    proc = subprocess.run([sys.executable, "-m", "engine", "convert", str(ckpt), "-o", str(tmp_path / "x.gguf")],
                          capture_output=True, text=True, env={"PYTHONPATH": str(fake), "PATH": "/usr/bin:/bin"},
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "pytorch_model.bin weights, which need torch" in last and "pip install torch" in last


def test_pytorch_bin_with_torch_converts(good, tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.numpy import load_file

    ckpt = _copy(good, tmp_path)
    tensors = load_file(str(ckpt / "model.safetensors"))
    (ckpt / "model.safetensors").unlink()
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, ckpt / "pytorch_model.bin")
    assert main(["convert", str(ckpt), "-o", str(tmp_path / "bin.gguf"), "--outtype", "f32"]) == 0
    assert main(["convert", str(good), "-o", str(tmp_path / "st.gguf"), "--outtype", "f32", "--name", "ckpt"]) == 0
    from convert.gguf_info import read_info

    assert read_info(tmp_path / "bin.gguf").tensor_shapes == read_info(tmp_path / "st.gguf").tensor_shapes


def test_tokenizer_model_without_sentencepiece_says_what_to_install(good, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import raises ImportError
    assert main(["convert", str(good), "-o", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "reading tokenizer.model needs the sentencepiece package: pip install sentencepiece" in err
