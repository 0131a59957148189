"""The simulated patient's turn: where it ends, and how its text is cleaned.

The simulator sends a transcript ending in `Paciente:`; a base model continues it, and after the
patient's line it would go on to write the student's next question. The reply ends at the next
speaker line (`Estudiante:`, `Terapeuta:`, `Paciente:`, `Sistema:`, or any other `Name:` at the
start of a line) or at a blank line; a leading speaker label and surrounding whitespace go.
"""

from __future__ import annotations

import re
from typing import Sequence

from ai_engine_common.patient_prompt import render_case_prompt  # noqa: F401  (re-exported for the tests)
from engine.generation import ReplyText, StopRules

SPEAKERS = ("Estudiante", "Terapeuta", "Paciente", "Sistema")

DEFAULT_STOPS = tuple(f"\n{s}:" for s in SPEAKERS) + ("\n\n",)

# Any one-word label at the start of a line ("Doctor:", "Psicóloga:"): the model inventing
# another speaker also ends the patient's turn.
SPEAKER_LINE = re.compile(r"\n[ \t]*[A-ZÁÉÍÓÚÑ][A-Za-zÁÉÍÓÚÑáéíóúñü]{1,24}[ \t]*:")
# Text that could still become a SPEAKER_LINE (held back when streaming).
SPEAKER_LINE_START = re.compile(r"\n[ \t]*(?:[A-ZÁÉÍÓÚÑ][A-Za-zÁÉÍÓÚÑáéíóúñü]{0,24}[ \t]*)?")

LEADING_LABEL = re.compile(r"^\s*(?:%s)\s*:\s*" % "|".join(SPEAKERS), re.IGNORECASE)


def stop_rules(stop: Sequence[str] | None) -> StopRules:
    """The default speaker-turn stops, or exactly the caller's list (`[]`: none at all)."""
    if stop is None:
        return StopRules(strings=DEFAULT_STOPS, patterns=((SPEAKER_LINE, SPEAKER_LINE_START),))
    return StopRules(strings=tuple(stop))


def clean_reply(text: str) -> str:
    """Strip whitespace and a leading speaker label (`Paciente: ...` → `...`)."""
    return LEADING_LABEL.sub("", text.strip(), count=1).strip()


def label_pending(text: str) -> bool:
    """True while the reply's start could still grow into a speaker label ("Pacien" → "Paciente:")."""
    head = text.lstrip().lower()
    if LEADING_LABEL.match(text):
        return not text[LEADING_LABEL.match(text).end():].strip()  # label seen, its text not yet
    return any(label.lower().startswith(head.rstrip(": \t")) and
               re.fullmatch(r"[^\W\d_]*[ \t]*:?[ \t]*", head) for label in SPEAKERS)


def reply_text(stop: Sequence[str] | None) -> ReplyText:
    """An empty patient reply with the request's stop rules."""
    return ReplyText(stop_rules(stop), clean=clean_reply, pending=label_pending, require_text=True)
