"""Safe output files: written under a temporary name and renamed when complete, with sidecars.

A failed or interrupted run never leaves a file under the real name, and never one ending in
.gguf: the temporary is `.NAME.PID.RANDOM.partial` beside the target (same filesystem, so the
rename is atomic), created exclusively (O_CREAT|O_EXCL|O_NOFOLLOW) under a name nobody can guess,
so a file or link planted in a shared folder is never opened. An output path that is a symbolic
link is refused rather than written through (the rename would replace the link, not its target).
Partials left by a killed run (SIGKILL cannot be caught) are removed by the next run for the same
target. Beside every finished file go `NAME.sha256` and `NAME.manifest.json`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any, Iterator

from ai_engine_common.files import sha256_file
from convert.errors import ConvertError

log = logging.getLogger(__name__)

# Exclusive, never through a link; the mode honours the umask (mkstemp's would be 0600).
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


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


def refuse_links(target: Path) -> None:
    """Refuse an output, or one of its sidecars, that is a symbolic link (dangling or not)."""
    for path in (target, *sidecar_paths(target)):
        if path.is_symlink():
            raise ConvertError(f"{path} is a symbolic link (to {os.readlink(path)}); the converter "
                               "does not write through links: give the real path or remove the link")


def _create_partial(target: Path) -> Path:
    """A new empty file beside `target`, created by this call alone under an unguessable name."""
    for _ in range(8):
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(8)}.partial")
        try:
            os.close(os.open(tmp, _CREATE, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise ConvertError(f"cannot create a temporary file beside {target}: every name tried exists")


@contextlib.contextmanager
def atomic_output(target: Path) -> Iterator[Path]:
    """Yield a new temporary path; on success rename it to `target`, on any failure delete it.

    The writer opens the yielded path itself (llama.cpp's quantizer takes a name, not a file);
    it is a regular file this call created, in a folder the target's owner controls.
    """
    refuse_links(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target)
    tmp = _create_partial(target)
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
