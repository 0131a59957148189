"""The optional judge: a model the engine serves rates each reply's character consistency and
naturalness, asked through the engine's API with a JSON schema for its verdict.

The question goes to Ollama's `/api/chat` with `format: <JSON schema>` (Ollama's documented
structured output), `stream: false` and temperature 0. A judge that cannot be reached, answers
with an error, or answers something that does not fit the schema gives the verdict
"unavailable" for that reply, with the reason; the trial goes on.
"""

from __future__ import annotations

import json

from engine.errors import EngineError

SCALE = (1, 5)
SCHEMA = {
    "type": "object",
    "properties": {
        "character": {"type": "integer", "minimum": SCALE[0], "maximum": SCALE[1],
                      "description": "1-5: does the patient stay the person of the case sheet"},
        "natural": {"type": "integer", "minimum": SCALE[0], "maximum": SCALE[1],
                    "description": "1-5: does the reply sound like a person talking"},
        "reason": {"type": "string"},
    },
    "required": ["character", "natural", "reason"],
}
INSTRUCTIONS = (
    "You judge a simulated patient in a psychology students' interview simulator. Read the case sheet and the "
    "interview, then rate the patient's LAST reply: 'character' from 1 (breaks the character: speaks as an "
    "assistant, contradicts the case, wrong tone) to 5 (fully the person of the case, with the case's tone and "
    "constraints); 'natural' from 1 (robotic, a list, a clinical summary) to 5 (sounds like that person talking). "
    "Answer only with JSON: {\"character\": int, \"natural\": int, \"reason\": one short sentence}.")


def judge_body(model: str, transcript: str, reply: str) -> dict:
    """The /api/chat request that asks `model` for its verdict on `reply`."""
    return {
        "model": model,
        "stream": False,
        "format": SCHEMA,
        "options": {"temperature": 0},
        "messages": [
            {"role": "system", "content": INSTRUCTIONS},
            {"role": "user", "content": f"{transcript} {reply}\n\nRate the patient's last reply."},
        ],
    }


def parse_verdict(answer: object) -> dict:
    """The judge's verdict from its /api/chat answer: {"verdict": "rated", character, natural,
    reason}, or {"verdict": "unavailable", "error": why} for anything that does not fit."""
    try:
        content = answer["message"]["content"]  # type: ignore[index]
        rating = json.loads(content)
        character, natural = rating["character"], rating["natural"]
        for value in (character, natural):
            if isinstance(value, bool) or not isinstance(value, int) or not SCALE[0] <= value <= SCALE[1]:
                raise ValueError(f"ratings must be whole numbers from {SCALE[0]} to {SCALE[1]}, got {value!r}")
        reason = rating.get("reason", "")
        return {"verdict": "rated", "character": character, "natural": natural,
                "reason": reason if isinstance(reason, str) else str(reason)}
    except (KeyError, TypeError, ValueError) as exc:
        return {"verdict": "unavailable", "error": f"the judge's answer does not fit the schema: {exc!s:.200}"}


def judge_reply(target, model: str, transcript: str, reply: str) -> dict:
    """Ask the judge `model` on `target` (targets.UrlTarget or EngineTarget) about one reply."""
    try:
        answer = target.post_json("/api/chat", judge_body(model, transcript, reply))
    except EngineError as exc:
        return {"verdict": "unavailable", "error": exc.message[:300]}
    return parse_verdict(answer)
