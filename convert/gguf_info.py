"""A GGUF header summary for the converter (file type, parameter count, tensor shapes in numpy
order), on top of the fast header reader the engine uses too (ai_engine_common/gguf_header.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ai_engine_common.gguf_header import GGUFFormatError, NotGGUF, read_header
from convert.errors import ConvertError


@dataclass
class GgufInfo:
    path: Path
    version: int
    metadata: dict[str, Any] = field(default_factory=dict)  # scalars and strings only
    array_lengths: dict[str, int] = field(default_factory=dict)
    tensor_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # numpy order

    @property
    def n_params(self) -> int:
        return sum(int(np.prod(s)) for s in self.tensor_shapes.values())


def read_info(path: Path) -> GgufInfo:
    """Header keys (scalars and strings), array lengths and tensor shapes of a GGUF file."""
    try:
        header = read_header(Path(path))
    except NotGGUF:
        raise ConvertError(f"{path} is not a GGUF file") from None
    except (OSError, GGUFFormatError) as exc:
        raise ConvertError(f"{path} is not a readable GGUF file ({exc or 'truncated'})") from None
    return GgufInfo(Path(path), header.version, header.scalars, dict(header.array_lengths),
                    {name: tuple(reversed(t.shape)) for name, t in header.tensors.items()})
