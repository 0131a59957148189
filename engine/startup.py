"""One start-up plan from the typed settings, used by `serve`, `serve --ray` and `doctor`.

`plan_startup` says which model MODEL means (with LORA's adapters), and `memory_plan` what that
model will take (GPU layers, RAM, VRAM) under the settings; `memory_budget` is what all resident
models may take together. The three entry points call these, so a replica on Ray, the local
server and `doctor` cannot disagree on the file, its adapters or its size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from engine.errors import EngineError, ModelLoadError, ModelRefused
from engine.model_files import ModelFiles, ModelSpec, check_gguf_file
from engine.settings import Settings

log = logging.getLogger(__name__)

GiB = 1 << 30
MiB = 1 << 20
RAM_HEADROOM = 1 * GiB  # kept free for the process itself, the HTTP server and the OS


@dataclass(frozen=True)
class StartupPlan:
    """What the engine loads at start-up."""

    settings: Settings
    files: ModelFiles
    spec: ModelSpec

    def check(self) -> None:
        """The quick refusals (missing, not GGUF) before anything listens. The message is the
        operator's (the command's, a replica's start), so it names the full path."""
        for path in (self.spec.path, *(adapter.path for adapter in self.spec.adapters)):
            try:
                check_gguf_file(path)
            except EngineError as exc:
                raise ModelLoadError(f"cannot start: {exc.message} ({path})") from exc


def plan_startup(settings: Settings, *, assemble: Callable[[Path], Path] | None = None) -> StartupPlan:
    """The start-up model for `settings`. `assemble(folder)` puts the embedded default model in
    place when MODEL is empty (default: assemble it; `doctor` only names it)."""
    files = ModelFiles(settings)
    return StartupPlan(settings, files, files.startup_spec(assemble=assemble))


def memory_plan(settings: Settings, spec: ModelSpec, *, gpus=None,
                offload_supported: bool | None = None) -> tuple[int, int, int, str]:
    """(n_gpu_layers, RAM bytes, VRAM bytes, log line) for loading `spec` under `settings`: the
    offload planner's weights + KV cache (N_PARALLEL × N_CTX) + compute buffers, plus the LoRA
    adapters and the conversation cache's budget. A file the planner cannot read is counted at
    its size (llama.cpp then says what is wrong with it)."""
    from engine import offload

    s = settings
    flash = offload.flash_attn_on(s.flash_attn, spec.path, kv_cache_type=s.kv_cache_type, gpu=True)
    common = dict(n_batch=s.n_batch, flash_attn=flash, n_seq=s.n_parallel)
    n_gpu, plan, message = offload.resolve_gpu_layers(s.n_gpu_layers, spec.path, s.n_ctx, kv_cache_type=s.kv_cache_type,
                                                      gpus=gpus, offload_supported=offload_supported, **common)
    if n_gpu == 0 and flash != offload.flash_attn_on(s.flash_attn, spec.path, kv_cache_type=s.kv_cache_type,
                                                     gpu=False):
        common["flash_attn"], plan = not flash, None  # on CPU `auto` turns it off for this model
    if plan is None:
        try:
            plan = offload.plan_offload(spec.path, s.n_ctx, 0, n_gpu_layers_requested=0,
                                        kv_type_bytes=offload.KV_TYPE_BYTES.get(s.kv_cache_type, 2.0), **common)
        except ModelRefused:
            plan = None
    extra = sum(_size(a.path) for a in spec.adapters) + (s.cache_ram_mb << 20)
    if plan is None:
        return n_gpu, _size(spec.path) + extra, 0, message
    return n_gpu, plan.ram_bytes + extra, plan.gpu_bytes, message


def memory_budget(settings: Settings) -> tuple[int, int]:
    """(RAM, VRAM) that resident models may take together: MEMORY_BUDGET_MB, else the RAM
    available now less RAM_HEADROOM; the VRAM free now on the visible GPUs less the planner's
    margin for each (0 on a CPU build or without a GPU)."""
    from engine import offload
    from ai_engine_common.machine import memory_info

    ram = ram_budget(settings.memory_budget_mb, memory_info()[1])
    vram = 0
    if settings.n_gpu_layers != "0" and offload.gpu_offload_supported():
        gpus = offload.query_free_vram()
        vram = max(0, sum(g.free_bytes for g in gpus) - offload.DEFAULT_MARGIN_BYTES * len(gpus))
    return ram, vram


def ram_budget(memory_budget_mb: int, available: int) -> int:
    """MEMORY_BUDGET_MB in bytes, or (0) the `available` RAM less RAM_HEADROOM; 8 GiB when the
    available RAM is unknown (not Linux)."""
    if memory_budget_mb:
        return memory_budget_mb * MiB
    return max(available - RAM_HEADROOM, 512 * MiB) if available else 8 * GiB


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
