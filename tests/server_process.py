"""Run `python -m engine serve` as a separate process and wait for it (tests and benchmarks)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import requests

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(env_overrides: dict[str, str], log_path: Path, timeout: float = 90.0,
                 argv: Callable[[int], list[str]] | None = None) -> Server:
    """Start `python -m engine serve` (or `argv(port)`, another HTTP server with a /health
    route) and wait until /health answers 200 (or the process exits)."""
    port = free_port()
    env = {**os.environ, "API_PORT": str(port), "API_HOST": "127.0.0.1", **env_overrides}
    command = argv(port) if argv else [sys.executable, "-m", "engine", "serve"]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, env=env,
                                   stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return Server(url, process, log_path)
        except requests.RequestException:  # not listening yet, or too busy to answer in time
            pass
        time.sleep(0.25)
    process.kill()
    process.wait()
    raise RuntimeError(f"server did not come up; its output:\n{log_path.read_text(errors='replace')}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
