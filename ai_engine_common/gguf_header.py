"""A GGUF file's header, read without loading the file: metadata and the tensor table.

The engine describes models with it (engine/gguf_info.py: /api/tags, /api/show, offload plans);
the converter checks its outputs with it (convert/gguf_info.py). Only the header is read; arrays
longer than MAX_KEPT_ARRAY (a vocabulary: 262k strings for Gemma 3) are counted, not kept.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
MAX_KEPT_ARRAY = 4096  # per-layer arrays are kept; vocabularies (262k strings) are only counted


class GGUFFormatError(ValueError):
    """The file is not a GGUF file, or its header is truncated or corrupt."""


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
