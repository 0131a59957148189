"""The generation path (engine/service.py) as the handlers call it: bound to the current request.

`start` hands engine.service the request's access-log fields, its path and its client's
disconnect check; `streaming_response` wraps a run's text in a Flask response that gives the
model back when the server closes it. Everything else is engine.service's own, imported here so
that a handler reads `service.start`, `service.Job`, `service.complete` from one place.
"""

from __future__ import annotations

from typing import Callable, Iterator

from flask import Response, request

from engine import service as core
from engine.api.http import client_gone, request_fields
from engine.model_manager import LoadedModel, ModelManager
from engine.service import Job, Run, chat_prompt_for, complete, json_job, plain_job, stop_key

__all__ = ["Job", "Run", "chat_prompt_for", "complete", "json_job", "plain_job", "start", "stop_key", "streaming_response"]


def start(host: ModelManager, name: str | None, make_job: Callable[[LoadedModel], Job], *,
          keep_alive_s: float | None = None, started: float | None = None, timeout_s: float | None = None) -> Run:
    """`engine.service.start` for the current request: the model and token counts go into the
    request's access-log fields, and a non-streaming run stops when its client leaves."""
    return core.start(host, name, make_job, keep_alive_s=keep_alive_s, started=started, timeout_s=timeout_s,
                      fields=request_fields(), path=request.path, client_gone=client_gone())


def streaming_response(body: Iterator[str], run: Run, mimetype: str) -> Response:
    """A streamed response that gives the model back when the server closes it, however far the
    client read (a client that disconnects stops its generation at the next token)."""
    response = Response(body, mimetype=mimetype, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    response.call_on_close(run.close)
    return response
