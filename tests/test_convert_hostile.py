"""Hostile converter input: every size a file declares is checked before anything is read or allocated.

A safetensors header is 8 bytes of length, a JSON header and raw data; each case below is a few
hand-written bytes. Whatever a header claims (an element count that overflows int64, negative or
fractional dimensions, offsets that overlap, point past the file or leave holes, a header longer
than the file), opening the checkpoint must raise `CheckpointError` naming the file and the
tensor, never a numpy/Python error, and never allocate more than a few MB. Then config.json:
every tensor whose shape the architecture knows (embeddings and head included) is checked against
it, its sizes must be positive integers, and token ids must name rows of the embeddings. Then
LoRA adapters against their base, and a hub cache that other users could write to.
"""

from __future__ import annotations

import json
import re
import shutil
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from convert.checkpoint import Checkpoint
from convert.errors import CheckpointError
from engine.cli import main
from tests.convert_fixtures import numpy_llama, write_safetensors

MAX_PEAK = 8 << 20  # bytes Python may allocate while refusing a hostile header


def st(header: Any, data: bytes = b"", *, length: int | None = None) -> bytes:
    """A safetensors file: `header` (a dict, or raw JSON bytes), its length (or a lie), then `data`."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (len(raw) if length is None else length).to_bytes(8, "little") + raw + data


def f32(shape: list[Any], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


# id, file content, the tensor the message must name (None: a fault of the whole file), words it must hold
HEADER_CASES = [
    ("element count overflows int64", st({"w": f32([2**62, 4], 0, 0)}), "w", "0 bytes"),
    ("2^64 elements in two dims", st({"w": f32([2**32, 2**32], 0, 0)}), "w", "0 bytes"),
    ("negative dims", st({"w": f32([-4, -4], 0, 64)}, bytes(64)), "w", "shape"),
    ("fractional dim", st({"w": f32([4.5], 0, 16)}, bytes(16)), "w", "shape"),
    ("dim as a string", st({"w": f32(["4"], 0, 16)}, bytes(16)), "w", "shape"),
    ("dim as a boolean", st({"w": f32([True], 0, 4)}, bytes(4)), "w", "shape"),
    ("offsets reversed", st({"w": f32([-4], 16, 0)}, bytes(16)), "w", "data_offsets"),
    ("offsets as strings", st({"w": f32([4], "0", "16")}, bytes(16)), "w", "data_offsets"),
    ("offsets past the file", st({"w": f32([2**68], 0, 2**70)}, bytes(16)), "w", "past the end"),
    ("offsets overlap", st({"a": f32([4], 0, 16), "b": f32([4], 0, 16)}, bytes(16)), "b", "overlaps"),
    ("hole between tensors", st({"a": f32([4], 0, 16), "b": f32([4], 32, 48)}, bytes(48)), "b", "gap"),
    ("bytes after the last tensor", st({"a": f32([4], 0, 16)}, bytes(4096)), None, "after"),
    ("header length past the file", st({"a": f32([4], 0, 16)}, bytes(16), length=50 << 20), None,
     "header length"),
    ("dtype not a string", st({"w": {"dtype": {"F32": 1}, "shape": [4], "data_offsets": [0, 16]}},
                              bytes(16)), "w", "dtype"),
    ("header not an object", st(b"[1, 2]"), None, "JSON object"),
    ("entry not an object", st({"w": 5}), "w", "object"),
    ("entry without data_offsets", st({"w": {"dtype": "F32", "shape": [4]}}, bytes(16)), "w",
     "data_offsets"),
    ("deeply nested header", st(b"[" * 200_000 + b"]" * 200_000), None, "not a readable"),
]


@pytest.mark.parametrize("content,tensor,needle", [c[1:] for c in HEADER_CASES],
                         ids=[c[0] for c in HEADER_CASES])
def test_hostile_header_is_a_clear_error_before_any_allocation(tmp_path, content, tensor, needle):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(content)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError) as info:
            Checkpoint(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert "model.safetensors" in message and needle in message, message
    if tensor is not None:
        assert f"tensor {tensor}" in message, message
    assert peak < MAX_PEAK, f"{peak / 1e6:.0f} MB allocated to refuse this header"


def test_tensor_in_two_shards_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        write_safetensors(tmp_path / name, {"model.norm.weight": np.ones(4, np.float32)})
    with pytest.raises(CheckpointError, match="model.norm.weight is in both model-00001-of-00002"):
        Checkpoint(tmp_path)


# --- shapes and sizes against config.json, through the CLI -------------------------------------


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return numpy_llama(tmp_path_factory.mktemp("good") / "ckpt")  # vocab 700, hidden 64, 2 layers


def _copy(good: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(good, tmp_path / "ckpt"))


def _edit_config(folder: Path, **changes: Any) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _replace_tensor(folder: Path, name: str, value: np.ndarray) -> None:
    from safetensors.numpy import load_file

    tensors = load_file(str(folder / "model.safetensors"))
    tensors[name] = value
    write_safetensors(folder / "model.safetensors", tensors)


def _refused(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ai-engine: error: ") and "Traceback" not in "\n".join(err), err
    return err[-1]


CONFIG_CASES = [
    ("vocab_size differs from the embeddings", lambda f: _edit_config(f, vocab_size=600),
     "model.embed_tokens.weight has shape [700, 64] but config.json implies [600, 64]"),
    ("head narrower than hidden_size", lambda f: _replace_tensor(f, "lm_head.weight", np.zeros((700, 32), np.float32)),
     "lm_head.weight has shape [700, 32] but config.json implies [700, 64]"),
    ("zero attention heads", lambda f: _edit_config(f, num_attention_heads=0),
     "'num_attention_heads' must be a positive integer"),
    ("fractional hidden_size", lambda f: _edit_config(f, hidden_size=64.5),
     "'hidden_size' must be a positive integer"),
    ("vocab_size a string", lambda f: _edit_config(f, vocab_size="700"),
     "'vocab_size' must be a positive integer"),
]


@pytest.mark.parametrize("breaks,message", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_sizes_are_checked_against_config(good, tmp_path, capsys, breaks, message):
    ckpt = _copy(good, tmp_path)
    breaks(ckpt)
    out = tmp_path / "out" / "x.gguf"
    last = _refused(["convert", str(ckpt), "-o", str(out)], capsys)
    assert message in last, last
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


@pytest.mark.parametrize("layers,message", [
    (10**9, "'num_hidden_layers' is 1000000000, more than the checkpoint's"),
    (10**4, "config.json has 10000 layers but the checkpoint holds only 21 tensors"),
], ids=["more layers than weights", "more layers than tensors"])
def test_layer_count_is_bounded_before_building_tables(good, tmp_path, monkeypatch, layers, message):
    """A config claiming huge layer counts is refused before gguf's name tables (built per layer) exist."""
    import gguf

    from convert.arch import architecture_for

    real = gguf.get_tensor_name_map

    def bounded(arch, n_blocks):
        assert n_blocks < 10_000, f"a name table for {n_blocks} layers takes minutes and GBs"
        return real(arch, n_blocks)

    monkeypatch.setattr(gguf, "get_tensor_name_map", bounded)
    ckpt = _copy(good, tmp_path)
    _edit_config(ckpt, num_hidden_layers=layers)
    with Checkpoint(ckpt) as checkpoint, pytest.raises(CheckpointError, match=re.escape(message)):
        architecture_for(checkpoint)


def test_token_id_past_the_embeddings_is_refused_before_sizing_tables(good, tmp_path, capsys, monkeypatch):
    """Tables of tokens are sized by the largest id: an id of 10^12 must not become 10^12 entries."""
    from convert.vocab import Vocab

    real = Vocab.pad_to

    def bounded(self, n):
        assert n <= 10**6, f"padding the vocabulary to {n} tokens"
        return real(self, n)

    monkeypatch.setattr(Vocab, "pad_to", bounded)
    ckpt = _copy(good, tmp_path)
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {str(10**12): {"content": "<evil>", "special": True}}
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    last = _refused(["convert", str(ckpt), "-o", str(tmp_path / "x.gguf")], capsys)
    assert "token id 1000000000000" in last and "700 rows" in last, last


# --- LoRA adapters against their base -----------------------------------------------------------


def _adapter(folder: Path, content: bytes, r: int = 4) -> Path:
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(content)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "bias": "none", "target_modules": ["q_proj"]}))
    return folder


Q = "base_model.model.model.layers.0.self_attn.q_proj"


def test_lora_header_that_lies_about_its_rank_is_refused(good, tmp_path, capsys):
    # rank 2^62: A is 2^62 × 64 and B 64 × 2^62, in no bytes at all (the element counts wrap to 0)
    content = st({f"{Q}.lora_A.weight": f32([2**62, 64], 0, 0), f"{Q}.lora_B.weight": f32([64, 2**62], 0, 0)})
    adapter = _adapter(tmp_path / "adapter", content)
    out = tmp_path / "a.gguf"
    last = _refused(["convert-lora", str(adapter), "--base", str(good), "-o", str(out)], capsys)
    assert "adapter_model.safetensors" in last and f"tensor {Q}.lora_A.weight" in last, last
    assert list(tmp_path.glob("*.gguf*")) == [] and list(tmp_path.glob(".*partial")) == []


def test_lora_rank_must_match_adapter_config(good, tmp_path, capsys):
    a, b = np.zeros((8, 64), np.float32), np.zeros((64, 8), np.float32)
    adapter = tmp_path / "adapter"
    _adapter(adapter, b"", r=4)
    write_safetensors(adapter / "adapter_model.safetensors", {f"{Q}.lora_A.weight": a, f"{Q}.lora_B.weight": b})
    last = _refused(["convert-lora", str(adapter), "--base", str(good), "-o", str(tmp_path / "a.gguf")], capsys)
    assert "rank 8" in last and "r=4" in last, last


# --- the hub cache --------------------------------------------------------------------------------


def test_hub_cache_writable_by_others_is_refused(tmp_path, monkeypatch):
    """Another user who can write the cache can plant files or links where downloads land."""
    pytest.importorskip("huggingface_hub")
    import huggingface_hub
    import huggingface_hub.constants

    from convert import hub

    cache = tmp_path / "hub"
    cache.mkdir()
    cache.chmod(0o777)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: calls.append(a) or str(cache))
    with pytest.raises(CheckpointError, match="writable by other users"):
        hub.download("clinic/tiny-llama")
    assert calls == []
