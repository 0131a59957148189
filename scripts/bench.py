#!/usr/bin/env python3
"""Benchmark the engine against llama-cpp-python itself, side by side in one run.

1. Baseline: llama-cpp-python's `create_completion` (streaming, to time the first token) on the
   same model, prompts and threads, in this process.
2. Engine: a real `ai-engine serve` process, called over HTTP on `POST /generate`.

For each it reports decode tokens/s (prompt excluded), time to first token for a new interview
(cold prompt) and for the interview's next turn (the transcript grows by one exchange), and the
engine/baseline ratios. Run it on a quiet machine: `.venv/bin/python scripts/bench.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from engine.default_model import ensure_default_model  # noqa: E402
from engine.patient import render_case_prompt  # noqa: E402
from engine.settings import physical_cores  # noqa: E402
from tests.conftest import DATA, start_server, stop_server  # noqa: E402

NEW_TOKENS = 128


def prompts() -> list[tuple[str, str]]:
    """(cold prompt, next-turn prompt) per fixture case."""
    cases = json.loads((DATA / "patient_cases.json").read_text(encoding="utf-8"))["cases"]
    pairs = []
    for case in cases:
        first = render_case_prompt(case)
        grown = dict(case, turnos=case["turnos"] + [["Paciente", "No sé bien."],
                                                   ["Estudiante", "¿Podés contarme un poco más?"]])
        pairs.append((first, render_case_prompt(grown)))
    return pairs


def baseline(model: Path, threads: int, n_ctx: int, rounds: int) -> dict[str, list[float]]:
    import llama_cpp

    llm = llama_cpp.Llama(str(model), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
    out: dict[str, list[float]] = {"decode": [], "ttft_cold": [], "ttft_next": []}
    for _ in range(rounds):
        for cold, nxt in prompts():
            for key, prompt in (("ttft_cold", cold), ("ttft_next", nxt)):
                llm.reset()  # llama-cpp-python keeps the last prompt's KV; cold means cold
                if key == "ttft_next":
                    llm.create_completion(cold, max_tokens=1, temperature=0)
                started = time.perf_counter()
                first = last = None
                n = 0
                for _chunk in llm.create_completion(prompt, max_tokens=NEW_TOKENS, temperature=0, stream=True):
                    last = time.perf_counter()
                    first = first or last
                    n += 1
                out[key].append(first - started)
                if key == "ttft_cold" and n > 1:
                    out["decode"].append((n - 1) / (last - first))
    llm.close()
    return out


def engine(model: Path, threads: int, n_ctx: int, rounds: int) -> dict[str, list[float]]:
    env = {"MODEL_PATH": str(model.parent), "MODEL": model.name, "N_THREADS": str(threads),
           "N_THREADS_BATCH": str(threads), "N_CTX": str(n_ctx), "LOG_LEVEL": "WARNING"}
    log = Path(os.environ.get("TMPDIR", "/tmp")) / "ai-engine-bench.log"
    server = start_server(env, log)
    out: dict[str, list[float]] = {"decode": [], "ttft_cold": [], "ttft_next": []}
    try:
        def call(prompt: str) -> dict:
            r = requests.post(server.url + "/generate", json={
                "prompt": prompt, "max_length": NEW_TOKENS, "temperature": 0, "stop": []}, timeout=300)
            r.raise_for_status()
            return r.json()["metadata"]

        for _ in range(rounds):
            # Cold prompts: each case in turn, so the previous one's cached prefix does not help.
            for cold, nxt in prompts():
                meta = call(cold)
                out["ttft_cold"].append(meta["ttft_ms"] / 1000)
                out["decode"].append(meta["tokens_per_second"])
                out["ttft_next"].append(call(nxt)["ttft_ms"] / 1000)
    finally:
        stop_server(server)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--n-ctx", type=int, default=4096)
    args = parser.parse_args()
    model = ensure_default_model(ROOT / "models")
    print(f"model {model.name}, {args.threads} threads, {NEW_TOKENS} new tokens, {args.rounds} rounds x 3 cases",
          flush=True)
    base = baseline(model, args.threads, args.n_ctx, args.rounds)
    eng = engine(model, args.threads, args.n_ctx, args.rounds)
    print(f"\n| metric | llama-cpp-python | ai-engine over HTTP | ratio |\n|---|---|---|---|")
    for key, label, unit, scale in (("decode", "decode tokens/s (median)", "", 1),
                                    ("ttft_cold", "time to first token, new interview (median)", " ms", 1000),
                                    ("ttft_next", "time to first token, next turn (median)", " ms", 1000)):
        b, e = statistics.median(base[key]) * scale, statistics.median(eng[key]) * scale
        print(f"| {label} | {b:.1f}{unit} | {e:.1f}{unit} | {e / b:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
