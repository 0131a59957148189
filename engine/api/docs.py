"""GET /openapi.json: the OpenAPI document of every route (engine/openapi.py), its request bodies
generated from the declarations that the handlers parse with (engine/api/bodies.py)."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from engine.openapi import openapi_document

bp = Blueprint("docs", __name__)


@bp.get("/openapi.json")
def openapi():
    """The OpenAPI 3.0 document; needs no API key, like /health."""
    # Built once per app, on first use: the declarations do not change while it serves, and tools
    # (schemathesis, clients) fetch it often.
    document = current_app.extensions.get("openapi_document")
    if document is None:
        document = current_app.extensions["openapi_document"] = openapi_document()
    return jsonify(document)
