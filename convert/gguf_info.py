"""A GGUF header summary (file type, parameter count, chosen keys) read in well under a second.

`gguf.GGUFReader` builds a numpy view for every array element: for a 128k-token vocabulary with
280k merges that takes seconds. Verification only needs a few scalars and the tensor shapes, so
this reader skips over arrays by their lengths instead.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from convert.errors import ConvertError

GGUF_MAGIC = b"GGUF"
# GGUF value types → struct format (STRING = 8, ARRAY = 9 are handled separately).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass
class GgufInfo:
    path: Path
    version: int
    metadata: dict[str, Any] = field(default_factory=dict)  # scalars and strings only
    array_lengths: dict[str, int] = field(default_factory=dict)
    tensor_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def n_params(self) -> int:
        return sum(int(np.prod(s)) for s in self.tensor_shapes.values())


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise EOFError
    return struct.unpack(fmt, data)[0]


def _string(f: BinaryIO) -> str:
    n = _read(f, "<Q")
    return f.read(n).decode("utf-8", errors="replace")


def _skip_value(f: BinaryIO, vtype: int) -> None:
    if vtype == _STRING:
        f.seek(_read(f, "<Q"), 1)
    elif vtype == _ARRAY:
        item, n = _read(f, "<I"), _read(f, "<Q")
        if item in _SCALARS:
            f.seek(struct.calcsize(_SCALARS[item]) * n, 1)
        else:
            for _ in range(n):
                _skip_value(f, item)
    else:
        f.seek(struct.calcsize(_SCALARS[vtype]), 1)


def read_info(path: Path) -> GgufInfo:
    """Header keys (scalars and strings), array lengths and tensor shapes of a GGUF file."""
    try:
        with path.open("rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise ConvertError(f"{path} is not a GGUF file")
            info = GgufInfo(path, _read(f, "<I"))
            n_tensors, n_kv = _read(f, "<Q"), _read(f, "<Q")
            for _ in range(n_kv):
                key, vtype = _string(f), _read(f, "<I")
                if vtype == _STRING:
                    info.metadata[key] = _string(f)
                elif vtype == _ARRAY:
                    item, n = _read(f, "<I"), _read(f, "<Q")
                    info.array_lengths[key] = n
                    f.seek(-12, 1)
                    _skip_value(f, _ARRAY)
                else:
                    info.metadata[key] = _read(f, _SCALARS[vtype])
            for _ in range(n_tensors):
                name, n_dims = _string(f), _read(f, "<I")
                dims = [_read(f, "<Q") for _ in range(n_dims)]
                f.seek(4 + 8, 1)  # type, offset
                info.tensor_shapes[name] = tuple(reversed(dims))
    except (OSError, EOFError, KeyError, struct.error) as exc:
        raise ConvertError(f"{path} is not a readable GGUF file ({exc or 'truncated'})") from None
    return info
