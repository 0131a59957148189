"""How long an idle model stays resident, as Ollama does it: for the keep_alive of the request that
used it last (the request's own, else KEEP_ALIVE; the default model until a request says
otherwise; 0 unloads it as soon as it is idle, a negative duration keeps it loaded), and the reaper
thread that unloads idle models whose time has passed."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from engine.loaded_model import LoadedModel
from engine.model_files import ModelSpec
from engine.model_residency import Residency
from engine.settings import Settings

log = logging.getLogger(__name__)


class KeepAlive:
    """The keep_alive rules over `residency`'s models (under its lock); `is_default(spec)`: whether
    `spec` is the default model. The reaper runs until the residency is closed."""

    def __init__(self, settings: Settings, residency: Residency, is_default: Callable[[ModelSpec], bool]) -> None:
        self.settings, self.residency, self.cond = settings, residency, residency.cond
        self.is_default = is_default
        self._reaper = threading.Thread(target=self._reap, name="model-reaper", daemon=True)

    def start(self) -> None:
        self._reaper.start()

    def natural(self, spec: ModelSpec) -> float | None:
        """How long a model stays after its last request when the request did not say: the
        default model until evicted, others KEEP_ALIVE (None: forever)."""
        if self.is_default(spec) or not self.settings.load_on_request:
            return None
        return self.settings.keep_alive_s

    def release(self, model: LoadedModel, keep_alive_s: float | None) -> None:
        """A lease on `model` ended, with its request's `keep_alive_s` (None: the model's own rule;
        each request resets it, as in Ollama). The last lease's end closes a retiring model, unloads
        one whose keep_alive is 0, or sets when it expires."""
        with self.cond:
            model.leases -= 1
            model.last_used = time.monotonic()
            if keep_alive_s is None:
                model.keep_alive_s = self.natural(model.spec)
            else:
                model.keep_alive_s = None if keep_alive_s < 0 else keep_alive_s
            if model.leases == 0:
                if model.retiring:
                    self.residency.close_later(model)
                elif model.keep_alive_s == 0:
                    self.residency.retire(model)
                else:
                    model.expires_at = None if model.keep_alive_s is None else model.last_used + model.keep_alive_s
            self.cond.notify_all()

    def demote(self, previous: LoadedModel) -> None:
        """`previous` was the default model and is now an ordinary one (lock held): it stays for
        KEEP_ALIVE once idle."""
        previous.keep_alive_s = self.natural(previous.spec)
        if previous.leases == 0 and previous.keep_alive_s is not None:
            previous.expires_at = time.monotonic() + previous.keep_alive_s

    def _reap(self) -> None:
        """Unload idle models whose keep_alive has passed."""
        residency = self.residency
        with self.cond:
            while not residency.closed:
                now = time.monotonic()
                due = [m for m in residency.resident.values()
                       if m.leases == 0 and m.expires_at is not None and m.expires_at <= now]
                for model in due:
                    log.info("%s idle for its keep_alive: unloading", model.name)
                    residency.retire(model)
                upcoming = [m.expires_at for m in residency.resident.values() if m.leases == 0 and m.expires_at]
                self.cond.wait(min(60.0, max(0.05, min(upcoming) - now)) if upcoming else 60.0)
