"""Resolve a conversion source: a local folder, or a Hugging Face repo id downloaded on demand.

Downloads go through `huggingface_hub.snapshot_download`, limited to the files a conversion reads
(config, tokenizer, safetensors; pytorch_model.bin only when there are no safetensors and torch is
installed). huggingface_hub itself honours HF_HOME (cache location), HF_TOKEN (gated and private
repos) and HF_HUB_OFFLINE=1 (use the cache only), and draws the progress bars.

This module writes no temporary files of its own; huggingface_hub writes each download to
`blobs/<etag>.<8 random hex>.incomplete` (opened without O_EXCL) and links `snapshots/` to the
blobs, and a file already in place is trusted as downloaded. So a cache folder, or the repo's
folder in it, that every user can write is refused: anyone could plant links or weights there.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import stat
from pathlib import Path

from convert.errors import CheckpointError
from convert.metadata import SourceInfo

log = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CONFIG_FILES = [
    "config.json", "generation_config.json", "README.md",
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "chat_template.json", "chat_template.jinja", "vocab.json", "merges.txt",
]
SAFETENSORS_FILES = ["*.safetensors", "model.safetensors.index.json"]
TORCH_FILES = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
# Mistral repos also carry the original-format weights (consolidated.safetensors), Llama 3 repos an
# original/ folder: gigabytes the conversion never reads.
IGNORED = ["*/*", "consolidated*"]


def resolve_source(src: str, revision: str | None = None) -> SourceInfo:
    """A local checkpoint folder as is; anything shaped like `org/name` from the hub."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{src} is a file; pass the checkpoint folder (with config.json)")
        return SourceInfo(path)
    if not _REPO_ID.match(src):
        raise CheckpointError(f"{src} is neither a folder nor a Hugging Face repo id (org/name)")
    return SourceInfo(download(src, revision), repo_id=src, revision=revision)


def refuse_world_writable_cache(cache: Path, repo_id: str) -> None:
    """Refuse a hub cache, or this repo's folder in it, that every user may write."""
    for folder in (cache, cache / ("models--" + repo_id.replace("/", "--"))):
        try:
            mode = folder.stat().st_mode
        except FileNotFoundError:
            continue
        if mode & stat.S_IWOTH:
            raise CheckpointError(f"the Hugging Face cache folder {folder} is writable by other users, "
                                  "who could plant files or links where downloads land; set HF_HOME "
                                  "to a folder of your own (or chmod o-w it)")


def download(repo_id: str, revision: str | None = None) -> Path:
    """Fetch (or find in the cache) the files a conversion needs; returns the snapshot folder."""
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub import errors as hf_errors
    except ImportError:
        raise CheckpointError("downloading from the hub needs huggingface-hub: "
                              "pip install 'ai-engine[convert]' (or pip install huggingface-hub)") from None
    refuse_world_writable_cache(Path(constants.HF_HUB_CACHE), repo_id)
    log.info("fetching %s%s from the Hugging Face hub", repo_id, f"@{revision}" if revision else "")
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, ignore_patterns=IGNORED,
                                        allow_patterns=CONFIG_FILES + SAFETENSORS_FILES))
        if not any(folder.glob("*.safetensors")):
            if importlib.util.find_spec("torch") is None:
                raise CheckpointError(f"{repo_id} has no .safetensors weights, and its "
                                      "pytorch_model.bin needs torch: pip install torch")
            folder = Path(snapshot_download(repo_id, revision=revision, ignore_patterns=IGNORED,
                                            allow_patterns=CONFIG_FILES + TORCH_FILES))
    except hf_errors.GatedRepoError:
        raise CheckpointError(f"{repo_id} is gated: accept its license on huggingface.co, then set "
                              "HF_TOKEN to a token of that account") from None
    except hf_errors.RepositoryNotFoundError:
        raise CheckpointError(f"{repo_id} was not found on the hub (or is private: set HF_TOKEN)") from None
    except hf_errors.RevisionNotFoundError:
        raise CheckpointError(f"{repo_id} has no revision {revision}") from None
    except hf_errors.LocalEntryNotFoundError:
        raise CheckpointError(f"{repo_id} is not in the local cache and the hub cannot be reached "
                              "(HF_HUB_OFFLINE=1 or no network); check HF_HOME or go online") from None
    except hf_errors.HfHubHTTPError as exc:
        raise CheckpointError(f"downloading {repo_id} failed: {str(exc).splitlines()[0]}") from None
    return folder
