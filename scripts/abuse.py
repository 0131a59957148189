#!/usr/bin/env python3
"""Abuse run: hostile clients against a running engine on loopback, then the checks of issue #18.

It starts its own engine on 127.0.0.1 (default model, no API key, short read and idle timeouts so
that slow clients are cut within the run) and sends, from several threads at once:
- hostile requests of many kinds (bad JSON, deep nesting, lone surrogates, wrong content types,
  huge declared and real bodies, foreign Host headers, long request ids, header floods, garbage
  bytes, bad fields, path traversal in model names, long stop lists, unknown routes and methods);
- valid generation requests, some abandoned by their client (streaming and not) half-way;
- slow clients trickling headers, and idle sockets from several loopback addresses beyond the
  per-client connection limit.

Checks: no 500 (or any 5xx but the documented 503/504); every valid request that the engine
accepted was answered (200, or a 503/504 with its reason); every hostile request got a 4xx or a
closed connection; the engine is healthy afterwards and still answers a normal request; its log
has no traceback; its resident memory stayed within --max-growth-mb of the warm start.
Bounded in count and time: --requests hostile requests (default 400), every socket with a 30 s
timeout. Writes bench/results/abuse.md and .json (--out), and exits non-zero if a check fails.

    .venv/bin/python scripts/abuse.py                 # about 2 minutes on 2 cores
    .venv/bin/python scripts/abuse.py --requests 60   # the quick version the tests run
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from engine.default_model import ensure_default_model  # noqa: E402
from tests.server_process import Server, start_server, stop_server  # noqa: E402

PROMPT = "Estudiante: ¿Cómo ha dormido esta semana?\nPaciente:"
DOCUMENTED_5XX = {503, 504}
CLIENT_LIMIT = 20  # well above --threads: the run's own clients (127.0.0.1), with connections it abandoned, stay under it
ENGINE_ENV = {"N_CTX": "1024", "N_PARALLEL": "4", "MAX_QUEUE": "8", "REQUEST_TIMEOUT_S": "60",
              "READ_TIMEOUT_S": "3", "IDLE_TIMEOUT_S": "5", "CLIENT_CONNECTION_LIMIT": str(CLIENT_LIMIT),
              "CONNECTION_LIMIT": "64", "RESPONSE_CACHE_SIZE": "0", "LOG_LEVEL": "INFO"}


def raw(server: Server, data: bytes, source: str = "127.0.0.1") -> int | str | None:
    """Send bytes as they are; the status line's code, or None for a connection closed unanswered.
    A 200 that echoes a hostile request id back is reported as "200 echoed"."""
    host, port = server.url.removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=30, source_address=(source, 0)) as sock:
            sock.sendall(data)
            reply = b""
            while b"\r\n\r\n" not in reply and (chunk := sock.recv(4096)):
                reply += chunk
    except (ConnectionResetError, BrokenPipeError):
        return None
    if not reply.startswith(b"HTTP/1."):
        return None
    code = int(reply.split(b" ", 2)[1])
    return "200 echoed" if code == 200 and b"rrrrrrrr" in reply.partition(b"\r\n\r\n")[0] else code


def http(method: str, path: str, body: bytes | str = b"", content_type: str | None = "application/json",
         headers: dict | None = None, host: str = "localhost") -> bytes:
    body = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}", "Connection: close"]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body


def hostile_requests(rng: random.Random) -> list[tuple[str, bytes]]:
    """(kind, bytes) pairs: each must get a 4xx or a closed connection, never a 5xx."""
    gen = lambda extra: json.dumps({"prompt": PROMPT, "max_length": 5, **extra})  # noqa: E731
    kinds = {
        "not json": lambda: http("POST", "/generate", "{prompt: hola"),
        "json array": lambda: http("POST", "/generate", "[1, 2, 3]"),
        "deep nesting": lambda: http("POST", "/generate", '{"prompt": ' + "[" * 50_000 + "]" * 50_000 + "}"),
        "lone surrogate": lambda: http("POST", "/api/generate", '{"model": "x", "prompt": "hola \\ud800"}'),
        "invalid utf-8": lambda: http("POST", "/generate", b'{"prompt": "\xff\xfe\xfd"}'),
        "text/plain": lambda: http("POST", "/generate", gen({}), "text/plain"),
        "form": lambda: http("POST", "/api/chat", gen({}), "application/x-www-form-urlencoded"),
        "no content type": lambda: http("POST", "/v1/completions", gen({}), None),
        "declared 40 MiB": lambda: http("POST", "/generate", b"{", headers={}).replace(
            b"Content-Length: 1", b"Content-Length: 41943040"),
        "body over the limit": lambda: http("POST", "/generate", '{"prompt": "' + "x" * (1 << 20) + '"}'),
        "foreign host": lambda: http("POST", "/generate", gen({}), host="attacker.example"),
        "long request id": lambda: http("GET", "/models", headers={"X-Request-ID": "r" * 8000}),
        "header flood": lambda: http("GET", "/models", headers={f"X-H{i}": "v" * 100 for i in range(1000)}),
        "garbage": lambda: bytes(rng.randrange(256) for _ in range(300)) + b"\r\n\r\n",
        "bad method": lambda: http("DELETE", "/generate", gen({})),
        "unknown route": lambda: http("GET", "/v1/models/..%2f..%2fetc%2fpasswd"),
        "negative max_length": lambda: http("POST", "/generate", gen({"max_length": -5})),
        "huge max_length": lambda: http("POST", "/generate", gen({"max_length": 10**12})),
        "wrong types": lambda: http("POST", "/generate", json.dumps({"prompt": 5, "temperature": "hot"})),
        "nan": lambda: http("POST", "/generate", '{"prompt": "hola", "temperature": NaN}'),
        "path traversal model": lambda: http("POST", "/load-model", json.dumps({"model_name": "../../etc/passwd"})),
        "absolute model path": lambda: http("POST", "/load-model", json.dumps({"model_name": "/etc/shadow"})),
        "model outside": lambda: http("POST", "/api/generate", json.dumps({"model": "/root/x.gguf", "prompt": "h"})),
        "many stops": lambda: http("POST", "/api/generate", json.dumps(
            {"model": "gemma-3-270m-q4_k_m", "prompt": PROMPT, "options": {"stop": ["s" * 50] * 5000}})),
        "long stop": lambda: http("POST", "/v1/completions", json.dumps(
            {"prompt": PROMPT, "max_tokens": 5, "stop": ["x" * 100_000]})),
        "bad keep_alive": lambda: http("POST", "/api/generate", json.dumps({"prompt": "h", "keep_alive": "soon"})),
        "context overflow": lambda: http("POST", "/generate", gen({"prompt": "hola " * 5000})),
        "bad messages": lambda: http("POST", "/v1/chat/completions", json.dumps({"messages": [{"role": 7}]})),
    }
    names = sorted(kinds)
    return [(name, kinds[name]()) for name in names]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="hostile requests (default 400)")
    parser.add_argument("--valid", type=int, default=0, help="valid generations (default: a tenth of --requests)")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--max-growth-mb", type=float, default=200.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "abuse")
    parser.add_argument("--seed", type=int, default=18)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    n_valid = args.valid or max(4, args.requests // 10)

    with tempfile.TemporaryDirectory() as tmp:
        model = ensure_default_model(ROOT / "models")
        server = start_server({"MODEL_PATH": str(model.parent), "MODEL": model.name, **ENGINE_ENV},
                              Path(tmp) / "engine.log")
        try:
            report = run(server, rng, args.requests, n_valid, args.threads)
        finally:
            stop_server(server)
    report["max_growth_mb"] = args.max_growth_mb
    failures = verdict(report)
    report["failures"] = failures
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 1 if failures else 0


def run(server: Server, rng: random.Random, n_hostile: int, n_valid: int, threads: int) -> dict:
    pid = server.process.pid
    requests.post(server.url + "/generate", json={"prompt": PROMPT, "max_length": 8}, timeout=60)  # warm
    rss = {"start_mb": rss_mb(pid), "max_mb": rss_mb(pid)}
    catalogue = hostile_requests(rng)
    work: list[tuple[str, object]] = [("hostile", catalogue[i % len(catalogue)]) for i in range(n_hostile)]
    work += [("valid", i) for i in range(n_valid)]
    work += [("abandon-stream", i) for i in range(max(2, n_valid // 4))]
    n_abandon = max(2, n_valid // 4)
    work += [("abandon", i) for i in range(n_abandon)]
    work += [("trickle", i) for i in range(4)]
    rng.shuffle(work)
    statuses: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    valid: collections.Counter = collections.Counter()
    lock = threading.Lock()
    started = time.monotonic()

    def worker() -> None:
        while True:
            with lock:
                if not work:
                    return
                kind, item = work.pop()
            if kind == "hostile":
                name, data = item
                code = raw(server, data)
                with lock:
                    statuses[name][code] += 1
            elif kind == "valid":
                body = {"prompt": PROMPT.replace("semana", f"semana {item}"), "max_length": 12}
                r = requests.post(server.url + "/generate", json=body, timeout=90)
                with lock:
                    valid[r.status_code] += 1
            elif kind == "abandon-stream":
                with requests.post(server.url + "/api/generate", json={"model": "gemma-3-270m-q4_k_m",
                                   "prompt": PROMPT, "stream": True,
                                   "options": {"num_predict": 400}}, stream=True, timeout=60) as r:
                    next(r.iter_lines(), None)
                with lock:
                    statuses["abandoned stream"][r.status_code] += 1
            elif kind == "abandon":
                code = raw_abandon(server)
                with lock:
                    statuses["abandoned request"][code] += 1
            else:
                with lock:
                    statuses["trickled headers"][trickle(server)] += 1
            with lock:
                rss["max_mb"] = max(rss["max_mb"], rss_mb(pid))

    idle = hold_idle(server)  # beyond the per-client limit, from two addresses
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    for sock in idle["sockets"]:
        sock.close()
    elapsed = time.monotonic() - started
    time.sleep(2)
    health = requests.get(server.url + "/health", timeout=30)
    after = requests.post(server.url + "/generate", json={"prompt": PROMPT, "max_length": 8}, timeout=60)
    rss["end_mb"] = rss_mb(pid)
    log = server.log()
    return {"hostile": n_hostile, "valid_sent": n_valid, "seconds": round(elapsed, 1),
            "statuses": {k: {str(c): n for c, n in v.items()} for k, v in sorted(statuses.items())},
            "valid": {str(c): n for c, n in valid.items()}, "idle": idle["counts"],
            "health_after": health.status_code, "normal_request_after": after.status_code,
            "cancelled": log.count('"status": 499'), "abandoned": statuses["abandoned request"][ABANDONED],
            "tracebacks": log.count("Traceback"), "traceback_excerpts": _tracebacks(log), "unhandled": log.count("unhandled error"),
            "rss_mb": {k: round(v, 1) for k, v in rss.items()}}


def _tracebacks(log: str, keep: int = 2) -> list[str]:
    """The first few tracebacks of the engine's log (its log goes with its temporary folder)."""
    lines, out = log.splitlines(), []
    for i, line in enumerate(lines):
        if "Traceback" in line and len(out) < keep:
            out.append("\n".join(lines[max(0, i - 2):i + 40]))
    return out


def raw_abandon(server: Server) -> str:
    """A non-streaming generation whose client leaves after a second; unless the engine answered
    within it (a refusal: 503 when its deadline estimate says no), then that status. The reply is
    400 tokens of counting at temperature 0 (several seconds): a patient's line could end within the
    second, and be answered before its client left."""
    body = json.dumps({"model": "gemma-3-270m-q4_k_m", "prompt": COUNTING, "stream": False,
                       "options": {"num_predict": 400, "temperature": 0}}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(http("POST", "/api/generate", body))
        time.sleep(1.0)
        sock.setblocking(False)
        try:
            head = sock.recv(64)
        except BlockingIOError:
            return ABANDONED
    return head.split(b" ")[1].decode() if head.startswith(b"HTTP/") else ABANDONED


ABANDONED = "closed by client"
COUNTING = "Contamos del 1 al 500: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"


def trickle(server: Server) -> str:
    """Headers one byte every 0.2 s: cut off after READ_TIMEOUT_S, never answered."""
    host, port = server.url.removeprefix("http://").split(":")
    data = b"GET /models HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"z" * 200 + b"\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        try:
            for i in range(len(data)):
                sock.sendall(data[i:i + 1])
                time.sleep(0.2)
            return "answered" if sock.recv(1) else "closed"
        except (BrokenPipeError, ConnectionResetError):
            return "cut off"


def hold_idle(server: Server) -> dict:
    """CLIENT_LIMIT + 4 idle sockets from 127.0.0.3 and as many from 127.0.0.4 (the rest of the
    run comes from 127.0.0.1, which must still be served)."""
    host, port = server.url.removeprefix("http://").split(":")
    sockets, counts = [], collections.Counter()
    for source in ("127.0.0.3", "127.0.0.4"):
        for _ in range(CLIENT_LIMIT + 4):
            sock = socket.create_connection((host, int(port)), timeout=30, source_address=(source, 0))
            sockets.append(sock)
    time.sleep(1.0)
    for sock in sockets:
        sock.setblocking(False)
        try:
            counts["closed at once" if sock.recv(1) == b"" else "data"] += 1
        except BlockingIOError:
            counts["held open"] += 1
        except ConnectionResetError:
            counts["closed at once"] += 1
    return {"sockets": sockets, "counts": dict(counts)}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def verdict(report: dict) -> list[str]:
    failures = []
    for name, codes in report["statuses"].items():
        for code in codes:
            if code not in ("closed by client", "cut off", "closed") and not code.startswith("4") \
                    and not (name in ("abandoned stream", "long request id") and code == "200") \
                    and not (name in ("abandoned stream", "abandoned request") and int(code) in DOCUMENTED_5XX):
                failures.append(f"{name}: answered {code}")
    if report["statuses"].get("trickled headers", {}).get("answered"):
        failures.append("a trickling client was answered")
    for code in report["valid"]:
        if code != "200" and int(code) not in DOCUMENTED_5XX:
            failures.append(f"a valid request got {code}")
    if sum(report["valid"].values()) != report["valid_sent"]:
        failures.append("a valid request got no answer")
    if report["idle"].get("closed at once", 0) < 8 or report["idle"].get("held open", 0) > 2 * CLIENT_LIMIT:
        failures.append(f"the per-client limit did not hold: {report['idle']}")
    if report["cancelled"] < report["abandoned"]:
        failures.append(f"{report['abandoned']} requests abandoned, {report['cancelled']} cancelled (499)")
    if report["health_after"] != 200 or report["normal_request_after"] != 200:
        failures.append("the engine was not healthy afterwards")
    if report["tracebacks"] or report["unhandled"]:
        failures.append("the engine logged a traceback")
    growth = report["rss_mb"]["max_mb"] - report["rss_mb"]["start_mb"]
    if growth > report["max_growth_mb"]:
        failures.append(f"resident memory grew {growth:.0f} MB")
    return failures


def markdown(report: dict) -> str:
    lines = ["# Abuse run (issue #18)", "",
             f"{report['hostile']} hostile requests of {len(report['statuses'])} kinds, {report['valid_sent']} valid "
             f"generations, abandoned requests, trickling and idle clients, in {report['seconds']} s; "
             "engine on 127.0.0.1, default model.", "",
             "| Kind | Answers (status: count) |", "|---|---|"]
    for name, codes in report["statuses"].items():
        lines.append(f"| {name} | " + ", ".join(f"{c}: {n}" for c, n in sorted(codes.items())) + " |")
    lines += ["", f"- Valid generations: {report['valid']}",
              f"- Non-streaming requests abandoned by their client: {report['abandoned']}; cancelled (499 in the "
              f"access log): {report['cancelled']}",
              f"- Idle sockets beyond the per-client limit: {report['idle']}",
              f"- Afterwards: /health {report['health_after']}, a normal request {report['normal_request_after']}, "
              f"{report['tracebacks']} tracebacks in the log",
              f"- Resident memory: {report['rss_mb']['start_mb']} MB warm, {report['rss_mb']['max_mb']} MB at most, "
              f"{report['rss_mb']['end_mb']} MB at the end (bound: +{report['max_growth_mb']:.0f} MB)",
              f"- Verdict: {'PASS' if not report['failures'] else 'FAIL: ' + '; '.join(report['failures'])}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
