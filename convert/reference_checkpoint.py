"""A real Hugging Face checkpoint made offline from a GGUF file, for tests and benchmarks.

transformers can load a GGUF file, dequantizing it (`GgufConfig(dequantize=True)`, which needs
the gguf and accelerate packages), and `save_pretrained` then writes an ordinary safetensors
checkpoint. From the embedded Gemma 3 270M GGUF this gives a 268M-parameter Gemma3ForCausalLM
with real weights and the real tokenizer, without any hub access. Building it takes about a
minute, so it is cached (keyed by the GGUF's sha256 and the transformers version).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ai_engine_common.files import sha256_file

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """$AI_ENGINE_CACHE, else $XDG_CACHE_HOME/ai-engine, else ~/.cache/ai-engine (as scripts/_setup.sh)."""
    if os.environ.get("AI_ENGINE_CACHE"):
        return Path(os.environ["AI_ENGINE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ai-engine"


def build_from_gguf(gguf_path: Path, out: Path) -> Path:
    """Dequantize `gguf_path` with transformers and save it as a safetensors checkpoint in `out`."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tmp = out.with_name(out.name + f".{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("building a Hugging Face checkpoint from %s (transformers %s)", gguf_path,
             transformers.__version__)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 quantization_config=GgufConfig(dequantize=True))
    model.config.architectures = [type(model).__name__]
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def cached_checkpoint_from_gguf(gguf_path: Path) -> Path:
    """The checkpoint for `gguf_path`, built once per GGUF content and transformers version."""
    import transformers

    key = f"{sha256_file(gguf_path)[:16]}-tf{transformers.__version__}"
    out = cache_root() / "convert" / f"hf-{gguf_path.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    return build_from_gguf(gguf_path, out)
