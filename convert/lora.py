"""PEFT LoRA adapter → GGUF LoRA adapter, for every architecture the base converter supports.

llama.cpp applies an adapter tensor pair to the base weight W of the same name as
W·x + scale·(alpha/rank)·B·(A·x), where `scale` is chosen at load time. The file therefore holds,
for every adapted GGUF weight `NAME.weight`, two tensors: `NAME.weight.lora_a` (numpy shape
[rank, in]) and `NAME.weight.lora_b` ([out, rank]) — PEFT's lora_A/lora_B as stored — plus the keys
`general.type=adapter`, `adapter.type=lora`, `adapter.lora.alpha`, and the base's
`general.architecture` (llama.cpp refuses an adapter whose architecture differs).

Names and transforms come from the base conversion itself: the base checkpoint's tensor plan
(convert/arch) says which GGUF tensor a module becomes and how its rows are permuted. A row
permutation acts on the output dimension, so it is applied to lora_B only (Llama's Q/K). A
transform that shifts values (Gemma's 1 + w norms) cannot be expressed by a low-rank delta; such
targets, embeddings, DoRA and full-module replacements are refused instead of converted wrong.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from convert import CONVERTER_VERSION
from convert.arch import OutTensor, architecture_for
from convert.checkpoint import Checkpoint, TensorSource, _SafetensorsFile
from convert.errors import CheckpointError, ConvertError
from convert.output import atomic_output, write_sidecars
from convert.pipeline import OUTTYPES, _StreamedTensor, nbytes, tensor_type

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT saves `base_model.model.<module>.lora_A.weight` (the adapter name "default" is dropped).
_BLOCK = re.compile(r"\.layers\.(\d+)\.")
_BASE_COPY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)(?:\.base_layer)?\.weight$")
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


class LoraError(ConvertError):
    """The adapter cannot be converted (unsupported feature, or it does not fit the base)."""


@dataclass
class LoraResult:
    path: Path
    manifest: dict[str, Any]
    seconds: float


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """adapter_config.json, checked for the PEFT features llama.cpp's LoRA cannot represent."""
    path = folder / ADAPTER_CONFIG
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder")
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {ADAPTER_CONFIG}; is it a PEFT adapter folder?")
    try:
        config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from None
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise LoraError(f"{path}: peft_type {kind} is not supported; only LoRA adapters convert")
    if config.get("use_dora"):
        raise LoraError(f"{path}: DoRA adapters (use_dora=true) are not supported by llama.cpp; "
                        "train without DoRA or merge the adapter into the base and convert that")
    if config.get("modules_to_save"):
        raise LoraError(f"{path}: modules_to_save {config['modules_to_save']} replace whole modules, "
                        "which a GGUF adapter cannot; merge the adapter and convert the merged model")
    if config.get("bias", "none") != "none":
        raise LoraError(f"{path}: bias={config['bias']!r} trains biases, which a GGUF adapter cannot "
                        "carry; train with bias='none'")
    if config.get("fan_in_fan_out"):
        raise LoraError(f"{path}: fan_in_fan_out=true (Conv1D layers) is not supported")
    if config.get("alpha_pattern"):
        raise LoraError(f"{path}: per-module alpha_pattern is not supported; a GGUF adapter has one alpha")
    ranks = [config.get("r"), *(config.get("rank_pattern") or {}).values()]
    if not isinstance(config.get("lora_alpha"), (int, float)) or not all(
            type(r) is int and r > 0 for r in ranks):
        raise CheckpointError(f"{path} lacks 'r' or 'lora_alpha' (r and rank_pattern's ranks "
                              "must be positive integers)")
    return config


def _check_ranks(pairs: dict[str, dict[str, TensorSource]], config: dict[str, Any]) -> None:
    """Every pair's rank is one adapter_config.json declares (r, or a rank of its rank_pattern).

    PEFT scales a pair by alpha over its configured rank, llama.cpp by alpha over the pair's
    actual rank: a pair of any other rank would be applied with the wrong scale.
    """
    pattern = sorted(set((config.get("rank_pattern") or {}).values()))
    allowed = {config["r"], *pattern}
    for module, ab in pairs.items():
        rank = ab["A"].shape[0]
        if rank not in allowed:
            also = f" (or {pattern} in rank_pattern)" if pattern else ""
            raise LoraError(f"adapter module {module}: lora_A has rank {rank} but "
                            f"adapter_config.json says r={config['r']}{also}")


def gguf_alpha(config: dict[str, Any]) -> float:
    """The alpha llama.cpp needs so that its alpha/rank equals PEFT's scaling.

    PEFT scales by alpha/r, or alpha/sqrt(r) with rsLoRA; llama.cpp always divides by the rank of
    each tensor pair, so rsLoRA's alpha is multiplied by sqrt(r). (rank_pattern needs nothing:
    llama.cpp reads each pair's own rank.)
    """
    alpha = float(config["lora_alpha"])
    if config.get("use_rslora"):
        if config.get("rank_pattern"):
            raise LoraError("rsLoRA with a per-module rank_pattern has no single GGUF alpha")
        alpha *= math.sqrt(float(config["r"]))
    return alpha


def _adapter_tensors(folder: Path, files: list[_SafetensorsFile]) -> dict[str, TensorSource]:
    """The adapter's tensors; every size in its header is checked against the file first."""
    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        hint = " (adapter_model.bin: save it again with safe_serialization=True)" \
            if (folder / "adapter_model.bin").is_file() else ""
        raise CheckpointError(f"{folder} has no {ADAPTER_WEIGHTS}{hint}")
    sf = _SafetensorsFile.open(path)
    files.append(sf)
    out: dict[str, TensorSource] = {}
    for name, t in sf.tensors().items():
        if t.dtype not in ("F32", "F16", "BF16"):
            raise CheckpointError(f"{path.name}: tensor {name} has dtype {t.dtype}")
        out[name] = t
    return out


def _drop_base_copies(tensors: dict[str, TensorSource], base: dict[str, TensorSource]) -> None:
    """Remove the copies of base weights PEFT saves beside the pairs, refusing changed ones.

    With lm_head or embed_tokens among the targets PEFT also saves those layers' full weights
    (`save_embedding_layers`), in case the vocabulary was resized. Unchanged copies carry nothing;
    changed ones would need a new base model, which an adapter cannot be.
    """
    copies = {n: m["module"] for n in tensors if ".lora_" not in n and (m := _BASE_COPY.match(n))}
    for name, module in copies.items():
        original = base.get(module + ".weight")
        if original is None and module == "lm_head":  # tied: the head is the embeddings
            original = base.get("model.embed_tokens.weight")
        copy = tensors.pop(name)
        if (original is None or original.shape != copy.shape
                or not np.array_equal(original.read(), copy.read())):
            raise LoraError(f"the adapter carries changed base weights for {module} (a resized "
                            "vocabulary or trained embeddings); merge the adapter into the base "
                            "model and convert the merged model instead")
        log.debug("skipping %s: an unchanged copy of the base weight", name)


def _pairs(tensors: dict[str, TensorSource]) -> dict[str, dict[str, TensorSource]]:
    """{HF module name: {"A": lora_A, "B": lora_B}}, refusing tensors that are not LoRA pairs."""
    pairs: dict[str, dict[str, TensorSource]] = {}
    for name, t in tensors.items():
        if "lora_embedding_" in name:
            raise LoraError(f"adapter tensor {name}: LoRA on embeddings is not supported; "
                            "leave embed_tokens out of target_modules")
        if "lora_magnitude_vector" in name:
            raise LoraError(f"adapter tensor {name}: DoRA adapters are not supported by llama.cpp")
        m = _LORA_KEY.match(name)
        if m is None:
            raise LoraError(f"adapter tensor {name} is not a LoRA A/B matrix; only plain LoRA "
                            "adapters (no trained biases or saved modules) convert")
        if len(t.shape) != 2:
            raise LoraError(f"adapter tensor {name} has shape {list(t.shape)}; expected a matrix")
        pairs.setdefault(m["module"], {})[m["ab"]] = t
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"adapter module {module} has lora_{''.join(ab)} but not both A and B")
    if not pairs:
        raise CheckpointError("the adapter holds no LoRA tensors")
    return pairs


def lora_plan(arch_plan: list[OutTensor], name_map: gguf.TensorNameMap, n_layers: int,
              pairs: dict[str, dict[str, TensorSource]], arch_name: str) -> list[OutTensor]:
    """GGUF tensors for each LoRA pair, named, shaped and permuted like the base weight they adapt."""
    base = {t.name: t for t in arch_plan}
    out: list[OutTensor] = []
    for module in sorted(pairs, key=_module_order):
        a, b = pairs[module]["A"], pairs[module]["B"]
        name = name_map.get_name(module + ".weight", try_suffixes=(".weight",))
        if (m := _BLOCK.search(module)) and int(m.group(1)) >= n_layers:
            raise LoraError(f"adapter module {module} is in layer {m.group(1)} but the base model has "
                            f"{n_layers} layers: the adapter was trained on another base model")
        if module.endswith("lm_head") and (name is None or name not in base):
            raise LoraError(f"target module {module}: this {arch_name} ties the output head to the "
                            "embeddings (llama.cpp has no separate output tensor for it), so it "
                            "cannot take a LoRA; leave lm_head out of target_modules")
        if name is None:
            raise LoraError(f"target module {module} has no GGUF counterpart for {arch_name}; "
                            "leave it out of target_modules")
        w = base.get(name)
        if w is None:
            raise LoraError(f"target module {module} ({name}) is not a tensor of the converted base "
                            f"model ({arch_name} ties or drops it); leave it out of target_modules")
        if len(w.shape) != 2:
            raise LoraError(f"target module {module} ({name}) is not a matrix in the base model; "
                            "leave it out of target_modules")
        if w.shift or w.data is not None:
            raise LoraError(f"target module {module} ({name}) is transformed in a way a low-rank "
                            "delta cannot follow; leave it out of target_modules")
        rank = a.shape[0]
        if b.shape[1] != rank:
            raise CheckpointError(f"adapter module {module}: lora_A {list(a.shape)} and lora_B "
                                  f"{list(b.shape)} disagree on the rank")
        if a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0]:
            raise LoraError(f"adapter module {module} is [{b.shape[0]}, {a.shape[1]}] but the base's "
                            f"{name} is {list(w.shape)}: the adapter was trained on another base model")
        out.append(OutTensor(name + ".lora_a", w.kind, tuple(a.shape), source=a))
        # The base's row permutation acts on output rows: those of lora_B (B·A is permuted then).
        out.append(OutTensor(name + ".lora_b", w.kind, tuple(b.shape), source=b, rows=w.rows))
    return out


def _module_order(module: str) -> tuple[int, str]:
    m = _BLOCK.search(module)
    return (int(m.group(1)) if m else -1, module)


def _check_base_name(config: dict[str, Any], base: Path, base_config: dict[str, Any]) -> None:
    """A hint, not a check: the recorded base name often differs from a local folder's name."""
    recorded = str(config.get("base_model_name_or_path") or "")
    if recorded and recorded.rstrip("/").split("/")[-1] not in (base.name, base_config.get("_name_or_path")):
        log.info("the adapter records base model %s; converting against %s", recorded, base)


def convert_lora(adapter_dir: Path, base_dir: Path, out: Path, outtype: str = "f16", *,
                 name: str | None = None) -> LoraResult:
    """Convert the PEFT adapter in `adapter_dir` (trained on `base_dir`) to the GGUF adapter `out`."""
    if outtype not in OUTTYPES:
        raise ConvertError(f"--outtype {outtype} is not one of {', '.join(OUTTYPES)}")
    started = time.monotonic()
    config = read_adapter_config(adapter_dir)
    alpha = gguf_alpha(config)
    wanted, file_type = OUTTYPES[outtype]
    files: list[_SafetensorsFile] = []
    try:
        with Checkpoint(base_dir) as ckpt:
            _check_base_name(config, base_dir, ckpt.config)
            arch = architecture_for(ckpt)
            adapter_tensors = _adapter_tensors(adapter_dir, files)
            _drop_base_copies(adapter_tensors, ckpt.tensors)
            pairs = _pairs(adapter_tensors)
            _check_ranks(pairs, config)
            # The whole base plan: it validates the base and carries each weight's name and transform.
            tensors = lora_plan(arch.tensor_plan(), arch.name_map, arch.n_layers, pairs, arch.hf_name)
            w = gguf.GGUFWriter(path=None, arch=arch.gguf_name)
            w.add_type(gguf.GGUFType.ADAPTER)
            w.add_string(gguf.Keys.Adapter.TYPE, "lora")
            w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
            w.add_name(name or adapter_dir.resolve().name)
            w.add_file_type(file_type)
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            plan = [(t, tensor_type(t, wanted)) for t in tensors]
            for t, qtype in plan:
                w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes(t.shape, qtype),
                                  raw_dtype=qtype)
            log.info("converting adapter %s (%s, %d pairs, alpha %g) to %s %s", adapter_dir,
                     arch.hf_name, len(pairs), alpha, out, outtype)
            with atomic_output(out) as tmp:
                try:
                    w.write_header_to_file(tmp)
                    w.write_kv_data_to_file()
                    w.write_ti_data_to_file()
                    for t, qtype in plan:
                        w.write_tensor_data(_StreamedTensor(t, qtype))
                except OSError as exc:
                    raise ConvertError(f"writing {out} failed: {exc}") from None
                finally:
                    w.close()
    finally:
        for sf in files:
            sf.close()
    ranks = sorted({int(p["A"].shape[0]) for p in pairs.values()})
    manifest = write_sidecars(out, {
        "adapter": str(adapter_dir), "base": str(base_dir), "architecture": arch.hf_name,
        "gguf_architecture": arch.gguf_name, "type": outtype, "lora_alpha": alpha, "ranks": ranks,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in pairs}), "tensors": len(plan),
        "converter": "ai-engine convert-lora", "converter_version": CONVERTER_VERSION,
    })
    seconds = time.monotonic() - started
    log.info("wrote %s (%.1f MB) in %.1f s", out, manifest["size_bytes"] / 1e6, seconds)
    return LoraResult(out, manifest, seconds)
