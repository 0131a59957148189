"""general.* metadata: name, license, source, size label, base models, from the model card.

The model card is README.md's YAML front matter (hub checkpoints carry one); flags override it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

log = logging.getLogger(__name__)

_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", re.S)


@dataclass
class SourceInfo:
    """Where a checkpoint came from: a local folder or a hub repo id (and revision)."""

    folder: Path
    repo_id: str | None = None
    revision: str | None = None

    @property
    def label(self) -> str:
        return self.repo_id or str(self.folder)

    def as_dict(self) -> dict[str, Any]:
        if self.repo_id:
            return {"repo_id": self.repo_id, "revision": self.revision}
        return {"path": str(self.folder.resolve())}


@dataclass
class ModelCard:
    name: str | None = None
    license: str | None = None
    base_models: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    languages: list[str] = field(default_factory=list)


def read_model_card(folder: Path) -> ModelCard:
    """Parse README.md's front matter; a missing or malformed card gives an empty one."""
    readme = folder / "README.md"
    if not readme.is_file():
        return ModelCard()
    match = _FRONT_MATTER.match(readme.read_text(encoding="utf-8", errors="replace"))
    if not match:
        return ModelCard()
    try:
        import yaml

        data = yaml.safe_load(match.group(1)) or {}
    except Exception as exc:  # a broken card must not stop a conversion
        log.warning("ignoring README.md front matter (%s)", exc)
        return ModelCard()
    if not isinstance(data, dict):
        return ModelCard()

    def as_list(value: Any) -> list[str]:
        if value is None:
            return []
        return [str(v) for v in value] if isinstance(value, list) else [str(value)]

    lic = data.get("license")
    return ModelCard(name=data.get("model_name"), license=str(lic) if lic else None,
                     base_models=as_list(data.get("base_model")), tags=as_list(data.get("tags")),
                     languages=as_list(data.get("language")))


def add_general(w: gguf.GGUFWriter, source: SourceInfo, n_params: int, *, name: str | None = None,
                license: str | None = None) -> str:
    """Fill general.*; returns the model name used."""
    card = read_model_card(source.folder)
    model_name = name or card.name or (source.repo_id.split("/")[-1] if source.repo_id else source.folder.name)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(model_name)
    if license or card.license:
        w.add_license(license or card.license)
    if source.repo_id:
        w.add_source_repo_url(f"https://huggingface.co/{source.repo_id}")
        w.add_source_url(f"https://huggingface.co/{source.repo_id}")
    if n_params > 0:
        w.add_size_label(gguf.size_label(n_params, n_params, 0, 0))
    if card.base_models:
        w.add_base_model_count(len(card.base_models))
        for i, base in enumerate(card.base_models):
            w.add_base_model_name(i, base)
            if "/" in base:
                w.add_base_model_repo_url(i, f"https://huggingface.co/{base}")
    if card.tags:
        w.add_tags(card.tags)
    if card.languages:
        w.add_languages(card.languages)
    return model_name
