"""The base class of every error the engine and the converter raise on purpose.

Each package derives its own errors from it (engine/errors.py, convert/errors.py); the boundaries
translate it once: HTTP handlers answer `{"error": message}` with its `status`, the CLI prints its
message and exits non-zero.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class: `status` is the HTTP status a handler answers with."""

    status = 500

    def __init__(self, message: str, *, field: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.headers = headers or {}  # HTTP headers the answer carries (Retry-After, WWW-Authenticate)
