"""Start-up failures are one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from engine.settings import REPO_ROOT
from tests.helpers import DEFAULT_MODEL, wait_until
from tests.server_process import free_port


def run_engine(env_overrides: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "API_PORT": str(free_port()), **env_overrides}
    return subprocess.run([sys.executable, "-m", "engine", *args], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("model,says", [
    ("missing.gguf", "not found"),
    ("truncated.gguf", "could not load"),
    ("notes.gguf", "not a GGUF"),
])
def test_bad_startup_model_is_a_clear_error(model_dir, model, says):
    result = run_engine({"MODEL_PATH": str(model_dir), "MODEL": model}, "serve")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("ai-engine: error:")]
    assert len(error_lines) == 1 and says in error_lines[0] and model in error_lines[0], result.stderr


@pytest.mark.parametrize("env,says", [
    ({"N_CTX": "lots"}, "N_CTX must be an integer"),
    ({"API_PORT": "70000"}, "API_PORT must be between 1 and 65535"),
    ({"N_GPU_LAYERS": "-2"}, "N_GPU_LAYERS must be auto, -1"),
    ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
])
def test_bad_settings_are_a_clear_error(env, says):
    result = run_engine(env, "serve")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert says in result.stderr


def test_a_failed_load_closes_the_listening_server_from_the_loader_thread():
    """The loader thread stops waitress while its loop waits in select() with a client connected:
    run() returns (no EBADF traceback, which CI once saw), and the port no longer answers."""
    import threading

    from waitress import create_server

    from engine.http_server import close_from_another_thread

    def app(environ, start_response):
        start_response("200 OK", [("Content-Length", "0")])
        return []

    server = create_server(app, host="127.0.0.1", port=0)
    port = server.effective_port
    loop = threading.Thread(target=server.run)
    loop.start()
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        assert client.recv(1024).startswith(b"HTTP/1.1 200")  # now an idle keep-alive channel in the map
        close_from_another_thread(server)
        loop.join(timeout=30)
        assert not loop.is_alive()
        assert client.recv(1) == b""  # the open connection was closed too
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_port_in_use_is_a_clear_error(model_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_engine({"MODEL_PATH": str(model_dir), "MODEL": DEFAULT_MODEL, "API_PORT": str(port)}, "serve")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_flags_win_over_environment(model_dir):
    result = run_engine({"MODEL_PATH": str(model_dir), "MODEL": "notes.gguf"}, "serve", "--model", "missing.gguf")
    assert result.returncode == 2 and "missing.gguf" in result.stderr


def test_help_lists_every_setting():
    from engine.settings import Settings
    import dataclasses

    result = run_engine({}, "serve", "--help")
    assert result.returncode == 0
    for f in dataclasses.fields(Settings):
        assert f.metadata["env"] in result.stdout and "--" + f.name.replace("_", "-") in result.stdout


def test_ensure_model_is_idempotent(default_model_file):
    result = run_engine({"MODEL_PATH": str(default_model_file.parent)}, "ensure-model")
    assert result.returncode == 0 and result.stdout.strip() == str(default_model_file)
    assert "assembling" not in result.stderr  # already there and intact: nothing rewritten


def test_gpu_layers_auto_runs_on_cpu_with_one_log_line(model_dir):
    """On a machine or build without a GPU, `auto` (the default) says so once and runs on CPU."""
    from tests.server_process import start_server, stop_server

    server = start_server({"MODEL_PATH": str(model_dir), "MODEL": DEFAULT_MODEL, "N_GPU_LAYERS": "auto"},
                          model_dir.parent / "auto.log")
    try:
        import requests

        health = requests.get(server.url + "/health", timeout=10).json()
        log = server.log()
    finally:
        stop_server(server)
    from engine.offload import gpu_offload_supported, query_free_vram

    if gpu_offload_supported() and query_free_vram():
        pytest.skip("a GPU is present: auto offloads (covered by the gpu-marked tests)")
    assert health["gpu_layers"] == 0
    assert sum("N_GPU_LAYERS=auto" in line and "running on CPU" in line for line in log.splitlines()) == 1


def test_explicit_gpu_layers_without_gpu_fail_at_startup(model_dir):
    from engine.offload import gpu_offload_supported, query_free_vram

    if gpu_offload_supported() and query_free_vram():
        pytest.skip("a GPU is present")
    result = run_engine({"MODEL_PATH": str(model_dir), "MODEL": DEFAULT_MODEL, "N_GPU_LAYERS": "10"}, "serve")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("ai-engine: error:")]
    assert len(error) == 1 and "N_GPU_LAYERS=10" in error[0] and "-DGGML_CUDA=on" in error[0]


def test_doctor_command(default_model_file):
    result = run_engine({}, "doctor", "--model", str(default_model_file))
    assert result.returncode == 0, result.stderr
    for heading in ("CPU features", "GPU offload", "KV cache", "N_GPU_LAYERS=auto"):
        assert heading in result.stdout


def test_sigterm_closes_the_engine_in_order(model_dir, cases, tmp_path):
    """SIGTERM (docker stop, systemd) stops the engine as Ctrl-C does: the models are closed in
    order, so the prompt cache's files are finished and kept, and the exit status is 0 (it was
    cut off by the signal before)."""
    import requests

    from engine.patient import render_case_prompt
    from tests.helpers import long_history
    from tests.server_process import start_server

    server = start_server({"MODEL_PATH": str(model_dir), "MODEL": DEFAULT_MODEL, "PROMPT_CACHE_DIR": str(tmp_path),
                           "N_PARALLEL": "2"}, tmp_path / "engine.log")
    try:
        turns = long_history(cases[0], 20)[:-1]
        for question in ("¿Qué te trae por acá?", "¿Dormís bien?"):
            prompt = render_case_prompt(dict(cases[0], turnos=turns + [["Estudiante", question]]))
            body = {"model": DEFAULT_MODEL, "prompt": prompt, "stream": False, "options": {"num_predict": 4}}
            assert requests.post(server.url + "/api/generate", json=body, timeout=300).status_code == 200
    finally:
        server.process.send_signal(signal.SIGTERM)
        status = server.process.wait(timeout=60)
    assert status == 0, server.log()[-2000:]
    assert len(list(tmp_path.glob("*/*.kv"))) == 1  # the shared case, written whole
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".kv" and p.name != "engine.log"]


def test_sigterm_answers_the_requests_received_before_it_stops(model_dir, tmp_path):
    """SIGTERM while a reply is streaming: the engine stops listening (a new connection is refused),
    answers a new request on an open keep-alive connection 503 with Retry-After, finishes the reply
    it was giving, and only then exits 0; nothing it received is lost (it was cut off before)."""
    import json

    import requests

    from tests.server_process import start_server

    server = start_server({"MODEL_PATH": str(model_dir), "MODEL": DEFAULT_MODEL, "N_PARALLEL": "2"},
                          tmp_path / "engine.log")
    try:
        kept = requests.Session()
        assert kept.get(server.url + "/health", timeout=30).status_code == 200  # a keep-alive connection
        body = {"model": DEFAULT_MODEL, "prompt": "Contamos del 1 al 500: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,",
                "stream": True, "options": {"num_predict": 400, "temperature": 0}}
        stream = requests.post(server.url + "/api/generate", json=body, stream=True, timeout=300)
        lines = stream.iter_lines()
        first = json.loads(next(lines))
        assert not first["done"]
        server.process.send_signal(signal.SIGTERM)
        wait_for_log(server, "finishing the requests received")  # the signal was handled
        with pytest.raises(requests.ConnectionError):
            requests.get(server.url + "/health", timeout=30)
        refused = kept.get(server.url + "/api/tags", timeout=30)
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) > 0
        assert "shutting down" in refused.json()["error"]
        rest = [json.loads(line) for line in lines if line]
        assert rest[-1]["done"] and rest[-1]["eval_count"] == 400, rest[-1]  # the whole reply
        assert len(rest) >= 300  # it was still streaming when the signal came
    finally:
        server.process.send_signal(signal.SIGTERM)
        status = server.process.wait(timeout=120)
    assert status == 0, server.log()[-2000:]


def test_a_second_sigterm_stops_at_once(model_dir, tmp_path):
    """The second signal closes the connections (the reply being streamed stops where it is) and
    the engine exits 0; one more, while it closes the models or after, is not an error either."""
    import json

    import requests

    from tests.server_process import start_server

    server = start_server({"MODEL_PATH": str(model_dir), "MODEL": DEFAULT_MODEL, "N_PARALLEL": "2",
                           "SHUTDOWN_TIMEOUT_S": "600"}, tmp_path / "engine.log")
    try:
        body = {"model": DEFAULT_MODEL, "prompt": "Contamos del 1 al 2000: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,",
                "stream": True, "options": {"num_predict": 2000, "temperature": 0}}
        stream = requests.post(server.url + "/api/generate", json=body, stream=True, timeout=300)
        lines = (json.loads(line) for line in stream.iter_lines() if line)
        assert not next(lines)["done"]
        server.process.send_signal(signal.SIGTERM)
        wait_for_log(server, "finishing the requests received")
        assert not next(lines)["done"]  # the first signal cut nothing
        server.process.send_signal(signal.SIGTERM)
        wait_for_log(server, "closing every connection now")
        rest = []
        try:
            rest = list(lines)
        except requests.RequestException:
            pass  # closed in the middle of a chunk
        assert not rest or not rest[-1]["done"]  # cut off: the reply's last line never came
        server.process.send_signal(signal.SIGTERM)  # closing the models, or gone (then nothing is sent)
    finally:
        status = server.process.wait(timeout=300)
    assert status == 0, server.log()[-2000:]
    assert "Traceback" not in server.log()


class FakeLoop:
    """What GracefulStop asks of the server's loop: a request that never ends, and closes counted."""

    def __init__(self):
        self.closed = 0

    def stop_listening(self):
        pass

    def in_progress(self):
        return 1

    def close(self):
        self.closed += 1


def test_signals_after_run_returned_change_nothing():
    """Once serve() is past run() (`closing`), a signal neither raises nor closes anything: before,
    a second SIGTERM landing there raised KeyboardInterrupt while the models closed (exit 130)."""
    import threading

    from engine.server import GracefulStop

    loop, draining = FakeLoop(), threading.Event()
    stop = GracefulStop(loop, draining, timeout_s=600)
    stop.signal(signal.SIGTERM, None)
    assert draining.wait(60)
    stop.closing()  # as when the drain has closed everything and run() returned
    stop.signal(signal.SIGTERM, None)
    stop.signal(signal.SIGINT, None)
    assert loop.closed == 0  # the drain was told to stop waiting; serve() closes what is left


def test_the_second_signal_closes_the_loop_once():
    import threading

    from engine.server import GracefulStop

    loop, draining = FakeLoop(), threading.Event()
    stop = GracefulStop(loop, draining, timeout_s=600)
    stop.signal(signal.SIGINT, None)
    assert draining.wait(60)
    stop.signal(signal.SIGINT, None)
    wait_until(lambda: loop.closed, what="the loop to be closed")
    stop.closing()
    assert loop.closed == 1


def wait_for_log(server, text: str) -> None:
    """Until the engine has logged `text`; it must not exit first."""
    wait_until(lambda: text in server.log() or server.process.poll() is not None, timeout_s=300,
               what=f"the engine to log {text!r}")
    assert text in server.log(), server.log()[-2000:]
