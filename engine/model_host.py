"""Model lifecycle: which GGUF is loaded, loading and swapping it, and exclusive use of its context.

One `ModelHost` per app (attached by `create_app`). A llama.cpp context serves one generation at
a time, so `use()` hands the loaded model out under a lock; `load()` builds the new model first
and swaps it in under the same lock, so requests already running finish on the old one and a model
that fails to load leaves the current one in place.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from engine.default_model import ensure_default_model
from engine.errors import ModelLoadError, ModelNotFound, ModelNotReady, ModelRefused
from engine.gguf_info import quantization_name
from engine.metrics import Metrics
from engine.offload import resolve_gpu_layers
from engine.prompt_cache import ResponseCache
from engine.scheduler import BatchEngine
from engine.settings import KV_CACHE_TYPES, Settings

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter applied on top of the base model."""

    path: Path
    name: str
    scale: float = 1.0


@dataclass(frozen=True)
class Preset:
    """A named combination from MODEL_PATH/presets.toml: base model + adapters + scales."""

    name: str
    base: str
    lora: tuple[str, ...] = ()
    scale: tuple[float, ...] = (1.0,)


@dataclass(eq=False)
class LoadedModel:
    """A loaded llama.cpp model, the batch engine driving its context, and what is known about it."""

    engine: BatchEngine
    path: Path
    name: str
    load_seconds: float
    gpu_layers: int = 0  # layers llama.cpp was asked to offload (-1: all)
    adapters: tuple[Adapter, ...] = ()
    preset: str | None = None

    def describe_adapters(self) -> list[dict]:
        return [{"name": a.name, "scale": a.scale} for a in self.adapters]

    @property
    def n_ctx(self) -> int:
        return self.engine.n_ctx

    @property
    def metadata(self) -> dict[str, str]:
        """The GGUF's metadata as llama.cpp read it (strings), arrays excluded."""
        return self.engine.metadata

    def close(self) -> None:
        """Finish the requests it accepted, then free it."""
        self.engine.close()


def check_gguf_file(path: Path) -> None:
    """Refuse a file that is missing or does not start like a GGUF file, before llama.cpp sees it."""
    if not path.is_file():
        raise ModelNotFound(f"model file not found: {path}")
    with path.open("rb") as f:
        head = f.read(8)
    if head[:4] != GGUF_MAGIC:
        raise ModelRefused(f"{path.name} is not a GGUF file (it does not start with the GGUF magic bytes)")
    version = int.from_bytes(head[4:8], "little") if len(head) == 8 else 0
    if version not in (2, 3):
        raise ModelRefused(f"{path.name} has an unsupported GGUF version {version} (llama.cpp reads 2 and 3)")


class ModelHost:
    """Owns the loaded model of one app."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.model_dir = Path(settings.model_path).expanduser().resolve()
        self._model: LoadedModel | None = None
        self.responses = ResponseCache(settings.response_cache_size)
        self.metrics = Metrics()
        self._load_lock = threading.Lock()  # one load at a time
        self.loading = False  # /health answers 503 while a model loads

    # -- which file -----------------------------------------------------------------------
    def startup_model_path(self) -> Path:
        """The model named by MODEL (a file under MODEL_PATH or a path), or the embedded default."""
        name = self.settings.model.strip()
        if not name:
            return ensure_default_model(self.model_dir)
        candidate = Path(name).expanduser()
        if not candidate.is_absolute() and not (self.model_dir / candidate).exists() and candidate.exists():
            return candidate.resolve()
        return candidate if candidate.is_absolute() else self.model_dir / candidate

    def resolve_request_path(self, model_name: str, model_path: str | None = None) -> Path:
        """The file a /load-model request names; refuse anything outside MODEL_PATH.

        `model_path` may be MODEL_PATH itself or a folder under it (then `model_name` is a file in
        it), or a file under it. Symlinks are resolved before the check, so a link inside
        MODEL_PATH cannot reach a file outside it.
        """
        base = Path(model_path).expanduser() if model_path else self.model_dir
        if not base.is_absolute():
            base = self.model_dir / base
        if "\x00" in model_name or (model_path and "\x00" in model_path):
            raise ModelRefused("model names and paths cannot contain NUL characters", field="model_name")
        target = base / model_name if (not model_path or base.is_dir()) and model_name else base
        resolved = target.resolve()
        if resolved != self.model_dir and self.model_dir not in resolved.parents:
            raise ModelRefused(
                f"only files under MODEL_PATH ({self.model_dir}) can be loaded; {str(target)!r} is outside it",
                field="model_path" if model_path else "model_name")
        if not resolved.is_file():
            raise ModelNotFound(
                f"model {model_name!r} not found under MODEL_PATH ({self.model_dir}); GET /models lists them",
                field="model_name")
        return resolved

    def find_model(self, name: str) -> Path | None:
        """A model named as clients name them: a file name or path under MODEL_PATH, with or
        without `.gguf`, with or without an Ollama-style `:latest` tag."""
        name = name.strip().removesuffix(":latest")
        for rel in self.list_models():
            if name in (rel, rel.removesuffix(".gguf"), Path(rel).name, Path(rel).stem):
                return self.model_dir / rel
        return None

    def ensure_model(self, name: str | None) -> tuple[LoadedModel, float]:
        """The loaded model if `name` is empty or names it; otherwise load the named model
        (switching the engine to it). Returns the model and the seconds spent loading."""
        current = self._model
        if not name or current is not None and (
                name.strip().removesuffix(":latest") in model_aliases(current.name) and current.preset is None
                or current.preset == name.strip().removesuffix(":latest")):
            if current is None:
                raise ModelNotReady("no model is loaded yet; retry shortly or POST /load-model")
            return current, 0.0
        preset = self.presets().get(name.strip().removesuffix(":latest"))
        if preset is not None:
            base = self.resolve_request_path(preset.base)
            loaded = self.load(base, self.resolve_adapters(preset.lora, preset.scale), preset=preset.name)
            return loaded, loaded.load_seconds
        path = self.find_model(name)
        if path is None:
            raise ModelNotFound(f"model '{name}' not found under MODEL_PATH ({self.model_dir}); "
                                "GET /api/tags or /v1/models lists them", field="model")
        if current is not None and path.resolve() == current.path.resolve():
            return current, 0.0
        loaded = self.load(path)
        return loaded, loaded.load_seconds

    def resolve_adapters(self, names, scales) -> tuple[Adapter, ...]:
        """LoRA adapter files under MODEL_PATH (same rules as models), with their scales."""
        paths = [self.resolve_request_path(n.strip()) for n in names if n and n.strip()]
        return self._adapters(paths, scales)

    def startup_adapters(self) -> tuple[Adapter, ...]:
        """LORA / LORA_SCALE: like MODEL, a name under MODEL_PATH or a path chosen by the operator."""
        s = self.settings
        paths = [Path(n.strip()).expanduser() for n in s.lora.split(",") if n.strip()]
        paths = [p if p.is_absolute() else self.model_dir / p for p in paths]
        return self._adapters(paths, [float(x) for x in s.lora_scale.split(",") if x.strip()])

    def _adapters(self, paths: list[Path], scales) -> tuple[Adapter, ...]:
        """One scale for all adapters, or one each."""
        scales = list(scales) or [1.0]
        if len(scales) == 1:
            scales = scales * len(paths)
        if len(scales) != len(paths):
            raise ModelRefused(f"{len(scales)} LoRA scales for {len(paths)} adapters", field="lora_scale")
        return tuple(Adapter(p, self.display_name(p), float(sc)) for p, sc in zip(paths, scales))

    def presets(self) -> dict[str, Preset]:
        """Named base + adapter combinations from MODEL_PATH/presets.toml (none if absent)."""
        path = self.model_dir / "presets.toml"
        if not path.is_file():
            return {}
        import tomllib

        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            log.warning("ignoring %s: %s", path, exc)
            return {}
        out = {}
        for name, p in data.get("presets", {}).items():
            lora = p.get("lora", ())
            scale = p.get("scale", 1.0)
            out[name] = Preset(name=name, base=p["base"], lora=tuple([lora] if isinstance(lora, str) else lora),
                               scale=tuple(scale if isinstance(scale, list) else [scale]))
        return out

    def list_models(self) -> list[str]:
        """GGUF files under MODEL_PATH, as paths relative to it (hidden and partial files skipped)."""
        if not self.model_dir.is_dir():
            return []
        names = []
        for path in self.model_dir.rglob("*.gguf"):
            rel = path.relative_to(self.model_dir)
            # Links that lead outside MODEL_PATH cannot be loaded, so they are not listed either.
            if path.is_file() and not any(part.startswith(".") for part in rel.parts) \
                    and self.model_dir in path.resolve().parents:
                names.append(rel.as_posix())
        return sorted(names)

    # -- loading --------------------------------------------------------------------------
    def load(self, path: Path, adapters: tuple[Adapter, ...] = (), preset: str | None = None) -> LoadedModel:
        """Load `path` (with LoRA `adapters`) and make it the current model; the previous one
        finishes what it accepted and is closed afterwards."""
        check_gguf_file(path)
        for adapter in adapters:
            check_gguf_file(adapter.path)
        with self._load_lock:
            self.loading = True
            self.metrics.model_loaded.set(0)
            try:
                new = self._build(path, adapters, preset)
                old, self._model = self._model, new
            finally:
                self.loading = False
                self.metrics.model_loaded.set(1 if self._model is not None else 0)
        if old is not None:
            # Requests it already accepted finish on it; new ones go to the new model.
            threading.Thread(target=old.close, name="model-drain", daemon=True).start()
        self.responses.clear()
        self.metrics.set_model(new.name, quantization_name(_file_type(new)), new.gpu_layers,
                               new.load_seconds)
        return new

    def _build(self, path: Path, adapters: tuple[Adapter, ...] = (), preset: str | None = None) -> LoadedModel:
        s = self.settings
        # An explicit N_GPU_LAYERS without a usable GPU is a settings error (not a load error).
        n_gpu, _plan, message = resolve_gpu_layers(s.n_gpu_layers, path, s.n_ctx, n_batch=s.n_batch,
                                                   kv_cache_type=s.kv_cache_type, flash_attn=s.flash_attn != "off",
                                                   n_seq=s.n_parallel)
        log.info("%s", message)
        started = time.perf_counter()
        try:
            engine = BatchEngine(
                path, n_ctx=s.n_ctx, n_parallel=s.n_parallel, n_batch=s.n_batch, n_threads=s.n_threads,
                n_threads_batch=s.n_threads_batch, n_gpu_layers=n_gpu, flash_attn=s.flash_attn,
                kv_type=KV_CACHE_TYPES[s.kv_cache_type], cache_bytes=s.cache_ram_mb << 20,
                max_queue=s.max_queue, metrics=self.metrics, adapters=[(a.path, a.scale) for a in adapters])
        except Exception as exc:  # llama-cpp-python raises ValueError with little detail
            size = path.stat().st_size if path.exists() else 0
            raise ModelLoadError(
                f"llama.cpp could not load {path.name} ({size:,} bytes): {exc}. The file may be truncated, "
                "not a model GGUF, or of an architecture this llama.cpp build does not support") from exc
        seconds = time.perf_counter() - started
        log.info("loaded %s in %.2f s (n_ctx=%d per sequence, n_parallel=%d, threads=%d, gpu_layers=%d)",
                 path.name, seconds, s.n_ctx, s.n_parallel, s.n_threads, n_gpu)
        if adapters:
            log.info("LoRA adapters: %s", ", ".join(f"{a.name} (scale {a.scale})" for a in adapters))
        return LoadedModel(engine=engine, path=path, name=self.display_name(path), load_seconds=seconds,
                           gpu_layers=n_gpu, adapters=tuple(adapters), preset=preset)

    def display_name(self, path: Path) -> str:
        """A model's name in responses: its path relative to MODEL_PATH, else its file name."""
        try:
            return path.resolve().relative_to(self.model_dir).as_posix()
        except ValueError:
            return path.name

    # -- use --------------------------------------------------------------------------------
    @property
    def current(self) -> LoadedModel | None:
        return self._model

    @property
    def ready(self) -> bool:
        return self._model is not None and not self.loading

    def close(self) -> None:
        model, self._model = self._model, None
        if model is not None:
            model.close()


def _file_type(model: LoadedModel) -> int | None:
    try:
        return int(model.metadata.get("general.file_type", ""))
    except ValueError:
        return None


def model_aliases(name: str) -> set[str]:
    """The names a model file answers to (relative path, without .gguf, file name, stem)."""
    return {name, name.removesuffix(".gguf"), Path(name).name, Path(name).stem}


def describe_path(path: Path) -> str:
    """A short human description for start-up logs."""
    try:
        return f"{path} ({os.path.getsize(path) / 1e6:.0f} MB)"
    except OSError:
        return str(path)
