"""Every supported architecture and tokenizer kind, end to end, on tiny random checkpoints.

For each kind (tests/convert_fixtures.py): build the checkpoint with transformers, convert it to
f32, f16 and q8_0, load each GGUF in llama-cpp-python, and compare with transformers: last-token
logit NMSE (f32 < 1e-5, f16 < 1e-3, q8_0 < 1e-2), top-1 and greedy agreement, and tokenization of
Spanish and English text.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from convert.gguf_info import read_info  # noqa: E402
from convert.metadata import SourceInfo  # noqa: E402
from convert.pipeline import convert  # noqa: E402
from convert.verify import PROMPTS, print_table, verify_files  # noqa: E402
from tests.convert_fixtures import (  # noqa: E402
    KINDS, LEADING_SPACE_TEXT, QWEN2_CHAT_TEMPLATE, TOKENIZE_TEXTS, build)

GGUF_ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "GemmaForCausalLM": "gemma",
             "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3", "Qwen2ForCausalLM": "qwen2"}
NMSE_LIMITS = {"f32": 1e-5, "f16": 1e-3, "q8_0": 1e-2}


@pytest.fixture(scope="module", params=KINDS, ids=[k.id for k in KINDS])
def converted(request, tmp_path_factory):
    """(kind, checkpoint folder, {outtype: gguf path}, verification report) for one kind."""
    kind = request.param
    root = tmp_path_factory.mktemp(kind.id)
    folder = build(kind, root / "hf", root / "work")
    outtypes = [*NMSE_LIMITS, *(["bf16"] if kind.dtype == "bfloat16" else [])]
    paths = {t: convert(SourceInfo(folder), root / f"{kind.id}-{t}.gguf", t).path for t in outtypes}
    # One thread: these models are tiny, and a second spinning thread only loses on a busy machine.
    report = verify_files(list(paths.values()), hf_source=SourceInfo(folder), greedy_tokens=8, threads=1,
                          prompts=[PROMPTS[1], PROMPTS[2]])  # one Spanish, one English
    print_table(report, sys.stdout)
    return kind, folder, paths, report


def test_logits_match_transformers(converted):
    kind, _, paths, report = converted
    rows = {r.file: r for r in report.rows}
    for outtype, limit in NMSE_LIMITS.items():
        row = rows[paths[outtype].name]
        assert row.nmse_max < limit, f"{kind.id} {outtype}: NMSE {row.nmse_max:.2e} ≥ {limit:g}"
    for outtype in ("f32", "f16"):
        row = rows[paths[outtype].name]
        assert row.top1_hf == 1.0 and row.greedy_same == 1.0, f"{kind.id} {outtype}: {row}"
    assert rows[paths["q8_0"].name].kl_mean < 0.01
    if "bf16" in paths:
        # The weights are copied bit for bit (test_convert_units), but llama.cpp rounds the
        # activations to bf16 in bf16 matmuls, so this is f16-class accuracy.
        assert rows[paths["bf16"].name].nmse_max < NMSE_LIMITS["f16"]


def _llama_tokens(path: Path, text: str) -> list[int]:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode(), add_bos=True, special=False)
    finally:
        llm.close()


def test_tokenization_matches_transformers(converted):
    from transformers import AutoTokenizer

    kind, folder, paths, _ = converted
    hf = AutoTokenizer.from_pretrained(folder)
    spm = None
    if (folder / "tokenizer.model").is_file():
        import sentencepiece

        spm = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    for text in TOKENIZE_TEXTS:
        ours = _llama_tokens(paths["f16"], text)
        theirs = hf(text)["input_ids"]
        if spm is not None:
            # A SentencePiece model was converted: SentencePiece itself is the ground truth, and
            # llama.cpp must agree with it even where transformers' converted tokenizer does not.
            truth = [hf.bos_token_id, *spm.encode(text)]
            assert ours == truth, f"{kind.id}: {text!r}"
            if theirs != truth:
                print(f"{kind.id}: transformers differs from SentencePiece on {text!r}")
                continue
        assert ours == theirs, f"{kind.id}: {text!r}\n  llama.cpp    {ours}\n  transformers {theirs}"
    if spm is not None:
        ours = _llama_tokens(paths["f16"], LEADING_SPACE_TEXT)
        assert ours == [hf.bos_token_id, *spm.encode(LEADING_SPACE_TEXT)]


def test_metadata(converted):
    kind, folder, paths, _ = converted
    info = read_info(paths["f16"])
    meta = info.metadata
    assert meta["general.architecture"] == GGUF_ARCH[kind.arch]
    assert meta["general.name"] == "hf"
    assert meta["general.file_type"] == 1  # MOSTLY_F16
    assert "tokenizer.ggml.add_bos_token" in meta
    if kind.id == "qwen2":
        assert meta["tokenizer.ggml.pre"] == "qwen2"
        assert meta["tokenizer.chat_template"] == QWEN2_CHAT_TEMPLATE
        assert meta["tokenizer.ggml.add_bos_token"] is False
    if kind.id == "llama3-bpe":
        assert meta["tokenizer.ggml.pre"] == "llama-bpe"
        assert "rope_freqs.weight" in info.tensor_shapes
    manifest = json.loads(paths["f16"].with_name(paths["f16"].name + ".manifest.json").read_text())
    assert manifest["architecture"] == kind.arch and manifest["type"] == "f16"
