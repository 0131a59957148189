"""A resident model as the rest of the engine sees it: its scheduler (which owns the llama.cpp
runtime), what it was loaded from, what it holds of the memory budget, and its lifecycle
bookkeeping (leases, keep_alive), which the model manager (engine/model_manager.py) guards."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine.model_files import Adapter, ModelSpec


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
    # its embedding context (engine/embed_service.py), made on the first embedding request
    embedder: object | None = None
    embed_lock: threading.Lock = field(default_factory=threading.Lock)

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


def file_stamp(path: Path) -> tuple:
    """The file's (mtime, size), () when it cannot be read: a changed file is loaded again."""
    try:
        st = path.stat()
    except OSError:
        return ()
    return (st.st_mtime_ns, st.st_size)
