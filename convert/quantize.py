"""Every llama.cpp quantization, through llama-cpp-python's `llama_model_quantize`.

The quantizer runs inside this process (no separate binary to build) and writes to a temporary
file that is renamed only when it succeeded. The very-low-bit types that llama.cpp's own tool
refuses without an importance matrix are refused here too, with the alternatives named.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from convert import CONVERTER_VERSION
from convert.errors import QuantizeError
from convert.output import atomic_output, write_sidecars

log = logging.getLogger(__name__)

# Type names as llama.cpp's quantize tool spells them → the llama_ftype constant's suffix.
QUANT_TYPES: dict[str, str] = {
    "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1",
    "Q8_0": "MOSTLY_Q8_0",
    "Q2_K": "MOSTLY_Q2_K", "Q2_K_S": "MOSTLY_Q2_K_S",
    "Q3_K_S": "MOSTLY_Q3_K_S", "Q3_K_M": "MOSTLY_Q3_K_M", "Q3_K_L": "MOSTLY_Q3_K_L",
    "Q4_K_S": "MOSTLY_Q4_K_S", "Q4_K_M": "MOSTLY_Q4_K_M",
    "Q5_K_S": "MOSTLY_Q5_K_S", "Q5_K_M": "MOSTLY_Q5_K_M", "Q6_K": "MOSTLY_Q6_K",
    "IQ1_S": "MOSTLY_IQ1_S", "IQ1_M": "MOSTLY_IQ1_M",
    "IQ2_XXS": "MOSTLY_IQ2_XXS", "IQ2_XS": "MOSTLY_IQ2_XS", "IQ2_S": "MOSTLY_IQ2_S", "IQ2_M": "MOSTLY_IQ2_M",
    "IQ3_XXS": "MOSTLY_IQ3_XXS", "IQ3_XS": "MOSTLY_IQ3_XS", "IQ3_S": "MOSTLY_IQ3_S", "IQ3_M": "MOSTLY_IQ3_M",
    "IQ4_NL": "MOSTLY_IQ4_NL", "IQ4_XS": "MOSTLY_IQ4_XS",
    "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "F32": "ALL_F32",
}
# llama.cpp's quantize tool: "Please do not use IQ1_S, IQ1_M, IQ2_S, IQ2_XXS, IQ2_XS or Q2_K_S
# quantization without an importance matrix" — the results are unusable without one.
NEEDS_IMATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K_S"})


def parse_type(name: str) -> str:
    """Normalise a type name (q4_k_m → Q4_K_M) and refuse unknown or imatrix-only ones."""
    key = name.strip().upper()
    if key not in QUANT_TYPES:
        raise QuantizeError(f"unknown quantization type {name}; choose one of {', '.join(QUANT_TYPES)}")
    if key in NEEDS_IMATRIX:
        raise QuantizeError(f"{key} needs an importance matrix (imatrix), which this tool does not "
                            "compute; use Q2_K, Q3_K_S or a larger type instead")
    return key


def quantize(src: Path, dst: Path, qtype: str, *, threads: int | None = None) -> dict:
    """Quantize GGUF `src` into `dst` (atomically, with sha256 and manifest); returns the manifest."""
    key = parse_type(qtype)
    if not src.is_file():
        raise QuantizeError(f"{src} does not exist")
    if src.resolve() == dst.resolve():
        raise QuantizeError("the output must be a different file from the input")
    try:
        import llama_cpp
    except ImportError:
        raise QuantizeError("quantizing needs llama-cpp-python (installed with ai-engine)") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{QUANT_TYPES[key]}")
    if threads:
        params.nthread = threads
    started = time.monotonic()
    log.info("quantizing %s to %s (%s)", src, dst, key)
    with atomic_output(dst) as tmp:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise QuantizeError(f"llama.cpp could not quantize {src.name} to {key} (status {rc}); "
                                "see the log above for the tensor it stopped at")
    seconds = time.monotonic() - started
    manifest = write_sidecars(dst, {
        **_inherited(src), "type": key, "quantized_from": {"file": src.name, **_source_sha(src)},
        "converter": "ai-engine quantize", "converter_version": CONVERTER_VERSION,
        "llama_cpp_python": llama_cpp.__version__, "seconds": round(seconds, 2),
    })
    log.info("wrote %s (%.1f MB) in %.1f s", dst, manifest["size_bytes"] / 1e6, seconds)
    return manifest


def _source_sha(src: Path) -> dict:
    """The input's sha256 from its sidecar when there is one (hashing it again costs seconds)."""
    sidecar = src.with_name(src.name + ".sha256")
    if sidecar.is_file():
        return {"sha256": sidecar.read_text(encoding="utf-8").split()[0]}
    return {}


def _inherited(src: Path) -> dict:
    """Source, architecture and name from the input's manifest, so provenance survives quantizing."""
    path = src.with_name(src.name + ".manifest.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: data[k] for k in ("source", "architecture", "gguf_architecture", "name") if k in data}
