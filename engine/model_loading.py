"""Loading a model, once: its files checked and its memory planned (the offload planner), its
llama.cpp runtime and scheduler built outside the manager's lock, and the outcome handed to every
request waiting for that same load (a failed load fails them all, with llama.cpp's terse error
turned into one that says what to check)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from engine.errors import EngineError, ModelLoadError
from engine.loaded_model import LoadedModel, file_stamp
from engine.metrics import Metrics
from engine.model_files import ModelFiles, ModelSpec, check_gguf_file
from engine.model_residency import Loading, ModelsBusy, Residency, remaining
from engine.settings import KV_CACHE_TYPES, Settings

log = logging.getLogger(__name__)

MiB = 1 << 20

RuntimeFactory = Callable[[ModelSpec, int], object]
Planner = Callable[[ModelSpec], tuple[int, int, int, str]]


class Loader:
    """`runtime_factory(spec, n_gpu_layers)` builds a model's runtime (default: llama.cpp's);
    `planner(spec)` gives (n_gpu_layers, RAM bytes, VRAM bytes, log line) (default: the offload
    planner); `natural_keep_alive(spec)`: a new model's keep_alive (KeepAlive.natural)."""

    def __init__(self, settings: Settings, files: ModelFiles, metrics: Metrics, residency: Residency,
                 natural_keep_alive: Callable[[ModelSpec], float | None],
                 runtime_factory: RuntimeFactory | None = None, planner: Planner | None = None) -> None:
        self.settings, self.files, self.metrics, self.residency = settings, files, metrics, residency
        self.cond = residency.cond
        self.natural_keep_alive = natural_keep_alive
        self.runtime_factory = runtime_factory or _llama_runtime(settings)
        self.planner = planner or _offload_planner(settings)

    def plan(self, spec: ModelSpec) -> tuple[int, int, int, str]:
        """Check the files (reading the GGUF headers) and plan the model's memory: (n_gpu_layers,
        RAM bytes, VRAM bytes, log line). Called outside the lock."""
        check_gguf_file(spec.path)
        for adapter in spec.adapters:
            check_gguf_file(adapter.path)
        return self.planner(spec)

    def wait(self, loading: Loading, spec: ModelSpec, deadline: float | None) -> None:
        """Someone loads the model: wait for that load, not a second one (lock held; released while
        waiting). Its error is raised here too; ModelsBusy when `deadline` passes first."""
        self.cond.release()
        try:
            loading.done.wait(remaining(deadline))
        finally:
            self.cond.acquire()
        if loading.error is not None:
            raise loading.error
        if not loading.done.is_set():
            raise ModelsBusy(f"timed out waiting for {spec.path.name} to load", retry_after=5)

    def load(self, spec: ModelSpec, loading: Loading, n_gpu: int, message: str) -> tuple[LoadedModel, float]:
        """Build the model registered as `loading` and make it resident, its first lease counted;
        returns it and the seconds the load took. The lock is held by the caller and released here
        while the model is built; whatever way this ends, those waiting on `loading` learn of it."""
        self.cond.release()
        try:
            log.info("%s", message)
            started = time.perf_counter()
            engine = self._build(spec, n_gpu)
            seconds = time.perf_counter() - started
        except BaseException as exc:
            with self.cond:
                loading.error = exc
                del self.residency.loading[loading.key]
                loading.done.set()
                self.cond.notify_all()
            self.cond.acquire()  # the caller's `with` releases it
            raise
        model = LoadedModel(engine=engine, spec=spec, name=self.files.display_name(spec.path),
                            load_seconds=seconds, gpu_layers=n_gpu, ram_bytes=loading.ram_bytes,
                            vram_bytes=loading.vram_bytes, stamp=file_stamp(spec.path), leases=1,
                            keep_alive_s=self.natural_keep_alive(spec))
        log.info("loaded %s in %.2f s (n_ctx=%d per sequence, n_parallel=%d, gpu_layers=%d, about %d MiB)",
                 model.name, seconds, self.settings.n_ctx, self.settings.n_parallel, n_gpu, model.ram_bytes // MiB)
        self.cond.acquire()
        self.residency.resident[loading.key] = model
        del self.residency.loading[loading.key]
        loading.model = model
        loading.done.set()
        self.cond.notify_all()
        self.metrics.model_loads.inc()
        return model, seconds

    def _build(self, spec: ModelSpec, n_gpu: int):
        """The model's scheduler on a new runtime; llama.cpp's own errors become ModelLoadError."""
        try:
            return self._build_engine(spec, n_gpu)
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

    def _build_engine(self, spec: ModelSpec, n_gpu: int):
        from engine.scheduler import Scheduler

        s = self.settings
        runtime = self.runtime_factory(spec, n_gpu)
        try:
            return Scheduler(runtime, cache_bytes=s.cache_ram_mb << 20, max_queue=s.max_queue, metrics=self.metrics,
                             prefill_chunk=s.prefill_chunk, disk=_disk_cache(s, spec, runtime.flash_attn, n_gpu))
        except BaseException:
            runtime.close()
            raise


def _disk_cache(settings: Settings, spec: ModelSpec, flash_attn: bool, n_gpu: int):
    """The model's prompt cache on disk (None when PROMPT_CACHE_MB is 0). Its states are only good
    for the same file, adapters, KV layout and arithmetic (the attention the runtime resolved, not
    FLASH_ATTN=auto; the layers on the GPU), so those name its subfolder."""
    if not settings.prompt_cache_mb:
        return None
    import hashlib

    from engine.disk_cache import DiskCache, default_cache_dir, model_identity

    try:
        parts = [model_identity(spec.path)] + [f"{model_identity(a.path)}:{a.scale}" for a in spec.adapters]
    except OSError:
        return None
    parts += [settings.kv_cache_type, "flash-attn" if flash_attn else "no-flash-attn", f"gpu-layers:{n_gpu}"]
    model_id = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    folder = Path(settings.prompt_cache_dir).expanduser() if settings.prompt_cache_dir else default_cache_dir()
    return DiskCache(folder, settings.prompt_cache_mb << 20, model_id)


def _llama_runtime(settings: Settings) -> RuntimeFactory:
    def build(spec: ModelSpec, n_gpu: int):
        from engine.offload import flash_attn_on
        from engine.runtime import LlamaRuntime

        s = settings
        flash = flash_attn_on(s.flash_attn, spec.path, kv_cache_type=s.kv_cache_type, gpu=n_gpu != 0)
        return LlamaRuntime(spec.path, n_ctx=s.n_ctx, n_parallel=s.n_parallel, n_batch=s.n_batch,
                            n_threads=s.n_threads, n_threads_batch=s.n_threads_batch, n_gpu_layers=n_gpu,
                            flash_attn="on" if flash else "off", kv_type=KV_CACHE_TYPES[s.kv_cache_type],
                            adapters=[(a.path, a.scale) for a in spec.adapters])

    return build


def _offload_planner(settings: Settings) -> Planner:
    def plan(spec: ModelSpec) -> tuple[int, int, int, str]:
        from engine.startup import memory_plan

        return memory_plan(settings, spec)

    return plan
