"""A Hugging Face checkpoint folder: config.json plus tensors read lazily, without torch.

Safetensors files are memory-mapped; a tensor's rows are decoded to float32 only when the writer
asks for them, and the pages are handed back to the kernel afterwards, so converting a model needs
far less RAM than the model's size. bf16 is widened in numpy (it is the top half of a float32).
`pytorch_model.bin` checkpoints are read through torch, and only when torch is installed.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import reprlib
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from convert.errors import CheckpointError

log = logging.getLogger(__name__)

# safetensors dtype names → numpy dtypes as stored on disk (bf16 is read as its raw 16 bits).
_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}
_PAGE = mmap.PAGESIZE
_MAX_HEADER = 100 << 20
_MAX_INT64 = 2**63 - 1


class TensorSource(Protocol):
    """One source tensor: its shape, and its rows decoded to float32 on demand."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray: ...

    def release(self) -> None: ...


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """Widen raw bf16 bits (uint16) to float32: bf16 is the upper half of a float32."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def short_repr(value: Any) -> str:
    """A header value for an error message, cut short: a hostile header can hold anything."""
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxdict, short.maxstring = 2, 6, 4, 40
    return short.repr(value)


def _is_count(value: Any) -> bool:
    """A non-negative integer that numpy, GGUF and llama.cpp can hold (int64); JSON true is not one."""
    return type(value) is int and 0 <= value <= _MAX_INT64


@dataclass(frozen=True)
class _Entry:
    """One tensor of a safetensors header, checked: offsets are relative to the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _check_entry(path: Path, name: str, info: Any, data_len: int) -> _Entry:
    """Every size one header entry declares, checked against itself and the file's length.

    Python integers throughout: numpy's int64 product of a shape like [2**62, 4] wraps to 0 and
    would match an empty byte range.
    """
    where = f"{path.name}: tensor {name}"
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: its header entry is not a JSON object")
    dtype = info.get("dtype")
    if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPES:
        raise CheckpointError(f"{where} has dtype {short_repr(dtype)}; only F32, F16 and BF16 "
                              "weights can be converted")
    offsets = info.get("data_offsets")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
        raise CheckpointError(f"{where} has data_offsets {short_repr(offsets)}; expected [begin, end] "
                              "with 0 <= begin <= end")
    begin, end = offsets
    if end > data_len:
        raise CheckpointError(f"{path.name} is truncated: tensor {name} ends {end} bytes into the "
                              f"data, past the end of the {data_len} bytes there; download it again")
    shape = info.get("shape")
    if not isinstance(shape, list) or not all(map(_is_count, shape)):
        raise CheckpointError(f"{where} has shape {short_repr(shape)}; dimensions must be "
                              "non-negative integers")
    expected = math.prod(shape) * np.dtype(_SAFETENSORS_DTYPES[dtype]).itemsize
    if end - begin != expected:
        raise CheckpointError(f"{where} is {end - begin} bytes, expected {expected} for shape "
                              f"{shape} of {dtype}")
    return _Entry(dtype, tuple(shape), begin, end)


def _check_layout(path: Path, entries: dict[str, _Entry], data_len: int) -> None:
    """Tensors tile the data section exactly: no overlaps, no gaps, nothing after the last one.

    The safetensors format requires it (and its own library refuses other files); bytes that
    belong to two tensors, or to none, mean a corrupted or deliberately crafted file.
    """
    pos, prev = 0, None
    for name, e in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if e.begin < pos:
            raise CheckpointError(f"{path.name}: tensor {name} (bytes {e.begin}-{e.end}) overlaps "
                                  f"tensor {prev} (which ends at byte {pos})")
        if e.begin > pos:
            raise CheckpointError(f"{path.name}: tensor {name} starts at byte {e.begin}, leaving a "
                                  f"gap of {e.begin - pos} bytes after "
                                  f"{f'tensor {prev}' if prev else 'the header'}; a safetensors "
                                  "file has no unused bytes")
        pos, prev = e.end, name
    if pos != data_len:
        raise CheckpointError(f"{path} has {data_len - pos} bytes after its last tensor; a "
                              "safetensors file holds nothing else (corrupted or crafted)")


def _read_header(path: Path) -> tuple[int, int, dict[str, Any]]:
    """(data start, file size, header without __metadata__); the header's length is checked
    against the file before it is read."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is not a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(f"{path}: header length {n} is larger than the file "
                                      f"({size} bytes); it is truncated or not a safetensors file")
            if n > _MAX_HEADER:
                raise CheckpointError(f"{path}: header length {n} is implausible (over 100 MB)")
            header = json.loads(f.read(n))
    except (OSError, ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    return 8 + n, size, header


@dataclass
class _SafetensorsFile:
    path: Path
    data_start: int
    entries: dict[str, _Entry]
    _mm: mmap.mmap | None = None

    @classmethod
    def open(cls, path: Path) -> "_SafetensorsFile":
        """Read and check the header: every size in it fits the file before any tensor is read."""
        data_start, size, header = _read_header(path)
        data_len = size - data_start
        entries = {name: _check_entry(path, name, info, data_len) for name, info in header.items()}
        _check_layout(path, entries, data_len)
        return cls(path, data_start, entries)

    def tensors(self) -> dict[str, "SafetensorsTensor"]:
        return {name: SafetensorsTensor(name, e.shape, e.dtype, self, self.data_start + e.begin,
                                        self.data_start + e.end) for name, e in self.entries.items()}

    def mm(self) -> mmap.mmap:
        if self._mm is None:
            with self.path.open("rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mm

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # an array still views the map (an exception is unwinding); GC unmaps it later
            self._mm = None


@dataclass
class SafetensorsTensor:
    """A tensor inside a memory-mapped safetensors file."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    file: _SafetensorsFile
    begin: int  # absolute byte offsets in the file
    end: int

    @property
    def _np_dtype(self) -> type:
        return _SAFETENSORS_DTYPES[self.dtype]

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) as a new float32 array (the whole tensor by default)."""
        itemsize = np.dtype(self._np_dtype).itemsize
        if len(self.shape) <= 1:
            offset, count, shape = self.begin, math.prod(self.shape), self.shape
        else:
            stop = self.shape[0] if stop is None else min(stop, self.shape[0])
            row = math.prod(self.shape[1:])
            offset, count = self.begin + start * row * itemsize, (stop - start) * row
            shape = (stop - start, *self.shape[1:])
        raw = np.frombuffer(self.file.mm(), dtype=self._np_dtype, count=count, offset=offset)
        out = bf16_to_f32(raw) if self.dtype == "BF16" else raw.astype(np.float32)
        del raw
        # The decoded copy is all the caller needs: hand the mapped pages back right away, so a
        # large tensor read in chunks never has more than one chunk resident.
        self._drop_pages(offset, offset + count * itemsize)
        return out.reshape(shape)

    def release(self) -> None:
        """Drop this tensor's pages from the process (the page cache keeps them if memory allows)."""
        self._drop_pages(self.begin, self.end)

    def _drop_pages(self, begin: int, end: int) -> None:
        mm = self.file._mm
        if mm is None or not hasattr(mm, "madvise"):
            return
        start = begin - begin % _PAGE
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (OSError, ValueError):
            pass


@dataclass
class TorchTensor:
    """A tensor from a pytorch_model.bin (needs torch)."""

    name: str
    tensor: Any
    shape: tuple[int, ...] = field(init=False)
    dtype: str = field(init=False)

    def __post_init__(self) -> None:
        self.shape = tuple(self.tensor.shape)
        self.dtype = str(self.tensor.dtype).removeprefix("torch.").upper()

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        t = self.tensor if len(self.shape) <= 1 else self.tensor[start:stop]
        return t.float().numpy().copy()

    def release(self) -> None:
        pass


class Checkpoint:
    """config.json, tokenizer files and the tensors of a local checkpoint folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        if not folder.is_dir():
            raise CheckpointError(f"{folder} is not a folder")
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{folder} has no config.json; is it a Hugging Face checkpoint?")
        try:
            self.config: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise CheckpointError(f"{config_path} is not valid JSON ({exc})") from None
        if quant := self.config.get("quantization_config"):
            method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else quant
            raise CheckpointError(
                f"{folder} holds pre-quantized weights ({method}); convert the original "
                "full-precision checkpoint instead")
        self._files: list[_SafetensorsFile] = []
        self.tensors: dict[str, TensorSource] = self._load_tensors()
        if not self.tensors:
            raise CheckpointError(f"{folder} has no weights (*.safetensors or pytorch_model.bin)")

    def _load_tensors(self) -> dict[str, TensorSource]:
        files = self._safetensors_files()
        if files:
            return self._index_safetensors(files)
        bins = sorted(self.folder.glob("pytorch_model*.bin"))
        if bins:
            return self._load_torch_bins(bins)
        return {}

    def _safetensors_files(self) -> list[Path]:
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError) as exc:
                raise CheckpointError(f"{index} is not a valid safetensors index ({exc})") from None
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (self.folder / n).is_file()]
            if missing:
                raise CheckpointError(
                    f"{self.folder} is incomplete: the index lists {len(names)} shards but "
                    f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing")
            return [self.folder / n for n in names]
        # consolidated*.safetensors: Mistral's original-format copy of the same weights.
        return sorted(p for p in self.folder.glob("*.safetensors") if not p.name.startswith("consolidated"))

    def _index_safetensors(self, paths: list[Path]) -> dict[str, TensorSource]:
        tensors: dict[str, TensorSource] = {}
        file_of: dict[str, str] = {}
        for path in paths:
            sf = _SafetensorsFile.open(path)
            self._files.append(sf)
            for name, t in sf.tensors().items():
                if name in tensors:
                    raise CheckpointError(f"{self.folder}: tensor {name} is in both "
                                          f"{file_of[name]} and {path.name}")
                tensors[name], file_of[name] = t, path.name
        return tensors

    def _load_torch_bins(self, paths: list[Path]) -> dict[str, TensorSource]:
        try:
            import torch
        except ImportError:
            raise CheckpointError(
                f"{self.folder} has only pytorch_model.bin weights, which need torch to read; "
                "install it (pip install torch) or use a checkpoint with .safetensors files") from None
        tensors: dict[str, TensorSource] = {}
        for path in paths:
            try:
                state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as exc:  # torch raises many types for a bad file
                raise CheckpointError(f"cannot read {path}: {exc}") from None
            for name, tensor in state.items():
                tensors[name] = TorchTensor(name, tensor)
        return tensors

    def close(self) -> None:
        for sf in self._files:
            sf.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
