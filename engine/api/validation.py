"""Request-body validation shared by the API surfaces: each failure names its field (400)."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from flask import request

from engine.errors import BadRequest, EngineError
from engine.generation import MAX_STOPS, check_stops

_MISSING = object()


MAX_JSON_DEPTH = 32  # the deepest real request (an OpenAI chat with tool calls) nests 6 levels


class UnsupportedMediaType(EngineError):
    status = 415


def json_body() -> dict[str, Any]:
    """The request's JSON object, or a 4xx that says why there is none.

    Only `Content-Type: application/json` is read: a web page may send a cross-site `text/plain`
    or form POST without asking the browser first (no CORS preflight), but not a JSON one."""
    if not request.is_json:
        given = request.mimetype or "none"
        raise UnsupportedMediaType(f"the request body must be JSON sent as Content-Type: application/json, not "
                                   f"{given[:60]} (with curl: -H 'Content-Type: application/json')")
    try:
        body = json.loads(request.get_data(cache=True))
    except RecursionError:
        raise BadRequest(f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError:  # JSONDecodeError, or bytes that are not UTF-8/16/32
        raise BadRequest("the request body must be valid JSON (Content-Type: application/json)") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, not {type(body).__name__}")
    _check_values(body)
    return body


def _check_values(body: dict) -> None:
    """Depth at most MAX_JSON_DEPTH, and every string valid Unicode: a lone surrogate escape
    (`"\\ud800"`) parses, but is no text and cannot be encoded for the tokenizer."""
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise BadRequest(f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            for text in (key, item):
                if isinstance(text, str) and _SURROGATE.search(text):
                    raise BadRequest("the request body has a string with a lone surrogate escape (such as \\ud800), "
                                     "which is not valid Unicode", field=key if isinstance(key, str) else None)
            if isinstance(item, (dict, list)):
                stack.append((item, depth + 1))


_SURROGATE = re.compile("[\ud800-\udfff]")


def string(body: dict, name: str, *, required: bool = False, default: str | None = None,
           non_empty: bool = True) -> str | None:
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        if required:
            raise BadRequest(f"'{name}' is required", field=name)
        return default
    if not isinstance(value, str):
        raise BadRequest(f"'{name}' must be a string, not {_kind(value)}", field=name)
    if non_empty and not value.strip():
        raise BadRequest(f"'{name}' must not be empty", field=name)
    return value


def integer(body: dict, name: str, default: int | None, *, minimum: int | None = None,
            maximum: int | None = None) -> int | None:
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    # JSON has one number type: accept 150.0 for 150, refuse 1.5 and booleans.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (isinstance(value, float) and not value.is_integer()):
        raise BadRequest(f"'{name}' must be an integer, not {_kind(value)}", field=name)
    value = int(value)
    _check_range(name, value, minimum, maximum, True, True)
    return value


def number(body: dict, name: str, default: float, *, minimum: float | None = None,
           maximum: float | None = None, min_inclusive: bool = True) -> float:
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"'{name}' must be a number, not {_kind(value)}", field=name)
    _check_range(name, value, minimum, maximum, min_inclusive, True)
    return float(value)


def boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(f"'{name}' must be true or false, not {_kind(value)}", field=name)
    return value


def string_list(body: dict, name: str, *, max_items: int = 16) -> list[str] | None:
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"'{name}' must be a list of strings", field=name)
    if any(v == "" for v in value):
        raise BadRequest(f"'{name}' must not contain empty strings", field=name)
    if len(value) > max_items:
        raise BadRequest(f"'{name}' has {len(value)} entries; at most {max_items} are allowed", field=name)
    return value


def stops(body: dict, name: str = "stop", *, max_items: int = MAX_STOPS) -> list[str] | None:
    """A request's stop strings: a string or a list, within generation.check_stops's limits."""
    value = string_list(body, name, max_items=max_items)
    check_stops(value, name)
    return value


def _check_range(name, value, minimum, maximum, min_inclusive, max_inclusive) -> None:
    low_bad = minimum is not None and (value < minimum or (not min_inclusive and value == minimum))
    high_bad = maximum is not None and (value > maximum or (not max_inclusive and value == maximum))
    if low_bad or high_bad:
        lo = "" if minimum is None else f"{'>=' if min_inclusive else '>'} {minimum}"
        hi = "" if maximum is None else f"<= {maximum}"
        raise BadRequest(f"'{name}' must be {' and '.join(p for p in (lo, hi) if p)}, got {value}", field=name)


def _kind(value: Any) -> str:
    return {bool: "a boolean", str: "a string", list: "a list", dict: "an object",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def duration(body: dict, name: str) -> float | None:
    """Ollama's `keep_alive`: seconds (a number) or a duration string (`5m`, `1h`, `-1`); None if absent."""
    from engine.settings import parse_duration

    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise BadRequest(f"'{name}': {exc}", field=name) from None


MIN_CLIENT_TIMEOUT_S = 1  # no reply comes sooner: a shorter deadline is a mistake, not a wish


def client_timeout(body: dict) -> float | None:
    """The deadline a client asks for, in seconds: the `timeout_s` field, else the
    `X-Request-Timeout` header (a number >= 1); None when it asks for none (REQUEST_TIMEOUT_S holds,
    and a longer one is cut to it)."""
    value = number(body, "timeout_s", None, minimum=MIN_CLIENT_TIMEOUT_S)
    if value is None and request.headers.get("X-Request-Timeout"):
        raw = request.headers["X-Request-Timeout"]
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < MIN_CLIENT_TIMEOUT_S:
            raise BadRequest(f"the X-Request-Timeout header must be a number of seconds >= {MIN_CLIENT_TIMEOUT_S}, "
                             f"got {raw[:40]!r}", field="X-Request-Timeout")
    return value
