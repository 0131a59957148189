"""How every surface writes a streamed reply: the output types (server-sent events, NDJSON), the
one loop that ends a stream with an error event when generation fails after the 200, and the
finish reasons a reply reports."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from engine.errors import EngineError
from engine.generation import Generation

# Why generation ended: a stop rule, the end-of-sequence token, or the token limit.
FINISH_REASONS = ("stop", "eos", "length")
# Ollama and OpenAI know only two: the end-of-sequence token is a stop there.
CLIENT_FINISH_REASONS = ("stop", "length")


def client_finish_reason(result: Generation) -> str:
    """`result`'s finish reason as Ollama and OpenAI report it (one of CLIENT_FINISH_REASONS)."""
    return "length" if result.finish_reason == "length" else "stop"


@dataclass(frozen=True)
class OutputType:
    """A streamed body's media type and how one JSON object is written in it."""

    mimetype: str
    frame: Callable[[dict], str]


SSE = OutputType("text/event-stream", lambda obj: f"data: {json.dumps(obj, ensure_ascii=False)}\n\n")
NDJSON = OutputType("application/x-ndjson", lambda obj: json.dumps(obj, ensure_ascii=False) + "\n")
OUTPUT_TYPES = (SSE, NDJSON)


def stream(texts: Iterable[str], output: OutputType, *, piece: Callable[[str], dict | None],
           error: Callable[[EngineError], dict], end: Callable[[], Iterable[dict]],
           start: Iterable[dict] = (), done: str = "") -> Iterator[str]:
    """The body of a streamed reply, written as `output`: the `start` objects, `piece(text)` for
    each new text of the run (None: skip it), then the `end()` objects (built once generation is
    over) and the raw `done` line. A failure after the 200 (the deadline, the engine) ends the
    stream with `error(exc)` instead: each surface's clients learn of it that way."""
    for obj in start:
        yield output.frame(obj)
    try:
        for text in texts:
            obj = piece(text)
            if obj is not None:
                yield output.frame(obj)
    except EngineError as exc:
        yield output.frame(error(exc))
        return
    for obj in end():
        yield output.frame(obj)
    if done:
        yield done
