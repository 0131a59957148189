"""The request body shared by the API surfaces: JSON sent as JSON, an object, not too deep, valid
Unicode. Its fields are read with the declarations of engine/api/bodies.py (fields.py's kinds)."""

from __future__ import annotations

import json
import re
from typing import Any

from flask import request

from engine.errors import BadRequest, EngineError

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
