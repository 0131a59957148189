#!/usr/bin/env python3
"""Benchmark scaling out with Ray Serve: aggregate tokens/s with 1 and 2 replicas, in one run.

Every configuration gets the same load: CLIENTS clients, each sending `/generate` requests back
to back (the fixture cases' prompts, MAX_LENGTH new tokens, `stop: []` so every reply has the
same length, no response cache) for SECONDS seconds. Configurations:
  - the single-machine engine (waitress, no Ray), N_THREADS=1: the baseline for Ray's overhead,
  - Ray Serve, 1 replica, N_THREADS=1,
  - Ray Serve, 2 replicas, N_THREADS=1 each,
  - the single-machine engine with N_THREADS=2: the same cores given to one engine instead.
Ray runs as a local single-node cluster on loopback, started the way `ai-engine serve --ray`
starts one. Prints a Markdown table. Needs the `ray` extra; run on a quiet machine:
`.venv/bin/python scripts/bench_ray.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import requests  # noqa: E402

from engine.default_model import ensure_default_model  # noqa: E402
from engine.patient import render_case_prompt  # noqa: E402
from engine.settings import Settings  # noqa: E402
from tests.server_process import free_port, start_server, stop_server  # noqa: E402
from bench import run_concurrently  # noqa: E402

CASES = json.loads((ROOT / "tests" / "data" / "patient_cases.json").read_text(encoding="utf-8"))["cases"]


def engine_env(model_dir: Path, threads: int, args: argparse.Namespace) -> dict[str, str]:
    return {"MODEL_PATH": str(model_dir), "MODEL": "", "N_THREADS": str(threads), "N_THREADS_BATCH": str(threads),
            "N_CTX": str(args.n_ctx), "N_PARALLEL": str(args.n_parallel), "RESPONSE_CACHE_SIZE": "0",
            "N_GPU_LAYERS": "0", "LOG_LEVEL": "WARNING", "API_HOST": "127.0.0.1"}


def load(url: str, clients: int, seconds: float, max_length: int) -> dict[str, float]:
    """Run the load; aggregate generated tokens per second of wall time, and latencies."""
    tokens: list[int] = []
    latencies: list[float] = []
    errors: list[str] = []
    replicas: set[str] = set()
    lock = threading.Lock()
    end = time.perf_counter() + seconds

    def client(i: int) -> None:
        n = i
        while time.perf_counter() < end:
            body = {"prompt": render_case_prompt(CASES[n % len(CASES)]), "max_length": max_length,
                    "temperature": 0.7, "stop": []}
            n += clients
            t0 = time.perf_counter()
            r = requests.post(url + "/generate", json=body, timeout=300)
            with lock:
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:100]}")
                    continue
                tokens.append(r.json()["metadata"]["tokens"])
                latencies.append(time.perf_counter() - t0)
                replicas.add(r.headers.get("X-AI-Engine-Replica", "-"))

    wall = run_concurrently(client, clients)
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return {"tokens_per_s": sum(tokens) / wall, "requests": len(tokens),
            "p50_s": statistics.median(latencies), "replicas": len(replicas - {"-"})}


def warm(url: str) -> None:
    for _ in range(3):
        requests.post(url + "/generate", json={"prompt": render_case_prompt(CASES[0]), "max_length": 8}, timeout=300)


def single_engine(model_dir: Path, threads: int, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(engine_env(model_dir, threads, args), Path(tmp) / "server.log", timeout=180)
        try:
            warm(server.url)
            return load(server.url, args.clients, args.seconds, args.max_length)
        finally:
            stop_server(server)


def ray_runs(model_dir: Path, args: argparse.Namespace) -> dict[int, dict[str, float]]:
    from ray import serve

    from engine import ray_serve
    from engine.ray_options import RayOptions

    env = {**engine_env(model_dir, 1, args), "API_PORT": str(free_port())}
    settings = Settings.load(env=env)
    ray_serve.connect()  # a local cluster: main() refuses RAY_ADDRESS
    results = {}
    try:
        for replicas in (1, 2):
            options = RayOptions(replicas=replicas, replica_cpus=1, max_queued_requests=-1)
            url = ray_serve.deploy(settings, options)
            warm(url)
            results[replicas] = load(url, args.clients, args.seconds, args.max_length)
            print(f"  ray, {replicas} replica(s): {results[replicas]['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients in every configuration")
    parser.add_argument("--seconds", type=float, default=30, help="load duration per configuration")
    parser.add_argument("--max-length", type=int, default=64, help="new tokens per request")
    parser.add_argument("--n-parallel", type=int, default=1,
                        help="N_PARALLEL of every engine (1: one sequence per replica, so only replicas add up)")
    parser.add_argument("--n-ctx", type=int, default=1024)
    args = parser.parse_args()
    if os.environ.get("RAY_ADDRESS"):
        parser.error("unset RAY_ADDRESS: the benchmark starts (and stops) its own local Ray")

    model_dir = Path(tempfile.mkdtemp(prefix="bench-ray-models-"))
    default = ensure_default_model(ROOT / "models")
    os.link(default, model_dir / default.name)  # the replicas' sha256 check finds it intact
    try:
        rows: list[tuple[str, dict[str, float]]] = []
        print("  engine, 1 thread ...", file=sys.stderr)
        rows.append(("single engine (no Ray), N_THREADS=1", single_engine(model_dir, 1, args)))
        ray = ray_runs(model_dir, args)
        rows.append(("Ray Serve, 1 replica, N_THREADS=1", ray[1]))
        rows.append(("Ray Serve, 2 replicas, N_THREADS=1 each", ray[2]))
        print("  engine, 2 threads ...", file=sys.stderr)
        rows.append(("single engine (no Ray), N_THREADS=2", single_engine(model_dir, 2, args)))
    finally:
        for path in model_dir.iterdir():
            path.unlink()
        model_dir.rmdir()

    base = rows[1][1]["tokens_per_s"]
    print(f"\n{args.clients} clients, {args.max_length} new tokens a request, N_PARALLEL={args.n_parallel}, "
          f"{args.seconds:.0f} s per configuration, {os.cpu_count()} CPUs\n")
    print("| configuration | aggregate tokens/s | vs 1 replica | requests | median latency (s) | replicas that answered |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.2f}x | {r['requests']} | "
              f"{r['p50_s']:.2f} | {r['replicas'] or '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
