"""What several test files share: the default model's name, engines built for a test (the real
model in process, or tests/fake_runtime.py), a Flask app on fake runtimes, requests to a
running server, and server-sent events.

Fixtures live in tests/conftest.py; this module holds plain functions and classes, imported by
the test files that use them.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import requests

from engine.generation import ReplyText, SamplingParams, StopRules
from tests.server_process import Server, start_server, stop_server

if TYPE_CHECKING:
    from engine.scheduler import Scheduler, Sequence

DEFAULT_MODEL = "gemma-3-270m-q4_k_m.gguf"
DATA = Path(__file__).parent / "data"
MiB = 1 << 20
GREEDY = SamplingParams(temperature=0, repeat_penalty=1.0, max_tokens=100)


def load_cases() -> list[dict]:
    """The fixture patient cases (tests/data/patient_cases.json)."""
    with (DATA / "patient_cases.json").open(encoding="utf-8") as f:
        return json.load(f)["cases"]


def link_or_copy(src: Path, dst: Path) -> None:
    """Put `src` at `dst` without copying 250 MB where a hard link is possible. A symlink is
    followed: the link is to the file itself (a link to a symlink would lead outside MODEL_PATH)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(Path(src).resolve(), dst)
    except OSError:
        shutil.copyfile(src, dst)


# -- engines in process ---------------------------------------------------------------------------

def real_scheduler(model_file: Path, *, n_ctx: int = 1024, n_parallel: int = 1, n_batch: int = 512,
                   cache_bytes: int = 0, max_queue: int = 4, flash_attn: str = "off", **scheduler_kwargs) -> Scheduler:
    """A scheduler on the real model: two threads, CPU only, F16 KV cache (what the exactness
    tests assume). The caller closes it."""
    import llama_cpp as L

    from engine.runtime import LlamaRuntime
    from engine.scheduler import Scheduler

    runtime = LlamaRuntime(model_file, n_ctx=n_ctx, n_parallel=n_parallel, n_batch=n_batch, n_threads=2,
                           n_threads_batch=2, n_gpu_layers=0, flash_attn=flash_attn, kv_type=L.GGML_TYPE_F16)
    return Scheduler(runtime, cache_bytes=cache_bytes, max_queue=max_queue, **scheduler_kwargs)


def fake_scheduler(path: str | Path = "fake.gguf", *, cache_bytes: int = 0, max_queue: int = 16, disk=None,
                   **runtime_kwargs) -> Scheduler:
    """A scheduler on tests/fake_runtime.py (no model; milliseconds), with the prompt cache on
    `disk` (a DiskCache) if given. The caller closes it."""
    from engine.scheduler import Scheduler
    from tests.fake_runtime import FakeRuntime

    return Scheduler(FakeRuntime(path, **runtime_kwargs), cache_bytes=cache_bytes, max_queue=max_queue, disk=disk)


def submit(eng: Scheduler, prompt: str, params: SamplingParams = GREEDY, reply: ReplyText | None = None,
           timeout_s: float = 600) -> Sequence:
    """Queue `prompt` on a scheduler as the HTTP layer does, with a deadline `timeout_s` from now.
    The default only keeps a hung test from hanging the suite; it is long enough that deadline
    admission never refuses a request on a slow or busy machine. Tests of deadlines pass theirs."""
    started = time.perf_counter()
    reply = ReplyText(StopRules()) if reply is None else reply
    return eng.submit(eng.tokenize(prompt), params, reply, started, started + timeout_s)


class StepClock:
    """A clock that only the runtime's decode steps move, `step_s` each (plus `row_s` for each token
    in the fake runtime's batch): installed, it is what
    `time.perf_counter()` reads, so a scheduler's deadlines, its measured speed and what it admits
    depend on the steps it takes, not on how fast or how busy the machine is."""

    def __init__(self, step_s: float, row_s: float = 0.0) -> None:
        self.step_s, self.row_s = step_s, row_s  # row_s: each token in the batch adds this much
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def install(self, monkeypatch, eng: Scheduler) -> "StepClock":
        decode = eng.runtime.decode

        def step(start: int = 0, end: int | None = None):
            rows = len(getattr(eng.runtime, "_batch", ())) if self.row_s else 0  # the fake runtime's batch
            rows = (rows if end is None else end) - start  # the rows this decode holds
            self.now += self.step_s + self.row_s * rows  # only the scheduler's thread decodes
            return decode(start, end)

        monkeypatch.setattr(eng.runtime, "decode", step)
        monkeypatch.setattr(time, "perf_counter", self)
        return self


# The simulator's temperature-0 call (repeat penalty on), as the conversation-cache tests send it.
SIMULATOR_GREEDY = SamplingParams(temperature=0, max_tokens=24)


def cache_scheduler(model_file: Path, *, cache: bool, n_parallel: int, flash_attn: str = "off",
                    **scheduler_kwargs) -> Scheduler:
    """A real-model scheduler for the conversation-cache tests: N_CTX 2048, N_BATCH 512, and 256 MiB
    of conversation cache (or none, the reference every reply is compared with)."""
    return real_scheduler(model_file, n_ctx=2048, n_parallel=n_parallel, n_batch=512, max_queue=8,
                          cache_bytes=(256 << 20) if cache else 0, flash_attn=flash_attn, **scheduler_kwargs)


def simulator_reply(eng: Scheduler, prompt: str, params: SamplingParams = SIMULATOR_GREEDY):
    """The finished generation for `prompt`, its reply cleaned as the simulator's route does."""
    from engine.patient import reply_text

    return submit(eng, prompt, params, reply_text(None)).wait()


def long_history(case: dict, exchanges: int) -> list[list[str]]:
    """The case's transcript with `exchanges` more question-answer pairs before its last question."""
    turns = [list(t) for t in case["turnos"]]
    filler = [["Paciente", "No sé, la verdad, me cuesta mucho hablar de esto."],
              ["Estudiante", "¿Y cómo te sentís con eso, en general?"]]
    return turns[:-1] + filler * exchanges + turns[-1:]


# -- the Flask app on fake runtimes ----------------------------------------------------------------

def tiny_gguf(path: Path) -> Path:
    """A GGUF with a header and metadata only: enough for the file checks and /api/tags."""
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(path.stem)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


ALIAS_FILE = "Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf"  # models/catalog.toml: llama3.1:8b


class Fakes:
    """A model manager on fake runtimes (models a, b, c and an alias's file under a temporary
    MODEL_PATH), with what the tests look at; `app()` is the engine's Flask app on it."""

    def __init__(self, tmp_path: Path, *, sizes: dict[str, int] | None = None, step_delay_s: float = 0.0,
                 load_delay_s: float = 0.0, **settings) -> None:
        from engine.model_manager import ModelManager
        from engine.settings import Settings

        self.dir = tmp_path / "models"
        for name in ("a.gguf", "b.gguf", "c.gguf", ALIAS_FILE):
            tiny_gguf(self.dir / name)
        self.settings = Settings.load(env={}, **{"model_path": self.dir, "n_ctx": 256, "n_parallel": 2,
                                                 "n_batch": 64, "request_timeout_s": 5,
                                                 "prompt_cache_dir": str(tmp_path / "prompt-cache"), **settings})
        self.sizes = sizes or {}
        self.step_delay_s, self.load_delay_s = step_delay_s, load_delay_s
        self.loads: list[str] = []
        self.runtimes: list = []
        self.manager = ModelManager(self.settings, runtime_factory=self.runtime, planner=self.plan)

    def runtime(self, spec, n_gpu: int):
        from tests.fake_runtime import FakeRuntime

        self.loads.append(spec.path.name)
        time.sleep(self.load_delay_s)
        rt = FakeRuntime(spec.path, n_ctx=self.settings.n_ctx, n_parallel=self.settings.n_parallel,
                         n_batch=self.settings.n_batch, reply=f"Soy {spec.path.stem}.", step_delay_s=self.step_delay_s)
        self.runtimes.append(rt)
        return rt

    def plan(self, spec) -> tuple[int, int, int, str]:
        return 0, self.sizes.get(spec.path.name, 100 * MiB), 0, f"fake plan for {spec.path.name}"

    def load(self, name: str = "a.gguf") -> "Fakes":
        from engine.model_files import ModelSpec

        self.manager.load(ModelSpec(self.dir / name))
        return self

    def names(self) -> set[str]:
        return {m.name for m in self.manager.resident()}

    def app(self):
        from engine.app import create_app

        return create_app(self.settings, self.manager)


# -- a running server over HTTP --------------------------------------------------------------------

def server_fixture(model_dir: Path, tmp_path_factory, **env) -> Iterator[Server]:
    """Body of a server fixture: `python -m engine serve` on the default model under `model_dir`
    with N_CTX=2048 and `env` on top, stopped afterwards (`yield from server_fixture(...)`)."""
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    srv = start_server({"MODEL_PATH": str(model_dir), "MODEL": DEFAULT_MODEL, "N_CTX": "2048",
                        "LOG_LEVEL": "INFO", **env}, log_path)
    yield srv
    stop_server(srv)


def post(server, path: str, body=None, timeout: float = 120, **kwargs) -> requests.Response:
    return requests.post(server.url + path, json=body, timeout=timeout, **kwargs)


def generate(server, **body) -> dict:
    """A non-streamed /generate that must succeed: its JSON body."""
    r = post(server, "/generate", body)
    assert r.status_code == 200, r.text
    return r.json()


def sse_events(lines: Iterable[bytes | str]) -> Iterator[dict]:
    """The JSON payloads of server-sent events (`data: {...}` lines), as they arrive."""
    for line in lines:
        if isinstance(line, bytes):
            line = line.decode("utf-8")
        if line.startswith("data: "):
            yield json.loads(line[len("data: "):])


def stream(server, **body) -> tuple[list[dict], dict]:
    """A streamed /generate that must succeed: (its token events, its final event)."""
    with requests.post(server.url + "/generate", json={**body, "stream": True}, stream=True, timeout=120) as r:
        assert r.status_code == 200, r.text
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = list(sse_events(r.iter_lines()))
    assert events and "texto" in events[-1], events
    return events[:-1], events[-1]


def wait_until(condition, timeout_s: float = 30, interval_s: float = 0.05, what: str = "the condition"):
    """Poll `condition()` until it returns something true, and return that. A guard against
    hanging, not a claim about speed: it fails only when `timeout_s` passes first."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout_s} s")
        time.sleep(interval_s)
