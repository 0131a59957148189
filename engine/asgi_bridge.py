"""Serve a WSGI app (the engine's Flask app) to an ASGI server, such as a Ray Serve replica.

The WSGI app runs in a thread pool, as under waitress, and every body chunk is sent as soon as
the app yields it, so server-sent events and NDJSON stream. When the client goes away (the ASGI
task is cancelled, as Ray Serve does on a disconnect, or a send fails) the app's next write
raises inside its thread, as waitress's would: a streamed generation stops at the next token and
gives the model back. (a2wsgi's WSGIMiddleware instead blocks its thread for good on a full
queue once nobody reads it, which here would hold the model forever.)
"""

from __future__ import annotations

import asyncio
import io
import logging
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, Iterable

log = logging.getLogger(__name__)

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
WsgiApp = Callable[[dict, Callable], Iterable[bytes]]


class ClientDisconnected(OSError):
    """The client is gone: raised in the app's thread at its next write."""


class WsgiToAsgi:
    """An ASGI app that runs `app` (WSGI) for each HTTP request."""

    def __init__(self, app: WsgiApp, *, threads: int, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="wsgi")

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await _lifespan(receive, send)
        elif scope["type"] == "websocket":  # no route of the engine speaks it
            await send({"type": "websocket.close", "code": 1000})

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def _http(self, scope: dict, receive: Receive, send: Send) -> None:
        # Past the limit only the length matters: Flask answers 413 from it.
        body, length = await _read_body(receive, self.max_body_bytes + 1)
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[Message | None] = asyncio.Queue()
        gone = threading.Event()

        def emit(message: Message | None) -> None:  # runs in the app's thread
            if message is not None and gone.is_set():
                raise ClientDisconnected("the client went away")
            loop.call_soon_threadsafe(out.put_nowait, message)

        environ = build_environ(scope, body, length)
        worker = loop.run_in_executor(self.executor, _run_wsgi, self.app, environ, emit)
        try:
            while (message := await out.get()) is not None:
                await send(message)
        except BaseException:  # cancelled (client gone) or the send failed: stop the app's writes
            gone.set()
            raise
        await worker  # an error of the app itself (Flask's handlers answer nearly all of them)


def _run_wsgi(app: WsgiApp, environ: dict, emit: Callable[[Message | None], None]) -> None:
    """Run one WSGI request, emitting ASGI messages; the headers go with the first non-empty
    chunk (PEP 3333), the end marker `None` always comes last."""
    head: list[Message] = []  # the response's start, until it is sent
    sent = threading.Event()

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable:
        if exc_info is not None and sent.is_set():
            raise exc_info[1].with_traceback(exc_info[2])  # too late to change the status
        head[:] = [{"type": "http.response.start", "status": int(status.split(" ", 1)[0]),
                    "headers": [(k.lower().encode("latin1"), v.encode("latin1")) for k, v in headers]}]
        return write

    def send_head() -> None:
        if head:
            emit(head.pop())
            sent.set()

    def write(chunk: bytes) -> None:
        send_head()
        emit({"type": "http.response.body", "body": bytes(chunk), "more_body": True})

    try:
        result = app(environ, start_response)
        try:
            for chunk in result:
                if chunk:
                    write(chunk)
            send_head()
            emit({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()  # a streamed generation gives the model back here
    except ClientDisconnected:
        log.info("client disconnected: %s %s", environ["REQUEST_METHOD"], environ["PATH_INFO"])
    finally:
        emit(None)


def build_environ(scope: dict, body: bytes, length: int | None = None) -> dict:
    """The WSGI environ of an ASGI HTTP scope whose body is `body` (the first bytes of it when
    `length`, the whole body's size, is larger). A body sent without a Content-Length (chunked)
    gets one: the size that arrived."""
    server = scope.get("server") or ("localhost", 80)
    client = scope.get("client") or ("", 0)
    root = scope.get("root_path", "")
    path = scope["path"]
    if root and path.startswith(root):
        path = path[len(root):]
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope["method"],
        # WSGI carries paths as latin-1 strings of the UTF-8 bytes
        "SCRIPT_NAME": root.encode("utf-8").decode("latin1"),
        "PATH_INFO": path.encode("utf-8").decode("latin1"),
        "QUERY_STRING": scope.get("query_string", b"").decode("latin1"),
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1] or 80),
        "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
        "REMOTE_ADDR": str(client[0]),
        "REMOTE_PORT": str(client[1]),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": io.BytesIO(body),
        "wsgi.input_terminated": True,  # the whole body is there, with or without a Content-Length
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    for raw_name, raw_value in scope.get("headers", []):
        name, value = raw_name.decode("latin1").lower(), raw_value.decode("latin1")
        if name == "content-type":
            environ["CONTENT_TYPE"] = value
        elif name == "content-length":
            environ["CONTENT_LENGTH"] = value
        else:
            key = "HTTP_" + name.upper().replace("-", "_")
            environ[key] = f"{environ[key]},{value}" if key in environ else value
    if "CONTENT_LENGTH" not in environ and (length or body):
        environ["CONTENT_LENGTH"] = str(len(body) if length is None else length)
    return environ


async def _read_body(receive: Receive, limit: int) -> tuple[bytes, int]:
    """The request body's first `limit` bytes (the rest is read and dropped) and its size."""
    chunks: list[bytes] = []
    kept = size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break  # http.disconnect: the app answers into the void, its writes stop it
        chunk = message.get("body", b"")
        size += len(chunk)
        if kept < limit:
            chunks.append(chunk[:limit - kept])
            kept += len(chunks[-1])
        if not message.get("more_body", False):
            break
    return b"".join(chunks), size


async def _lifespan(receive: Receive, send: Send) -> None:
    """Startup and shutdown need nothing here: the engine's model is loaded by its owner."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
