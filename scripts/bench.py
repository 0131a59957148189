#!/usr/bin/env python3
"""Benchmark the generation core against llama.cpp itself, side by side in one run.

Single request (default model, up to NEW_TOKENS new tokens; a fixture case's first turn and the
same case 30 exchanges later, greedy without repeat penalty, and the first turn with the
simulator's sampling settings; runners interleaved round by round):
  (a) floor: a bare decode loop on llama-cpp-python's low-level API (llama_decode + llama.cpp's
      greedy sampler, or the engine's native chain when sampling; what llama.cpp itself does
      with the same context settings),
  (b) llama-cpp-python's `Llama.create_completion` (streaming, to time the first token),
  (c) the engine over HTTP (`POST /generate`: decode rate and TTFT as the engine measures them),
      and (c') the same with `stream: true`, timed by the client from each token's event,
  (d) transformers fp32 `generate` on the same weights, when torch and transformers are installed,
  and llama.cpp's own llama-bench when scripts/build_llama_server.sh has built it.
All with the engine's attention setting (`--flash-attn`, default the engine's FLASH_ATTN default).
Reported: decode tokens/s, prompt tokens/s, time to first token, and (c)/(a), (c)/(b).

Interview: time to first token per turn over a 10-turn interview from the fixtures (the engine's
reply is fed back as the patient's line, as the simulator does), with the conversation cache and
without it (CACHE_RAM_MB=0), alone and with 4 interviews interleaved turn by turn.

Concurrency: 1, 2, 4 and 8 streaming clients over HTTP (aggregate tokens/s, TTFT p50/p95), beside
llama.cpp's batched decode with as many sequences, and llama-server and llama-batched-bench when
scripts/build_llama_server.sh has built them.

Class (`--only class`, not part of the default run; scripts/class_bench.py): N students open K
clinical cases at once and ask T questions each with think time between them, every request the
simulator's backend's Ollama `/api/generate`; the engine and then llama-server, one at a time.
Reply times for first and later turns, shares under 3 s and over 30 s, 503s, aggregate tokens/s.
`--model llama1b` runs it on a random Llama-3.2-1B-shaped model (built once, cached).
    .venv/bin/python scripts/bench.py --only class [--students 12 --cases 2 --turns 3 --think 2,6]
    .venv/bin/python scripts/bench.py --only class --model llama1b --servers both
    PROMPT_CACHE_DIR=/tmp/pc .venv/bin/python scripts/bench.py --only class --servers engine --warm

Writes bench/results/bench.md (and class.md, class-llama1b.md) and bench/results/bench.png. Run on a quiet machine:
`.venv/bin/python scripts/bench.py` (needs the `bench` extra for the chart: matplotlib).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from ai_engine_common.machine import physical_cores, read_cpu_info  # noqa: E402
from engine.default_model import ensure_default_model  # noqa: E402
from engine.generation import SamplingParams  # noqa: E402
from engine.patient import render_case_prompt  # noqa: E402
from engine.runtime import flash_attn_type, sampler_chain  # noqa: E402
from engine.settings import Settings  # noqa: E402
from tests.server_process import start_server, stop_server  # noqa: E402

NEW_TOKENS = 128
CONCURRENT_TOKENS = 64
FLASH_ATTN = "off"  # every runner's attention setting; main() sets it from --flash-attn
DEFAULT_N_PARALLEL = Settings.load(env={}).n_parallel
RESULTS = ROOT / "bench" / "results"
CASES = json.loads((ROOT / "tests" / "data" / "patient_cases.json").read_text(encoding="utf-8"))["cases"]
QUESTIONS = ["¿Desde cuándo te pasa?", "¿Cómo afecta eso a tu trabajo?", "¿Hablaste con alguien de esto?",
             "¿Qué pensás que lo empeora?", "¿Cómo están tus comidas y tu energía?",
             "¿Qué te gustaría que cambie?", "¿Cómo te sentís ahora, contándolo?", "¿Qué hacés para relajarte?",
             "¿Con quién contás cuando estás mal?", "¿Qué esperás de estas sesiones?"]


PATIENT_LINES = ["No sé, me cuesta explicarlo.", "Desde hace unos meses, creo que empezó con lo del trabajo.",
                 "A veces sí, a veces no. Depende del día.", "Mi hermana me dice que estoy distinta, más callada.",
                 "Intento no pensar en eso, pero vuelve a la noche.", "Como poco, y me canso enseguida.",
                 "Me gustaría volver a dormir bien, nada más.", "Un poco nerviosa, la verdad."]


GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, repeat_penalty=1.0)
A, B, C = "(a) bare llama.cpp loop", "(b) create_completion", "(c) ai-engine over HTTP"
LLAMA_BENCH = "llama-bench (llama.cpp's tool, no sampling)"
# What the simulator sends (temperature 0.7, top_p 0.9) on the engine's documented defaults for the
# rest (top_k 40, min_p 0.05, repeat penalty 1.1), with a seed so that every round is the same.
SIMULATOR = SamplingParams(max_tokens=NEW_TOKENS, seed=7)


def single_cases() -> dict[str, tuple[str, SamplingParams]]:
    """Name → (prompt, sampling) of the single-request measurements."""
    prompts = single_prompts()
    return {"first turn, greedy": (prompts["first turn"], GREEDY), "turn 30, greedy": (prompts["turn 30"], GREEDY),
            "first turn, simulator's sampling": (prompts["first turn"], SIMULATOR)}


def single_prompts() -> dict[str, str]:
    """The first turn of a fixture case, and the same case late in a long interview (30 more
    exchanges), where attention over the transcript weighs on every decoded token."""
    case = CASES[0]
    late = case["turnos"] + [turn for k in range(30) for turn in (["Paciente", PATIENT_LINES[k % len(PATIENT_LINES)]],
                                                                   ["Estudiante", QUESTIONS[k % len(QUESTIONS)]])]
    return {"first turn": render_case_prompt(case), "turn 30": render_case_prompt(dict(case, turnos=late))}


def single_prompt() -> str:
    return single_prompts()["first turn"]


class Runner:
    """One way of generating; `run(prompt, sampling)` → (time to first token s, prompt tokens/s,
    decode tokens/s)."""

    def run(self, prompt: str, sp: SamplingParams) -> tuple[float, float, float]:
        raise NotImplementedError

    def close(self) -> None:
        pass


# -- (a) the floor: a bare low-level loop ---------------------------------------------------
class BareLoop(Runner):
    """llama_decode + a native sampler on a context with the engine's settings: llama.cpp's greedy
    sampler, or for sampled decoding the engine's own native chain (`sampler_chain`). It never
    stops early: end-of-generation tokens are decoded like any other."""

    def __init__(self, model: Path, threads: int, n_ctx: int) -> None:
        import llama_cpp as L
        from llama_cpp import _internals

        self.L = L
        self.model = _internals.LlamaModel(path_model=str(model), params=L.llama_model_default_params(), verbose=False)
        p = L.llama_context_default_params()
        p.n_ctx, p.n_threads, p.n_threads_batch = n_ctx, threads, threads
        p.flash_attn_type = flash_attn_type(FLASH_ATTN)
        self.ctx = _internals.LlamaContext(model=self.model, params=p, verbose=False)
        self.n_batch = p.n_batch
        self.batch = L.llama_batch_init(self.n_batch, 0, 1)

    def _decode(self, toks, pos0) -> None:
        b = self.batch
        b.n_tokens = len(toks)
        for i, t in enumerate(toks):
            b.token[i], b.pos[i], b.n_seq_id[i] = t, pos0 + i, 1
            b.seq_id[i][0], b.logits[i] = 0, i == len(toks) - 1
        assert self.L.llama_decode(self.ctx.ctx, b) == 0

    def chain(self, sp: SamplingParams):
        L = self.L
        if sp.temperature > 0:
            return sampler_chain(L, self.model.n_vocab(), sp, native=True)
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
        return chain

    def run(self, prompt: str, sp: SamplingParams) -> tuple[float, float, float]:
        L, ctx = self.L, self.ctx.ctx
        tokens = self.model.tokenize(prompt.encode(), True, True)
        chain = self.chain(sp)
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        started = time.perf_counter()
        for s in range(0, len(tokens), self.n_batch):
            self._decode(tokens[s:s + self.n_batch], s)
        prompt_done = time.perf_counter()
        pos = len(tokens)
        token = L.llama_sampler_sample(chain, ctx, -1)
        first = time.perf_counter()
        for _ in range(sp.max_tokens - 1):
            self._decode([token], pos)
            pos += 1
            token = L.llama_sampler_sample(chain, ctx, -1)
        last = time.perf_counter()
        L.llama_sampler_free(chain)
        return first - started, len(tokens) / (prompt_done - started), (sp.max_tokens - 1) / (last - first)

    def close(self) -> None:
        self.L.llama_batch_free(self.batch)
        self.ctx.close()
        self.model.close()


# -- (b) llama-cpp-python's create_completion -----------------------------------------------
class CreateCompletion(Runner):
    """`Llama(...).create_completion(stream=True)`, cold each time (no reuse of the last prompt)."""

    def __init__(self, model: Path, threads: int, n_ctx: int) -> None:
        import llama_cpp as L

        self.L = L
        self.llm = L.Llama(str(model), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False,
                           flash_attn=FLASH_ATTN != "off")

    def run(self, prompt: str, sp: SamplingParams) -> tuple[float, float, float]:
        llm = self.llm
        n_prompt = len(llm.tokenize(prompt.encode(), add_bos=True, special=True))
        llm.reset()
        self.L.llama_memory_clear(self.L.llama_get_memory(llm.ctx), True)
        started = time.perf_counter()
        first = last = None
        n = 0
        for _chunk in llm.create_completion(prompt, max_tokens=sp.max_tokens, temperature=sp.temperature,
                                            top_p=sp.top_p, top_k=sp.top_k, min_p=sp.min_p,
                                            repeat_penalty=sp.repeat_penalty, seed=sp.seed, stream=True):
            last = time.perf_counter()
            first = first or last
            n += 1
        return first - started, n_prompt / (first - started), (n - 1) / (last - first)

    def close(self) -> None:
        self.llm.close()


# -- (c) the engine over HTTP -----------------------------------------------------------------
def engine_env(model: Path, threads: int, n_ctx: int, **extra: str) -> dict[str, str]:
    return {"MODEL_PATH": str(model.parent), "MODEL": model.name, "N_THREADS": str(threads),
            "N_THREADS_BATCH": str(threads), "N_CTX": str(n_ctx), "LOG_LEVEL": "WARNING",
            "RESPONSE_CACHE_SIZE": "0", "FLASH_ATTN": FLASH_ATTN, **extra}


class EngineHTTP(Runner):
    """(c) as the simulator calls it: one JSON reply; decode rate and TTFT as the engine measured
    them. With `stream`, (c'): timed by the client from the arrival of each token's event. The
    engine runs with its default settings, without its caches (every prompt evaluated in full)."""

    def __init__(self, server, stream: bool) -> None:
        self.server, self.stream = server, stream

    def run(self, prompt: str, sp: SamplingParams) -> tuple[float, float, float]:
        body = {"prompt": prompt, "max_length": sp.max_tokens, "temperature": sp.temperature, "top_p": sp.top_p,
                "top_k": sp.top_k, "min_p": sp.min_p, "repeat_penalty": sp.repeat_penalty, "stop": []}
        if sp.seed is not None:
            body["seed"] = sp.seed
        if not self.stream:
            r = requests.post(self.server.url + "/generate", json=body, timeout=300)
            r.raise_for_status()
            meta = r.json()["metadata"]
            ttft = meta["ttft_ms"] / 1000
            return ttft, meta["prompt_tokens"] / ttft, meta["tokens_per_second"]
        started = time.perf_counter()
        times, last_event = [], b""
        with requests.post(self.server.url + "/generate", json={**body, "stream": True}, stream=True,
                           timeout=300) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line:
                    times.append(time.perf_counter())
                    last_event = line
        meta = json.loads(last_event[len(b"data: "):])["metadata"]
        first, last = times[0], times[-2]  # the last event is the final reply, not a token
        return first - started, meta["prompt_tokens"] / (first - started), (meta["tokens"] - 1) / (last - first)


class LlamaBench(Runner):
    """llama.cpp's own llama-bench with the same threads, batch sizes and attention setting: prompt
    processing of the prompt's length, then decoding after as many tokens in the cache (`-d`),
    one repetition per round so that it interleaves with the others. It decodes without sampling
    (llama_decode alone) and times no first token: its TTFT is its prompt time. Greedy cases only."""

    def __init__(self, binary: str, model: Path, threads: int, lengths: dict[str, int]) -> None:
        self.binary, self.model, self.threads, self.lengths = binary, model, threads, lengths

    def _rate(self, *args: str) -> float:
        out = subprocess.run([self.binary, "-m", str(self.model), "-t", str(self.threads), "-fa", FLASH_ATTN,
                              "-r", "1", "-o", "json", *args], capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"llama-bench failed: {out.stderr[-2000:]}")
        return float(json.loads(out.stdout)[0]["avg_ts"])

    def run(self, prompt: str, sp: SamplingParams) -> tuple[float, float, float] | None:
        if sp.temperature > 0:
            return None
        n = self.lengths[prompt]
        prompt_tps = self._rate("-p", str(n), "-n", "0")
        decode_tps = self._rate("-p", "0", "-n", str(sp.max_tokens), "-d", str(n))
        return n / prompt_tps, prompt_tps, decode_tps


def single_runs(model: Path, threads: int, n_ctx: int, rounds: int, n_prompt: dict[str, int],
                llama_bench: str | None = None) -> dict[str, dict[str, dict[str, list[float]]]]:
    """Every runner on every case, `rounds` times, interleaved round by round so that a slow
    patch of the machine hits all runners alike. → {case: {runner: {metric: [values]}}}"""
    server = start_server(engine_env(model, threads, n_ctx, CACHE_RAM_MB="0"),
                          Path(tempfile.gettempdir()) / "ai-engine-bench.log")
    runners: dict[str, Runner] = {}
    try:
        runners[A] = BareLoop(model, threads, n_ctx)
        runners[B] = CreateCompletion(model, threads, n_ctx)
        runners[C] = EngineHTTP(server, stream=False)
        runners["(c') ai-engine over HTTP, streaming"] = EngineHTTP(server, stream=True)
        if llama_bench:
            lengths = {single_prompts()[k]: n for k, n in n_prompt.items()}
            runners[LLAMA_BENCH] = LlamaBench(llama_bench, model, threads, lengths)
        cases = single_cases()
        out: dict[str, dict[str, dict[str, list[float]]]] = {c: {} for c in cases}
        for name, runner in runners.items():  # warm-up: page the weights in, first-call costs
            runner.run(*cases["first turn, greedy"])
        for _ in range(rounds):
            for c, (prompt, sp) in cases.items():
                for name, runner in runners.items():
                    result = runner.run(prompt, sp)
                    if result is None:  # not a case this runner can do
                        continue
                    for metric, value in zip(("ttft", "prompt", "decode"), result):
                        out[c].setdefault(name, {"ttft": [], "prompt": [], "decode": []})[metric].append(value)
    finally:
        for runner in runners.values():
            runner.close()
        stop_server(server)
    return out


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
def interview(model: Path, threads: int, n_ctx: int, cache: bool, n_interviews: int,
              turns: int) -> tuple[list[list[float]], list[list[str]]]:
    """TTFT (ms, server-measured) per turn, per interview, and the prompts sent; interviews
    interleave turn by turn."""
    env = engine_env(model, threads, n_ctx, **({} if cache else {"CACHE_RAM_MB": "0"}))
    server = start_server(env, Path(tempfile.gettempdir()) / "ai-engine-bench-interview.log")
    histories = [[list(t) for t in CASES[i % len(CASES)]["turnos"]] for i in range(n_interviews)]
    ttfts: list[list[float]] = [[] for _ in range(n_interviews)]
    prompts: list[list[str]] = [[] for _ in range(n_interviews)]
    try:
        for turn in range(turns):
            for i, history in enumerate(histories):
                prompts[i].append(render_case_prompt(dict(CASES[i % len(CASES)], turnos=history)))
                r = requests.post(server.url + "/generate", timeout=300, json={
                    "prompt": prompts[i][-1], "max_length": 60, "temperature": 0.7, "seed": turn})
                r.raise_for_status()
                body = r.json()
                ttfts[i].append(body["metadata"]["ttft_ms"])
                history += [["Paciente", body["texto"] or "No sé."], ["Estudiante", QUESTIONS[turn % len(QUESTIONS)]]]
    finally:
        stop_server(server)
    return ttfts, prompts


def completion_interview(model: Path, threads: int, n_ctx: int, prompts: list[list[str]]) -> list[list[float]]:
    """(b) on the interview: the same transcripts, turn by turn, through one `Llama` and
    `create_completion` (its own reuse of the previous call's prefix, nothing more); TTFT in ms."""
    import llama_cpp as L

    d = SamplingParams()
    llm = L.Llama(str(model), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False,
                  flash_attn=FLASH_ATTN != "off")
    ttfts: list[list[float]] = [[] for _ in prompts]
    try:
        for turn in range(len(prompts[0])):
            for i, interview_prompts in enumerate(prompts):
                started = time.perf_counter()
                first = None
                for _chunk in llm.create_completion(
                        interview_prompts[turn], max_tokens=60, temperature=d.temperature, top_p=d.top_p,
                        top_k=d.top_k, min_p=d.min_p, repeat_penalty=d.repeat_penalty, seed=turn, stream=True):
                    first = first or time.perf_counter()
                ttfts[i].append(((first or time.perf_counter()) - started) * 1000)
    finally:
        llm.close()
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


def client_prompt(i: int, k: int) -> str:
    """Request k of client i: its own interview (a fixture case) with one more question."""
    case = CASES[i % len(CASES)]
    history = case["turnos"] + [["Paciente", "No sé."], ["Estudiante", QUESTIONS[(i + k) % len(QUESTIONS)]]]
    return render_case_prompt(dict(case, turnos=history))


def sse_events(response) -> Iterator[dict]:
    for line in response.iter_lines():
        if line.startswith(b"data: "):
            yield json.loads(line[len(b"data: "):])


def engine_request(url: str, prompt: str, seed: int) -> tuple[float, int]:
    """One streamed /generate: (time to the first token's event, tokens generated)."""
    started, first = time.perf_counter(), None
    with requests.post(url + "/generate", stream=True, timeout=600, json={
            "prompt": prompt, "max_length": CONCURRENT_TOKENS, "stop": [], "temperature": 0.8, "seed": seed,
            "stream": True}) as r:
        r.raise_for_status()
        for event in sse_events(r):
            first = first or time.perf_counter()
            if "texto" in event:
                return first - started, event["metadata"]["tokens"]
    raise RuntimeError("the stream ended without the final reply")


def llama_server_request(url: str, prompt: str, seed: int) -> tuple[float, int]:
    """The same request to llama-server's /completion, with the engine's default sampler chain
    (top-k first, then the repeat penalty over the last 64 tokens, top-p, min-p, temperature)."""
    d = SamplingParams()
    started, first = time.perf_counter(), None
    with requests.post(url + "/completion", stream=True, timeout=600, json={
            "prompt": prompt, "n_predict": CONCURRENT_TOKENS, "temperature": 0.8, "seed": seed, "stream": True,
            "top_k": d.top_k, "top_p": d.top_p, "min_p": d.min_p, "repeat_penalty": d.repeat_penalty,
            "repeat_last_n": 64, "samplers": ["top_k", "penalties", "top_p", "min_p", "temperature"],
            "cache_prompt": True}) as r:
        r.raise_for_status()
        for event in sse_events(r):
            first = first or time.perf_counter()
            if event.get("stop"):
                return first - started, event["tokens_predicted"]
    raise RuntimeError("the stream ended without the final event")


def measure_clients(url: str, request, clients: tuple[int, ...], requests_each: int) -> dict[int, dict[str, float]]:
    """Aggregate generated tokens/s and client-side TTFT percentiles with n clients at once, each
    sending `requests_each` requests one after the other."""
    out: dict[int, dict[str, float]] = {}
    for n in clients:
        ttfts: list[float] = []
        tokens = [0] * n

        def client(i: int) -> None:
            for k in range(requests_each):
                ttft, generated = request(url, client_prompt(i, k), i * 100 + k)
                tokens[i] += generated
                ttfts.append(ttft * 1000)

        wall = run_concurrently(client, n)
        ttfts.sort()
        out[n] = {"tokens_per_s": sum(tokens) / wall, "p50": ttfts[len(ttfts) // 2],
                  "p95": ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.95))]}
        print(f"  {n} clients: {out[n]}", flush=True)
    return out


def concurrency(model: Path, threads: int, n_ctx: int, clients: tuple[int, ...], requests_each: int,
                n_parallel: int) -> dict[int, dict[str, float]]:
    """N clients streaming /generate at once (each its own interview, sampled, CONCURRENT_TOKENS
    new tokens, no stops) on one engine with N_PARALLEL and its default settings."""
    server = start_server(engine_env(model, threads, n_ctx, N_PARALLEL=str(n_parallel), MAX_QUEUE="64"),
                          Path(tempfile.gettempdir()) / "ai-engine-bench-concurrency.log")
    try:
        print("ai-engine:", flush=True)
        return measure_clients(server.url, engine_request, clients, requests_each)
    finally:
        stop_server(server)


def find_llama_server(given: str | None) -> str | None:
    """--llama-server, else one on PATH, else the one scripts/build_llama_server.sh built for this
    llama-cpp-python version and these CMAKE_ARGS."""
    if given:
        return given
    if shutil.which("llama-server"):
        return shutil.which("llama-server")
    found = subprocess.run(["bash", str(ROOT / "scripts" / "build_llama_server.sh"), "--if-built"],
                           capture_output=True, text=True)
    return found.stdout.strip() if found.returncode == 0 and found.stdout.strip() else None


def llama_tool(server: str | None, name: str) -> str | None:
    """llama.cpp's `name` tool (llama-bench, llama-batched-bench): beside the llama-server found
    (scripts/build_llama_server.sh builds them together), else on PATH."""
    if server and (Path(server).parent / name).is_file():
        return str(Path(server).parent / name)
    return shutil.which(name)


def llama_server_concurrency(binary: str, model: Path, threads: int, n_ctx: int, clients: tuple[int, ...],
                             requests_each: int, n_parallel: int) -> dict[int, dict[str, float]]:
    """The same clients against llama.cpp's own llama-server with the engine's layout: n_parallel
    slots of n_ctx tokens each, the same attention setting, full-size sliding-window caches (as the
    engine: without them llama-server reads every prompt in full, finding no reusable prefix in
    Gemma 3's SWA layers), continuous batching (its default)."""
    argv = llama_server_argv(binary, model, threads, n_ctx, n_parallel, FLASH_ATTN)
    server = start_server({}, Path(tempfile.gettempdir()) / "ai-engine-bench-llama-server.log", argv=argv)
    try:
        print("llama-server:", flush=True)
        return measure_clients(server.url, llama_server_request, clients, requests_each)
    finally:
        stop_server(server)


def llama_server_argv(binary: str, model: Path, threads: int, n_ctx: int, n_parallel: int, flash_attn: str):
    """llama-server with the engine's layout (see llama_server_concurrency); a function of the port."""
    def argv(port: int) -> list[str]:
        return [binary, "-m", str(model), "-t", str(threads), "-tb", str(threads), "-c", str(n_ctx * n_parallel),
                "-np", str(n_parallel), "-fa", flash_attn, "--swa-full", "--host", "127.0.0.1", "--port", str(port),
                "--no-webui"]

    return argv


def think_range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX seconds, got {text!r}") from None
    if not 0 <= low <= high:
        raise argparse.ArgumentTypeError(f"expected 0 <= MIN <= MAX, got {text!r}")
    return low, high


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--turns", type=int, default=None,
                        help="interview turns (default 10); with --only class, questions per student (default 3, "
                        "2 with --model llama1b)")
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--no-transformers", action="store_true", help="skip (d) even if torch is installed")
    parser.add_argument("--only", choices=["single", "interview", "concurrency", "class"], action="append",
                        help="run only these parts (repeatable; default: single, interview and concurrency)")
    parser.add_argument("--n-parallel", type=int, default=DEFAULT_N_PARALLEL,
                        help="N_PARALLEL for the concurrency part (default: the engine's; another value "
                        "writes concurrency-npN.md beside it)")
    parser.add_argument("--flash-attn", choices=["off", "on", "auto"], default=Settings.load(env={}).flash_attn,
                        help="attention setting of every runner (default: the engine's FLASH_ATTN default)")
    parser.add_argument("--llama-server", help="llama-server binary to compare with (default: on PATH, or the "
                        "one scripts/build_llama_server.sh built)")
    group = parser.add_argument_group("class (--only class)")
    group.add_argument("--students", type=int, help="students at once (default 12, 6 with --model llama1b; another "
                       "number writes class-sN.md beside class.md)")
    group.add_argument("--cases", type=int, help="cases open, students spread round-robin (default 2)")
    group.add_argument("--think", type=think_range, default=(2.0, 6.0), metavar="MIN,MAX",
                       help="think time between a reply and the next question, uniform (default 2,6 seconds)")
    group.add_argument("--model", choices=["default", "llama1b"], default="default",
                       help="the default model, or a random Llama-3.2-1B-shaped Q4_K_M built once under "
                       "~/.cache/ai-engine/bench-models (replies capped at 40 tokens)")
    group.add_argument("--servers", choices=["engine", "llama-server", "both"], default="both",
                       help="servers to run the class on, one after the other (default both; llama-server only "
                       "when built)")
    group.add_argument("--seed", type=int, default=0, help="seed of the think times and question orders")
    group.add_argument("--warm", action="store_true",
                       help="run the engine twice with the same cases and environment, restarting it in between "
                       "(for a prompt cache on disk: PROMPT_CACHE_DIR); the second run is reported apart")
    group.add_argument("--socket-timeout", type=float, default=180.0,
                       help="how long a student waits for an answer (default 180 s; replies after 30 s count as "
                       "over 30 s either way)")
    group.add_argument("--max-minutes", type=float, default=10.0,
                       help="each server's class stops itself after this long (default 10)")
    args = parser.parse_args()
    for name in ("students", "cases", "turns"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    global FLASH_ATTN
    FLASH_ATTN = args.flash_attn
    machine = f"{read_cpu_info().model}, {physical_cores()} cores, {args.threads} threads"
    parts = args.only or ["single", "interview", "concurrency"]
    if args.model != "default" and parts != ["class"]:
        parser.error("--model is for the class part only: use it with --only class")
    RESULTS.mkdir(parents=True, exist_ok=True)
    if "class" in parts:
        import class_bench

        binary = find_llama_server(args.llama_server) if args.servers != "engine" else None
        part, class_header, result = class_bench.class_part(args, machine, binary, llama_server_argv)
        save(part, class_header, result)
    args.turns = args.turns or 10
    if set(parts) - {"class"}:
        model = ensure_default_model(ROOT / "models")
        header = f"Measured {date.today().isoformat()} on {machine}; model {model.name}."
        print(header, flush=True)
    if "single" in parts:
        save("single", header, single_part(model, args))
    if "interview" in parts:
        save("interview", header, interview_part(model, args))
    if "concurrency" in parts:  # the default N_PARALLEL's results feed the chart; others sit beside them
        save("concurrency" + ("" if args.n_parallel == DEFAULT_N_PARALLEL else f"-np{args.n_parallel}"), header,
             concurrency_part(model, args))
    others = sorted(p.stem for p in RESULTS.glob("concurrency-np*.md"))
    classes = sorted(p.stem for p in RESULTS.glob("class*.md"))
    report = "\n".join((RESULTS / f"{p}.md").read_text(encoding="utf-8")
                       for p in ("single", "interview", "concurrency", *others, *classes)
                       if (RESULTS / f"{p}.md").exists())
    (RESULTS / "bench.md").write_text(report, encoding="utf-8")
    print("\n" + report)
    chart()
    return 0


def save(part: str, header: str, result: tuple[list[str], dict]) -> None:
    lines, data = result
    (RESULTS / f"{part}.md").write_text("\n".join([header, ""] + lines) + "\n", encoding="utf-8")
    (RESULTS / f"{part}.json").write_text(json.dumps(data, indent=1), encoding="utf-8")


def single_part(model: Path, args) -> tuple[list[str], dict]:
    n_prompt = prompt_lengths(model)
    runs = single_runs(model, args.threads, args.n_ctx, args.rounds, n_prompt,
                       llama_tool(find_llama_server(args.llama_server), "llama-bench"))
    if not args.no_transformers:
        hf = transformers_fp32(model, args.threads, max(1, args.rounds // 2))
        if hf:
            runs["first turn, greedy"]["(d) transformers fp32"] = hf
    med = {p: {k: {m: statistics.median(v) for m, v in r.items()} for k, r in by.items()} for p, by in runs.items()}
    sim = SIMULATOR
    lines = [f"Single request: median of {args.rounds} runs (runners interleaved round by round), up to {NEW_TOKENS} "
             f"new tokens, flash attention {args.flash_attn} for all; the engine without its caches (every prompt "
             f"read in full). Two prompts: a fixture case's first turn ({n_prompt['first turn']} tokens) and the "
             f"same case 30 exchanges later ({n_prompt['turn 30']} tokens). Greedy: temperature 0, no repeat "
             f"penalty; (a) uses llama.cpp's greedy sampler. Simulator's sampling: temperature {sim.temperature}, "
             f"top_p {sim.top_p} (what the simulator sends) and the engine's defaults for the rest (top_k "
             f"{sim.top_k}, min_p {sim.min_p}, repeat penalty {sim.repeat_penalty}), seed {sim.seed}, given to every "
             "runner; (a) samples with the engine's native chain, (b) with create_completion's own chain; a "
             "sampled reply may end before the limit (decode rate per token)."
             + (" llama-bench is llama.cpp's own benchmark, built from the same llama.cpp "
                "(`scripts/build_llama_server.sh`), one repetition per round: the prompt's length of prompt "
                "processing, then decoding at that depth, without sampling; its time to first token is its "
                "prompt time." if LLAMA_BENCH in runs["first turn, greedy"] else ""), "",
             "| runner | case | decode tokens/s | prompt tokens/s | time to first token |", "|---|---|---|---|---|"]
    for p, by in med.items():
        for name, m in by.items():
            lines.append(f"| {name} | {p} | {m['decode']:.1f} | {m['prompt']:.0f} | {m['ttft'] * 1000:.0f} ms |")
    lines.append("")
    for p, by in med.items():
        a, b, c = (by[k]["decode"] for k in (A, B, C))
        tool = f", (c)/llama-bench = {c / by[LLAMA_BENCH]['decode']:.3f}" if LLAMA_BENCH in by else ""
        lines.append(f"Decode, {p}: (c)/(a) = **{c / a:.3f}**, (c)/(b) = **{c / b:.3f}**{tool}.")
    lines.append("")
    return lines, {"median": med, "runs": runs, "prompt_tokens": n_prompt}


def prompt_lengths(model: Path) -> dict[str, int]:
    import llama_cpp as L

    vocab = L.Llama(str(model), vocab_only=True, verbose=False)
    try:
        return {p: len(vocab.tokenize(text.encode(), add_bos=True, special=True)) for p, text in single_prompts().items()}
    finally:
        vocab.close()


def interview_part(model: Path, args) -> tuple[list[str], dict]:
    series, names = {}, {}
    for cache in (True, False):
        for n in (1, 4):
            series[(cache, n)], prompts = interview(model, args.threads, args.n_ctx, cache, n, args.turns)
            names[(cache, n)] = f"{'cache' if cache else 'no cache'}, {n} interview{'s' if n > 1 else ''}"
            if cache:  # (b) on the very same transcripts
                series[("b", n)] = completion_interview(model, args.threads, args.n_ctx, prompts)
                names[("b", n)] = f"(b) create_completion, {n} interview{'s' if n > 1 else ''}"
            print(f"interview cache={cache} n={n} done", flush=True)
    series = {k: series[k] for k in names}
    lines = [f"Interview: time to first token per turn (ms, median over interviews), {args.turns} turns, "
             "the engine's replies fed back; (b) replays the same transcripts through `create_completion`. "
             "The engine reuses only KV that reading the prompt in full computes, so its replies are the same "
             "bits with and without the cache: each turn it reads the previous reply again (its KV from "
             "decoding differs in the last bits); create_completion reuses it.", "",
             "| turn | " + " | ".join(names.values()) + " |", "|---" * (len(series) + 1) + "|"]
    per_turn = {k: [statistics.median(t[i] for t in v) for i in range(args.turns)] for k, v in series.items()}
    for turn in range(args.turns):
        lines.append(f"| {turn + 1} | " + " | ".join(f"{per_turn[k][turn]:.0f}" for k in series) + " |")
    late = slice(4, args.turns)
    for n in (1, 4):
        with_c = statistics.median(x for t in series[(True, n)] for x in t[late])
        without = statistics.median(x for t in series[(False, n)] for x in t[late])
        plain = statistics.median(x for t in series[("b", n)] for x in t[late])
        lines.append(f"\nTurns 5-{args.turns}, {n} interview{'s' if n > 1 else ''}: median TTFT {with_c:.0f} ms with "
                     f"the cache vs {without:.0f} ms without: ratio **{with_c / without:.3f}**; (b) "
                     f"create_completion {plain:.0f} ms ((c)/(b) = {with_c / plain:.2f}).")
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
    p.flash_attn_type = flash_attn_type(FLASH_ATTN)
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


def batched_bench(binary: str, model: Path, threads: int, counts: tuple[int, ...]) -> dict[int, float]:
    """llama.cpp's own llama-batched-bench: n sequences of a 200-token prompt, then 64 tokens each
    decoded together (no sampling); its decode throughput (S_TG) per n."""
    out = subprocess.run([binary, "-m", str(model), "-t", str(threads), "-tb", str(threads), "-c", str(512 * max(counts)),
                          "-b", "512", "-ub", "512", "-npp", "200", "-ntg", "64", "-npl", ",".join(map(str, counts)),
                          "-fa", FLASH_ATTN, "--output-format", "jsonl"], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"llama-batched-bench failed: {out.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out.stdout + out.stderr).splitlines() if line.startswith('{"n_kv_max"')]
    return {int(r["pl"]): float(r["speed_tg"]) for r in rows}


def concurrency_part(model: Path, args) -> tuple[list[str], dict]:
    counts = (1, 2, 4, 8)
    floor = batched_floor(model, args.threads, counts)
    binary = find_llama_server(args.llama_server)
    tool = llama_tool(binary, "llama-batched-bench")
    own = batched_bench(tool, model, args.threads, counts) if tool else {}
    result = concurrency(model, args.threads, args.n_ctx, counts, 3, args.n_parallel)
    server = (llama_server_concurrency(binary, model, args.threads, args.n_ctx, counts, 3, args.n_parallel)
              if binary else None)
    one = result[1]["tokens_per_s"]
    lines = [f"Concurrent clients over HTTP (N_PARALLEL={args.n_parallel}; each client streams 3 requests of "
             f"{CONCURRENT_TOKENS} sampled tokens for its own interview, prompts included; time to first token "
             "as the client sees it), beside llama.cpp's own decode throughput with the same number of "
             "sequences per llama_decode (no prompts, no sampling, no HTTP)"
             + (" and llama.cpp's llama-server with the same clients, slots and settings" if server else "") + ":",
             "", "| clients | ai-engine tokens/s | vs 1 client | TTFT p50 | TTFT p95 | "
             + ("llama-server tokens/s | vs 1 client | TTFT p50 | TTFT p95 | " if server else "")
             + "llama.cpp batched decode | vs 1 sequence |",
             "|---|---|---|---|---|" + ("---|---|---|---|" if server else "") + "---|---|"]
    for n, r in result.items():
        row = f"| {n} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / one:.2f}x | {r['p50']:.0f} ms | {r['p95']:.0f} ms | "
        if server:
            s1, sn = server[1]["tokens_per_s"], server[n]
            row += f"{sn['tokens_per_s']:.1f} | {sn['tokens_per_s'] / s1:.2f}x | {sn['p50']:.0f} ms | {sn['p95']:.0f} ms | "
        lines.append(row + f"{floor[n]:.1f} | {floor[n] / floor[1]:.2f}x |")
    if server:
        lines += ["", f"4 clients: ai-engine {result[4]['tokens_per_s'] / one:.2f}x one client, llama-server "
                      f"{server[4]['tokens_per_s'] / server[1]['tokens_per_s']:.2f}x; ai-engine / llama-server "
                      f"aggregate = {result[4]['tokens_per_s'] / server[4]['tokens_per_s']:.2f}."]
    else:
        lines += ["", "llama-server is not built here (`scripts/build_llama_server.sh` builds it from the "
                      "llama.cpp that llama-cpp-python vendors), so its numbers are not in this run."]
    if own:
        lines += ["", "llama.cpp's own `llama-batched-bench` (n sequences of a 200-token prompt, then 64 tokens "
                      "each decoded together, no sampling), decode tokens/s: "
                      + ", ".join(f"{n} → {own[n]:.1f} ({own[n] / own[1]:.2f}x)" for n in counts if n in own) + "."]
    lines.append("")
    data = {str(n): {**r, "llama_cpp_floor": floor[n], **({"batched_bench": own[n]} if n in own else {})}
            for n, r in result.items()}
    if server:
        for n, r in server.items():
            data[str(n)]["llama_server"] = r
    return lines, data


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
    if "single" in data and "first turn, greedy" in data["single"]["median"]:
        med = data["single"]["median"]
        names = list(med["first turn, greedy"])
        height = 0.8 / len(med)
        for k, (p, by) in enumerate(med.items()):
            axes[0].barh([i + k * height for i in range(len(names))], [by.get(n, {}).get("decode", 0) for n in names],
                         height=height, label=p)
        axes[0].set_yticks([i + height * (len(med) - 1) / 2 for i in range(len(names))], names)
        axes[0].set_xlabel("decode tokens/s, one request")
        axes[0].invert_yaxis()
        axes[0].legend()
    if "interview" in data:
        for name, ys in data["interview"]["per_turn"].items():
            axes[1].plot(range(1, len(ys) + 1), ys, marker="o", linestyle=":" if name.startswith("(b)") else "-" if name.startswith("cache") else "--",
                         label=name)
        axes[1].set_xlabel("interview turn")
        axes[1].set_ylabel("time to first token (ms)")
        axes[1].set_yscale("log")
        axes[1].legend()
    if "concurrency" in data:
        conc = data["concurrency"]
        series = {"ai-engine": [r["tokens_per_s"] for r in conc.values()],
                  "llama.cpp batched decode (no HTTP, no sampling)": [r["llama_cpp_floor"] for r in conc.values()]}
        if all("llama_server" in r for r in conc.values()):
            series["llama-server"] = [r["llama_server"]["tokens_per_s"] for r in conc.values()]
        width = 0.8 / len(series)
        for k, (name, ys) in enumerate(series.items()):
            axes[2].bar([i + k * width for i in range(len(conc))], ys, width=width, label=name)
        axes[2].set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(conc))], list(conc))
        axes[2].set_xlabel("concurrent clients")
        axes[2].set_ylabel("aggregate tokens/s")
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "bench.png", dpi=110)
    print(f"chart: {RESULTS / 'bench.png'}")


if __name__ == "__main__":
    raise SystemExit(main())
