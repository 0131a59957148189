"""The catalog of recommended models (`models/catalog.toml`)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from engine.settings import REPO_ROOT

CATALOG_PATH = REPO_ROOT / "models" / "catalog.toml"

REQUIRED = ("description", "hub_id", "architecture", "parameters", "license", "quantization", "file", "ram_gb")


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    description: str
    hub_id: str
    architecture: str
    parameters: str
    license: str
    quantization: str
    file: str
    ram_gb: float
    default: bool = False
    source: str | None = None
    sha256: str | None = None
    ollama: tuple[str, ...] = ()  # Ollama-style names (`llama3.1:8b`) that mean this model


def load_catalog(path: Path = CATALOG_PATH) -> dict[str, CatalogEntry]:
    """Entries by name; a missing field is an error that names the entry and the field."""
    with path.open("rb") as f:
        data = tomllib.load(f)
    entries = {}
    for name, fields in data.get("models", {}).items():
        missing = [k for k in REQUIRED if k not in fields]
        if missing:
            raise ValueError(f"{path}: model {name!r} lacks {', '.join(missing)}")
        if "ollama" in fields:
            fields = {**fields, "ollama": tuple(fields["ollama"])}
        entries[name] = CatalogEntry(name=name, **fields)
    return entries
