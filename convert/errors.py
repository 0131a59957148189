"""Converter exceptions. All are `EngineError`s, so the CLI prints one line and exits non-zero."""

from __future__ import annotations

from ai_engine_common.errors import EngineError


class ConvertError(EngineError):
    """A conversion cannot proceed; the message says why and, where there is one, the fix."""


class CheckpointError(ConvertError):
    """The source checkpoint is missing, incomplete or unreadable."""


class UnsupportedArchitecture(ConvertError):
    """config.json names an architecture the converter has no module for."""


class TokenizerError(ConvertError):
    """The tokenizer files cannot be turned into a faithful GGUF vocabulary."""


class QuantizeError(ConvertError):
    """llama.cpp's quantizer refused or failed."""


class VerifyError(ConvertError):
    """Verification could not run (missing packages, unreadable files)."""
