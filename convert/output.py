"""Safe output files: written under a temporary name and renamed when complete, with sidecars.

A failed or interrupted run never leaves a file under the real name, and never one ending in
.gguf: the temporary is `.NAME.PID.partial` beside the target (same filesystem, so the rename is
atomic). Partials left by a killed run (SIGKILL cannot be caught) are removed by the next run for
the same target. Beside every finished file go `NAME.sha256` and `NAME.manifest.json`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

from engine.default_model import sha256_file

log = logging.getLogger(__name__)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(target: Path) -> None:
    """Delete partial files of `target` whose writer process is gone."""
    for path in target.parent.glob(f".{target.name}.*.partial"):
        try:
            pid = int(path.name[len(target.name) + 2:].split(".", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            log.info("removing %s, left by an interrupted run", path)
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output(target: Path) -> Iterator[Path]:
    """Yield a temporary path; on success rename it to `target`, on any failure delete it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sidecar_paths(target: Path) -> tuple[Path, Path]:
    return target.with_name(target.name + ".sha256"), target.with_name(target.name + ".manifest.json")


def write_sidecars(target: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash `target`, then write NAME.sha256 and NAME.manifest.json (both atomically)."""
    digest = sha256_file(target)
    full = {"file": target.name, "sha256": digest, "size_bytes": target.stat().st_size,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **manifest}
    sha_path, manifest_path = sidecar_paths(target)
    with atomic_output(sha_path) as tmp:
        tmp.write_text(f"{digest}  {target.name}\n", encoding="utf-8")
    with atomic_output(manifest_path) as tmp:
        tmp.write_text(json.dumps(full, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return full
