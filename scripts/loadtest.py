#!/usr/bin/env python3
"""Load test of the admission queue: many simulator clients at once against a bounded queue.

Each round, CLIENTS threads wait at a barrier and then each send one `POST /generate` with a
fixture case (tests/data/patient_cases.json, rendered as the simulator's backend does). With
MAX_QUEUE waiting places beside the N_PARALLEL sequences generating, most of a burst is refused at
once.

Checks, per request and across rounds:
- every accepted request completes correctly (200, a non-empty `texto`, generated tokens);
- every refused one is a 503 with a `Retry-After` header, answered at once (not after a wait);
- no other status (no 5xx, no 504 deadline);
- the queue never holds more than MAX_QUEUE (its depth polled from /health during each burst), and
  the engine's rejection counter in /metrics moves by as many 503s as the clients saw;
- the engine's resident memory after the last round is within TOLERANCE of the first round's;
- /health is 200 afterwards.
Reports p50/p95 latency of accepted requests, counts and RSS per round as a Markdown table, and
exits non-zero if a check fails.

Loopback only, bounded in count and time: it starts its own engine on 127.0.0.1 (default model,
MAX_QUEUE=8, no response cache, a 16 MB conversation cache that the warm-up fills) or tests a
running one given by --url on a loopback address (there the conversation cache may still be filling
up to CACHE_RAM_MB during the rounds, which shows as memory growth).
    .venv/bin/python scripts/loadtest.py                   # 40 clients x 3 rounds, own engine
    .venv/bin/python scripts/loadtest.py --url http://127.0.0.1:5000 --max-queue 32
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from engine.default_model import ensure_default_model  # noqa: E402
from engine.patient import render_case_prompt  # noqa: E402
from tests.server_process import Server, start_server, stop_server  # noqa: E402

CASES = ROOT / "tests" / "data" / "patient_cases.json"
IMMEDIATE_S = 2.0  # a refusal slower than this was not "at once" (it waited for something)
REJECTIONS = "ai_engine_queue_rejections_total"
# The conversation cache of the engine started here: small, so that the warm-up fills it and the
# rounds measure the request path at a constant cache size (the default, 256 MB, would still be
# filling up during the rounds and look like growth).
CACHE_RAM_MB = 16


@dataclass
class Outcome:
    """One request's result, judged as it came back."""

    status: int
    seconds: float
    problem: str | None = None  # why this answer breaks the contract, if it does


@dataclass
class Round:
    number: int
    outcomes: list[Outcome] = field(default_factory=list)
    max_queue_depth: int | None = None  # the most requests /health saw waiting during the burst
    rejections_counted: int | None = None  # the engine's own count of 503s in this round (/metrics)
    rss_bytes: int | None = None
    seconds: float = 0.0

    def accepted(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == 200]

    def rejected(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == 503]

    def problems(self) -> list[str]:
        return [o.problem for o in self.outcomes if o.problem]


# -- the requests ---------------------------------------------------------------------------------
def load_prompts() -> list[str]:
    cases = json.loads(CASES.read_text(encoding="utf-8"))["cases"]
    return [render_case_prompt(case) for case in cases]


def one_request(session: requests.Session, url: str, body: dict, timeout: float) -> Outcome:
    """Send one /generate and judge the answer against the admission contract."""
    started = time.perf_counter()
    try:
        response = session.post(url + "/generate", json=body, timeout=timeout)
    except requests.RequestException as exc:
        return Outcome(0, time.perf_counter() - started, f"no answer: {type(exc).__name__}: {exc}")
    seconds = time.perf_counter() - started
    return Outcome(response.status_code, seconds, judge(response, seconds))


def judge(response: requests.Response, seconds: float) -> str | None:
    status = response.status_code
    if status == 200:
        try:
            reply = response.json()
        except ValueError:
            return "200 without a JSON body"
        if not isinstance(reply.get("texto"), str) or not reply["texto"].strip():
            return f"200 with an empty reply: {json.dumps(reply, ensure_ascii=False)[:200]}"
        if reply.get("metadata", {}).get("tokens", 0) < 1:
            return "200 without generated tokens"
        return None
    if status == 503:
        retry_after = response.headers.get("Retry-After", "")
        if not retry_after.isdigit() or int(retry_after) < 1:
            return f"503 without a valid Retry-After header ({retry_after!r}): {response.text[:200]}"
        if seconds > IMMEDIATE_S:
            return f"503 after {seconds:.1f} s: a full queue must be refused at once"
        return None
    return f"unexpected status {status}: {response.text[:200]}"


def burst(url: str, prompts: list[str], clients: int, max_length: int, deadline: float) -> list[Outcome]:
    """`clients` threads released together, one request each."""
    barrier = threading.Barrier(clients)
    outcomes: list[Outcome | None] = [None] * clients

    def client(i: int) -> None:
        body = {"prompt": prompts[i % len(prompts)], "max_length": max_length, "temperature": 0.7}
        with requests.Session() as session:
            barrier.wait()
            outcomes[i] = one_request(session, url, body, timeout=max(1.0, deadline - time.monotonic()))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()) + 5)
    return [o or Outcome(0, 0.0, "client thread did not finish before the deadline") for o in outcomes]


class QueueWatch:
    """Polls /health during a burst for the deepest queue it sees (the engine's own `queue_depth`)."""

    def __init__(self, url: str, interval: float = 0.05) -> None:
        self.url, self.interval = url, interval
        self.deepest: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "QueueWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                try:
                    depth = session.get(self.url + "/health", timeout=2).json().get("queue_depth")
                except (requests.RequestException, ValueError):
                    depth = None
                if isinstance(depth, int):
                    self.deepest = max(depth, self.deepest or 0)
                self._stop.wait(self.interval)


# -- metrics and memory ---------------------------------------------------------------------------
def metric(url: str, name: str) -> float | None:
    """One unlabelled sample of the engine's /metrics, or None if it has no such metric."""
    try:
        text = requests.get(url + "/metrics", timeout=10).text
    except requests.RequestException:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def process_rss(pid: int) -> int:
    """Resident memory of a local process, in bytes."""
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for process {pid}")


def metrics_rss(url: str) -> int | None:
    """The engine's own report of its resident memory (a server this script did not start)."""
    value = metric(url, "process_resident_memory_bytes")
    return None if value is None else int(value)


# -- the run --------------------------------------------------------------------------------------
def warm_up(url: str, prompts: list[str], max_length: int, passes: int = 2) -> None:
    """Each prompt `passes` times, one at a time: the model's buffers and the conversation cache
    (each reply adds a state until CACHE_RAM_MB is reached) grow to their working size before the
    first measured round, so growth across rounds means a leak, not a warm-up."""
    for prompt in prompts * passes:
        response = requests.post(url + "/generate", json={"prompt": prompt, "max_length": max_length},
                                 timeout=120)
        response.raise_for_status()


def run_rounds(url: str, rss, args: argparse.Namespace) -> list[Round]:
    prompts = load_prompts()
    warm_up(url, prompts, args.max_length)
    deadline = time.monotonic() + args.max_seconds
    rounds = []
    for number in range(1, args.rounds + 1):
        if time.monotonic() >= deadline:
            break
        started = time.perf_counter()
        rejections_before = metric(url, REJECTIONS)
        with QueueWatch(url) as watch:
            r = Round(number, burst(url, prompts, args.clients, args.max_length, deadline))
        r.seconds = time.perf_counter() - started
        r.max_queue_depth = watch.deepest
        rejections_after = metric(url, REJECTIONS)
        if rejections_before is not None and rejections_after is not None:
            r.rejections_counted = round(rejections_after - rejections_before)
        r.rss_bytes = rss()
        rounds.append(r)
        print(f"round {number}: {len(r.accepted())} accepted, {len(r.rejected())} refused, "
              f"{r.seconds:.1f} s", file=sys.stderr, flush=True)
    return rounds


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


def checks(rounds: list[Round], args: argparse.Namespace, healthy: bool) -> list[tuple[str, bool]]:
    problems = [p for r in rounds for p in r.problems()]
    out = [
        (f"all {args.rounds} rounds ran within {args.max_seconds:.0f} s", len(rounds) == args.rounds),
        ("every accepted request completed correctly and every refusal was 503 + Retry-After at once"
         + (f" ({len(problems)} did not: {problems[0]})" if problems else ""), not problems),
        ("every round accepted at least one request", all(r.accepted() for r in rounds)),
        ("/health is 200 after the rounds", healthy),
    ]
    depths = [r.max_queue_depth for r in rounds if r.max_queue_depth is not None]
    if args.max_queue is not None:
        out.append((f"the queue never held more than MAX_QUEUE = {args.max_queue} (deepest seen: "
                    f"{max(depths) if depths else '?'})", bool(depths) and max(depths) <= args.max_queue))
    if all(r.rejections_counted is not None for r in rounds):
        seen = sum(len(r.rejected()) for r in rounds)
        counted = sum(r.rejections_counted for r in rounds)
        out.append((f"the engine counted every refusal in /metrics ({counted} counted, {seen} seen)",
                    counted == seen))
    sizes = [r.rss_bytes for r in rounds if r.rss_bytes]
    if len(sizes) >= 2:
        growth = sizes[-1] / sizes[0] - 1
        out.append((f"memory after the last round within +{args.tolerance:.0%} of the first "
                    f"({growth:+.1%})", growth <= args.tolerance))
    else:
        out.append(("memory measured after every round", False))
    return out


def report(rounds: list[Round], results: list[tuple[str, bool]], args: argparse.Namespace) -> str:
    def ms(value: float | None) -> str:
        return "–" if value is None else f"{value * 1000:.0f}"

    lines = [f"Load test: {args.clients} concurrent clients x {args.rounds} rounds, `POST /generate` "
             f"(max_length {args.max_length}), MAX_QUEUE {args.max_queue if args.max_queue is not None else '?'}",
             "",
             "| round | accepted | refused (503) | other | deepest queue | p50 accepted (ms) "
             "| p95 accepted (ms) | p95 refused (ms) | round (s) | RSS after (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rounds:
        ok = [o.seconds for o in r.accepted()]
        no = [o.seconds for o in r.rejected()]
        other = len(r.outcomes) - len(ok) - len(no)
        rss = "–" if r.rss_bytes is None else f"{r.rss_bytes / 2**20:.0f}"
        depth = "–" if r.max_queue_depth is None else r.max_queue_depth
        lines.append(f"| {r.number} | {len(ok)} | {len(no)} | {other} | {depth} | {ms(percentile(ok, 50))} | "
                     f"{ms(percentile(ok, 95))} | {ms(percentile(no, 95))} | {r.seconds:.1f} | {rss} |")
    accepted = [o.seconds for r in rounds for o in r.accepted()]
    lines += ["", f"All rounds: {len(accepted)} accepted, p50 {ms(percentile(accepted, 50))} ms, "
                  f"p95 {ms(percentile(accepted, 95))} ms.", ""]
    lines += [f"- [{'x' if passed else ' '}] {text}" for text, passed in results]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running engine on a loopback address (default: start one)")
    p.add_argument("--clients", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-queue", type=int, default=None,
                   help="MAX_QUEUE of the engine (default 8 for the engine started here; with --url, "
                        "give the server's value to check the bound)")
    p.add_argument("--max-length", type=int, default=40, help="new tokens per request")
    p.add_argument("--max-seconds", type=float, default=600, help="time bound of all rounds together")
    p.add_argument("--tolerance", type=float, default=0.10, help="allowed RSS growth, first to last round")
    args = p.parse_args(argv)
    if args.url is None and args.max_queue is None:
        args.max_queue = 8
    if args.url and not is_loopback(args.url):
        p.error(f"--url must be a loopback address (127.0.0.1, ::1, localhost), not {args.url}")
    return args


def is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def start_own_server(args: argparse.Namespace, log_path: Path) -> Server:
    model = ensure_default_model(ROOT / "models")
    return start_server({
        "MODEL_PATH": str(model.parent), "MODEL": model.name, "API_HOST": "127.0.0.1",
        "MAX_QUEUE": str(args.max_queue), "RESPONSE_CACHE_SIZE": "0", "CACHE_RAM_MB": str(CACHE_RAM_MB),
        "LOG_LEVEL": "WARNING",
        # Every client must reach the queue to be accepted or refused: a thread each, and some.
        "SERVER_THREADS": str(max(48, args.clients + 8)),
    }, log_path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    server = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if args.url:
                url, rss = args.url.rstrip("/"), lambda: metrics_rss(args.url.rstrip("/"))
            else:
                server = start_own_server(args, Path(tmp) / "server.log")
                url, rss = server.url, lambda: process_rss(server.process.pid)
            rounds = run_rounds(url, rss, args)
            healthy = requests.get(url + "/health", timeout=10).status_code == 200
        finally:
            if server is not None:
                stop_server(server)
    results = checks(rounds, args, healthy)
    print(report(rounds, results, args))
    return 0 if all(passed for _, passed in results) else 1


if __name__ == "__main__":
    sys.exit(main())
