"""Which models are resident, being loaded or closing, within the memory budget: room for a load
(idle models evicted least recently used first; when only busy ones could make room, the least
recently used stops taking requests, finishes those it has and is closed; loads wait their turn,
first come, first served), and taking a model out of service and freeing it once its last lease
has ended. The model manager (engine/model_manager.py) holds the lock (`cond`) these run under."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from engine.errors import EngineError
from engine.loaded_model import LoadedModel
from engine.model_files import ModelSpec
from engine.settings import Settings

log = logging.getLogger(__name__)

MiB = 1 << 20


class ModelsBusy(EngineError):
    """No room for another model now: the resident ones are in use (503 + Retry-After)."""

    status = 503

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)} if retry_after else None)


@dataclass(eq=False)
class Loading:
    """A load in progress, which other requests for the same model wait on."""

    key: tuple
    ram_bytes: int
    vram_bytes: int
    done: threading.Event = field(default_factory=threading.Event)
    model: LoadedModel | None = None
    error: BaseException | None = None


class Residency:
    """The tables of resident, loading and closing models (guarded by `cond`) and the budget they
    share: MAX_LOADED_MODELS, `ram_budget` and `vram_budget` bytes."""

    def __init__(self, settings: Settings, cond: threading.Condition, ram_budget: int, vram_budget: int) -> None:
        self.settings, self.cond = settings, cond
        self.ram_budget, self.vram_budget = ram_budget, vram_budget
        self.resident: dict[tuple, LoadedModel] = {}
        self.retiring: set[LoadedModel] = set()
        self.loading: dict[tuple, Loading] = {}
        self._room_queue: deque[object] = deque()  # loads waiting for room, in arrival order
        self.closed = False  # the manager is shutting down: nothing is leased or loaded any more

    def make_room(self, spec: ModelSpec, ram: int, vram: int, deadline: float | None, ticket: object) -> None:
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
                if first and self.fits(ram, vram):
                    return
                if first and not self.fits(ram, vram, once_closed=True):  # what is closing is not enough
                    victim = self.victim()
                    if victim is not None:
                        log.info("unloading %s to make room for %s", victim.name, name)
                        self.retire(victim)
                        continue
                left = remaining(deadline)
                if left is not None and left <= 0:
                    busy = ", ".join(m.name for m in self.resident.values()) or "models still closing"
                    raise ModelsBusy(f"no room to load {name}: the loaded models are in use ({busy}); retry "
                                     "shortly", retry_after=self.retry_after())
                self.cond.wait(left if left is not None else 5.0)
        finally:
            self._room_queue.remove(ticket)
            self.cond.notify_all()

    def fits(self, ram: int, vram: int, once_closed: bool = False) -> bool:
        """Whether a model of `ram`/`vram` bytes fits now (or `once_closed`: when the models
        being closed are gone)."""
        held = [*self.resident.values(), *([] if once_closed else self.retiring)]
        pending = list(self.loading.values())
        count = len(held) + len(pending)
        used_ram = sum(m.ram_bytes for m in held) + sum(p.ram_bytes for p in pending)
        used_vram = sum(m.vram_bytes for m in held) + sum(p.vram_bytes for p in pending)
        return (count < self.settings.max_loaded_models and used_ram + ram <= self.ram_budget
                and used_vram + vram <= self.vram_budget)

    def grow(self, model: LoadedModel, ram: int, deadline: float | None) -> None:
        """Count `ram` more bytes for the resident `model` (lock held; its embedding context): idle
        models are unloaded for room, least recently used first; ModelsBusy (503) when only busy
        ones could make it, by the deadline."""
        while True:
            held = [*self.resident.values(), *self.retiring]
            used = sum(m.ram_bytes for m in held) + sum(p.ram_bytes for p in self.loading.values())
            if ram <= 0 or used + ram <= self.ram_budget:
                model.ram_bytes += ram
                return
            idle = [m for m in self.resident.values() if m is not model and not m.leases]
            if idle:
                victim = min(idle, key=lambda m: m.last_used)
                log.info("unloading %s to make room for the embedding context of %s", victim.name, model.name)
                self.retire(victim)
                continue
            left = remaining(deadline)
            if not self.retiring or (left is not None and left <= 0):
                raise ModelsBusy(f"no room in the memory budget for the embedding context of {model.name} (about "
                                 f"{ram // MiB} MiB): the other loaded models are in use; retry shortly, or raise "
                                 "MEMORY_BUDGET_MB", retry_after=self.retry_after())
            self.cond.wait(left if left is not None else 5.0)

    def victim(self) -> LoadedModel | None:
        """The model to unload for room: an idle one, least recently used first; else the least
        recently used busy one, which then finishes its requests and closes."""
        candidates = sorted(self.resident.values(), key=lambda m: (m.leases > 0, m.last_used))
        return candidates[0] if candidates else None

    def retire(self, model: LoadedModel) -> None:
        """Take `model` out of service (lock held): no new leases; closed once the last one ends."""
        if self.resident.get(model.spec.key) is model:
            del self.resident[model.spec.key]
        model.retiring = True
        self.retiring.add(model)
        if model.leases == 0:
            self.close_later(model)

    def retire_all(self) -> None:
        """Shutting down (lock held): every resident model is taken out of service."""
        self.closed = True
        for model in list(self.resident.values()):
            self.retire(model)

    def close_later(self, model: LoadedModel) -> None:
        threading.Thread(target=self._close, args=(model,), name=f"unload-{model.name}", daemon=True).start()

    def _close(self, model: LoadedModel) -> None:
        try:
            if model.embedder is not None:  # its context goes before the model it reads from
                model.embedder.close()
            model.engine.close()
        except Exception:  # a failure to free must not stop the others: log it loudly
            log.exception("closing %s failed", model.name)
        model.engine = _Closed(model.engine)  # nothing may reach the freed runtime through it
        _trim_heap()
        log.info("unloaded %s", model.name)
        with self.cond:
            self.retiring.discard(model)
            self.cond.notify_all()

    def retry_after(self) -> int:
        recent = [getattr(m.engine, "recent_s", 2.0) for m in self.resident.values()]
        return max(1, round(max(recent, default=2.0)))

    def wait_unloaded(self, timeout: float) -> bool:
        """Block until no model is closing (tests, shutdown)."""
        end = time.monotonic() + timeout
        with self.cond:
            while self.retiring:
                if not self.cond.wait(max(0.0, end - time.monotonic())):
                    return not self.retiring
            return True


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


def remaining(deadline: float | None) -> float | None:
    """Seconds left until `deadline` (time.perf_counter); None: no deadline."""
    return None if deadline is None else deadline - time.perf_counter()
