"""Logging: JSON lines (or text) on stderr, an access log line per request, and the opt-in
prompt/reply history.

The access log carries request ids, durations and token counts, never the prompt or the reply.
Prompts and replies are written only when ENGINE_LOG_PROMPTS names a file: a rotating JSON-lines
file that contains the patients' (simulated) clinical data and must be protected as such: the
file and every rotation are created 0600 whatever the umask, a folder created for it is 0700, and
an existing file that others could read is made private (with a warning) before anything is written.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import stat
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from engine.errors import SettingsError

access_log = logging.getLogger("engine.access")
prompt_log = logging.getLogger("engine.prompts")

PROMPT_LOG_BYTES = 20 << 20
PROMPT_LOG_BACKUPS = 5
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, and any `extra={"fields": {...}}`."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str, fmt: str = "json", prompt_file: str = "") -> None:
    """Root logging on stderr; the prompt history file when asked for."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # its "task queue depth" warnings
    for old in prompt_log.handlers:
        old.close()
    prompt_log.handlers.clear()
    prompt_log.propagate = False  # never into the main log
    if prompt_file:
        prompt_log.addHandler(_prompt_history(prompt_file))
        prompt_log.setLevel(logging.INFO)
        logging.getLogger(__name__).warning(
            "ENGINE_LOG_PROMPTS is on: prompts and replies are written to %s (sensitive data)", prompt_file)


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating log whose file, and each new file after a rotation, is 0600 whatever the umask
    (the rotations keep that mode: they are the same files renamed). A symbolic link at the
    file's name, or a file owned by another user, is refused: another user of a shared folder
    such as /tmp could otherwise read what is written."""

    def _open(self):
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND | _O_NOFOLLOW | _O_CLOEXEC, 0o600)
        try:
            _make_private(fd, self.baseFilename)
            return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)
        except BaseException:
            os.close(fd)
            raise


def _make_private(fd: int, path: str) -> None:
    """Check that the open file is ours and a regular file, and take away others' access to it."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (hasattr(os, "geteuid") and st.st_uid != os.geteuid()):
        raise PermissionError(f"{path} is not a regular file owned by this user")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.fchmod(fd, 0o600)
        logging.getLogger(__name__).warning(
            "%s could be read by other users (mode %o); made it private (0600)", path, stat.S_IMODE(st.st_mode))


def _prompt_history(prompt_file: str) -> PrivateRotatingFileHandler:
    """The handler of ENGINE_LOG_PROMPTS: folders it needs created 0700, the file and its
    existing rotations private."""
    from engine.disk_cache import make_private_dirs  # numpy: only when the history is on

    path = Path(prompt_file).expanduser().absolute()
    try:
        make_private_dirs(path.parent)  # an existing folder (/tmp, a user's own) is left as it is
        for n in range(1, PROMPT_LOG_BACKUPS + 1):  # rotations left by an earlier run
            backup = f"{path}.{n}"
            try:
                fd = os.open(backup, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                _make_private(fd, backup)
            finally:
                os.close(fd)
        history = PrivateRotatingFileHandler(path, maxBytes=PROMPT_LOG_BYTES, backupCount=PROMPT_LOG_BACKUPS,
                                             encoding="utf-8")
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if getattr(exc, "errno", None) == getattr(os, "ELOOP", -1):
            reason = "it is a symbolic link"
        raise SettingsError(f"ENGINE_LOG_PROMPTS {prompt_file}: cannot write the prompt history privately "
                            f"({reason})", field="ENGINE_LOG_PROMPTS") from None
    history.setFormatter(JsonFormatter())
    return history


def log_access(request_id: str, method: str, path: str, status: int, started: float,
               remote: str | None, tokens: dict[str, Any]) -> None:
    access_log.info("%s %s %d", method, path, status, extra={"fields": {
        "request_id": request_id, "method": method, "path": path, "status": status,
        "duration_ms": round((time.perf_counter() - started) * 1000, 1), "remote": remote, **tokens}})


def log_prompt(request_id: str, path: str, prompt: str, reply: str, model: str) -> None:
    if prompt_log.handlers:
        prompt_log.info("generation", extra={"fields": {
            "request_id": request_id, "path": path, "model": model, "prompt": prompt, "reply": reply}})
