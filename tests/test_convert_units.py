"""Small pieces of the converter: pre-tokenizer identification, names, bf16, shards, RoPE factors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from convert.checkpoint import bf16_to_f32
from convert.cli import quantized_name
from convert.errors import TokenizerError
from convert.pretokenizers import GPT2_REGEX, LLAMA3_REGEX, QWEN2_REGEX, identify
from engine.cli import main
from tests.convert_fixtures import numpy_llama


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}


@pytest.mark.parametrize("tokenizer,expected", [
    ({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [_split(LLAMA3_REGEX), BYTE_LEVEL]}}, "llama-bpe"),
    ({"normalizer": {"type": "NFC"},
      "pre_tokenizer": {"type": "Sequence", "pretokenizers": [_split(QWEN2_REGEX), BYTE_LEVEL]}}, "qwen2"),
    ({"pre_tokenizer": {**BYTE_LEVEL, "use_regex": True}}, "gpt-2"),
    ({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {**BYTE_LEVEL, "use_regex": True}]}}, "starcoder"),
], ids=["llama3", "qwen2", "gpt2", "starcoder"])
def test_pretokenizer_identified_from_its_rules(tokenizer, expected):
    assert identify(tokenizer) == expected


@pytest.mark.parametrize("tokenizer", [
    {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [_split(LLAMA3_REGEX.replace("{1,3}", "{1,4}")),
                                                             BYTE_LEVEL]}},
    {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [_split(LLAMA3_REGEX), {**BYTE_LEVEL, "use_regex": True}]}},
    {"pre_tokenizer": {**BYTE_LEVEL, "add_prefix_space": True, "use_regex": True}},
    {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {**_split(GPT2_REGEX), "behavior": "Removed"}, BYTE_LEVEL]}},
    {"pre_tokenizer": {"type": "Whitespace"}},
], ids=["digit groups of 4", "double split", "prefix space", "removed splits", "whitespace"])
def test_unknown_pretokenizer_is_an_error(tokenizer):
    with pytest.raises(TokenizerError, match="unrecognised BPE pre-tokenizer"):
        identify(tokenizer)


@pytest.mark.parametrize("out,outtype,qtype,expected", [
    ("m/gemma-3-270m-f16.gguf", "f16", "Q4_K_M", "m/gemma-3-270m-q4_k_m.gguf"),
    ("m/model.F32.gguf", "f32", "Q8_0", "m/model-q8_0.gguf"),
    ("m/model.gguf", "f16", "Q5_K_M", "m/model-q5_k_m.gguf"),
])
def test_quantized_output_names(out, outtype, qtype, expected):
    assert quantized_name(Path(out), outtype, qtype) == Path(expected)


def test_bf16_widening_is_exact():
    values = np.array([1.0, -2.5, 3.140625, 2.0 ** -126, -0.0, np.inf, 65280.0], dtype=np.float32)
    raw = (values.view(np.uint32) >> 16).astype(np.uint16)  # exactly representable in bf16
    assert np.array_equal(bf16_to_f32(raw), values)


def test_sharded_checkpoint_converts_to_the_same_file(tmp_path):
    one = numpy_llama(tmp_path / "a" / "ckpt", shards=1)
    three = numpy_llama(tmp_path / "b" / "ckpt", shards=3)
    assert len(json.loads((three / "model.safetensors.index.json").read_text())["weight_map"]) == 21
    assert main(["convert", str(one), "-o", str(tmp_path / "a.gguf"), "--outtype", "f32"]) == 0
    assert main(["convert", str(three), "-o", str(tmp_path / "b.gguf"), "--outtype", "f32"]) == 0
    digest = lambda p: (tmp_path / p).read_text().split()[0]  # noqa: E731
    assert digest("a.gguf.sha256") == digest("b.gguf.sha256")


def test_bf16_and_f32_sources_convert_alike(tmp_path):
    """A bf16 checkpoint converts to exactly the values of the same weights stored as f32."""
    from tests.convert_fixtures import write_safetensors

    f32 = numpy_llama(tmp_path / "f32" / "ckpt")
    bf16 = tmp_path / "bf16" / "ckpt"
    bf16.parent.mkdir()
    import shutil

    shutil.copytree(f32, bf16)
    from convert.checkpoint import Checkpoint

    with Checkpoint(f32) as ckpt:
        tensors = {n: t.read() for n, t in ckpt.tensors.items()}
    rounded = {n: bf16_to_f32((v.view(np.uint32) >> 16).astype(np.uint16)) for n, v in tensors.items()}
    write_safetensors(f32 / "model.safetensors", rounded)
    header = {}
    blobs = []
    offset = 0
    for n, v in rounded.items():
        data = (v.view(np.uint32) >> 16).astype(np.uint16).tobytes()
        header[n] = {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    with (bf16 / "model.safetensors").open("wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))
    for folder in (f32, bf16):
        assert main(["convert", str(folder), "-o", str(folder.parent / "m.gguf"), "--outtype", "f32"]) == 0
    digest = lambda d: (d.parent / "m.gguf.sha256").read_text().split()[0]  # noqa: E731
    assert digest(f32) == digest(bf16)

    # And bf16 weights reach a bf16 GGUF bit for bit.
    import gguf

    assert main(["convert", str(bf16), "-o", str(tmp_path / "b.gguf"), "--outtype", "bf16"]) == 0
    stored = {t.name: t for t in gguf.GGUFReader(tmp_path / "b.gguf").tensors}
    want = (rounded["model.layers.0.mlp.down_proj.weight"].view(np.uint32) >> 16).astype(np.uint16)
    assert stored["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.BF16
    assert np.array_equal(np.asarray(stored["blk.0.ffn_down.weight"].data).view(np.uint16).ravel(), want.ravel())


def test_llama3_rope_factors_match_transformers():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from convert.arch.llama import llama3_rope_factors

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = LlamaConfig(hidden_size=2048, num_attention_heads=32, head_dim=64,
                         max_position_embeddings=131072, rope_parameters=rope)
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    base = 1.0 / 500000.0 ** (np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(llama3_rope_factors(rope, 64), base / inv_freq.numpy(), rtol=1e-5)


def test_interleave_rows_undoes_transformers_rotate_half_layout():
    from convert.arch.llama import interleave_rows

    # Two heads of dim 4: transformers stores [x0 x1 | y0 y1] per head, llama.cpp wants x0 y0 x1 y1.
    assert interleave_rows(8, 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_chat_template_sources_in_transformers_order(tmp_path):
    from convert.special import chat_template

    assert chat_template(tmp_path, {}) is None
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "from json"}))
    assert chat_template(tmp_path, {}) == "from json"
    (tmp_path / "chat_template.jinja").write_text("from jinja")
    assert chat_template(tmp_path, {}) == "from jinja"
    assert chat_template(tmp_path, {"chat_template": "from config"}) == "from config"


def test_special_tokens_and_flags(tmp_path):
    from convert.special import load_special

    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "hola"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": {"content": "<eos>"}, "pad_token": "<pad>"}))
    (tmp_path / "config.json").write_text(json.dumps({"unk_token_id": 3, "eos_token_id": [1, 4]}))
    template = {"post_processor": {"type": "TemplateProcessing", "single": [
        {"SpecialToken": {"id": "<bos>"}}, {"Sequence": {"id": "A"}}, {"SpecialToken": {"id": "<eos>"}}]}}
    special = load_special(tmp_path, tokens, template, sentencepiece=False)
    assert special.ids == {"bos": 2, "eos": 1, "unk": 3, "pad": 0}
    assert special.add_bos and special.add_eos
    assert not load_special(tmp_path, tokens, {}, sentencepiece=False).add_bos
    assert load_special(tmp_path, tokens, None, sentencepiece=True).add_bos  # SentencePiece default
