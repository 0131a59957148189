"""The HTTP side of a request, shared by the app's hooks (engine/app.py) and the blueprints.

The generation path below them (engine/service.py, the scheduler) knows nothing of Flask: what it
needs from a request, the access log's fields and whether the client is still there, it is given
as a dict and a callable (engine/api/service.py).
"""

from __future__ import annotations

from typing import Callable

from flask import request
from werkzeug.exceptions import HTTPException

from engine.errors import EngineError

REQUEST_FIELDS = "ai_engine.fields"  # per-request dict in the WSGI environ: id, token counts
CLIENT_DISCONNECTED = "waitress.client_disconnected"  # see engine/http_server.py


class Unauthorized(EngineError):
    status = 401


class HostRefused(EngineError):
    status = 400


def request_fields() -> dict:
    """The current request's log fields (token counts are added by the handlers)."""
    return request.environ.setdefault(REQUEST_FIELDS, {})


def client_gone() -> Callable[[], bool] | None:
    """A check that the current request's client has closed its connection, where the server
    offers one (waitress with channel_request_lookahead); None elsewhere."""
    return request.environ.get(CLIENT_DISCONNECTED)


def http_error_headers(exc: HTTPException) -> dict[str, str]:
    """Werkzeug's own headers for an HTTP error (a 405's Allow), without its HTML content type."""
    return {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
