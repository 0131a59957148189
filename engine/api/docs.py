"""GET /openapi.json: the hand-written OpenAPI document of every route (engine/openapi.py)."""

from __future__ import annotations

import functools

from flask import Blueprint, jsonify

from engine.openapi import openapi_document

bp = Blueprint("docs", __name__)


@functools.lru_cache(maxsize=1)
def _document() -> dict:
    # Built once: the document is static, and tools (schemathesis, clients) fetch it often.
    return openapi_document()


@bp.get("/openapi.json")
def openapi():
    """The OpenAPI 3.0 document; needs no API key, like /health."""
    return jsonify(_document())
