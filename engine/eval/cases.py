"""The case file of `ai-engine eval` (format in docs/eval.md), read and validated.

A case is the simulator's case prompt up to and including `ENTREVISTA:\\n`, the questions asked one
by one, and the hidden facts that must not come out before a given question. Every mistake in a
file is refused with the file and the field named, before any question is asked.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from engine.errors import EngineError

PROMPT_END = "ENTREVISTA:\n"
LANGUAGES = ("es", "en", "pt", "fr", "it", "de")  # those the language check can tell apart
CASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DEFAULT_MIN_WORDS = 1
DEFAULT_MAX_WORDS = 80
FIELDS = {"id", "language", "prompt", "questions", "hidden", "min_words", "max_words", "notes"}


class CaseError(EngineError):
    """A case file that cannot be used: unreadable, not JSON, or a field that is wrong."""

    status = 400


@dataclass(frozen=True)
class Hidden:
    """A fact of the case's history: none of `keywords` may appear in a reply to a question
    before index `not_before` (0-based: questions[not_before] is the first that may bring it out)."""

    keywords: tuple[str, ...]
    not_before: int


@dataclass(frozen=True)
class Case:
    id: str
    language: str
    prompt: str
    questions: tuple[str, ...]
    hidden: tuple[Hidden, ...] = ()
    min_words: int = DEFAULT_MIN_WORDS
    max_words: int = DEFAULT_MAX_WORDS

    @property
    def patient_name(self) -> str | None:
        """The `Nombre:` line of the case sheet, if it has one (the third-person check uses it)."""
        found = re.search(r"^Nombre:\s*(.+?)\s*$", self.prompt, re.MULTILINE)
        return found.group(1) if found else None


def load_cases(paths: list[str | Path]) -> list[Case]:
    """Every case file, validated; two files with the same `id` are refused."""
    cases = [load_case(p) for p in paths]
    seen: dict[str, str] = {}
    for path, case in zip(paths, cases):
        if case.id in seen:
            raise CaseError(f"case file {path}: id '{case.id}' is already used by {seen[case.id]}", field="id")
        seen[case.id] = str(path)
    if not cases:
        raise CaseError("no case files given")
    return cases


def load_case(path: str | Path) -> Case:
    """One case file, or CaseError naming the file and the field."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise CaseError(f"case file {path}: cannot read it ({exc.strerror})") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CaseError(f"case file {path}: not valid JSON ({exc})") from exc
    try:
        return parse_case(data)
    except CaseError as exc:
        raise CaseError(f"case file {path}: {exc.message}", field=exc.field) from exc


def parse_case(data: object) -> Case:
    """A case from its JSON value; CaseError names the field that is wrong."""
    if not isinstance(data, dict):
        raise CaseError("the case must be a JSON object")
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise CaseError(f"unknown field(s) {', '.join(unknown)}; a case has {', '.join(sorted(FIELDS))}",
                        field=unknown[0])
    case_id = _text(data, "id")
    if not CASE_ID.fullmatch(case_id):
        raise CaseError("'id' must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
                        field="id")
    language = _text(data, "language").lower()
    if language not in LANGUAGES:
        raise CaseError(f"'language' must be one of {', '.join(LANGUAGES)}, not '{language}'", field="language")
    prompt = _text(data, "prompt")
    if not prompt.endswith(PROMPT_END):
        raise CaseError("'prompt' must end with 'ENTREVISTA:\\n' (the case prompt up to the interview, as the "
                        "simulator builds it)", field="prompt")
    questions = data.get("questions")
    if not isinstance(questions, list) or not questions:
        raise CaseError("'questions' must be a non-empty list of strings", field="questions")
    for i, q in enumerate(questions):
        if not isinstance(q, str) or not q.strip() or "\n" in q.strip():
            raise CaseError(f"'questions[{i}]' must be a non-empty one-line string", field=f"questions[{i}]")
    hidden = tuple(_hidden(h, i, len(questions)) for i, h in enumerate(_list(data, "hidden")))
    min_words = _count(data, "min_words", DEFAULT_MIN_WORDS)
    max_words = _count(data, "max_words", DEFAULT_MAX_WORDS)
    if max_words < min_words:
        raise CaseError(f"'max_words' ({max_words}) is below 'min_words' ({min_words})", field="max_words")
    return Case(case_id, language, prompt, tuple(q.strip() for q in questions), hidden, min_words, max_words)


def _text(data: dict, name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value.strip():
        raise CaseError(f"'{name}' must be a non-empty string", field=name)
    return value if name == "prompt" else value.strip()


def _list(data: dict, name: str) -> list:
    value = data.get(name, [])
    if not isinstance(value, list):
        raise CaseError(f"'{name}' must be a list", field=name)
    return value


def _count(data: dict, name: str, default: int) -> int:
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CaseError(f"'{name}' must be a whole number >= 0", field=name)
    return value


def _hidden(item: object, i: int, n_questions: int) -> Hidden:
    where = f"hidden[{i}]"
    if not isinstance(item, dict) or set(item) != {"keywords", "not_before"}:
        raise CaseError(f"'{where}' must be an object with exactly 'keywords' and 'not_before'", field=where)
    keywords = item["keywords"]
    if (not isinstance(keywords, list) or not keywords
            or not all(isinstance(k, str) and k.strip() for k in keywords)):
        raise CaseError(f"'{where}.keywords' must be a non-empty list of non-empty strings", field=f"{where}.keywords")
    n = item["not_before"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise CaseError(f"'{where}.not_before' must be a question index >= 0 (0-based; {n_questions} or more: "
                        "never during this interview)", field=f"{where}.not_before")
    return Hidden(tuple(k.strip() for k in keywords), n)
