"""The conversion pipeline: checkpoint → GGUF keys → vocabulary → tensors, streamed to disk.

Tensor infos are declared first (their sizes are known from shapes alone), then each tensor is
read from the memory-mapped checkpoint in row chunks, transformed, encoded and written, and its
pages released before the next one. Peak memory is a chunk or one permuted tensor, not the model.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import gguf
import numpy as np

from convert import CONVERTER_VERSION
from convert.arch import OutTensor, architecture_for
from convert.checkpoint import Checkpoint
from convert.errors import ConvertError
from convert.metadata import SourceInfo, add_general
from convert.output import atomic_output, write_sidecars
from convert.vocab import load_vocab

log = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
# --outtype → (GGML type of 2-D weights, general.file_type)
OUTTYPES: dict[str, tuple[Q, gguf.LlamaFileType]] = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
CHUNK_BYTES = 32 << 20  # float32 bytes decoded per read


@dataclass
class ConvertResult:
    path: Path
    manifest: dict[str, Any]
    seconds: float


def tensor_type(t: OutTensor, wanted: Q) -> Q:
    """The stored type of one tensor: norms, biases and 1-D tensors stay f32 (as llama.cpp does)."""
    if t.keep_f32 or len(t.shape) < 2:
        return Q.F32
    if wanted is Q.Q8_0 and t.shape[-1] % gguf.GGML_QUANT_SIZES[wanted][0] != 0:
        return Q.F16  # rows that do not fill whole Q8_0 blocks
    return wanted


def nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


def encode(values: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype is Q.F32:
        return np.ascontiguousarray(values, dtype=np.float32)
    if qtype is Q.F16:
        return values.astype(np.float16)
    return gguf.quants.quantize(values, qtype)  # bf16 (round-to-nearest-even) and q8_0, in numpy


class _StreamedTensor:
    """What GGUFWriter.write_tensor_data needs (nbytes, tofile), produced chunk by chunk."""

    def __init__(self, t: OutTensor, qtype: Q) -> None:
        self.t, self.qtype = t, qtype
        self.nbytes = nbytes(t.shape, qtype)

    def tofile(self, fp: BinaryIO) -> None:
        step = self.t.chunk_rows(CHUNK_BYTES)
        written = 0
        for start in range(0, self.t.n_rows, step):
            data = encode(self.t.read(start, min(start + step, self.t.n_rows)), self.qtype)
            fp.write(memoryview(np.ascontiguousarray(data)).cast("B"))
            written += data.nbytes
        if written != self.nbytes:
            raise ConvertError(f"{self.t.name}: wrote {written} bytes, expected {self.nbytes}")


def convert(source: SourceInfo, out: Path, outtype: str = "f16", *, name: str | None = None,
            license: str | None = None) -> ConvertResult:
    """Convert the checkpoint in `source.folder` to `out` (written atomically, with sidecars)."""
    if outtype not in OUTTYPES:
        raise ConvertError(f"--outtype {outtype} is not one of {', '.join(OUTTYPES)}; "
                           "use `ai-engine quantize` for the other llama.cpp types")
    started = time.monotonic()
    wanted, file_type = OUTTYPES[outtype]
    with Checkpoint(source.folder) as ckpt:
        arch = architecture_for(ckpt)
        tensors = arch.tensor_plan()
        embd = next(t for t in tensors if t.name == "token_embd.weight")
        vocab = load_vocab(source.folder, rows=embd.shape[0])
        vocab.pad_to(embd.shape[0])

        w = gguf.GGUFWriter(path=None, arch=arch.gguf_name)
        n_params = sum(math.prod(t.shape) for t in tensors)
        model_name = add_general(w, source, n_params, name=name, license=license)
        arch.add_hparams(w)
        w.add_file_type(file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab.add_to(w)

        plan = [(t, tensor_type(t, wanted)) for t in tensors]
        for t, qtype in plan:
            w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes(t.shape, qtype), raw_dtype=qtype)
        log.info("converting %s (%s, %d tensors, %.0fM parameters) to %s %s", source.label,
                 arch.hf_name, len(plan), n_params / 1e6, out, outtype)
        with atomic_output(out) as tmp:
            try:
                w.write_header_to_file(tmp)
                w.write_kv_data_to_file()
                w.write_ti_data_to_file()
                for i, (t, qtype) in enumerate(plan, 1):
                    w.write_tensor_data(_StreamedTensor(t, qtype))
                    t.release()
                    log.debug("[%d/%d] %s %s %s", i, len(plan), t.name, list(t.shape), qtype.name)
            except OSError as exc:  # disk full, permissions, a vanished mount
                raise ConvertError(f"writing {out} failed: {exc}") from None
            finally:
                w.close()
    manifest = write_sidecars(out, {
        "source": source.as_dict(), "architecture": arch.hf_name, "gguf_architecture": arch.gguf_name,
        "name": model_name, "type": outtype, "parameters": n_params, "tensors": len(plan),
        "vocabulary": {"tokens": len(vocab.tokens), "from": vocab.source, "model": vocab.model,
                       "pre": vocab.pre},
        "converter": "ai-engine convert", "converter_version": CONVERTER_VERSION,
    })
    seconds = time.monotonic() - started
    log.info("wrote %s (%.1f MB) in %.1f s", out, manifest["size_bytes"] / 1e6, seconds)
    return ConvertResult(out, manifest, seconds)
