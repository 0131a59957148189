"""What a GGUF file is, read from its header without loading it: architecture, size, quantization.

The header reader is ai_engine_common/gguf_header.py (the converter uses it too); its names are
imported here for the engine's modules. Only scalar metadata is described; arrays (the vocabulary:
262k strings for Gemma 3) are skipped, so describing every file under MODEL_PATH for /api/tags
stays fast. Results are cached by path, size and modification time; a file's sha256 digest
likewise (or taken from the `.sha256` file the converter writes beside its outputs).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import gguf

from ai_engine_common.files import sha256_file
from ai_engine_common.gguf_header import GGUFFormatError, read_header

__all__ = ["GGUFFormatError", "ModelDetails", "describe", "digest", "quantization_name", "read_header",
           "read_metadata"]


def read_metadata(path: Path) -> dict[str, Any]:
    """Scalar and string key/values of a GGUF header (arrays left out)."""
    return read_header(path).scalars


@dataclass(frozen=True)
class ModelDetails:
    """What Ollama's /api/tags and /api/show say about a model file."""

    name: str
    size: int
    modified_at: str
    architecture: str
    parameter_size: str
    quantization_level: str
    context_length: int | None
    metadata: dict[str, Any]


def quantization_name(file_type: int | None) -> str:
    if file_type is None:
        return "unknown"
    try:
        return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").replace("GUESSED", "unknown")
    except ValueError:
        return f"type {file_type}"


@functools.lru_cache(maxsize=256)
def _describe(path: str, size: int, mtime: float, name: str) -> ModelDetails:
    md = read_metadata(Path(path))
    arch = str(md.get("general.architecture", "unknown"))
    return ModelDetails(
        name=name, size=size,
        modified_at=datetime.fromtimestamp(mtime, timezone.utc).isoformat().replace("+00:00", "Z"),
        architecture=arch,
        parameter_size=str(md.get("general.size_label") or "unknown"),
        quantization_level=quantization_name(md.get("general.file_type")),
        context_length=md.get(f"{arch}.context_length"),
        metadata=md)


def describe(path: Path, name: str) -> ModelDetails:
    st = path.stat()
    return _describe(str(path), st.st_size, st.st_mtime, name)


@functools.lru_cache(maxsize=256)
def _digest(path: str, size: int, mtime: float) -> str:
    sidecar = Path(path + ".sha256")
    if sidecar.is_file() and sidecar.stat().st_mtime >= mtime:
        value = sidecar.read_text().split()[0] if sidecar.read_text().strip() else ""
        if len(value) == 64:
            return value
    return sha256_file(Path(path))


def digest(path: Path) -> str:
    """The file's sha256 (hex), computed once per version of the file."""
    st = path.stat()
    return _digest(str(path), st.st_size, st.st_mtime)

