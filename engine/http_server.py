"""The engine's waitress server with limits that keep one client from holding it.

Waitress's defaults suit a trusted network: a body up to 1 GiB is read before the application
sees it, a client may take as long as it likes to send its headers (each byte counts as
activity), and one machine may open every connection there is. Here:

- a body larger than MAX_BODY_BYTES is refused with 413 as soon as its Content-Length is read
  (a chunked one as soon as it passes the limit), before the API key or anything else;
- a request must arrive whole within READ_TIMEOUT_S of its first byte, and a connection with
  nothing to do is closed after IDLE_TIMEOUT_S; a connection whose request is being answered is
  never closed for idleness (a long generation or stream);
- at most CONNECTION_LIMIT connections at once, CLIENT_CONNECTION_LIMIT of them from one address;
- the application can ask whether its client is still there (`waitress.client_disconnected`,
  which needs a request lookahead), so that a non-streaming generation whose client left stops;
- a graceful stop (`drain`): no new connections, the requests received answered, then closed.
"""

from __future__ import annotations

import json
import logging
import threading
import time

from waitress import create_server, wasyncore
from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer
from waitress.task import ErrorTask

from engine.settings import Settings

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 << 10  # request line and headers; waitress's default is 256 KiB
REFUSAL_LOG_INTERVAL_S = 10.0


class JsonErrorTask(ErrorTask):
    """Waitress's own refusals (413 body too large, 400 malformed request, 431-like header
    overflow) in the engine's error shape: `{"error": str}`, OpenAI's under /v1/."""

    def execute(self) -> None:
        error = self.request.error
        message = f"{error.reason}: {error.body}"
        path = getattr(self.request, "path", "") or ""
        # A request that failed to parse may have no path; waitress's own log line for a client
        # that leaves before this answer is written reads it (and logs a traceback without it).
        self.request.path = path
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}} \
            if path.startswith("/v1/") else {"error": message}
        data = json.dumps(body).encode()
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(data)
        self.write(data)


class GuardedChannel(HTTPChannel):
    """An HTTP connection that remembers when the request it is receiving began, and closes
    itself at once when its client address already has CLIENT_CONNECTION_LIMIT connections."""

    error_task_class = JsonErrorTask
    client_limit = 0  # set per server by `guard()`
    reading_since: float | None = None

    def __init__(self, server, sock, addr, adj, map=None) -> None:
        super().__init__(server, sock, addr, adj, map=map)
        if self.client_limit and addr[1] is not None:  # a TCP client (a Unix socket's has no port)
            same = sum(1 for ch in server.active_channels.values() if ch is not self and ch.addr[0] == addr[0])
            if same >= self.client_limit:
                _log_refusal(addr[0], self.client_limit)
                self.handle_close()

    def received(self, data: bytes) -> bool:
        if data and self.request is None:
            self.reading_since = time.time()  # the first byte of a request
        result = super().received(data)
        if self.request is None:
            self.reading_since = None  # nothing partly received
        return result


_last_refusal: dict[str, float] = {}


def _log_refusal(address: str, limit: int) -> None:
    now = time.monotonic()
    if now - _last_refusal.get(address, -REFUSAL_LOG_INTERVAL_S) >= REFUSAL_LOG_INTERVAL_S:
        _last_refusal[address] = now
        log.warning("closing new connections from %s: it already has CLIENT_CONNECTION_LIMIT=%d open", address, limit)


def build_server(app, settings: Settings):
    """A waitress server for `app` on API_HOST:API_PORT with the limits above (not yet running)."""
    server = create_server(
        app, host=settings.api_host, port=settings.api_port, threads=settings.server_threads, ident="ai-engine",
        connection_limit=settings.connection_limit, channel_timeout=settings.idle_timeout_s,
        cleanup_interval=max(1, min(settings.read_timeout_s, settings.idle_timeout_s) // 2),
        max_request_body_size=settings.max_body_bytes, max_request_header_size=MAX_HEADER_BYTES,
        channel_request_lookahead=1,  # lets the application see that its client left (see service.Run.wait)
        asyncore_use_poll=True)  # select() cannot watch file descriptors above 1023
    for listener in listeners(server):
        guard(listener, settings.client_connection_limit, settings.read_timeout_s)
    return server


def guard(listener: BaseWSGIServer, client_limit: int, read_timeout_s: float) -> None:
    """Give one listening server the guarded channels and the read deadline."""
    listener.channel_class = type("Channel", (GuardedChannel,), {"client_limit": client_limit})
    idle_maintenance = listener.maintenance

    def maintenance(now: float) -> None:
        idle_maintenance(now)  # idle connections (IDLE_TIMEOUT_S)
        cutoff = now - read_timeout_s
        for channel in list(listener.active_channels.values()):
            since = getattr(channel, "reading_since", None)
            # A request still arriving after READ_TIMEOUT_S; never one whose answer is under way.
            if since is not None and since < cutoff and not channel.requests:
                log.info("closing a connection from %s: its request took over READ_TIMEOUT_S=%ss to arrive",
                         channel.addr[0] if isinstance(channel.addr, tuple) else channel.addr, read_timeout_s)
                channel.will_close = True

    listener.maintenance = maintenance


def listeners(server) -> list[BaseWSGIServer]:
    """The listening servers: the server itself, or each of a multi-address server's."""
    if isinstance(server, BaseWSGIServer):
        return [server]
    return [s for s in server.map.values() if isinstance(s, BaseWSGIServer)]


def close_from_another_thread(server) -> None:
    """Close every socket of a running waitress server from a thread other than its loop's.

    The closing runs in the loop thread, through waitress's own trigger (the way its channels
    wake the loop): closing the sockets here while that thread waits in poll() or select() would
    make it fail with EBADF, and the engine exit with a traceback instead of its one line."""
    Loop(server).close()


class Loop:
    """A running waitress server, as another thread reaches it: its socket map (listeners and
    connections) and the trigger that runs a function in its loop thread."""

    def __init__(self, server) -> None:
        self.server, self.listeners = server, listeners(server)
        self.map, self.trigger = self.listeners[0]._map, self.listeners[0].trigger

    @property
    def closed(self) -> bool:
        """Whether the trigger is closed: waitress would still write to its descriptor."""
        return getattr(self.trigger, "_closed", False)

    def run_in_loop(self, fn) -> bool:
        if self.closed:
            return False
        try:
            self.trigger.pull_trigger(fn)
            return True
        except OSError:  # the trigger is gone (the loop is closing anyway)
            log.debug("waitress trigger unavailable", exc_info=True)
            return False

    def close(self) -> None:
        """Close everything from another thread while the loop runs: run() returns."""
        if self.closed:
            return
        if not self.run_in_loop(self.close_here):
            self.server.close()  # close from here, as before

    def close_here(self) -> None:
        """Close every socket, in the loop's thread or once run() has returned. The connections
        first: a request still running sees its client gone and stops, and a worker thread that
        writes to a closed connection does not pull the trigger (waitress writes to the trigger's
        descriptor even after it is closed: by then the number may be another file's)."""
        sockets = sorted(self.map.values(), key=lambda d: not isinstance(d, HTTPChannel))
        for dispatcher in sockets:
            try:
                dispatcher.close()
            except Exception:  # noqa: BLE001 - as wasyncore.close_all(ignore_all=True): close the rest
                log.debug("closing %r", dispatcher, exc_info=True)
        self.map.clear()

    def stop_listening(self) -> None:
        """Refuse new connections; those open stay, and the loop goes on serving them."""
        def close_listeners() -> None:
            for listener in self.listeners:  # its socket only: BaseWSGIServer.close also closes the trigger
                wasyncore.dispatcher.close(listener)
        self.run_in_loop(close_listeners)

    def in_progress(self) -> int:
        """Requests received whole and not yet answered: waiting for a worker thread, being
        handled, or with their response not yet sent. A connection that only stays open (keep-
        alive), or whose request is still arriving, does not count."""
        return sum(1 for ch in list(self.map.values())
                   if isinstance(ch, HTTPChannel) and (ch.requests or ch.total_outbufs_len))


def drain(loop: Loop, timeout_s: float, cancel: threading.Event, poll_s: float = 0.05) -> int:
    """The first half of a graceful stop of a running server, from another thread: refuse new
    connections and wait while the requests received are answered, until none is left, `timeout_s`
    has passed or `cancel` is set. The caller then closes the rest (`loop.close()`: run() returns).
    Returns how many requests are left unanswered (0: none)."""
    loop.stop_listening()
    end = time.monotonic() + timeout_s
    while (left := loop.in_progress()) and time.monotonic() < end and not cancel.wait(poll_s):
        pass
    return left
