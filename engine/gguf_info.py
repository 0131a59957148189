"""What a GGUF file is, read from its header without loading it: architecture, size, quantization.

Only scalar metadata is kept; arrays (the vocabulary: 262k strings for Gemma 3) are skipped,
so describing every file under MODEL_PATH for /api/tags stays fast. Results are cached by path,
size and modification time; a file's sha256 digest likewise (or taken from the `.sha256` file
the converter writes beside its outputs).
"""

from __future__ import annotations

import functools
import mmap
import struct
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import gguf

from engine.default_model import sha256_file

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    pass


def read_metadata(path: Path) -> dict[str, Any]:
    """Scalar key/values of a GGUF header (arrays are skipped)."""
    try:
        return _read_metadata(path)
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, GGUFFormatError):
            raise
        raise GGUFFormatError(f"{path.name}: the GGUF header is truncated or corrupt ({exc})") from exc


def _read_metadata(path: Path) -> dict[str, Any]:
    if path.stat().st_size < 24:
        raise GGUFFormatError(f"{path.name} is too small to be a GGUF file")
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != b"GGUF":
            raise GGUFFormatError(f"{path.name} is not a GGUF file")
        _version, _n_tensors, n_kv = struct.unpack_from("<IQQ", m, 4)
        pos = 24
        out: dict[str, Any] = {}

        def string(at: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", m, at)
            return m[at + 8:at + 8 + n].decode("utf-8", "replace"), at + 8 + n

        def skip(kind: int, at: int) -> int:
            if kind in _SCALARS:
                return at + struct.calcsize(_SCALARS[kind])
            if kind == _STRING:
                return at + 8 + struct.unpack_from("<Q", m, at)[0]
            if kind == _ARRAY:
                item, count = struct.unpack_from("<IQ", m, at)
                at += 12
                if item in _SCALARS:
                    return at + count * struct.calcsize(_SCALARS[item])
                for _ in range(count):
                    at = skip(item, at)
                return at
            raise GGUFFormatError(f"{path.name}: unknown GGUF value type {kind}")

        for _ in range(n_kv):
            key, pos = string(pos)
            (kind,) = struct.unpack_from("<I", m, pos)
            pos += 4
            if kind in _SCALARS:
                (out[key],) = struct.unpack_from(_SCALARS[kind], m, pos)
            elif kind == _STRING:
                out[key], _ = string(pos)
            pos = skip(kind, pos)
        return out


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

