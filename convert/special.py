"""Special tokens, the add-BOS/EOS flags and the chat template, as transformers would use them.

Sources, in transformers' order of precedence: tokenizer_config.json (`bos_token`, `add_bos_token`,
`chat_template`), then tokenizer.json's post-processor template (does it put a special token
first or last?), then config.json (`bos_token_id`, …). The add-BOS/EOS flags are always written,
because llama.cpp's defaults differ per tokenizer type and would otherwise disagree with
transformers. tokenizer.json is passed in already parsed: it can be tens of megabytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from convert.errors import TokenizerError

TYPES = ("bos", "eos", "unk", "sep", "pad", "mask")


@dataclass
class SpecialTokens:
    ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | list[dict[str, str]] | None = None

    def add_to(self, w: gguf.GGUFWriter) -> None:
        for kind, token_id in self.ids.items():
            getattr(w, f"add_{kind}_token_id")(token_id)
        w.add_add_bos_token(self.add_bos)
        w.add_add_eos_token(self.add_eos)
        if self.chat_template:
            w.add_chat_template(self.chat_template)


def read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise TokenizerError(f"{path} is not valid JSON ({exc})") from None


def _content(entry: Any) -> str | None:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


def _template_ends(tokenizer_json: dict[str, Any]) -> tuple[str | None, str | None]:
    """The special tokens a TemplateProcessing post-processor puts first and last (single input)."""
    post = tokenizer_json.get("post_processor") or {}
    for proc in post.get("processors", [post]) if post else []:
        if proc.get("type") == "TemplateProcessing":
            single = proc.get("single") or []
            first = single[0].get("SpecialToken", {}).get("id") if single else None
            last = single[-1].get("SpecialToken", {}).get("id") if len(single) > 1 else None
            return first, last
    return None, None


def chat_template(folder: Path, tokenizer_config: dict[str, Any]) -> str | list[dict[str, str]] | None:
    """From tokenizer_config.json, else chat_template.jinja, else chat_template.json."""
    if tokenizer_config.get("chat_template"):
        return tokenizer_config["chat_template"]
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    return (read_json(folder / "chat_template.json") or {}).get("chat_template")


def load_special(folder: Path, tokens: list[str], tokenizer_json: dict[str, Any] | None,
                 *, sentencepiece: bool) -> SpecialTokens:
    """Special token ids and flags for a vocabulary whose token strings are `tokens`."""
    tc = read_json(folder / "tokenizer_config.json") or {}
    config = read_json(folder / "config.json") or {}
    lookup: dict[str, int] = {}
    for i, text in enumerate(tokens):
        lookup.setdefault(text, i)
    out = SpecialTokens()
    for kind in TYPES:
        token_id = lookup.get(_content(tc.get(f"{kind}_token")) or "\0")
        if token_id is None:
            value = config.get(f"{kind}_token_id")
            value = value[0] if isinstance(value, list) and value else value
            token_id = value if isinstance(value, int) and 0 <= value < len(tokens) else None
        if token_id is not None:
            out.ids[kind] = token_id
    first, last = _template_ends(tokenizer_json or {})
    bos_text = tokens[out.ids["bos"]] if "bos" in out.ids else None
    eos_text = tokens[out.ids["eos"]] if "eos" in out.ids else None
    if isinstance(tc.get("add_bos_token"), bool):
        out.add_bos = tc["add_bos_token"]
    elif first is not None:
        out.add_bos = first == bos_text
    else:
        # transformers' SentencePiece tokenizers add BOS unless told not to.
        out.add_bos = sentencepiece and tokenizer_json is None and "bos" in out.ids
    if isinstance(tc.get("add_eos_token"), bool):
        out.add_eos = tc["add_eos_token"]
    else:
        out.add_eos = last is not None and last == eos_text
    out.chat_template = chat_template(folder, tc)
    return out
