"""Which file a model name means: GGUF files under MODEL_PATH, presets, and Ollama-style aliases.

Nothing here loads a model. `ModelFiles` turns what clients send (`gemma-3-270m-q4_k_m`,
`persona/alt-model.gguf`, `llama3.1:8b`, a preset's name) into a `ModelSpec`: a GGUF file under
MODEL_PATH, the LoRA adapters on top of it, and the preset that named the pair. The same rules
serve start-up (MODEL, LORA), `/load-model`, and every request's `model` field.

Name resolution, first match wins (an Ollama tag `:latest` is the same as no tag):
1. a preset in MODEL_PATH/presets.toml (by its name or one of its `aliases`);
2. a GGUF under MODEL_PATH by relative path, file name or stem, with or without `.gguf`;
   a pulled one also as `hf.co/ORG/REPO:QUANT` (engine/hub_names.py);
3. an alias from the catalog (`models/catalog.toml`, e.g. `llama3.1:8b`) whose file is under
   MODEL_PATH.
"""

from __future__ import annotations

import logging
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from engine.catalog import load_catalog
from engine.errors import ModelNotFound, ModelRefused
from engine.hub_names import find_pulled
from engine.settings import Settings

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
    """A named combination from MODEL_PATH/presets.toml: base model + adapters + scales, and what
    `POST /api/create` keeps with them (a Modelfile's PARAMETER, SYSTEM and TEMPLATE)."""

    name: str
    base: str
    lora: tuple[str, ...] = ()
    scale: tuple[float, ...] = (1.0,)
    aliases: tuple[str, ...] = ()
    parameters: dict = field(default_factory=dict, hash=False, compare=False)  # Ollama options
    system: str | None = None
    template: str | None = None  # a Jinja chat template, instead of the GGUF's


@dataclass(frozen=True)
class ModelSpec:
    """What to load: a GGUF file, the LoRA adapters on top, and the preset that named them."""

    path: Path
    adapters: tuple[Adapter, ...] = ()
    preset: str | None = None

    @property
    def key(self) -> tuple:
        """Two specs with the same key are the same resident model."""
        return (str(self.path.resolve()), tuple((str(a.path.resolve()), a.scale) for a in self.adapters))


def check_gguf_file(path: Path) -> None:
    """Refuse a file that is missing or does not start like a GGUF file, before llama.cpp sees it.
    Messages name the file, not its folder: they reach HTTP clients (see `ModelFiles.public_text`)."""
    if not path.is_file():
        raise ModelNotFound(f"model file not found: {path.name}")
    with path.open("rb") as f:
        head = f.read(8)
    if head[:4] != GGUF_MAGIC:
        raise ModelRefused(f"{path.name} is not a GGUF file (it does not start with the GGUF magic bytes)")
    version = int.from_bytes(head[4:8], "little") if len(head) == 8 else 0
    if version not in (2, 3):
        raise ModelRefused(f"{path.name} has an unsupported GGUF version {version} (llama.cpp reads 2 and 3)")


def plain_name(name: str) -> str:
    """A client's model name without surrounding blanks and without the default tag `:latest`."""
    return name.strip().removesuffix(":latest")


def describe_path(path: Path) -> str:
    """A short human description for start-up logs (the full path: logs are the operator's, never
    an HTTP client's)."""
    try:
        return f"{path} ({os.path.getsize(path) / 1e6:.0f} MB)"
    except OSError:
        return str(path)


def _table(value) -> dict:
    return dict(value) if isinstance(value, dict) else {}


def _text(value) -> str | None:
    return value if isinstance(value, str) else None


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a folder under MODEL_PATH that this process may not search
        return False


class ModelFiles:
    """The models one MODEL_PATH offers, and what a name means there."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.model_dir = Path(settings.model_path).expanduser().resolve()
        # MODEL_PATH as configured and as resolved (they differ when it is or passes a link): a
        # client may name a folder under it either way.
        self._roots = {self.model_dir, Path(os.path.normpath(Path(settings.model_path).expanduser().absolute()))}

    # -- start-up: MODEL and LORA ------------------------------------------------------------
    def startup_spec(self, *, assemble: Callable[[Path], Path] | None = None) -> ModelSpec:
        """What MODEL and LORA (LORA_SCALE) name. MODEL is a file under MODEL_PATH, a path, a
        preset or an alias; empty means the embedded default model, which `assemble` (default:
        `ensure_default_model`) puts into MODEL_PATH first. LORA replaces a preset's adapters."""
        s = self.settings
        name = s.model.strip()
        spec = None
        if not name:
            from engine.default_model import ensure_default_model

            spec = ModelSpec((assemble or ensure_default_model)(self.model_dir))
        else:
            candidate = Path(name).expanduser()
            if candidate.is_absolute():
                spec = ModelSpec(candidate)
            elif (self.model_dir / candidate).exists():
                spec = ModelSpec(self.model_dir / candidate)
            else:
                spec = self._named(name) or ModelSpec(
                    candidate.resolve() if candidate.exists() else self.model_dir / candidate)
        paths = [Path(n.strip()).expanduser() for n in s.lora.split(",") if n.strip()]
        if paths:
            paths = [p if p.is_absolute() else self.model_dir / p for p in paths]
            scales = [float(x) for x in s.lora_scale.split(",") if x.strip()]
            spec = ModelSpec(spec.path, self._adapters(paths, scales))
        return spec

    # -- requests ----------------------------------------------------------------------------
    def resolve(self, name: str) -> ModelSpec:
        """The model a request's `model` field names (see the module docstring); 404 if none."""
        spec = self._named(name)
        if spec is None:
            raise ModelNotFound(f"model '{name.strip()}' not found under MODEL_PATH; GET /api/tags or /v1/models "
                                "lists them", field="model")
        return spec

    def _named(self, name: str) -> ModelSpec | None:
        wanted = plain_name(name)
        if not wanted:
            return None
        for preset in self.presets().values():
            if wanted == preset.name or wanted in {plain_name(a) for a in preset.aliases}:
                base = self.resolve_request_path(preset.base)
                return ModelSpec(base, self.resolve_adapters(preset.lora, preset.scale), preset=preset.name)
        path = self.find_model(wanted)
        if path is not None:
            return ModelSpec(path)
        pulled = find_pulled(wanted, self.list_models())
        if pulled is not None:
            return ModelSpec(self.model_dir / pulled)
        for entry in load_catalog().values():
            if wanted in {plain_name(a) for a in entry.ollama}:
                path = self.find_model(entry.file)
                if path is not None:
                    return ModelSpec(path)
        return None

    def find_model(self, name: str) -> Path | None:
        """A model named as clients name them: a file name or path under MODEL_PATH, with or
        without `.gguf`, with or without an Ollama-style `:latest` tag."""
        name = plain_name(name)
        for rel in self.list_models():
            if name in (rel, rel.removesuffix(".gguf"), Path(rel).name, Path(rel).stem):
                return self.model_dir / rel
        return None

    def resolve_request_path(self, model_name: str, model_path: str | None = None) -> Path:
        """The file a /load-model request names; refuse anything outside MODEL_PATH.

        `model_path` may be MODEL_PATH itself or a folder under it (then `model_name` is a file in
        it), or a file under it. Symlinks are resolved before the check, so a link inside
        MODEL_PATH cannot reach a file outside it. A path outside MODEL_PATH is refused before
        anything there is looked at, with a message that depends only on the request: whether it
        exists, or is a folder or a file, is not revealed. Messages name paths as the client gave
        them or relative to MODEL_PATH, never MODEL_PATH's own location.
        """
        if "\x00" in model_name or (model_path and "\x00" in model_path):
            raise ModelRefused("model names and paths cannot contain NUL characters", field="model_name")
        # One refusal for every path outside, built from the request alone.
        shown = f"model_path {model_path[:200]!r} with model_name {model_name[:200]!r}" if model_path \
            else f"model_name {model_name[:200]!r}"
        outside = ModelRefused(f"only files under MODEL_PATH can be loaded; {shown} leads outside it (GET /models "
                               "lists them)", field="model_path" if model_path else "model_name")
        base = self._lexical(model_path) if model_path else self.model_dir
        if base is None:
            raise outside
        target = base
        if model_name and (not model_path or _is_dir(base)):
            target = self._lexical(model_name, base)
            if target is None:
                raise outside
        resolved = Path(os.path.realpath(target))  # links inside MODEL_PATH are followed, then checked
        if resolved != self.model_dir and self.model_dir not in resolved.parents:
            raise outside
        if not resolved.is_file():
            raise ModelNotFound(f"model {model_name!r} not found under MODEL_PATH; GET /models lists them",
                                field="model_name")
        return resolved

    def _lexical(self, name: str, base: Path | None = None) -> Path | None:
        """`name` (relative to `base`, default MODEL_PATH) as an absolute path without `..`, if that
        is MODEL_PATH or under it (links not followed: nothing outside is touched); else None."""
        path = Path(os.path.normpath((base or self.model_dir) / name))
        if any(path == root or root in path.parents for root in self._roots):
            return path
        return None

    def public_text(self, text: str) -> str:
        """`text` (an error from llama.cpp, the OS or a library) with MODEL_PATH's location replaced by
        `MODEL_PATH`, so that a message for an HTTP client names files relative to it."""
        for root in sorted({str(r) for r in self._roots}, key=len, reverse=True):
            if root != os.sep:
                text = text.replace(root, "MODEL_PATH")
        return text

    def resolve_adapters(self, names, scales) -> tuple[Adapter, ...]:
        """LoRA adapter files under MODEL_PATH (same rules as models), with their scales."""
        paths = [self.resolve_request_path(n.strip()) for n in names if n and n.strip()]
        return self._adapters(paths, scales)

    def _adapters(self, paths: list[Path], scales) -> tuple[Adapter, ...]:
        """One scale for all adapters, or one each."""
        scales = list(scales) or [1.0]
        if len(scales) == 1:
            scales = scales * len(paths)
        if len(scales) != len(paths):
            raise ModelRefused(f"{len(scales)} LoRA scales for {len(paths)} adapters", field="lora_scale")
        return tuple(Adapter(p, self.display_name(p), float(sc)) for p, sc in zip(paths, scales))

    # -- what is there -----------------------------------------------------------------------
    @property
    def presets_file(self) -> Path:
        return self.model_dir / "presets.toml"

    def presets(self) -> dict[str, Preset]:
        """Named base + adapter combinations from MODEL_PATH/presets.toml (none if absent)."""
        path = self.presets_file
        if not path.is_file():
            return {}
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            log.warning("ignoring %s: %s", path.name, exc)
            return {}
        out = {}
        for name, p in data.get("presets", {}).items():
            lora = p.get("lora", ())
            scale = p.get("scale", 1.0)
            aliases = p.get("aliases", ())
            out[name] = Preset(name=name, base=p["base"], lora=tuple([lora] if isinstance(lora, str) else lora),
                               scale=tuple(scale if isinstance(scale, list) else [scale]),
                               aliases=tuple([aliases] if isinstance(aliases, str) else aliases),
                               parameters=_table(p.get("parameters")), system=_text(p.get("system")),
                               template=_text(p.get("template")))
        return out

    def aliases(self) -> dict[str, str]:
        """Ollama-style names from the catalog whose file is under MODEL_PATH: alias -> file (relative)."""
        out = {}
        for entry in load_catalog().values():
            path = self.find_model(entry.file)
            if path is not None:
                for alias in entry.ollama:
                    out[alias] = path.relative_to(self.model_dir).as_posix()
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

    def display_name(self, path: Path) -> str:
        """A model's name in responses: its path relative to MODEL_PATH, else its file name."""
        try:
            return path.resolve().relative_to(self.model_dir).as_posix()
        except ValueError:
            return path.name
