"""The tokenizer, as GGUF metadata: tokens, their types and scores or merges, special tokens.

Three kinds of tokenizer files are understood:

- SentencePiece `tokenizer.model` (Llama 2, Mistral, Gemma) → llama.cpp's "llama" tokenizer, with
  SentencePiece's own scores;
- `tokenizer.json` holding a SentencePiece-style BPE (byte fallback, "▁" for spaces; Gemma or Llama
  checkpoints without tokenizer.model) → also "llama". llama.cpp merges the pair whose result scores
  highest, so each token's score is minus the rank of the first merge that produces it, which
  replays the BPE merge order;
- `tokenizer.json` holding a byte-level BPE (Llama 3, Qwen2) → "gpt2" with its merges and a
  pre-tokenizer identified from its split rules (convert/pretokenizers.py).

Special token ids, the add-BOS/EOS flags and the chat template: convert/special.py.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from convert import pretokenizers
from convert.checkpoint import short_repr
from convert.errors import TokenizerError
from convert.special import SpecialTokens, load_special, read_json

log = logging.getLogger(__name__)

TT = gguf.TokenType
SPACE = "\u2581"  # SentencePiece's visible space
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
_USER_DEFINED_SCORE = -1000.0


@dataclass
class Vocab:
    """Everything llama.cpp needs to tokenize like the original."""

    model: str                      # tokenizer.ggml.model: "llama" or "gpt2"
    pre: str                        # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    source: str                     # which file it came from, for logs and the manifest
    special: SpecialTokens | None = None
    add_space_prefix: bool | None = None
    remove_extra_whitespaces: bool | None = None
    merges: list[str] = field(default_factory=list)

    def pad_to(self, n: int) -> None:
        """Grow to the embedding's row count with unused tokens (models often pad their vocab)."""
        if len(self.tokens) > n:
            raise TokenizerError(f"the tokenizer has {len(self.tokens)} tokens but the embedding "
                                 f"matrix only {n} rows")
        for i in range(len(self.tokens), n):
            self.tokens.append(f"[PAD{i}]")
            self.types.append(TT.UNUSED)
            if self.scores is not None:
                self.scores.append(_USER_DEFINED_SCORE)

    def add_to(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model(self.model)
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.types)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        if self.remove_extra_whitespaces is not None:
            w.add_remove_extra_whitespaces(self.remove_extra_whitespaces)
        if self.merges:
            w.add_token_merges(self.merges)
        if self.special is not None:
            self.special.add_to(w)


def load_vocab(folder: Path, rows: int | None = None) -> Vocab:
    """Read the checkpoint's tokenizer files (tokenizer.model first, then tokenizer.json).

    `rows`, the embedding matrix's row count, bounds every token id the files declare; it is
    checked before any table is sized by an id.
    """
    vocab: Vocab | None = None
    spm_path, json_path = folder / "tokenizer.model", folder / "tokenizer.json"
    tokenizer_json = read_json(json_path)  # parsed once: it can be tens of megabytes
    added = _added_tokens(folder, tokenizer_json)
    if rows is not None:
        _check_ids(tokenizer_json, added, rows)
    if spm_path.is_file():
        vocab = _from_sentencepiece(spm_path, fallback=tokenizer_json is not None)
    if vocab is None and tokenizer_json is not None:
        vocab = _from_tokenizer_json(tokenizer_json)
    if vocab is None:
        raise TokenizerError(f"{folder} has no tokenizer (tokenizer.model or tokenizer.json)")
    _apply_added_tokens(vocab, added)
    vocab.special = load_special(folder, vocab.tokens, tokenizer_json,
                                 sentencepiece=vocab.source == "tokenizer.model")
    log.info("vocabulary: %d tokens from %s (%s, pre-tokenizer %s)", len(vocab.tokens), vocab.source,
             vocab.model, vocab.pre)
    return vocab


def _check_ids(tokenizer_json: dict[str, Any] | None, added: list[tuple[int, str, bool]],
               rows: int) -> None:
    """Every id in the tokenizer files names a row of the embedding matrix (a hostile id of 10^12
    would otherwise size a table of 10^12 entries)."""
    model = (tokenizer_json or {}).get("model") or {}
    vocab_ids = model.get("vocab").values() if isinstance(model.get("vocab"), dict) else []
    for i in (*vocab_ids, *(a[0] for a in added)):
        if type(i) is not int or not 0 <= i < rows:
            raise TokenizerError(f"the tokenizer files declare token id {short_repr(i)}, but the "
                                 f"embedding matrix has {rows} rows (ids 0 to {rows - 1})")


# --- SentencePiece tokenizer.model -----------------------------------------------------------


def _from_sentencepiece(path: Path, *, fallback: bool) -> Vocab | None:
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        if fallback:
            log.info("sentencepiece is not installed; reading tokenizer.json instead")
            return None
        raise TokenizerError("reading tokenizer.model needs the sentencepiece package: "
                             "pip install sentencepiece") from None
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as exc:
        # Llama 3 ships a tiktoken file under the same name; its tokenizer.json is the real one.
        if fallback:
            log.info("%s is not a SentencePiece model (%s); reading tokenizer.json", path.name, exc)
            return None
        raise TokenizerError(f"{path} is not a SentencePiece model ({exc})") from None
    tokens, types, scores = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.IdToPiece(i))
        scores.append(float(sp.GetScore(i)))
        if sp.IsUnknown(i):
            types.append(TT.UNKNOWN)
        elif sp.IsControl(i):
            types.append(TT.CONTROL)
        elif sp.IsUnused(i):
            types.append(TT.UNUSED)
        elif sp.IsByte(i):
            types.append(TT.BYTE)
        else:
            types.append(TT.NORMAL)
    # The normaliser settings are in the model's protobuf; asking the model itself avoids needing
    # protobuf: a dummy prefix shows as a leading "▁", whitespace collapsing as a lost space.
    add_prefix = sp.EncodeAsPieces("a")[0].startswith(SPACE)
    collapses = sp.DecodePieces(sp.EncodeAsPieces("a  b")) == "a b"
    return Vocab("llama", "default", tokens, types, scores, "tokenizer.model",
                 add_space_prefix=add_prefix, remove_extra_whitespaces=collapses)


# --- tokenizer.json --------------------------------------------------------------------------


def _from_tokenizer_json(tj: dict[str, Any]) -> Vocab:
    model = tj.get("model") or {}
    kind = model.get("type")
    if kind == "Unigram":
        return _unigram(tj)
    if kind != "BPE":
        raise TokenizerError(f"tokenizer.json model type {kind} is not supported (BPE or Unigram)")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise TokenizerError("tokenizer.json uses subword prefixes/suffixes, which llama.cpp's "
                             "tokenizers do not support")
    if _mentions(tj.get("pre_tokenizer"), "ByteLevel") or _mentions(tj.get("decoder"), "ByteLevel"):
        return _byte_level_bpe(tj)
    if model.get("byte_fallback") or _uses_metaspace(tj):
        return _spm_style_bpe(tj)
    raise TokenizerError("tokenizer.json is a BPE that is neither byte-level nor SentencePiece-style; "
                         "llama.cpp has no tokenizer for it")


def _mentions(node: Any, kind: str) -> bool:
    if isinstance(node, dict):
        return node.get("type") == kind or any(_mentions(v, kind) for v in node.values())
    if isinstance(node, list):
        return any(_mentions(v, kind) for v in node)
    return False


def _uses_metaspace(tj: dict[str, Any]) -> bool:
    return _mentions(tj.get("pre_tokenizer"), "Metaspace") or SPACE in json.dumps(tj.get("normalizer"), ensure_ascii=False)


def _spm_prefix(tj: dict[str, Any]) -> bool:
    """Does the SentencePiece-style tokenizer put "▁" before the text (a dummy prefix)?"""
    def walk(node: Any) -> bool | None:
        if isinstance(node, list):
            for v in node:
                if (r := walk(v)) is not None:
                    return r
            return None
        if not isinstance(node, dict):
            return None
        if node.get("type") == "Prepend":
            return node.get("prepend") == SPACE
        if node.get("type") == "Metaspace":
            if "prepend_scheme" in node:
                return node["prepend_scheme"] in ("first", "always")
            return bool(node.get("add_prefix_space", True))
        return walk(node.get("normalizers") or node.get("pretokenizers"))
    for section in ("normalizer", "pre_tokenizer"):
        if (r := walk(tj.get(section))) is not None:
            return r
    return False


def _id_table(vocab: dict[str, int], added: list[dict[str, Any]]) -> list[str | None]:
    n = max([*vocab.values(), *(a["id"] for a in added)], default=-1) + 1
    table: list[str | None] = [None] * n
    for piece, i in vocab.items():
        table[i] = piece
    return table


def _merge_pairs(model: dict[str, Any]) -> list[tuple[str, str]]:
    pairs = []
    for m in model.get("merges") or []:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        pairs.append((a, b))
    return pairs


def _spm_style_bpe(tj: dict[str, Any]) -> Vocab:
    model = tj["model"]
    table = _id_table(model["vocab"], tj.get("added_tokens") or [])
    first_rank: dict[str, int] = {}
    for rank, (a, b) in enumerate(_merge_pairs(model)):
        first_rank.setdefault(a + b, rank)
    unk = model.get("unk_token")
    tokens, types, scores = [], [], []
    for i, piece in enumerate(table):
        if piece is None:
            tokens.append(f"[PAD{i}]"), types.append(TT.UNUSED), scores.append(_USER_DEFINED_SCORE)
            continue
        tokens.append(piece)
        if piece == unk:
            types.append(TT.UNKNOWN)
        elif model.get("byte_fallback") and _BYTE_TOKEN.match(piece):
            types.append(TT.BYTE)
        else:
            types.append(TT.NORMAL)
        # Single characters are never merge results; their score is never consulted.
        scores.append(-float(first_rank[piece]) if piece in first_rank else 0.0)
    return Vocab("llama", "default", tokens, types, scores, "tokenizer.json (SentencePiece-style BPE)",
                 add_space_prefix=_spm_prefix(tj), remove_extra_whitespaces=False)


def _unigram(tj: dict[str, Any]) -> Vocab:
    model = tj["model"]
    unk_id = model.get("unk_id")
    tokens, types, scores = [], [], []
    for i, (piece, score) in enumerate(model["vocab"]):
        tokens.append(piece)
        scores.append(float(score))
        types.append(TT.UNKNOWN if i == unk_id else TT.BYTE if _BYTE_TOKEN.match(piece) else TT.NORMAL)
    return Vocab("llama", "default", tokens, types, scores, "tokenizer.json (Unigram)",
                 add_space_prefix=_spm_prefix(tj), remove_extra_whitespaces=False)


def _byte_level_bpe(tj: dict[str, Any]) -> Vocab:
    model = tj["model"]
    pre = pretokenizers.identify(tj)
    table = _id_table(model["vocab"], tj.get("added_tokens") or [])
    tokens, types = [], []
    for i, piece in enumerate(table):
        tokens.append(piece if piece is not None else f"[PAD{i}]")
        types.append(TT.NORMAL if piece is not None else TT.UNUSED)
    merges = [" ".join(_escape_space(p) for p in pair) for pair in _merge_pairs(model)]
    return Vocab("gpt2", pre, tokens, types, None, "tokenizer.json (byte-level BPE)", merges=merges)


def _escape_space(part: str) -> str:
    # GGUF merges are "a b" strings; a literal space inside a part is shifted like llama.cpp does.
    return part.replace(" ", chr(ord(" ") + 256))


# --- added tokens ----------------------------------------------------------------------------


def _added_tokens(folder: Path, tokenizer_json: dict[str, Any] | None) -> list[tuple[int, str, bool]]:
    """(id, content, special) for every added token, from tokenizer.json or tokenizer_config.json."""
    found: dict[int, tuple[str, bool]] = {}
    config = read_json(folder / "tokenizer_config.json") or {}
    try:
        for key, entry in (config.get("added_tokens_decoder") or {}).items():
            found[int(key)] = (entry["content"], bool(entry.get("special")))
        for entry in (tokenizer_json or {}).get("added_tokens") or []:
            found[int(entry["id"])] = (entry["content"], bool(entry.get("special")))
        for content, i in (read_json(folder / "added_tokens.json") or {}).items():
            found.setdefault(int(i), (content, False))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise TokenizerError(f"{folder}: an added token is malformed ({short_repr(exc)})") from None
    return sorted((i, c, s) for i, (c, s) in found.items())


def _apply_added_tokens(vocab: Vocab, added: list[tuple[int, str, bool]]) -> None:
    for i, content, special in added:
        if i >= len(vocab.tokens):
            vocab.pad_to(i + 1)
        if vocab.types[i] in (TT.UNKNOWN, TT.BYTE):
            continue  # keep what the model itself says these are
        if special:
            vocab.types[i] = TT.CONTROL
        else:
            vocab.types[i] = TT.USER_DEFINED
            if vocab.model == "llama":  # llama.cpp matches user tokens against raw text
                content = content.replace(SPACE, " ")
        vocab.tokens[i] = content
        if vocab.scores is not None:
            vocab.scores[i] = _USER_DEFINED_SCORE
