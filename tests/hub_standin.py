"""A local stand-in for the few Hugging Face hub endpoints that `ai-engine pull` calls through
huggingface-hub (pointed at it with HF_ENDPOINT): nothing leaves the machine in tests.

- `GET /api/models/ORG/REPO[/revision/REV]` (`?blobs=true`): the repo's id, commit and files, each
  with its size and LFS sha256, as the hub answers `model_info(files_metadata=True)`;
- `HEAD` and `GET /ORG/REPO/resolve/REV/FILE`: the file, with the hub's headers (`X-Repo-Commit`,
  `ETag`, `X-Linked-Etag`, `X-Linked-Size`, `Accept-Ranges`) and `Range: bytes=N-` answered 206.

Faults a test asks for: `cut_after` (the next GETs send that many bytes of the body, then close the
connection), `corrupt` (serve other bytes than the sha256 the metadata states), `sha256` (metadata
that states another digest for a file). Every request is
recorded (`requests`: method, path, Range header).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

COMMIT = "5f0c1e8a9b7d6c5e4f3a2b1c0d9e8f7a6b5c4d3e"


@dataclass
class HubStandIn:
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)  # repo id -> file name -> bytes
    cut_after: list[int] = field(default_factory=list)  # one entry per GET to cut, used up in order
    corrupt: bool = False
    sha256: dict[str, str] = field(default_factory=dict)  # file name -> the sha256 the metadata states instead
    requests: list[tuple[str, str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "HubStandIn":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def gets(self) -> list[tuple[str, str, str]]:
        """The file downloads asked for (GET .../resolve/...)."""
        return [r for r in self.requests if r[0] == "GET" and "/resolve/" in r[1]]

    def info(self, repo_id: str) -> dict:
        files = self.repos[repo_id]
        return {"id": repo_id, "modelId": repo_id, "sha": COMMIT, "private": False, "siblings": [
            {"rfilename": name, "size": len(data), "blobId": hashlib.sha1(data).hexdigest(),
             "lfs": {"sha256": self.sha256.get(name, hashlib.sha256(data).hexdigest()), "size": len(data),
                     "pointerSize": 134}}
            for name, data in files.items()]}


def _handler(hub: HubStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _json(self, status: int, body: dict, headers: dict | None = None) -> None:
            raw = json.dumps(body).encode()
            self.send_response(status)
            for k, v in {"Content-Type": "application/json", "Content-Length": str(len(raw)),
                         **(headers or {})}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(raw)

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path, self.headers.get("Range", "")))
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path)
            if m:
                if m.group(1) not in hub.repos:
                    return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                return self._json(200, hub.info(m.group(1)))
            m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            data = hub.repos.get(m.group(1), {}).get(m.group(3)) if m else None
            if data is None:
                return self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
            self._file(data, body)

        def _file(self, data: bytes, body: bool) -> None:
            sha = hashlib.sha256(data).hexdigest()
            served = bytes(b ^ 0xFF for b in data) if hub.corrupt else data
            start = 0
            rng = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if rng and int(rng.group(1)) < len(data):
                start = int(rng.group(1))
            self.send_response(206 if start else 200)
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(data) - start),
                       "Accept-Ranges": "bytes", "X-Repo-Commit": COMMIT, "ETag": f'"{sha}"',
                       "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data))}
            if start:
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if not body:
                return
            rest = served[start:]
            if hub.cut_after:
                self.wfile.write(rest[:hub.cut_after.pop(0)])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(rest)

    return Handler
