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

ModelManager owns the leases and the default model; it composes `Residency`
(engine/model_residency.py: the resident, loading and closing models within the budget, room and
eviction), `Loader` (engine/model_loading.py: planning and building a model once, its outcome
handed to every request waiting for it) and `KeepAlive` (engine/keep_alive.py: keep_alive and the
reaper).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from engine.admission import EngineFailed
from engine.errors import EngineError, ModelNotReady
from engine.keep_alive import KeepAlive
from engine.loaded_model import LoadedModel, file_stamp
from engine.metrics import Metrics
from engine.model_files import ModelFiles, ModelSpec
from engine.model_loading import Loader, RuntimeFactory
from engine.model_residency import Loading, ModelsBusy, Residency
from engine.prompt_cache import ResponseCache
from engine.settings import Settings

log = logging.getLogger(__name__)


class LoadForbidden(EngineError):
    """The request names a model that is not loaded, and LOAD_ON_REQUEST is off."""

    status = 403


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
        from engine.startup import memory_budget

        self._cond = threading.Condition()
        self.residency = Residency(settings, self._cond, *memory_budget(settings))
        self.keep_alive = KeepAlive(settings, self.residency, self._is_default_spec)
        self.loader = Loader(settings, self.files, self.metrics, self.residency, self.keep_alive.natural,
                             runtime_factory, planner)
        self._default_key: tuple | None = None
        self.default_spec: ModelSpec | None = None
        self.started = False  # the start-up model has loaded (/health is 503 before)
        self.keep_alive.start()
        self.metrics.bind_models(self)

    # -- what is resident ---------------------------------------------------------------------
    @property
    def default(self) -> LoadedModel | None:
        """The default model (requests without a `model`), if it is resident."""
        with self._cond:
            return self.residency.resident.get(self._default_key) if self._default_key else None

    @property
    def ready(self) -> bool:
        return self.started and not self.residency.closed

    @property
    def loading(self) -> bool:
        with self._cond:
            return bool(self.residency.loading)

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
            return sorted(self.residency.resident.values(), key=lambda m: -m.last_used)

    def closing(self) -> list[LoadedModel]:
        """Models taken out of service that still finish requests or are being freed."""
        with self._cond:
            return list(self.residency.retiring)

    def is_default(self, model: LoadedModel) -> bool:
        return self._is_default_spec(model.spec)

    def _is_default_spec(self, spec: ModelSpec) -> bool:
        return spec.key == self._default_key

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
                    previous = self.residency.resident.get(self._default_key) if self._default_key else None
                    self._default_key, self.default_spec = spec.key, spec
                    lease.model.keep_alive_s = None  # the default stays until a request says otherwise
                    if previous is not None and previous is not lease.model:  # now an ordinary model
                        self.keep_alive.demote(previous)
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
            model = self.residency.resident.get(spec.key) if spec is not None else None
            if model is None:
                return False
            self.residency.retire(model)
            return True

    def _lease(self, spec: ModelSpec, keep_alive_s: float | None, deadline: float | None,
               on_request: bool) -> Lease:
        key = spec.key
        ticket = object()
        with self._cond:
            while True:
                if self.residency.closed:
                    raise ModelNotReady("the engine is shutting down")
                model = self._in_service(key, on_request)
                if model is not None:
                    model.leases += 1
                    model.last_used = time.monotonic()
                    return Lease(self, model, 0.0, keep_alive_s)
                loading = self.residency.loading.get(key)
                if loading is not None:  # someone loads it: wait for that load, not a second one
                    self.loader.wait(loading, spec, deadline)
                    continue
                if on_request and not self.settings.load_on_request:
                    raise LoadForbidden(
                        f"model '{self.files.display_name(spec.path)}' is not loaded, and this engine loads "
                        "models only at start-up or through POST /load-model (LOAD_ON_REQUEST=off)",
                        field="model")
                break
        # Not resident and nobody loads it: plan it (reads the GGUF header) outside the lock.
        n_gpu, ram, vram, message = self.loader.plan(spec)
        with self._cond:
            if key in self.residency.loading or key in self.residency.resident:  # another request got there first
                pass
            else:
                self.residency.make_room(spec, ram, vram, deadline, ticket)
                loading = self.residency.loading[key] = Loading(key, ram, vram)
                self._cond.notify_all()
                model, seconds = self.loader.load(spec, loading, n_gpu, message)
                return Lease(self, model, seconds, keep_alive_s)
        return self._lease(spec, keep_alive_s, deadline, on_request)

    def _in_service(self, key: tuple, on_request: bool) -> LoadedModel | None:
        """The resident model of `key` if it can take a lease (lock held). One whose file changed
        on disk is retired (requests that hold it finish on the old file), and so is an unhealthy
        one loaded again (start-up, /load-model); a request for an unhealthy one gets its 503."""
        model = self.residency.resident.get(key)
        if model is not None and model.stamp != file_stamp(model.path):
            log.info("%s changed on disk: loading it again", model.name)
            self.residency.retire(model)
            model = None
        if model is not None and not model.healthy:
            if on_request:
                raise EngineFailed(model.name, model.failure)
            log.warning("%s is unhealthy (%s): loading it again", model.name, model.failure)
            self.residency.retire(model)
            model = None
        return model

    def grow(self, model: LoadedModel, ram: int, deadline: float | None) -> None:
        """Count `ram` more bytes (negative: fewer) for the leased `model` in the memory budget:
        its embedding context (Residency.grow)."""
        with self._cond:
            self.residency.grow(model, ram, deadline)

    def _release(self, model: LoadedModel, keep_alive_s: float | None) -> None:
        self.keep_alive.release(model, keep_alive_s)

    def wait_unloaded(self, timeout: float) -> bool:
        """Block until no model is closing (tests, shutdown)."""
        return self.residency.wait_unloaded(timeout)

    def close(self) -> None:
        """Finish what was accepted, then free every model."""
        with self._cond:
            self.residency.retire_all()
            self._cond.notify_all()
        self.wait_unloaded(600)


__all__ = ["LoadForbidden", "Lease", "LoadedModel", "ModelManager", "ModelsBusy"]
