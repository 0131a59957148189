"""Several models resident at once, within a memory budget, freed only when nobody uses them.

One `ModelManager` per app (attached by `create_app`). Each resident model is a `LoadedModel`: a
llama.cpp runtime and the scheduler that batches its requests. Requests name a model (or take the
default one) and get a `Lease`; every use of a model's llama.cpp objects (tokenizing, chat
templates, decoding, state save/restore) happens while a lease is held, and a model is closed
only once its last lease has ended. Nothing is freed from under a thread.

Lifecycle, as Ollama does it:
- A model that is not resident is loaded on demand (unless LOAD_ON_REQUEST is off); two requests
  for the same model wait for one load.
- It stays resident for `keep_alive` after its last request (the request's own, else KEEP_ALIVE;
  the default model, loaded at start-up or by /load-model, stays until a request says otherwise):
  0 unloads it as soon as it is idle, a negative duration keeps it loaded.
- A load that does not fit MAX_LOADED_MODELS or the memory budget (MEMORY_BUDGET_MB, RAM; and the
  free VRAM for GPU layers) evicts idle models, least recently used first. When only busy models
  could make room, the least recently used one stops taking new requests, finishes those it has,
  and is closed; the load waits its turn (first come, first served) until the request's deadline,
  then answers 503 with Retry-After. A model larger than the whole budget is refused at once.
- A model whose scheduler thread has stopped (engine/scheduler.py, `failed`) is unhealthy: requests
  for it are answered 503 at once, `healthy` turns false for /health, and loading it again (start-up's
  path, POST /load-model) replaces it with a fresh one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from engine.admission import EngineFailed
from engine.errors import EngineError, ModelLoadError, ModelNotReady
from engine.metrics import Metrics
from engine.model_files import Adapter, ModelFiles, ModelSpec, check_gguf_file
from engine.prompt_cache import ResponseCache
from engine.settings import KV_CACHE_TYPES, Settings

log = logging.getLogger(__name__)

MiB = 1 << 20


class ModelsBusy(EngineError):
    """No room for another model now: the resident ones are in use (503 + Retry-After)."""

    status = 503

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)} if retry_after else None)


class LoadForbidden(EngineError):
    """The request names a model that is not loaded, and LOAD_ON_REQUEST is off."""

    status = 403


@dataclass(eq=False)
class LoadedModel:
    """A resident model: its scheduler (which owns the llama.cpp runtime) and its bookkeeping."""

    engine: object  # engine.scheduler.Scheduler (or one on a test runtime)
    spec: ModelSpec
    name: str
    load_seconds: float
    gpu_layers: int = 0  # layers llama.cpp was asked to offload (-1: all)
    ram_bytes: int = 0  # the planner's estimate: weights + KV cache + buffers (+ conversation cache)
    vram_bytes: int = 0
    loaded_at: float = field(default_factory=time.time)
    stamp: tuple = ()  # the file's (mtime, size) when loaded: a changed file is loaded again
    # lifecycle, guarded by the manager's lock
    leases: int = 0
    last_used: float = field(default_factory=time.monotonic)
    keep_alive_s: float | None = None  # after the last request; None: until evicted
    expires_at: float | None = None  # monotonic; None: no expiry
    retiring: bool = False  # takes no new leases; closed when the last one ends

    @property
    def path(self) -> Path:
        return self.spec.path

    @property
    def adapters(self) -> tuple[Adapter, ...]:
        return self.spec.adapters

    @property
    def preset(self) -> str | None:
        return self.spec.preset

    def describe_adapters(self) -> list[dict]:
        return [{"name": a.name, "scale": a.scale} for a in self.adapters]

    @property
    def n_ctx(self) -> int:
        return self.engine.n_ctx

    @property
    def healthy(self) -> bool:
        """False once its scheduler thread has stopped after an internal error (see `failure`)."""
        return not self.engine.failed

    @property
    def failure(self) -> str | None:
        """Why its scheduler stopped; None while it runs."""
        return self.engine.failure

    @property
    def metadata(self) -> dict[str, str]:
        """The GGUF's metadata as llama.cpp read it (strings), arrays excluded."""
        return self.engine.metadata

    @property
    def expires_in_s(self) -> float | None:
        """Seconds until it unloads when idle; None: it stays (pinned, or in use)."""
        if self.leases or self.expires_at is None:
            return None
        return max(0.0, self.expires_at - time.monotonic())


class Lease:
    """The right to use one resident model until `release()` (or the end of a `with` block)."""

    def __init__(self, manager: "ModelManager", model: LoadedModel, load_seconds: float,
                 keep_alive_s: float | None) -> None:
        self.manager, self.model, self.load_seconds = manager, model, load_seconds
        self._keep_alive_s = keep_alive_s
        self._released = False
        self._lock = threading.Lock()

    def release(self) -> None:
        """Idempotent: a stream closed twice, or an error path after a close, releases once."""
        with self._lock:
            if self._released:
                return
            self._released = True
        self.manager._release(self.model, self._keep_alive_s)

    def __enter__(self) -> LoadedModel:
        return self.model

    def __exit__(self, *exc) -> None:
        self.release()


@dataclass(eq=False)
class _Loading:
    """A load in progress, which other requests for the same model wait on."""

    key: tuple
    ram_bytes: int
    vram_bytes: int
    done: threading.Event = field(default_factory=threading.Event)
    model: LoadedModel | None = None
    error: BaseException | None = None


RuntimeFactory = Callable[[ModelSpec, int], object]


class ModelManager:
    """The models of one app: which are resident, leases on them, loading and unloading."""

    def __init__(self, settings: Settings, runtime_factory: RuntimeFactory | None = None,
                 planner: Callable[[ModelSpec], tuple[int, int, int, str]] | None = None) -> None:
        """`runtime_factory(spec, n_gpu_layers)` builds a model's runtime (default: llama.cpp's);
        `planner(spec)` gives (n_gpu_layers, RAM bytes, VRAM bytes, log line) (default: the
        offload planner). Tests inject both to run the HTTP surfaces on a fast fake model."""
        self.settings = settings
        self.files = ModelFiles(settings)
        self.model_dir = self.files.model_dir
        self.responses = ResponseCache(settings.response_cache_size)
        self.metrics = Metrics()
        self._runtime_factory = runtime_factory or _llama_runtime(settings)
        self._planner = planner or _offload_planner(settings)
        from engine.startup import memory_budget

        self.ram_budget, self.vram_budget = memory_budget(settings)
        self._cond = threading.Condition()
        self._resident: dict[tuple, LoadedModel] = {}
        self._retiring: set[LoadedModel] = set()
        self._loading: dict[tuple, _Loading] = {}
        self._room_queue: deque[object] = deque()  # loads waiting for room, in arrival order
        self._default_key: tuple | None = None
        self.default_spec: ModelSpec | None = None
        self.started = False  # the start-up model has loaded (/health is 503 before)
        self._closed = False
        self._reaper = threading.Thread(target=self._reap, name="model-reaper", daemon=True)
        self._reaper.start()
        self.metrics.bind_models(self)

    # -- what is resident ---------------------------------------------------------------------
    @property
    def default(self) -> LoadedModel | None:
        """The default model (requests without a `model`), if it is resident."""
        with self._cond:
            return self._resident.get(self._default_key) if self._default_key else None

    @property
    def ready(self) -> bool:
        return self.started and not self._closed

    @property
    def loading(self) -> bool:
        with self._cond:
            return bool(self._loading)

    @property
    def healthy(self) -> bool:
        """False while a resident model's scheduler has stopped (see `failures`): the engine cannot
        serve that model until it is restarted or the model is loaded again."""
        return not self.failures()

    def failures(self) -> dict[str, str]:
        """Resident models whose scheduler has stopped: name → why."""
        return {m.name: m.failure for m in self.resident() if not m.healthy}

    def resident(self) -> list[LoadedModel]:
        """Resident models, most recently used first (those closing excluded)."""
        with self._cond:
            return sorted(self._resident.values(), key=lambda m: -m.last_used)

    def closing(self) -> list[LoadedModel]:
        """Models taken out of service that still finish requests or are being freed."""
        with self._cond:
            return list(self._retiring)

    def is_default(self, model: LoadedModel) -> bool:
        return model.spec.key == self._default_key

    # -- leases -------------------------------------------------------------------------------
    def acquire(self, name: str | None = None, *, keep_alive_s: float | None = None,
                deadline: float | None = None) -> Lease:
        """A lease on the model `name` means (the default model when empty), loading it first
        when it is not resident. `keep_alive_s` is the request's keep_alive (None: the default
        rule); `deadline` (time.perf_counter) bounds the wait for room."""
        if name and name.strip():
            spec = self.files.resolve(name)
        elif self.default_spec is not None:
            spec = self.default_spec
        else:
            raise ModelNotReady("no model is loaded yet; retry shortly or POST /load-model")
        if not self.settings.load_on_request:
            keep_alive_s = None  # a clinic that pins its models: requests cannot unload them either
        return self._lease(spec, keep_alive_s, deadline, on_request=True)

    def load(self, spec: ModelSpec, *, make_default: bool = True) -> tuple[LoadedModel, float]:
        """Load `spec` (or find it resident) and, with `make_default`, make it the default model:
        start-up and /load-model. Returns the model and the seconds spent loading (0: resident).
        Waits for room at most REQUEST_TIMEOUT_S."""
        deadline = time.perf_counter() + self.settings.request_timeout_s
        lease = self._lease(spec, None, deadline, on_request=False)
        try:
            if make_default:
                with self._cond:
                    previous = self._resident.get(self._default_key) if self._default_key else None
                    self._default_key, self.default_spec = spec.key, spec
                    lease.model.keep_alive_s = None  # the default stays until a request says otherwise
                    if previous is not None and previous is not lease.model:  # now an ordinary model
                        previous.keep_alive_s = self._natural_keep_alive(previous.spec)
                        if previous.leases == 0 and previous.keep_alive_s is not None:
                            previous.expires_at = time.monotonic() + previous.keep_alive_s
                    self.started = True
                    self._cond.notify_all()
            return lease.model, lease.load_seconds
        finally:
            lease.release()

    def unload(self, name: str | None) -> bool:
        """Unload the resident model `name` means once its requests end (Ollama's keep_alive 0
        with no prompt); False when it is not resident."""
        spec = self.files.resolve(name) if name and name.strip() else self.default_spec
        with self._cond:
            model = self._resident.get(spec.key) if spec is not None else None
            if model is None:
                return False
            self._retire(model)
            return True

    def _lease(self, spec: ModelSpec, keep_alive_s: float | None, deadline: float | None,
               on_request: bool) -> Lease:
        key = spec.key
        ticket = object()
        with self._cond:
            while True:
                if self._closed:
                    raise ModelNotReady("the engine is shutting down")
                model = self._resident.get(key)
                if model is not None and model.stamp != _stamp(model.path):
                    log.info("%s changed on disk: loading it again", model.name)
                    self._retire(model)  # requests that hold it finish on the old file
                    model = None
                if model is not None and not model.healthy:
                    if on_request:
                        raise EngineFailed(model.name, model.failure)
                    log.warning("%s is unhealthy (%s): loading it again", model.name, model.failure)
                    self._retire(model)
                    model = None
                if model is not None:
                    model.leases += 1
                    model.last_used = time.monotonic()
                    return Lease(self, model, 0.0, keep_alive_s)
                loading = self._loading.get(key)
                if loading is not None:  # someone loads it: wait for that load, not a second one
                    self._cond.release()
                    try:
                        loading.done.wait(_remaining(deadline))
                    finally:
                        self._cond.acquire()
                    if loading.error is not None:
                        raise loading.error
                    if not loading.done.is_set():
                        raise ModelsBusy(f"timed out waiting for {spec.path.name} to load", retry_after=5)
                    continue
                if on_request and not self.settings.load_on_request:
                    raise LoadForbidden(
                        f"model '{self.files.display_name(spec.path)}' is not loaded, and this engine loads "
                        "models only at start-up or through POST /load-model (LOAD_ON_REQUEST=off)",
                        field="model")
                break
        # Not resident and nobody loads it: plan it (reads the GGUF header) outside the lock.
        check_gguf_file(spec.path)
        for adapter in spec.adapters:
            check_gguf_file(adapter.path)
        n_gpu, ram, vram, message = self._planner(spec)
        with self._cond:
            if key in self._loading or key in self._resident:  # another request got there first
                pass
            else:
                self._make_room(spec, ram, vram, deadline, ticket)
                loading = self._loading[key] = _Loading(key, ram, vram)
                self._cond.notify_all()
                return self._finish_load(spec, loading, n_gpu, message, keep_alive_s)
        return self._lease(spec, keep_alive_s, deadline, on_request)

    def _finish_load(self, spec: ModelSpec, loading: _Loading, n_gpu: int, message: str,
                     keep_alive_s: float | None) -> Lease:
        """Build the model (outside the lock, which the caller holds: released here)."""
        self._cond.release()
        try:
            log.info("%s", message)
            started = time.perf_counter()
            try:
                engine = self._build_engine(spec, n_gpu)
            except EngineError:
                raise
            except Exception as exc:  # llama-cpp-python raises ValueError with little detail
                size = spec.path.stat().st_size if spec.path.exists() else 0
                log.warning("llama.cpp could not load %s: %s", spec.path, exc)  # the full path for the operator
                raise ModelLoadError(
                    f"llama.cpp could not load {spec.path.name} ({size:,} bytes): {self.files.public_text(str(exc))}. "
                    "The file may be "
                    "truncated, not a model GGUF, or of an architecture this llama.cpp build does not "
                    "support") from exc
            seconds = time.perf_counter() - started
        except BaseException as exc:
            with self._cond:
                loading.error = exc
                del self._loading[loading.key]
                loading.done.set()
                self._cond.notify_all()
            self._cond.acquire()  # the caller's `with` releases it
            raise
        model = LoadedModel(engine=engine, spec=spec, name=self.files.display_name(spec.path),
                            load_seconds=seconds, gpu_layers=n_gpu, ram_bytes=loading.ram_bytes,
                            vram_bytes=loading.vram_bytes, stamp=_stamp(spec.path), leases=1,
                            keep_alive_s=self._natural_keep_alive(spec))
        log.info("loaded %s in %.2f s (n_ctx=%d per sequence, n_parallel=%d, gpu_layers=%d, about %d MiB)",
                 model.name, seconds, self.settings.n_ctx, self.settings.n_parallel, n_gpu, model.ram_bytes // MiB)
        self._cond.acquire()
        self._resident[loading.key] = model
        del self._loading[loading.key]
        loading.model = model
        loading.done.set()
        self._cond.notify_all()
        self.metrics.model_loads.inc()
        return Lease(self, model, seconds, keep_alive_s)

    def _natural_keep_alive(self, spec: ModelSpec) -> float | None:
        """How long a model stays after its last request when the request did not say: the
        default model until evicted, others KEEP_ALIVE (None: forever)."""
        if spec.key == self._default_key or not self.settings.load_on_request:
            return None
        return self.settings.keep_alive_s

    def _build_engine(self, spec: ModelSpec, n_gpu: int):
        from engine.scheduler import Scheduler

        s = self.settings
        runtime = self._runtime_factory(spec, n_gpu)
        try:
            return Scheduler(runtime, cache_bytes=s.cache_ram_mb << 20, max_queue=s.max_queue, metrics=self.metrics,
                             prefill_chunk=s.prefill_chunk, disk=_disk_cache(s, spec))
        except BaseException:
            runtime.close()
            raise

    def _release(self, model: LoadedModel, keep_alive_s: float | None) -> None:
        with self._cond:
            model.leases -= 1
            model.last_used = time.monotonic()
            # The request's keep_alive, else the model's own rule (each request resets it, as in Ollama).
            if keep_alive_s is None:
                model.keep_alive_s = self._natural_keep_alive(model.spec)
            else:
                model.keep_alive_s = None if keep_alive_s < 0 else keep_alive_s
            if model.leases == 0:
                if model.retiring:
                    self._close_later(model)
                elif model.keep_alive_s == 0:
                    self._retire(model)
                else:
                    model.expires_at = None if model.keep_alive_s is None else model.last_used + model.keep_alive_s
            self._cond.notify_all()

    # -- room ---------------------------------------------------------------------------------
    def _make_room(self, spec: ModelSpec, ram: int, vram: int, deadline: float | None, ticket: object) -> None:
        """Evict until `spec` fits (lock held). Loads wait their turn in `_room_queue`."""
        name = spec.path.name
        if ram > self.ram_budget or vram > self.vram_budget:
            raise ModelsBusy(
                f"{name} needs about {ram // MiB} MiB of RAM and {vram // MiB} MiB of VRAM with these settings, "
                f"more than the whole budget ({self.ram_budget // MiB} MiB RAM, {self.vram_budget // MiB} MiB "
                "VRAM): raise MEMORY_BUDGET_MB, or lower N_CTX or N_PARALLEL, or pick a smaller quantization")
        self._room_queue.append(ticket)
        try:
            while True:
                first = self._room_queue[0] is ticket
                if first and self._fits(ram, vram):
                    return
                if first and not self._fits(ram, vram, once_closed=True):  # what is closing is not enough
                    victim = self._victim()
                    if victim is not None:
                        log.info("unloading %s to make room for %s", victim.name, name)
                        self._retire(victim)
                        continue
                remaining = _remaining(deadline)
                if remaining is not None and remaining <= 0:
                    busy = ", ".join(m.name for m in self._resident.values()) or "models still closing"
                    raise ModelsBusy(f"no room to load {name}: the loaded models are in use ({busy}); retry "
                                     "shortly", retry_after=self._retry_after())
                self._cond.wait(remaining if remaining is not None else 5.0)
        finally:
            self._room_queue.remove(ticket)
            self._cond.notify_all()

    def _fits(self, ram: int, vram: int, once_closed: bool = False) -> bool:
        """Whether a model of `ram`/`vram` bytes fits now (or `once_closed`: when the models
        being closed are gone)."""
        held = [*self._resident.values(), *([] if once_closed else self._retiring)]
        pending = list(self._loading.values())
        count = len(held) + len(pending)
        used_ram = sum(m.ram_bytes for m in held) + sum(p.ram_bytes for p in pending)
        used_vram = sum(m.vram_bytes for m in held) + sum(p.vram_bytes for p in pending)
        return (count < self.settings.max_loaded_models and used_ram + ram <= self.ram_budget
                and used_vram + vram <= self.vram_budget)

    def _victim(self) -> LoadedModel | None:
        """The model to unload for room: an idle one, least recently used first; else the least
        recently used busy one, which then finishes its requests and closes."""
        candidates = sorted(self._resident.values(), key=lambda m: (m.leases > 0, m.last_used))
        return candidates[0] if candidates else None

    def _retire(self, model: LoadedModel) -> None:
        """Take `model` out of service (lock held): no new leases; closed once the last one ends."""
        if self._resident.get(model.spec.key) is model:
            del self._resident[model.spec.key]
        model.retiring = True
        self._retiring.add(model)
        if model.leases == 0:
            self._close_later(model)

    def _close_later(self, model: LoadedModel) -> None:
        threading.Thread(target=self._close, args=(model,), name=f"unload-{model.name}", daemon=True).start()

    def _close(self, model: LoadedModel) -> None:
        try:
            model.engine.close()
        except Exception:  # a failure to free must not stop the others: log it loudly
            log.exception("closing %s failed", model.name)
        model.engine = _Closed(model.engine)  # nothing may reach the freed runtime through it
        _trim_heap()
        log.info("unloaded %s", model.name)
        with self._cond:
            self._retiring.discard(model)
            self._cond.notify_all()

    def _retry_after(self) -> int:
        recent = [getattr(m.engine, "recent_s", 2.0) for m in self._resident.values()]
        return max(1, round(max(recent, default=2.0)))

    # -- expiry -------------------------------------------------------------------------------
    def _reap(self) -> None:
        """Unload idle models whose keep_alive has passed."""
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                due = [m for m in self._resident.values()
                       if m.leases == 0 and m.expires_at is not None and m.expires_at <= now]
                for model in due:
                    log.info("%s idle for its keep_alive: unloading", model.name)
                    self._retire(model)
                upcoming = [m.expires_at for m in self._resident.values() if m.leases == 0 and m.expires_at]
                self._cond.wait(min(60.0, max(0.05, min(upcoming) - now)) if upcoming else 60.0)

    def wait_unloaded(self, timeout: float) -> bool:
        """Block until no model is closing (tests, shutdown)."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._retiring:
                if not self._cond.wait(max(0.0, end - time.monotonic())):
                    return not self._retiring
            return True

    def close(self) -> None:
        """Finish what was accepted, then free every model."""
        with self._cond:
            self._closed = True
            models = list(self._resident.values())
            for model in models:
                self._retire(model)
            self._cond.notify_all()
        self.wait_unloaded(600)


class _Closed:
    """What a closed model's `engine` becomes: the counters stay readable, the rest is gone."""

    def __init__(self, engine) -> None:
        self.n_ctx, self.n_parallel, self.metadata = engine.n_ctx, engine.n_parallel, engine.metadata
        self.active = self.waiting = 0
        self.failed, self.failure = False, None  # out of service: no longer this engine's health


def _trim_heap() -> None:
    """Give the heap pages a closed model's buffers leave behind back to the OS. glibc keeps freed
    memory in its per-thread arenas (every request and scheduler thread has one), so without this
    the process stays near its peak after models unload: measured here, 1.6 GiB instead of 0.5
    after a minute of model swaps under load. A no-op where there is no glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.perf_counter()


def _stamp(path: Path) -> tuple:
    try:
        st = path.stat()
    except OSError:
        return ()
    return (st.st_mtime_ns, st.st_size)


def _disk_cache(settings: Settings, spec: ModelSpec):
    """The model's prompt cache on disk (None when PROMPT_CACHE_MB is 0). Its states are only good
    for the same file, adapters and KV layout, so those name its subfolder."""
    if not settings.prompt_cache_mb:
        return None
    import hashlib

    from engine.disk_cache import DiskCache, default_cache_dir, model_identity

    try:
        parts = [model_identity(spec.path)] + [f"{model_identity(a.path)}:{a.scale}" for a in spec.adapters]
    except OSError:
        return None
    parts += [settings.kv_cache_type, settings.flash_attn]
    model_id = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    folder = Path(settings.prompt_cache_dir).expanduser() if settings.prompt_cache_dir else default_cache_dir()
    return DiskCache(folder, settings.prompt_cache_mb << 20, model_id)


def _llama_runtime(settings: Settings) -> RuntimeFactory:
    def build(spec: ModelSpec, n_gpu: int):
        from engine.runtime import LlamaRuntime

        s = settings
        return LlamaRuntime(spec.path, n_ctx=s.n_ctx, n_parallel=s.n_parallel, n_batch=s.n_batch,
                            n_threads=s.n_threads, n_threads_batch=s.n_threads_batch, n_gpu_layers=n_gpu,
                            flash_attn=s.flash_attn, kv_type=KV_CACHE_TYPES[s.kv_cache_type],
                            adapters=[(a.path, a.scale) for a in spec.adapters])

    return build


def _offload_planner(settings: Settings) -> Callable[[ModelSpec], tuple[int, int, int, str]]:
    def plan(spec: ModelSpec) -> tuple[int, int, int, str]:
        from engine.startup import memory_plan

        return memory_plan(settings, spec)

    return plan


__all__ = ["LoadForbidden", "Lease", "LoadedModel", "ModelManager", "ModelsBusy"]
