"""The WSGI-to-ASGI bridge that Ray Serve replicas run the Flask app through: streaming chunk by
chunk, a client that goes away stops a streamed body, request bodies and limits, environ."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from flask import Flask, Response, request

from engine.asgi_bridge import WsgiToAsgi, build_environ

LIMIT = 1024


def make_app(events: dict[str, threading.Event]) -> Flask:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = LIMIT

    @app.post("/echo")
    def echo():
        return {"json": request.get_json(), "query": request.args.get("q"), "agent": request.headers.get("User-Agent"),
                "path": request.path}

    @app.get("/stream")
    def stream():
        def chunks():
            yield "first\n"
            # The second chunk waits until the client has the first: only a real stream gets here.
            if not events["first_seen"].wait(5):
                yield "BUFFERED\n"
            yield "second\n"

        return Response(chunks(), mimetype="text/plain")

    @app.get("/forever")
    def forever():
        def chunks():
            try:
                while True:
                    yield "tick\n"
                    time.sleep(0.01)
            finally:
                events["closed"].set()

        response = Response(chunks(), mimetype="text/plain")
        return response

    return app


def scope(method: str, path: str, headers: dict[str, str] | None = None, query: bytes = b"") -> dict:
    return {"type": "http", "http_version": "1.1", "method": method, "path": path, "root_path": "",
            "query_string": query, "scheme": "http", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5555),
            "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}


async def call(bridge: WsgiToAsgi, scope_: dict, body: list[bytes] | None = None, on_send=None) -> list[dict]:
    incoming = [{"type": "http.request", "body": chunk, "more_body": i < len(body or [b""]) - 1}
                for i, chunk in enumerate(body or [b""])]
    sent: list[dict] = []

    async def receive() -> dict:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)
        if on_send is not None:
            on_send(message, sent)

    await bridge(scope_, receive, send)
    return sent


@pytest.fixture
def events() -> dict[str, threading.Event]:
    return {"first_seen": threading.Event(), "closed": threading.Event()}


@pytest.fixture
def bridge(events):
    b = WsgiToAsgi(make_app(events), threads=4, max_body_bytes=LIMIT)
    yield b
    b.close()


def body_of(messages: list[dict]) -> bytes:
    return b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")


def test_json_round_trip_with_query_headers_and_utf8_path(bridge):
    payload = json.dumps({"prompt": "¿Cómo dormiste?"}).encode()
    messages = asyncio.run(call(bridge, scope("POST", "/echo", {"Content-Type": "application/json",
                                                                 "Content-Length": str(len(payload)),
                                                                 "User-Agent": "test"}, b"q=1"),
                                [payload[:5], payload[5:]]))
    assert messages[0]["type"] == "http.response.start" and messages[0]["status"] == 200
    assert json.loads(body_of(messages)) == {"json": {"prompt": "¿Cómo dormiste?"}, "query": "1",
                                             "agent": "test", "path": "/echo"}
    assert messages[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


def test_streamed_chunks_are_sent_as_they_come(bridge, events):
    def on_send(message: dict, sent: list[dict]) -> None:
        if message.get("body") == b"first\n":
            events["first_seen"].set()

    messages = asyncio.run(call(bridge, scope("GET", "/stream"), on_send=on_send))
    assert [m.get("body") for m in messages[1:]] == [b"first\n", b"second\n", b""]


def test_client_gone_stops_a_streamed_body(bridge, events):
    async def scenario() -> None:
        task = asyncio.ensure_future(call(bridge, scope("GET", "/forever")))
        await asyncio.sleep(0.2)
        task.cancel()  # what Ray Serve does when the client disconnects
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert events["closed"].wait(5), "the app's body kept running after the client left"


def test_a_send_that_fails_stops_a_streamed_body(bridge, events):
    def on_send(message: dict, sent: list[dict]) -> None:
        if len(sent) > 3:
            raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        asyncio.run(call(bridge, scope("GET", "/forever"), on_send=on_send))
    assert events["closed"].wait(5)


@pytest.mark.parametrize("with_length", [True, False])
def test_body_over_the_limit_is_413(bridge, with_length):
    big = b"x" * (LIMIT * 3)
    headers = {"Content-Type": "application/json", **({"Content-Length": str(len(big))} if with_length else {})}
    messages = asyncio.run(call(bridge, scope("POST", "/echo", headers), [big[:LIMIT], big[LIMIT:]]))
    assert messages[0]["status"] == 413


def test_lifespan_is_acknowledged(bridge):
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict] = []

    async def receive() -> dict:
        return incoming.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(bridge({"type": "lifespan"}, receive, send))
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


def test_environ_strips_root_path_and_joins_repeated_headers():
    s = scope("GET", "/api/café", query=b"a=1")
    s["root_path"] = "/api"
    s["headers"] += [(b"accept", b"a"), (b"accept", b"b")]
    environ = build_environ(s, b"")
    assert environ["SCRIPT_NAME"] == "/api"
    assert environ["PATH_INFO"] == "/café".encode().decode("latin1")
    assert environ["HTTP_ACCEPT"] == "a,b" and environ["QUERY_STRING"] == "a=1"
    assert environ["REMOTE_ADDR"] == "127.0.0.1" and environ["wsgi.input_terminated"] is True
