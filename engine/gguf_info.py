"""What a GGUF file is, read from its header without loading it: architecture, size, quantization.

Only scalar metadata is kept; arrays (the vocabulary: 262k strings for Gemma 3) are skipped,
so describing every file under MODEL_PATH for /api/tags stays fast. Results are cached by path,
size and modification time; a file's sha256 digest likewise (or taken from the `.sha256` file
the converter writes beside its outputs).
"""

from __future__ import annotations

import functools
import math
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
MAX_KEPT_ARRAY = 4096  # per-layer arrays are kept; vocabularies (262k strings) are only counted


class GGUFFormatError(ValueError):
    pass


class NotGGUF(GGUFFormatError):
    """The file does not start with the GGUF magic bytes."""


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]  # ggml order (ne0 first): the reverse of numpy's
    qtype: int
    nbytes: int


@dataclass(frozen=True)
class GgufHeader:
    """A GGUF file's header: metadata (scalars, strings and arrays up to MAX_KEPT_ARRAY items),
    the length of every array, and the tensor table. The tensor data is not touched."""

    version: int
    metadata: dict[str, Any]
    array_lengths: dict[str, int]
    tensors: dict[str, TensorInfo]

    @property
    def scalars(self) -> dict[str, Any]:
        return {k: v for k, v in self.metadata.items() if k not in self.array_lengths}


def read_header(path: Path) -> GgufHeader:
    """Read the header of a GGUF file in milliseconds (`gguf.GGUFReader` builds a numpy view per
    array element: seconds for a large vocabulary). Raises GGUFFormatError for anything else."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise NotGGUF(f"{path.name} is not a GGUF file")
        if path.stat().st_size < 24:
            raise GGUFFormatError(f"{path.name} is too short for a GGUF header")
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return _parse(m, path.name)
    except (struct.error, ValueError, UnicodeDecodeError, KeyError, OverflowError) as exc:
        if isinstance(exc, GGUFFormatError):
            raise
        raise GGUFFormatError(f"{path.name}: the GGUF header is truncated or corrupt ({exc})") from exc


def _parse(m: mmap.mmap, name: str) -> GgufHeader:
    if m[:4] != b"GGUF":
        raise GGUFFormatError(f"{name} is not a GGUF file")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", m, 4)

    def string(at: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", m, at)
        return m[at + 8:at + 8 + n].decode("utf-8", "replace"), at + 8 + n

    def value(kind: int, at: int, keep: bool = True) -> tuple[Any, int]:
        if kind in _SCALARS:
            return struct.unpack_from(_SCALARS[kind], m, at)[0], at + struct.calcsize(_SCALARS[kind])
        if kind == _STRING:
            if keep:
                return string(at)
            return None, at + 8 + struct.unpack_from("<Q", m, at)[0]
        if kind != _ARRAY:
            raise GGUFFormatError(f"{name}: unknown GGUF value type {kind}")
        item, count = struct.unpack_from("<IQ", m, at)
        at += 12
        keep = keep and count <= MAX_KEPT_ARRAY
        if item in _SCALARS:
            size = struct.calcsize(_SCALARS[item])
            values = list(struct.unpack_from("<" + _SCALARS[item][1] * count, m, at)) if keep else None
            return values, at + size * count
        items = []
        for _ in range(count):
            element, at = value(item, at, keep)
            if keep:
                items.append(element)
        return (items if keep else None), at

    pos = 24
    metadata: dict[str, Any] = {}
    lengths: dict[str, int] = {}
    for _ in range(n_kv):
        key, pos = string(pos)
        (kind,) = struct.unpack_from("<I", m, pos)
        if kind == _ARRAY:
            lengths[key] = struct.unpack_from("<Q", m, pos + 8)[0]
        val, pos = value(kind, pos + 4)
        if val is not None:
            metadata[key] = val
    tensors: dict[str, TensorInfo] = {}
    for _ in range(n_tensors):
        tname, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", m, pos)
        shape = struct.unpack_from(f"<{n_dims}Q", m, pos + 4)
        qtype, _offset = struct.unpack_from("<IQ", m, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
        tensors[tname] = TensorInfo(tuple(shape), qtype, math.prod(shape) // block * type_size)
    return GgufHeader(version, metadata, lengths, tensors)


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

