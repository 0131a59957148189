#!/usr/bin/env python3
"""Benchmark the generation core against llama.cpp itself, side by side in one run.

Single request (default model, fixture case, greedy, no repeat penalty, NEW_TOKENS new tokens):
  (a) floor: a bare decode loop on llama-cpp-python's low-level API (llama_decode + a greedy
      native sampler; what llama.cpp itself does),
  (b) llama-cpp-python's `Llama.create_completion` (streaming, to time the first token),
  (c) the engine over HTTP (`POST /generate`: decode rate and TTFT as the engine measures them),
      and (c') the same with `stream: true`, timed by the client from each token's event,
  (d) transformers fp32 `generate` on the same weights, when torch and transformers are installed.
Reported: decode tokens/s, prompt tokens/s, time to first token, and (c)/(a), (c)/(b).

Interview: time to first token per turn over a 10-turn interview from the fixtures (the engine's
reply is fed back as the patient's line, as the simulator does), with the conversation cache and
without it (CACHE_RAM_MB=0), alone and with 4 interviews interleaved turn by turn.

Writes bench/results/bench.md and bench/results/bench.png. Run on a quiet machine:
`.venv/bin/python scripts/bench.py` (needs the `bench` extra for the chart: matplotlib).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from engine.default_model import ensure_default_model  # noqa: E402
from engine.patient import render_case_prompt  # noqa: E402
from engine.settings import physical_cores  # noqa: E402
from tests.server_process import start_server, stop_server  # noqa: E402

NEW_TOKENS = 128
RESULTS = ROOT / "bench" / "results"
CASES = json.loads((ROOT / "tests" / "data" / "patient_cases.json").read_text(encoding="utf-8"))["cases"]
QUESTIONS = ["¿Desde cuándo te pasa?", "¿Cómo afecta eso a tu trabajo?", "¿Hablaste con alguien de esto?",
             "¿Qué pensás que lo empeora?", "¿Cómo están tus comidas y tu energía?",
             "¿Qué te gustaría que cambie?", "¿Cómo te sentís ahora, contándolo?", "¿Qué hacés para relajarte?",
             "¿Con quién contás cuando estás mal?", "¿Qué esperás de estas sesiones?"]


def single_prompt() -> str:
    return render_case_prompt(CASES[0])


# -- (a) the floor: a bare low-level loop ---------------------------------------------------
def bare_loop(model: Path, threads: int, n_ctx: int, rounds: int) -> dict[str, list[float]]:
    import llama_cpp as L

    llm = L.Llama(str(model), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
    ctx, n_batch = llm.ctx, llm.n_batch
    tokens = llm.tokenize(single_prompt().encode(), add_bos=True, special=True)
    batch = L.llama_batch_init(n_batch, 0, 1)
    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
    mem = L.llama_get_memory(ctx)
    out: dict[str, list[float]] = {"decode": [], "prompt": [], "ttft": []}

    def decode(toks, pos0):
        batch.n_tokens = len(toks)
        for i, t in enumerate(toks):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, pos0 + i, 1
            batch.seq_id[i][0], batch.logits[i] = 0, i == len(toks) - 1
        assert L.llama_decode(ctx, batch) == 0

    for _ in range(rounds):
        L.llama_memory_clear(mem, True)
        started = time.perf_counter()
        for s in range(0, len(tokens), n_batch):
            decode(tokens[s:s + n_batch], s)
        prompt_done = time.perf_counter()
        pos = len(tokens)
        token = L.llama_sampler_sample(chain, ctx, -1)
        first = time.perf_counter()
        for _ in range(NEW_TOKENS - 1):
            decode([token], pos)
            pos += 1
            token = L.llama_sampler_sample(chain, ctx, -1)
        last = time.perf_counter()
        out["prompt"].append(len(tokens) / (prompt_done - started))
        out["ttft"].append(first - started)
        out["decode"].append((NEW_TOKENS - 1) / (last - first))
    L.llama_sampler_free(chain)
    L.llama_batch_free(batch)
    llm.close()
    return out


# -- (b) llama-cpp-python's create_completion -----------------------------------------------
def create_completion(model: Path, threads: int, n_ctx: int, rounds: int) -> dict[str, list[float]]:
    import llama_cpp as L

    llm = L.Llama(str(model), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
    prompt = single_prompt()
    n_prompt = len(llm.tokenize(prompt.encode(), add_bos=True, special=True))
    out: dict[str, list[float]] = {"decode": [], "prompt": [], "ttft": []}
    for _ in range(rounds):
        llm.reset()
        L.llama_memory_clear(L.llama_get_memory(llm.ctx), True)  # cold: no reuse of the last prompt
        started = time.perf_counter()
        first = last = None
        n = 0
        for _chunk in llm.create_completion(prompt, max_tokens=NEW_TOKENS, temperature=0, repeat_penalty=1.0,
                                            stream=True):
            last = time.perf_counter()
            first = first or last
            n += 1
        out["ttft"].append(first - started)
        out["prompt"].append(n_prompt / (first - started))
        out["decode"].append((n - 1) / (last - first))
    llm.close()
    return out


# -- (c) the engine over HTTP -----------------------------------------------------------------
def engine_env(model: Path, threads: int, n_ctx: int, **extra: str) -> dict[str, str]:
    return {"MODEL_PATH": str(model.parent), "MODEL": model.name, "N_THREADS": str(threads),
            "N_THREADS_BATCH": str(threads), "N_CTX": str(n_ctx), "LOG_LEVEL": "WARNING",
            "RESPONSE_CACHE_SIZE": "0", **extra}


def engine_http(model: Path, threads: int, n_ctx: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    """(c) as the simulator calls it (one JSON reply; decode rate and TTFT as the engine measured
    them), and streaming (timed by the client from the arrival of each token's event)."""
    server = start_server(engine_env(model, threads, n_ctx, CACHE_RAM_MB="0"),
                          Path(tempfile.gettempdir()) / "ai-engine-bench.log")
    plain: dict[str, list[float]] = {"decode": [], "prompt": [], "ttft": []}
    streamed: dict[str, list[float]] = {"decode": [], "prompt": [], "ttft": []}
    body = {"prompt": single_prompt(), "max_length": NEW_TOKENS, "temperature": 0, "repeat_penalty": 1.0,
            "stop": []}
    try:
        for _ in range(rounds):
            r = requests.post(server.url + "/generate", json=body, timeout=300)
            r.raise_for_status()
            meta = r.json()["metadata"]
            plain["ttft"].append(meta["ttft_ms"] / 1000)
            plain["prompt"].append(meta["prompt_tokens"] / (meta["ttft_ms"] / 1000))
            plain["decode"].append(meta["tokens_per_second"])

            started = time.perf_counter()
            times, last_event = [], b""
            with requests.post(server.url + "/generate", json={**body, "stream": True}, stream=True,
                               timeout=300) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if line:
                        times.append(time.perf_counter())
                        last_event = line
            meta = json.loads(last_event[len(b"data: "):])["metadata"]
            first, last = times[0], times[-2]  # the last event is the final reply, not a token
            streamed["ttft"].append(first - started)
            streamed["prompt"].append(meta["prompt_tokens"] / (first - started))
            streamed["decode"].append((meta["tokens"] - 1) / (last - first))
    finally:
        stop_server(server)
    return {"(c) ai-engine over HTTP": plain, "(c') ai-engine over HTTP, streaming": streamed}


# -- (d) transformers fp32 ----------------------------------------------------------------------
def transformers_fp32(model: Path, threads: int, rounds: int) -> dict[str, list[float]] | None:
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        return None
    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(str(model.parent), gguf_file=model.name)
    hf = AutoModelForCausalLM.from_pretrained(str(model.parent), gguf_file=model.name, torch_dtype=torch.float32)
    ids = tok(single_prompt(), return_tensors="pt").input_ids
    out: dict[str, list[float]] = {"decode": [], "prompt": [], "ttft": []}
    with torch.inference_mode():
        for _ in range(rounds):
            started = time.perf_counter()
            hf.generate(ids, max_new_tokens=1, do_sample=False)
            ttft = time.perf_counter() - started
            started = time.perf_counter()
            hf.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
            total = time.perf_counter() - started
            out["ttft"].append(ttft)
            out["prompt"].append(ids.shape[1] / ttft)
            out["decode"].append((NEW_TOKENS - 1) / max(total - ttft, 1e-9))
    return out


# -- the interview --------------------------------------------------------------------------------
def interview(model: Path, threads: int, n_ctx: int, cache: bool, n_interviews: int, turns: int) -> list[list[float]]:
    """TTFT (ms, server-measured) per turn, per interview; interviews interleave turn by turn."""
    env = engine_env(model, threads, n_ctx, **({} if cache else {"CACHE_RAM_MB": "0"}))
    server = start_server(env, Path(tempfile.gettempdir()) / "ai-engine-bench-interview.log")
    histories = [[list(t) for t in CASES[i % len(CASES)]["turnos"]] for i in range(n_interviews)]
    ttfts: list[list[float]] = [[] for _ in range(n_interviews)]
    try:
        for turn in range(turns):
            for i, history in enumerate(histories):
                case = dict(CASES[i % len(CASES)], turnos=history)
                r = requests.post(server.url + "/generate", timeout=300, json={
                    "prompt": render_case_prompt(case), "max_length": 60, "temperature": 0.7, "seed": turn})
                r.raise_for_status()
                body = r.json()
                ttfts[i].append(body["metadata"]["ttft_ms"])
                history += [["Paciente", body["texto"] or "No sé."], ["Estudiante", QUESTIONS[turn % len(QUESTIONS)]]]
    finally:
        stop_server(server)
    return ttfts


# -- concurrency: continuous batching -------------------------------------------------------------
def run_concurrently(client, n: int) -> float:
    """Run client(0..n-1) in n threads at once; the wall time until all are done."""
    started = time.perf_counter()
    workers = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return time.perf_counter() - started


def concurrency(model: Path, threads: int, n_ctx: int, clients: tuple[int, ...], requests_each: int,
                n_parallel: int) -> dict[int, dict[str, float]]:
    """Aggregate generated tokens/s and TTFT percentiles with N clients sending /generate at once
    (each its own interview, sampled, 64 new tokens, no stops), on one engine with N_PARALLEL."""
    server = start_server(engine_env(model, threads, n_ctx, N_PARALLEL=str(n_parallel), MAX_QUEUE="64"),
                          Path(tempfile.gettempdir()) / "ai-engine-bench-concurrency.log")
    out: dict[int, dict[str, float]] = {}
    try:
        for n in clients:
            ttfts: list[float] = []
            tokens = [0] * n

            def client(i: int) -> None:
                case = CASES[i % len(CASES)]
                for k in range(requests_each):
                    history = case["turnos"] + [["Paciente", "No sé."], ["Estudiante", QUESTIONS[(i + k) % len(QUESTIONS)]]]
                    r = requests.post(server.url + "/generate", timeout=600, json={
                        "prompt": render_case_prompt(dict(case, turnos=history)), "max_length": 64, "stop": [],
                        "temperature": 0.8, "seed": i * 100 + k})
                    r.raise_for_status()
                    meta = r.json()["metadata"]
                    tokens[i] += meta["tokens"]
                    ttfts.append(meta["ttft_ms"])

            wall = run_concurrently(client, n)
            ttfts.sort()
            out[n] = {"tokens_per_s": sum(tokens) / wall, "p50": ttfts[len(ttfts) // 2],
                      "p95": ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.95))]}
            print(f"concurrency {n}: {out[n]}", flush=True)
    finally:
        stop_server(server)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--no-transformers", action="store_true", help="skip (d) even if torch is installed")
    parser.add_argument("--only", choices=["single", "interview", "concurrency"], action="append",
                        help="run only these parts (repeatable; default: all)")
    parser.add_argument("--n-parallel", type=int, default=4, help="N_PARALLEL for the concurrency part")
    args = parser.parse_args()
    model = ensure_default_model(ROOT / "models")
    machine = f"{cpu_name()}, {physical_cores()} cores, {args.threads} threads"
    parts = args.only or ["single", "interview", "concurrency"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    header = f"Measured {date.today().isoformat()} on {machine}; model {model.name}."
    print(header, flush=True)
    if "single" in parts:
        save("single", header, single_part(model, args))
    if "interview" in parts:
        save("interview", header, interview_part(model, args))
    if "concurrency" in parts:
        save("concurrency", header, concurrency_part(model, args))
    report = "\n".join((RESULTS / f"{p}.md").read_text(encoding="utf-8") for p in ("single", "interview", "concurrency")
                       if (RESULTS / f"{p}.md").exists())
    (RESULTS / "bench.md").write_text(report, encoding="utf-8")
    print("\n" + report)
    chart()
    return 0


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="ascii", errors="replace"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def save(part: str, header: str, result: tuple[list[str], dict]) -> None:
    lines, data = result
    (RESULTS / f"{part}.md").write_text("\n".join([header, ""] + lines) + "\n", encoding="utf-8")
    (RESULTS / f"{part}.json").write_text(json.dumps(data, indent=1), encoding="utf-8")


def single_part(model: Path, args) -> tuple[list[str], dict]:
    runs = {"(a) bare llama.cpp loop": bare_loop(model, args.threads, args.n_ctx, args.rounds)}
    runs["(b) create_completion"] = create_completion(model, args.threads, args.n_ctx, args.rounds)
    runs.update(engine_http(model, args.threads, args.n_ctx, args.rounds))
    if not args.no_transformers:
        hf = transformers_fp32(model, args.threads, max(1, args.rounds // 2))
        if hf:
            runs["(d) transformers fp32"] = hf
    med = {k: {m: statistics.median(v) for m, v in r.items()} for k, r in runs.items()}
    a, b, c = (med[k] for k in list(med)[:3])
    lines = [f"Single request: median of {args.rounds} runs, {NEW_TOKENS} new tokens, greedy, no repeat penalty.", "",
             "| runner | decode tokens/s | prompt tokens/s | time to first token |", "|---|---|---|---|"]
    for name, m in med.items():
        lines.append(f"| {name} | {m['decode']:.1f} | {m['prompt']:.0f} | {m['ttft'] * 1000:.0f} ms |")
    lines += ["", f"Decode ratio (c)/(a) = **{c['decode'] / a['decode']:.3f}**, "
                  f"(c)/(b) = **{c['decode'] / b['decode']:.3f}**.", ""]
    return lines, {"median": med, "runs": runs}


def interview_part(model: Path, args) -> tuple[list[str], dict]:
    series = {}
    for cache in (True, False):
        for n in (1, 4):
            series[(cache, n)] = interview(model, args.threads, args.n_ctx, cache, n, args.turns)
            print(f"interview cache={cache} n={n} done", flush=True)
    names = {k: f"{'cache' if k[0] else 'no cache'}, {k[1]} interview{'s' if k[1] > 1 else ''}" for k in series}
    lines = [f"Interview: time to first token per turn (ms, median over interviews), {args.turns} turns, "
             "the engine's replies fed back.", "",
             "| turn | " + " | ".join(names.values()) + " |", "|---" * (len(series) + 1) + "|"]
    per_turn = {k: [statistics.median(t[i] for t in v) for i in range(args.turns)] for k, v in series.items()}
    for turn in range(args.turns):
        lines.append(f"| {turn + 1} | " + " | ".join(f"{per_turn[k][turn]:.0f}" for k in series) + " |")
    late = slice(4, args.turns)
    for n in (1, 4):
        with_c = statistics.median(x for t in series[(True, n)] for x in t[late])
        without = statistics.median(x for t in series[(False, n)] for x in t[late])
        lines.append(f"\nTurns 5-{args.turns}, {n} interview{'s' if n > 1 else ''}: median TTFT {with_c:.0f} ms with "
                     f"the cache vs {without:.0f} ms without: ratio **{with_c / without:.3f}**.")
    lines.append("")
    return lines, {"per_turn": {names[k]: v for k, v in per_turn.items()}}


def batched_floor(model: Path, threads: int, counts: tuple[int, ...], steps: int = 40) -> dict[int, float]:
    """llama.cpp's own decode throughput with n sequences per llama_decode (prompts already in the
    cache, one token per sequence per step): the ceiling for continuous batching on this machine."""
    import llama_cpp as L
    from llama_cpp import _internals

    m = _internals.LlamaModel(path_model=str(model), params=L.llama_model_default_params(), verbose=False)
    p = L.llama_context_default_params()
    p.n_ctx, p.n_seq_max, p.kv_unified, p.n_batch, p.n_ubatch = 2048 * max(counts), max(counts), False, 512, 512
    p.n_threads = p.n_threads_batch = threads
    p.swa_full = True
    ctx = _internals.LlamaContext(model=m, params=p, verbose=False)
    b = L.llama_batch_init(512, 0, 1)
    mem = L.llama_get_memory(ctx.ctx)

    def decode(items):
        for i, (seq, tok, pos) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = tok, pos, 1, seq, True
        b.n_tokens = len(items)
        assert L.llama_decode(ctx.ctx, b) == 0

    prompts = [m.tokenize(render_case_prompt(CASES[i % len(CASES)]).encode(), True, True)[:200]
               for i in range(max(counts))]
    for seq, pr in enumerate(prompts):
        for start in range(0, len(pr), 256):
            decode([(seq, t, start + i) for i, t in enumerate(pr[start:start + 256])])
    out = {}
    for n in counts:
        started = time.perf_counter()
        for step in range(steps):
            decode([(seq, 100 + step, len(prompts[seq]) + step) for seq in range(n)])
        out[n] = steps * n / (time.perf_counter() - started)
        for seq in range(n):
            L.llama_memory_seq_rm(mem, seq, len(prompts[seq]), -1)
    L.llama_batch_free(b)
    ctx.close()
    m.close()
    return out


def concurrency_part(model: Path, args) -> tuple[list[str], dict]:
    counts = (1, 2, 4, 8)
    floor = batched_floor(model, args.threads, counts)
    result = concurrency(model, args.threads, args.n_ctx, counts, 3, args.n_parallel)
    one = result[1]["tokens_per_s"]
    lines = [f"Concurrent clients over HTTP (N_PARALLEL={args.n_parallel}; each client sends 3 requests of 64 "
             "sampled tokens for its own interview, prompts included), beside llama.cpp's own decode "
             "throughput with the same number of sequences per llama_decode (no prompts, no HTTP):", "",
             "| clients | aggregate tokens/s | vs 1 client | TTFT p50 | TTFT p95 | llama.cpp batched decode | vs 1 sequence |",
             "|---|---|---|---|---|---|---|"]
    for n, r in result.items():
        lines.append(f"| {n} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / one:.2f}x | {r['p50']:.0f} ms | "
                     f"{r['p95']:.0f} ms | {floor[n]:.1f} | {floor[n] / floor[1]:.2f}x |")
    lines += ["", "llama-server is not installed here (llama-cpp-python ships no server binary), so its own "
                  "numbers are not in this run; DESIGN.md measured 113 tokens/s for 4 clients (2.3x) on this "
                  "project's machine.", ""]
    return lines, {str(n): {**r, "llama_cpp_floor": floor[n]} for n, r in result.items()}


def chart() -> None:
    """bench/results/bench.png from whichever parts have results."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install -e '.[bench]')")
        return
    data = {p: json.loads((RESULTS / f"{p}.json").read_text()) for p in ("single", "interview", "concurrency")
            if (RESULTS / f"{p}.json").exists()}
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    if "single" in data:
        med = data["single"]["median"]
        axes[0].barh(list(med), [m["decode"] for m in med.values()], color="#4c72b0")
        axes[0].set_xlabel("decode tokens/s, one request")
        axes[0].invert_yaxis()
    if "interview" in data:
        for name, ys in data["interview"]["per_turn"].items():
            axes[1].plot(range(1, len(ys) + 1), ys, marker="o", linestyle="-" if name.startswith("cache") else "--",
                         label=name)
        axes[1].set_xlabel("interview turn")
        axes[1].set_ylabel("time to first token (ms)")
        axes[1].set_yscale("log")
        axes[1].legend()
    if "concurrency" in data:
        conc = data["concurrency"]
        axes[2].bar(list(conc), [r["tokens_per_s"] for r in conc.values()], color="#55a868")
        axes[2].set_xlabel("concurrent clients")
        axes[2].set_ylabel("aggregate tokens/s")
    fig.tight_layout()
    fig.savefig(RESULTS / "bench.png", dpi=110)
    print(f"chart: {RESULTS / 'bench.png'}")


if __name__ == "__main__":
    raise SystemExit(main())
