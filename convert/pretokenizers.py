"""Identify a byte-level BPE pre-tokenizer from what tokenizer.json says it does.

llama.cpp does not read the pre-tokenizer from the file: it has a fixed set of split rules, named
by `tokenizer.ggml.pre`, and a converter must pick the right name. llama.cpp's own converter hashes
the token ids of a test string, which only recognises tokenizers it has already seen. Here the
`pre_tokenizer` section itself (its split regexes, digit splitting and ByteLevel settings) is
compared with the rules each name stands for, so a retrained or test tokenizer with the same rules
is recognised too, and anything else is refused instead of silently tokenizing differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from convert.errors import TokenizerError

# The split regexes exactly as they appear in tokenizer.json.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
               r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# What a ByteLevel pre-tokenizer with use_regex=true splits on (GPT-2's rule).
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


@dataclass(frozen=True)
class PreTokenizer:
    """One llama.cpp pre-tokenizer: its GGUF name and the split steps that define it."""

    name: str            # tokenizer.ggml.pre
    steps: tuple[str, ...]  # regexes, in order ("digits" for an individual-digit split)
    used_by: str


KNOWN = (
    PreTokenizer("llama-bpe", (LLAMA3_REGEX,), "Llama 3, 3.1, 3.2"),
    PreTokenizer("qwen2", (QWEN2_REGEX,), "Qwen 1.5, Qwen2, Qwen2.5"),
    PreTokenizer("gpt-2", (GPT2_REGEX,), "GPT-2 and byte-level BPEs without a custom split"),
    PreTokenizer("starcoder", ("digits", GPT2_REGEX), "StarCoder, SmolLM"),
)


def split_steps(pre_tokenizer: dict[str, Any] | None) -> tuple[str, ...]:
    """The split steps a tokenizer.json pre_tokenizer performs, in the vocabulary of KNOWN."""
    if not pre_tokenizer:
        return ()
    parts = pre_tokenizer.get("pretokenizers") if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    steps: list[str] = []
    for part in parts or []:
        kind = part.get("type")
        if kind == "Split":
            pattern = part.get("pattern", {})
            regex = pattern.get("Regex")
            if regex is None or part.get("invert") or part.get("behavior") != "Isolated":
                steps.append(f"Split({pattern}, behavior={part.get('behavior')}, invert={part.get('invert')})")
            else:
                steps.append(regex)
        elif kind == "ByteLevel":
            if part.get("add_prefix_space"):
                steps.append("ByteLevel(add_prefix_space=true)")
            if part.get("use_regex", True):
                steps.append(GPT2_REGEX)
        elif kind == "Digits":
            steps.append("digits" if part.get("individual_digits") else "Digits(grouped)")
        else:
            steps.append(kind or repr(part))
    return tuple(steps)


def identify(tokenizer_json: dict[str, Any]) -> str:
    """tokenizer.ggml.pre for a byte-level BPE tokenizer.json, or a TokenizerError saying why not."""
    normalizer = tokenizer_json.get("normalizer")
    if normalizer and normalizer.get("type") != "NFC":
        raise TokenizerError(f"the BPE tokenizer's normalizer {normalizer.get('type')} has no "
                             "llama.cpp equivalent; refusing to write a vocabulary that tokenizes differently")
    steps = split_steps(tokenizer_json.get("pre_tokenizer"))
    for known in KNOWN:
        if steps == known.steps:
            return known.name
    described = " → ".join(s if len(s) < 60 else s[:57] + "..." for s in steps) or "none"
    raise TokenizerError(
        f"unrecognised BPE pre-tokenizer (split steps: {described}); llama.cpp has no matching "
        "rule, so the GGUF would tokenize differently from the original. Known: "
        + ", ".join(f"{k.name} ({k.used_by})" for k in KNOWN))
