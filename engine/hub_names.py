"""Hugging Face hub names as Ollama spells them, and which GGUF file of a repo a quant tag means.

Nothing here touches the network or the disk: `engine/hub_pull.py` downloads, `engine/model_files.py`
resolves a pulled name to its file. The rules follow Ollama's (docs: huggingface.co/docs/hub/ollama):

- `hf.co/ORG/REPO:QUANT` (or `huggingface.co/...`, or `ORG/REPO` with a quant given apart);
- QUANT is matched against each `.gguf` file's quant tag (`model-Q4_K_M.gguf` → `Q4_K_M`), case
  insensitively; no QUANT (or `latest`) picks Q4_K_M when the repo has it, else the only GGUF;
- split GGUFs (`-00001-of-00003`) and vision projectors (`mmproj`) are not models to pull;
- a pulled file lives at `MODEL_PATH/hf.co/ORG/REPO/<file name>`, and is named
  `hf.co/ORG/REPO:QUANT` on the Ollama surface.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from engine.errors import BadRequest, ModelNotFound

HUB_FOLDER = "hf.co"  # MODEL_PATH/hf.co/ORG/REPO/FILE.gguf
DEFAULT_QUANT = "Q4_K_M"
_PREFIXES = ("https://", "http://")
_HOSTS = ("hf.co/", "huggingface.co/")
# The hub's own rule for a user or repo name: letters, digits, `-`, `_`, `.`; no `--` or `..`, not
# starting or ending with `-` or `.`; at most 96 characters.
_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
_QUANT = re.compile(r"[A-Za-z0-9_.-]{1,40}")
_SPLIT = re.compile(r"-\d{5}-of-\d{5}$")
_FILE = re.compile(r"[^/\\\x00]{1,200}\.gguf", re.IGNORECASE)


@dataclass(frozen=True)
class HubRef:
    """A GGUF repo on the hub and the quant asked for (None: the default rule)."""

    repo_id: str  # ORG/REPO
    quant: str | None = None

    @property
    def name(self) -> str:
        return f"{HUB_FOLDER}/{self.repo_id}" + (f":{self.quant}" if self.quant else "")


def parse_ref(name: str, quant: str | None = None, *, field: str = "model") -> HubRef:
    """`hf.co/ORG/REPO[:QUANT]`, `huggingface.co/...` or `ORG/REPO[:QUANT]` (with `quant` given
    apart, as `ai-engine pull --quant` does); a 400 naming `field` for anything else."""
    text = name.strip()
    for prefix in _PREFIXES:
        text = text.removeprefix(prefix)
    for host in _HOSTS:
        if text.lower().startswith(host):
            text = text[len(host):]
            break
    repo, _, tag = text.partition(":")
    tag = tag.strip()
    if tag.lower() == "latest":
        tag = ""
    if quant and tag and quant.lower() != tag.lower():
        raise BadRequest(f"'{name}' names quant {tag} but {quant} was asked for too", field=field)
    tag = quant or tag or None
    parts = repo.strip("/").split("/")
    if len(parts) != 2 or not all(_PART.fullmatch(p) and ".." not in p and "--" not in p for p in parts):
        raise BadRequest(f"'{name[:200]}' is not a Hugging Face repo: expected hf.co/ORG/REPO[:QUANT] or "
                         "ORG/REPO (letters, digits, '-', '_', '.')", field=field)
    if tag is not None and not _QUANT.fullmatch(tag):
        raise BadRequest(f"'{tag[:60]}' is not a quant tag (such as Q4_K_M)", field=field)
    return HubRef("/".join(parts), tag)


def is_hub_name(name: str) -> bool:
    """Whether a model name is spelled as a hub pull (`hf.co/...` or `huggingface.co/...`)."""
    return name.strip().lower().startswith(_HOSTS)


def quant_tag(filename: str) -> str | None:
    """The quant tag of a GGUF file name (`Llama-3.2-1B-Instruct-Q4_K_M.gguf` → `Q4_K_M`): the
    last `-` or `.` separated part of its stem that looks like one; None if none does."""
    stem = PurePosixPath(filename).name
    stem = stem[:-5] if stem.lower().endswith(".gguf") else stem
    for part in reversed(re.split(r"[-.]", stem)):
        if re.fullmatch(r"(?i)(I?Q\d[A-Z0-9_]*|T?Q\d_\d|B?F\d{2}|MXFP4[A-Z0-9_]*)", part):
            return part.upper()
    return None


def candidates(files: list[str]) -> list[str]:
    """The repo's files that are single-file GGUF models (no split parts, no vision projectors)."""
    out = []
    for f in files:
        base = PurePosixPath(f).name
        if not _FILE.fullmatch(base) or base.startswith("."):
            continue
        stem = base[:-5]
        if _SPLIT.search(stem) or "mmproj" in stem.lower():
            continue
        out.append(f)
    return out


def pick_file(repo_id: str, files: list[str], quant: str | None) -> str:
    """The one GGUF of `files` that `quant` means (see the module docstring); a 404 that lists the
    repo's GGUFs when none or several match."""
    models = candidates(files)
    if not models:
        raise ModelNotFound(f"hf.co/{repo_id} has no single-file GGUF model to pull (split GGUFs and mmproj files "
                            "are not pulled)", field="model")
    if quant is None:
        matches = [f for f in models if quant_tag(f) == DEFAULT_QUANT] or (models if len(models) == 1 else [])
        if len(matches) == 1:
            return matches[0]
    else:
        matches = [f for f in models if (quant_tag(f) or "").lower() == quant.lower()]
        if len(matches) == 1:
            return matches[0]
    tags = ", ".join(f"{quant_tag(f) or '?'} ({PurePosixPath(f).name})" for f in sorted(models))
    if quant is None:
        why = f"it has no {DEFAULT_QUANT} file and more than one GGUF; add :QUANT"
    elif matches:
        why = f"{len(matches)} files match quant {quant}"
    else:
        why = f"no file matches quant {quant}"
    raise ModelNotFound(f"hf.co/{repo_id}: {why}. It has: {tags}", field="model")


def local_path(repo_id: str, filename: str) -> PurePosixPath:
    """Where a pulled file lives, relative to MODEL_PATH: hf.co/ORG/REPO/<file name>."""
    base = PurePosixPath(filename).name
    if not _FILE.fullmatch(base) or base.startswith("."):
        raise BadRequest(f"the hub named a file {base[:100]!r} that cannot be stored", field="model")
    return PurePosixPath(HUB_FOLDER, *repo_id.split("/"), base)


def pulled_name(rel: str) -> str | None:
    """`hf.co/ORG/REPO:QUANT` for a file pulled to hf.co/ORG/REPO/<file> (relative to MODEL_PATH);
    None for any other file."""
    parts = PurePosixPath(rel).parts
    if len(parts) != 4 or parts[0] != HUB_FOLDER:
        return None
    tag = quant_tag(parts[3])
    return f"{HUB_FOLDER}/{parts[1]}/{parts[2]}" + (f":{tag}" if tag else "")


def find_pulled(name: str, models: list[str]) -> str | None:
    """The file (relative to MODEL_PATH, one of `models`) that a pulled name means, by the same
    rule as a pull: `hf.co/ORG/REPO:QUANT` or `hf.co/ORG/REPO` (Q4_K_M, else the only one)."""
    if not is_hub_name(name):
        return None
    try:
        ref = parse_ref(name)
    except BadRequest:
        return None
    prefix = f"{HUB_FOLDER}/{ref.repo_id}/".lower()
    files = [m for m in models if m.lower().startswith(prefix) and m.count("/") == 3]
    try:
        return pick_file(ref.repo_id, files, ref.quant) if files else None
    except ModelNotFound:
        return None
