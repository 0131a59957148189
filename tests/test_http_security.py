"""The HTTP layer against clients on the same network or in a web page (issue #18), over real
HTTP on loopback: body and header limits before anything else, slow and idle connections, one
address holding every connection, DNS rebinding (the Host allow-list), the key file, and the
refusal to listen beyond loopback without a key."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import requests

from engine.errors import SettingsError
from engine.settings import Settings
from tests.helpers import server_fixture
from tests.server_process import free_port

KEY = "k3y-from-a-file"
BODY = b'{"prompt": "Estudiante: Hola.\\nPaciente:", "max_length": 3}'


@pytest.fixture(scope="module")
def guarded(model_dir, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("secret") / "engine_api_key"
    key_file.write_text(KEY + "\n")
    yield from server_fixture(model_dir, tmp_path_factory, ENGINE_API_KEY_FILE=str(key_file),
                              READ_TIMEOUT_S="2", IDLE_TIMEOUT_S="2", CLIENT_CONNECTION_LIMIT="4",
                              MAX_BODY_BYTES="65536", RESPONSE_CACHE_SIZE="0", REQUEST_TIMEOUT_S="600")


def address(server) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def connect(server, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(address(server), timeout=30, source_address=(source, 0))
    return sock


def read_response(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def still_open(sock: socket.socket) -> bool:
    """Nothing to read and not closed: a look that does not wait."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except ConnectionResetError:
        return False
    finally:
        sock.settimeout(timeout)


def authorized(**headers) -> dict:
    return {"Authorization": f"Bearer {KEY}", **headers}


def test_the_key_file_holds_the_key(guarded):
    assert requests.get(guarded.url + "/models", timeout=30).status_code == 401
    assert requests.get(guarded.url + "/models", headers=authorized(), timeout=30).status_code == 200
    assert KEY not in guarded.log()


def test_a_huge_declared_body_is_413_before_it_is_sent_or_the_key_checked(guarded):
    """40 MiB declared, a few bytes sent: the answer comes at once, in the engine's error shape."""
    for path, shape in (("/generate", str), ("/v1/chat/completions", dict)):
        with connect(guarded) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {40 << 20}\r\n\r\n{{".encode())
            head, _, body = read_response(sock).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413"), head
        assert isinstance(json.loads(body)["error"], shape), body
    assert requests.get(guarded.url + "/health", timeout=30).status_code == 200


def test_headers_that_trickle_in_are_cut_off(guarded):
    """One byte every 0.1 s: the connection is closed about READ_TIMEOUT_S (2 s) after the first
    byte, long before the request is whole, and nothing is answered."""
    request = (b"GET /models HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer " + KEY.encode() +
               b"\r\nX-Padding: " + b"a" * 400 + b"\r\n\r\n")
    with connect(guarded) as sock:
        sent = 0
        try:
            for byte in request:
                sock.sendall(bytes([byte]))
                sent += 1
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert sent < len(request) and closed_by_server(sock)
    assert requests.get(guarded.url + "/models", headers=authorized(), timeout=30).status_code == 200


def test_one_address_cannot_hold_every_connection(guarded):
    """CLIENT_CONNECTION_LIMIT=4 idle sockets from 127.0.0.1: its fifth is closed at once, and
    another address (127.0.0.2, also loopback) is served."""
    held = [connect(guarded) for _ in range(4)]
    try:
        time.sleep(0.3)  # the server has accepted them
        with connect(guarded) as fifth:
            assert closed_by_server(fifth)
        # Closed for the limit, not for being idle: the four idle longer are still open.
        assert all(still_open(sock) for sock in held)
        r = session_from("127.0.0.2").get(guarded.url + "/models", headers=authorized(), timeout=30)
        assert r.status_code == 200
    finally:
        for sock in held:
            sock.close()


def test_idle_connections_are_closed_but_a_long_answer_is_not(guarded):
    """IDLE_TIMEOUT_S=2: an idle socket is closed; a 150-token generation (longer than that on a
    CPU) is answered whole. That a request in progress is never idle, whatever the machine's
    speed, is shown by test_a_slow_application_is_not_cut_by_the_idle_timeout."""
    with connect(guarded) as idle:
        assert closed_by_server(idle)  # blocks until the server closes it (the socket timeout is 30 s)
    body = {"prompt": "Números: 1, 2, 3, 4, 5,", "max_length": 150, "stop": [], "temperature": 0,
            "repeat_penalty": 1.0}
    r = requests.post(guarded.url + "/generate", json=body, headers=authorized(), timeout=600)
    assert r.status_code == 200 and r.json()["metadata"]["tokens"] == 150


def session_from(ip: str) -> requests.Session:
    """requests cannot choose its source address; a session with an adapter can."""
    from requests.adapters import HTTPAdapter

    class Source(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            kwargs["source_address"] = (ip, 0)
            super().init_poolmanager(*args, **kwargs)

    session = requests.Session()
    session.mount("http://", Source())
    return session


@pytest.mark.parametrize("host,status", [
    ("localhost:5000", 200), ("127.0.0.1", 200), ("[::1]:80", 200), ("LOCALHOST.", 200),
    ("evil.example", 400), ("evil.example:5000", 400), ("127.0.0.1.evil.example", 400),
])
def test_dns_rebinding_the_host_allow_list(guarded, host, status):
    """A page whose name now points at 127.0.0.1 sends its own name as Host: refused (without
    the key, which such a page cannot know); /health answers any Host (for probes)."""
    r = requests.get(guarded.url + "/models", headers={"Host": host}, timeout=30)
    assert r.status_code == (401 if status == 200 else 400), r.text
    if status == 400:
        assert "ALLOWED_HOSTS" in r.json()["error"]
    assert requests.get(guarded.url + "/models", headers=authorized(Host=host), timeout=30).status_code == 200
    assert requests.get(guarded.url + "/health", headers={"Host": host}, timeout=30).status_code == 200


def test_host_allow_list_setting():
    from engine.app import allowed_hosts, host_name

    assert allowed_hosts(Settings.load({}, allowed_hosts="*")) is None
    assert allowed_hosts(Settings.load({}, allowed_hosts="ai-engine, Clinic.local:5000")) == {"ai-engine",
                                                                                                "clinic.local"}
    default = allowed_hosts(Settings.load({}))
    assert default == {"localhost", "127.0.0.1", "::1"}
    wildcard = allowed_hosts(Settings.load({}, api_host="0.0.0.0"))
    assert host_name(socket.gethostname()) in wildcard and "evil.example" not in wildcard
    assert [host_name(h) for h in ("[::1]:5000", "::1", "a.b.:80", "[fe80::1")] == ["::1", "::1", "a.b", "fe80::1"]


def test_listening_beyond_loopback_needs_a_key_or_allow_no_key(tmp_path):
    from engine.server import check_exposure

    with pytest.raises(SettingsError, match="ENGINE_API_KEY_FILE.*ALLOW_NO_KEY=1"):
        check_exposure(Settings.load({}, api_host="0.0.0.0"))
    check_exposure(Settings.load({}, api_host="0.0.0.0", allow_no_key=True))
    check_exposure(Settings.load({}, api_host="0.0.0.0", api_key="x"))
    for loopback in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        check_exposure(Settings.load({}, api_host=loopback))


def test_listening_beyond_loopback_without_a_key_stops_the_engine_with_one_line(model_dir):
    """The refusal comes before anything listens (so this test binds nothing beyond loopback)."""
    from tests.test_startup import run_engine

    result = run_engine({"MODEL_PATH": str(model_dir), "API_HOST": "0.0.0.0"}, "serve")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "ALLOW_NO_KEY=1" in result.stderr


def test_the_key_file_setting(tmp_path):
    key = tmp_path / "key"
    key.write_text("  abc123\n")
    assert Settings.load({"ENGINE_API_KEY_FILE": str(key)}).api_key == "abc123"
    with pytest.raises(SettingsError, match="not both"):
        Settings.load({"ENGINE_API_KEY_FILE": str(key), "ENGINE_API_KEY": "x"})
    with pytest.raises(SettingsError, match="cannot read"):
        Settings.load({"ENGINE_API_KEY_FILE": str(tmp_path / "missing")})
    key.write_text("two words\n")
    with pytest.raises(SettingsError, match="one key"):
        Settings.load({"ENGINE_API_KEY_FILE": str(key)})


def test_a_slow_application_is_not_cut_by_the_idle_timeout():
    """Waitress-level check of the idle rule with an app slower than IDLE_TIMEOUT_S."""
    from engine.http_server import build_server, close_from_another_thread

    def app(environ, start_response):
        time.sleep(2.5)
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    server = build_server(app, Settings.load({}, api_port=free_port(), idle_timeout_s=1, read_timeout_s=1))
    loop = threading.Thread(target=server.run)
    loop.start()
    try:
        r = requests.get(f"http://127.0.0.1:{server.effective_port}/", timeout=30)
        assert r.status_code == 200 and r.text == "ok"
    finally:
        close_from_another_thread(server)
        loop.join(timeout=30)


def test_a_client_that_leaves_before_a_refusal_is_written_leaves_no_traceback():
    """A malformed request (400: a request line that does not parse) whose client has gone by
    the time the refusal is written: waitress's 'client disconnected' log line read the unparsed request's path and failed
    (AttributeError, a traceback in the log; seen in the abuse run)."""
    from waitress.channel import ClientDisconnected

    from engine.http_server import build_server, listeners

    server = build_server(lambda environ, start_response: [], Settings.load({}, api_port=free_port()))
    listener = listeners(server)[0]
    ours, theirs = socket.socketpair()
    try:
        channel = listener.channel_class(listener, ours, ("127.0.0.1", 1), listener.adj, map={})
        channel.received(b"\x00\x01 garbage\r\n\r\n")
        assert channel.requests and channel.requests[0].error is not None

        def gone(data):
            raise ClientDisconnected

        channel.write_soon = gone
        channel.service()  # raised AttributeError before
    finally:
        theirs.close()
        server.close()
