"""Where the trial's questions go: the simulator's `/generate` contract, over HTTP or in process.

`UrlTarget` speaks to any server with the simulator's contract (this engine, or another one) at
an address; `EngineTarget` starts this engine in process on a model (the same app and model
manager `ai-engine serve` builds, reached through Flask's test client, so no port is opened).
Both ask with `stream: true` to time the first token (TTFT); a server that answers a plain JSON
body instead (a `/generate` without streaming) is read as well, and its TTFT is then the whole time.
The judge's questions go to Ollama's `/api/chat` on the same target.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Iterable, Iterator

from engine.errors import EngineError

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 300.0


class TargetError(EngineError):
    """The target did not answer a question: an error status, a stream that stopped with an error,
    or a body that is not the simulator's contract. The trial records it as that reply's failure."""

    status = 502


class Unreachable(TargetError):
    """No server answers at the target's address: the trial stops."""


@dataclass(frozen=True)
class Reply:
    """One answer to `/generate`: the patient's text, the seconds to its first token and in all,
    and the model the server says answered."""

    text: str
    ttft_s: float
    total_s: float
    model: str | None
    streamed: bool


def generate_body(prompt: str, *, model: str | None, temperature: float, top_p: float, max_length: int) -> dict:
    """The body the simulator's backend sends (DESIGN.md), plus `stream` and, when one is named, `model`."""
    body = {"prompt": prompt, "max_length": max_length, "temperature": temperature, "top_p": top_p, "stream": True}
    if model:
        body["model"] = model
    return body


def sse_payloads(chunks: Iterable[bytes]) -> Iterator[dict]:
    """The JSON payloads of server-sent events (`data: {...}` lines) from a stream of byte chunks."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            line = line.strip()
            if line.startswith(b"data:"):
                yield json.loads(line[5:].strip().decode("utf-8"))
    if buffer.strip().startswith(b"data:"):
        yield json.loads(buffer.strip()[5:].strip().decode("utf-8"))


def read_generate(content_type: str, chunks: Iterable[bytes], started: float, where: str) -> Reply:
    """The reply in a `/generate` answer, streamed (SSE) or a plain JSON body."""
    try:
        if content_type.startswith("text/event-stream"):
            first = None
            for payload in sse_payloads(chunks):
                if "error" in payload:
                    raise TargetError(f"{where} stopped with an error: {payload['error']}")
                if first is None and payload.get("text"):
                    first = time.perf_counter() - started
                if "texto" in payload:
                    total = time.perf_counter() - started
                    return _reply(payload, first if first is not None else total, total, streamed=True)
            raise TargetError(f"{where}: the event stream ended without the final reply")
        body = json.loads(b"".join(chunks).decode("utf-8"))
        total = time.perf_counter() - started
        return _reply(body, total, total, streamed=False)
    except (ValueError, UnicodeDecodeError) as exc:
        raise TargetError(f"{where}: the answer is not the simulator's /generate contract ({exc})") from exc


def _reply(body: object, ttft_s: float, total_s: float, *, streamed: bool) -> Reply:
    if not isinstance(body, dict) or not isinstance(body.get("texto"), str):
        raise ValueError("no 'texto' string in it")
    metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
    model = metadata.get("modelo") if isinstance(metadata.get("modelo"), str) else None
    return Reply(body["texto"], ttft_s, total_s, model, streamed)


class UrlTarget:
    """A server with the simulator's `/generate` contract at `url` (ENGINE_API_KEY, when set, is
    sent as a bearer token)."""

    def __init__(self, url: str, *, api_key: str | None = None, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.api_key = api_key if api_key is not None else os.environ.get("ENGINE_API_KEY") or None

    def describe(self) -> str:
        return self.url

    def generate(self, body: dict) -> Reply:
        where = f"{self.url}/generate"
        started = time.perf_counter()
        with self._post("/generate", body) as response:
            return read_generate(response.headers.get("Content-Type", ""), iter(lambda: response.readline(), b""),
                                 started, where)

    def post_json(self, path: str, body: dict) -> dict:
        """A non-streamed JSON request (the judge's /api/chat); its JSON answer."""
        with self._post(path, body) as response:
            try:
                return json.loads(response.read().decode("utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise TargetError(f"{self.url}{path}: the answer is not JSON ({exc})") from exc

    def _post(self, path: str, body: dict):
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream, application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode("utf-8"), headers=headers,
                                         method="POST")
        try:
            return urllib.request.urlopen(request, timeout=self.timeout_s)  # noqa: S310 (the user's own URL)
        except urllib.error.HTTPError as exc:
            raise TargetError(f"{self.url}{path} answered {exc.code}: {_error_text(exc.read())}") from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Unreachable(f"cannot reach {self.url}{path}: {reason}; is the engine running there?") from exc

    def close(self) -> None:
        pass


class EngineTarget:
    """This engine, started in process on `model` (a file under MODEL_PATH, a path, a preset or an
    alias; None: MODEL, else the embedded default model), with the settings `ai-engine serve` reads
    from the environment. Questions go through the engine's own Flask app (no port is opened)."""

    def __init__(self, model: str | None) -> None:
        from engine.app import create_app
        from engine.model_manager import ModelManager
        from engine.settings import Settings
        from engine.startup import plan_startup

        settings = Settings.load(model=model) if model else Settings.load()
        plan = plan_startup(settings)
        plan.check()
        self.host = ModelManager(settings)
        try:
            loaded, _seconds = self.host.load(plan.spec)
        except BaseException:
            self.host.close()
            raise
        self.model_name = loaded.name
        self.client = create_app(settings, self.host).test_client()

    def describe(self) -> str:
        return f"this engine in process ({self.model_name})"

    def generate(self, body: dict) -> Reply:
        started = time.perf_counter()
        response = self.client.post("/generate", json=body, buffered=False)
        try:
            if response.status_code != 200:
                raise TargetError(f"/generate answered {response.status_code}: {_error_text(response.get_data())}")
            return read_generate(response.content_type or "", response.iter_encoded(), started, "/generate")
        finally:
            response.close()  # gives the model back (the stream's call_on_close)

    def post_json(self, path: str, body: dict) -> dict:
        response = self.client.post(path, json=body)
        if response.status_code != 200:
            raise TargetError(f"{path} answered {response.status_code}: {_error_text(response.get_data())}")
        try:
            return json.loads(response.get_data())
        except ValueError as exc:
            raise TargetError(f"{path}: the answer is not JSON ({exc})") from exc

    def close(self) -> None:
        self.host.close()


def _error_text(raw: bytes) -> str:
    """The `error` of a JSON error body, else the body's start."""
    try:
        body = json.loads(raw)
        if isinstance(body, dict) and "error" in body:
            error = body["error"]
            return error.get("message", str(error)) if isinstance(error, dict) else str(error)
    except (ValueError, UnicodeDecodeError):
        pass
    return raw[:200].decode("utf-8", "replace") or "(empty body)"
