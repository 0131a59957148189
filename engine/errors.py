"""The engine's exceptions, raised where a problem is known and translated once at each boundary.

HTTP handlers turn an `EngineError` into `{"error": message}` with its `status`; the CLI prints
its message and exits non-zero. Messages say what went wrong and, where there is one, the fix.
`EngineError` itself is declared in ai_engine_common/errors.py, as the converter's errors derive
from it too.
"""

from __future__ import annotations

from ai_engine_common.errors import EngineError

class BadRequest(EngineError):
    """The request itself is wrong (missing field, wrong type, out of range)."""

    status = 400


class ContextOverflow(BadRequest):
    """The prompt (plus the requested new tokens) does not fit the model's context."""


class ModelNotFound(EngineError):
    """A model file that was asked for does not exist."""

    status = 404


class ModelRefused(BadRequest):
    """A model path outside MODEL_PATH, or a file that is not a loadable GGUF."""


class ModelLoadError(EngineError):
    """llama.cpp could not load a model file (truncated, not GGUF, unsupported, out of memory)."""

    status = 422


class ModelNotReady(EngineError):
    """No model is loaded yet."""

    status = 503


class SettingsError(EngineError):
    """A configuration value (environment variable or flag) is invalid."""
