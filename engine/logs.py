"""Logging: JSON lines (or text) on stderr, an access log line per request, and the opt-in
prompt/reply history.

The access log carries request ids, durations and token counts, never the prompt or the reply.
Prompts and replies are written only when ENGINE_LOG_PROMPTS names a file: a rotating JSON-lines
file that contains the patients' (simulated) clinical data and must be protected as such.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

access_log = logging.getLogger("engine.access")
prompt_log = logging.getLogger("engine.prompts")

PROMPT_LOG_BYTES = 20 << 20
PROMPT_LOG_BACKUPS = 5


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
    prompt_log.handlers.clear()
    prompt_log.propagate = False  # never into the main log
    if prompt_file:
        Path(prompt_file).expanduser().parent.mkdir(parents=True, exist_ok=True)
        history = logging.handlers.RotatingFileHandler(prompt_file, maxBytes=PROMPT_LOG_BYTES,
                                                       backupCount=PROMPT_LOG_BACKUPS, encoding="utf-8")
        history.setFormatter(JsonFormatter())
        prompt_log.addHandler(history)
        prompt_log.setLevel(logging.INFO)
        logging.getLogger(__name__).warning(
            "ENGINE_LOG_PROMPTS is on: prompts and replies are written to %s (sensitive data)", prompt_file)


def log_access(request_id: str, method: str, path: str, status: int, started: float,
               remote: str | None, tokens: dict[str, Any]) -> None:
    access_log.info("%s %s %d", method, path, status, extra={"fields": {
        "request_id": request_id, "method": method, "path": path, "status": status,
        "duration_ms": round((time.perf_counter() - started) * 1000, 1), "remote": remote, **tokens}})


def log_prompt(request_id: str, path: str, prompt: str, reply: str, model: str) -> None:
    if prompt_log.handlers:
        prompt_log.info("generation", extra={"fields": {
            "request_id": request_id, "path": path, "model": model, "prompt": prompt, "reply": reply}})
