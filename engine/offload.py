"""GPU offload planning: how many layers of a GGUF model fit the free VRAM, and whether to try.

`plan_offload` reads a GGUF file's layout (tensor sizes per layer, attention shape), estimates what
each offloaded layer costs on the GPU (weights, KV cache for `n_ctx`, compute buffers) and picks
the largest layer count that fits the free VRAM minus a safety margin. `resolve_gpu_layers` turns
the N_GPU_LAYERS setting (`auto`, `-1`, `0` or a count) into the number passed to llama.cpp,
refusing explicit GPU layers on a build or a machine that cannot honour them.

How llama.cpp (the version vendored by llama-cpp-python 0.3.36) places layers, which the arithmetic
here follows (src/llama-model.cpp, `load_tensors`):

- There are `n_layer + 1` offloadable layers: the repeating blocks `blk.0 … blk.{n-1}` and the
  output layer (`output_norm`, `output`). `n_gpu_layers = k` puts the output layer on the GPU
  first, then the last `k - 1` blocks; `k >= n_layer + 1` (or -1) offloads everything.
- The input layer (`token_embd` and other non-block tensors) always stays on the CPU. A model with
  tied embeddings (no `output.weight`) gets a GPU copy of `token_embd` as its output matrix.
- Each block's KV cache lives on that block's device.
- The compute buffer of the device that holds the output layer includes the logits of a whole
  micro-batch (`n_vocab × n_ubatch` floats): 512 MiB for Gemma 3's 262k vocabulary.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

import gguf

from engine.errors import ModelRefused, SettingsError
from engine.gguf_info import GGUFFormatError, read_header
from engine.kv_types import FLOAT_KV_TYPES, KV_CACHE_TYPES

log = logging.getLogger(__name__)

MiB = 1 << 20
GiB = 1 << 30

# Headroom kept free on each GPU. NVML reports free memory before this process creates its CUDA
# context (0.3–0.5 GiB with cuBLAS), and the allocator needs slack; llama.cpp's own `--fit`
# keeps 1 GiB free per device as well.
DEFAULT_MARGIN_BYTES = 1 * GiB

# llama.cpp pads the context (and so the KV cache) to a multiple of 256 cells.
_KV_PAD = 256

# Older gguf packages lack this constant; files written by newer converters may still carry the key.
_SWA_PATTERN_KEY = getattr(gguf.Keys.Attention, "SLIDING_WINDOW_PATTERN", "{arch}.attention.sliding_window_pattern")

# Layers whose attention is a sliding window, for architectures where llama.cpp hard-codes the
# pattern (a GGUF may override it with `{arch}.attention.sliding_window_pattern`). With pattern
# n, layer i is a sliding-window layer unless i % n == n - 1 (llama_hparams::set_swa_pattern).
_SWA_PATTERNS = {
    "gemma2": 2,       # alternating local/global
    "gemma3": 6,       # 5 local : 1 global
    "gemma3n": 5,
    "gemma-embedding": 6,
    "cohere2": 4,
    "gpt-oss": 2,
}


def _bytes_per_element(ggml_type: int) -> float:
    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    return type_size / block


# Bytes per KV cache element for each KV_CACHE_TYPE (block size and bytes from gguf's table).
KV_TYPE_BYTES: dict[str, float] = {name: _bytes_per_element(t) for name, t in KV_CACHE_TYPES.items()}

CUDA_BUILD_FIX = 'CMAKE_ARGS="-DGGML_CUDA=on" scripts/serve.sh'


class GpuUnavailableError(SettingsError):
    """GPU layers were asked for explicitly, but the build or the machine cannot offload."""


# -- reading a GGUF file's layout ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GgufLayout:
    """What the planner needs from a GGUF file: metadata (small values) and tensor sizes."""

    metadata: dict[str, Any]
    tensors: dict[str, tuple[tuple[int, ...], int]]  # name -> (shape, bytes)


def read_gguf_layout(path: Path) -> GgufLayout:
    """A GGUF file's metadata and tensor table, without touching the tensor data."""
    try:
        header = read_header(Path(path))
    except (GGUFFormatError, OSError) as exc:
        raise ModelRefused(f"{Path(path).name} is not a readable GGUF file: {exc}") from exc
    return GgufLayout(header.metadata, {name: (t.shape, t.nbytes) for name, t in header.tensors.items()})


# -- the model's shape ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ModelShape:
    """Per-layer sizes and attention shape of a model, as llama.cpp will lay it out."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_ff: int
    n_vocab: int
    layer_bytes: tuple[int, ...]   # weights of each block blk.i
    kv_per_cell: tuple[int, ...]   # K+V elements per context cell of each block
    swa_layers: tuple[bool, ...]   # True where a block attends through a sliding window
    n_swa: int                     # sliding window size (0: none)
    output_bytes: int              # what offloading the output layer puts on the GPU
    output_copy_bytes: int         # part of it that is a copy: tied embeddings reuse token_embd,
                                   # which the input layer keeps in RAM
    weights_bytes: int             # all tensors in the file

    @classmethod
    def from_layout(cls, layout: GgufLayout) -> "ModelShape":
        md, tensors = layout.metadata, layout.tensors
        arch = md.get(gguf.Keys.General.ARCHITECTURE)
        if not arch:
            raise ModelRefused("the GGUF file has no general.architecture")

        def key(template: str, default: Any = None) -> Any:
            return md.get(template.format(arch=arch), default)

        n_layer = int(key(gguf.Keys.LLM.BLOCK_COUNT, 0))
        n_embd = int(key(gguf.Keys.LLM.EMBEDDING_LENGTH, 0))
        if n_layer <= 0 or n_embd <= 0:
            raise ModelRefused(f"the GGUF file lacks {arch}.block_count or {arch}.embedding_length")
        n_head = _per_layer(key(gguf.Keys.Attention.HEAD_COUNT, 1), n_layer)
        n_head_kv = _per_layer(key(gguf.Keys.Attention.HEAD_COUNT_KV, None) or n_head, n_layer)
        head_max = max(n_head) or 1
        n_embd_k = int(key(gguf.Keys.Attention.KEY_LENGTH, n_embd // head_max))
        n_embd_v = int(key(gguf.Keys.Attention.VALUE_LENGTH, n_embd // head_max))
        n_ff = max(_per_layer(key(gguf.Keys.LLM.FEED_FORWARD_LENGTH, 4 * n_embd), n_layer))
        embd = tensors.get("token_embd.weight")
        n_vocab = int(key(gguf.Keys.LLM.VOCAB_SIZE, 0) or (embd[0][-1] if embd else 0))

        layer_bytes = [0] * n_layer
        output_bytes = 0
        for name, (_shape, nbytes) in tensors.items():
            block = _block_index(name)
            if block is not None and block < n_layer:
                layer_bytes[block] += nbytes
            elif name.split(".")[0] in ("output", "output_norm"):
                output_bytes += nbytes
        # Without output.weight llama.cpp reuses token_embd as the output matrix (tied embeddings).
        copy_bytes = embd[1] if "output.weight" not in tensors and embd is not None else 0

        n_swa = int(key(gguf.Keys.Attention.SLIDING_WINDOW, 0) or 0)
        return cls(
            arch=arch, n_layer=n_layer, n_embd=n_embd, n_head=head_max, n_ff=n_ff, n_vocab=n_vocab,
            layer_bytes=tuple(layer_bytes),
            kv_per_cell=tuple(h * (n_embd_k + n_embd_v) for h in n_head_kv),
            swa_layers=_swa_layers(arch, n_layer, n_swa, key(_SWA_PATTERN_KEY)),
            n_swa=n_swa, output_bytes=output_bytes + copy_bytes, output_copy_bytes=copy_bytes,
            weights_bytes=sum(nbytes for _shape, nbytes in tensors.values()))

    @property
    def total_layers(self) -> int:
        """Offloadable layers as llama.cpp counts them: the blocks plus the output layer."""
        return self.n_layer + 1


def _per_layer(value: Any, n_layer: int) -> list[int]:
    """A hyper-parameter that a GGUF stores either once or as one value per layer."""
    if isinstance(value, list):
        values = [int(v) for v in value[:n_layer]]
        return values + [values[-1] if values else 0] * (n_layer - len(values))
    return [int(value)] * n_layer


def _block_index(name: str) -> int | None:
    if not name.startswith("blk."):
        return None
    index = name.split(".", 2)[1]
    return int(index) if index.isdigit() else None


def _swa_layers(arch: str, n_layer: int, n_swa: int, pattern: Any) -> tuple[bool, ...]:
    if n_swa <= 0:
        return (False,) * n_layer
    if isinstance(pattern, list):  # one flag per layer
        return tuple(bool(p) for p in pattern[:n_layer]) + (False,) * max(0, n_layer - len(pattern))
    n = int(pattern) if isinstance(pattern, int) and pattern > 0 else _SWA_PATTERNS.get(arch, 0)
    if n <= 0:
        return (False,) * n_layer
    return tuple(i % n < n - 1 for i in range(n_layer))


# -- the plan -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class OffloadPlan:
    """Where a model's layers go and what that costs, in bytes."""

    model: str                 # file name
    gpu_layers: int            # layers on the GPU (the count to pass as n_gpu_layers)
    total_layers: int          # blocks + output layer
    n_ctx: int
    gpu_bytes: int             # weights + KV + compute on the GPU
    ram_bytes: int             # weights + KV + compute in RAM
    kv_bytes: int              # the whole KV cache for n_ctx (GPU and RAM parts)
    weights_bytes: int         # all tensors in the file
    compute_bytes: int         # compute buffers (GPU and RAM)
    gpu_weights_bytes: int
    gpu_kv_bytes: int
    gpu_compute_bytes: int
    free_vram_bytes: int
    margin_bytes: int
    requested: str             # "auto" or the explicit value
    reason: str = ""

    @property
    def fits(self) -> bool:
        """Whether the GPU part fits the free VRAM with the margin kept."""
        return self.gpu_bytes == 0 or self.gpu_bytes + self.margin_bytes <= self.free_vram_bytes

    def describe(self) -> str:
        """One line for the start-up log: layers on the GPU, bytes on the GPU and in RAM, and why."""
        head = (f"N_GPU_LAYERS={self.requested}: {self.gpu_layers}/{self.total_layers} layers of "
                f"{self.model} on GPU (n_ctx {self.n_ctx})")
        vram = f"{fmt_bytes(self.free_vram_bytes)} VRAM free, margin {fmt_bytes(self.margin_bytes)}"
        if self.gpu_layers == 0:
            gpu = f"GPU 0 MiB of {vram}"
        else:
            gpu = (f"GPU {fmt_bytes(self.gpu_bytes)} (weights {fmt_bytes(self.gpu_weights_bytes)}, "
                   f"KV {fmt_bytes(self.gpu_kv_bytes)}, compute {fmt_bytes(self.gpu_compute_bytes)}) of {vram}")
        ram = (f"RAM {fmt_bytes(self.ram_bytes)} (weights {fmt_bytes(self.ram_weights_bytes)}, "
               f"KV {fmt_bytes(self.ram_kv_bytes)}, compute {fmt_bytes(self.ram_compute_bytes)})")
        line = f"{head}; {gpu}; {ram}"
        return f"{line}; {self.reason}" if self.reason else line

    @property
    def ram_weights_bytes(self) -> int:
        return self.ram_bytes - self.ram_kv_bytes - self.ram_compute_bytes

    @property
    def ram_kv_bytes(self) -> int:
        return self.kv_bytes - self.gpu_kv_bytes

    @property
    def ram_compute_bytes(self) -> int:
        return self.compute_bytes - self.gpu_compute_bytes


def fmt_bytes(n: float) -> str:
    """Bytes in GiB, MiB or (below 1 MiB, for small test models) KiB."""
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.0f} MiB" if abs(n) >= MiB or n == 0 else f"{n / 1024:.0f} KiB"


@dataclasses.dataclass(frozen=True)
class _Costs:
    gpu_weights: int
    gpu_kv: int
    gpu_compute: int
    ram_weights: int
    ram_kv: int
    ram_compute: int

    @property
    def gpu(self) -> int:
        return self.gpu_weights + self.gpu_kv + self.gpu_compute

    @property
    def ram(self) -> int:
        return self.ram_weights + self.ram_kv + self.ram_compute


def kv_cache_bytes(shape: ModelShape, n_ctx: int, *, kv_type_bytes: float = 2.0, n_ubatch: int = 512,
                   swa_full: bool = True) -> list[int]:
    """KV cache bytes of each block for a context of `n_ctx` tokens.

    Sliding-window blocks keep only `n_swa + n_ubatch` cells unless `swa_full` (the engine sets
    it, so that its conversation cache can drop a suffix), as llama_kv_cache_iswa does.
    """
    cells = _pad(n_ctx)
    swa_cells = min(cells, _pad(shape.n_swa + n_ubatch)) if not swa_full else cells
    return [math.ceil((swa_cells if swa else cells) * per_cell * kv_type_bytes)
            for per_cell, swa in zip(shape.kv_per_cell, shape.swa_layers)]


def compute_buffer_bytes(shape: ModelShape, n_ctx: int, n_ubatch: int, *, with_output: bool,
                         flash_attn: bool = False) -> int:
    """Estimated compute buffer of one device: f32 activations of one micro-batch.

    The largest live tensor dominates: the logits (n_vocab per token) where the output layer
    runs, otherwise the attention scores (n_head × n_ctx per token, plus the mask) without flash
    attention, or the feed-forward's gate and up projections. Calibrated on llama.cpp's CPU
    buffer for the default model: 515.75 MiB estimated and reported at n_ctx 512, n_ubatch 512.
    """
    attn = (n_ctx if flash_attn else (shape.n_head + 1) * n_ctx)
    widest = max(attn, 2 * shape.n_ff, shape.n_vocab if with_output else 0)
    return 4 * n_ubatch * (3 * shape.n_embd + widest)


def _costs(shape: ModelShape, k: int, kv: list[int], n_ctx: int, n_ubatch: int, flash_attn: bool) -> _Costs:
    """What `n_gpu_layers = k` puts on the GPU and leaves in RAM."""
    gpu_blocks = max(0, min(k, shape.total_layers) - 1)
    first_gpu = shape.n_layer - gpu_blocks
    output_on_gpu = k >= 1
    gpu_weights = sum(shape.layer_bytes[first_gpu:]) + (shape.output_bytes if output_on_gpu else 0)
    moved = gpu_weights - (shape.output_copy_bytes if output_on_gpu else 0)
    gpu_kv = sum(kv[first_gpu:])
    gpu_compute = compute_buffer_bytes(shape, n_ctx, n_ubatch, with_output=True,
                                       flash_attn=flash_attn) if output_on_gpu else 0
    if first_gpu > 0 or not output_on_gpu:
        ram_compute = compute_buffer_bytes(shape, n_ctx, n_ubatch, with_output=not output_on_gpu,
                                           flash_attn=flash_attn)
    else:  # everything offloaded: the CPU only looks up the input embeddings
        ram_compute = 4 * n_ubatch * shape.n_embd
    return _Costs(gpu_weights=gpu_weights, gpu_kv=gpu_kv, gpu_compute=gpu_compute,
                  ram_weights=shape.weights_bytes - moved, ram_kv=sum(kv) - gpu_kv,
                  ram_compute=ram_compute)


def plan_offload(gguf_path: str | os.PathLike[str], n_ctx: int, free_vram_bytes: int, *,
                 n_gpu_layers_requested: str | int = "auto", kv_type_bytes: float = 2.0,
                 margin_bytes: int = DEFAULT_MARGIN_BYTES, n_batch: int = 512, flash_attn: bool = False,
                 swa_full: bool = True, shape: ModelShape | None = None, n_seq: int = 1) -> OffloadPlan:
    """Plan how many layers of the model at `gguf_path` go to a GPU with `free_vram_bytes` free.

    `auto` picks the largest layer count whose GPU part (weights, KV cache for `n_seq` sequences
    of `n_ctx` tokens each, compute buffer) fits `free_vram_bytes - margin_bytes`; an explicit
    count (or -1 for all) is planned as given, and `OffloadPlan.fits` says whether it fits.
    `n_batch` bounds llama.cpp's micro-batch (n_ubatch = min(512, n_batch, n_ctx)), which sizes
    the compute buffers.
    """
    path = Path(gguf_path)
    shape = shape or ModelShape.from_layout(read_gguf_layout(path))
    n_ubatch = max(1, min(512, n_batch, n_ctx))
    kv = [n_seq * b for b in kv_cache_bytes(shape, n_ctx, kv_type_bytes=kv_type_bytes, n_ubatch=n_ubatch,
                                            swa_full=swa_full)]
    total = shape.total_layers

    def costs(k: int) -> _Costs:
        return _costs(shape, k, kv, _pad(n_ctx), n_ubatch, flash_attn)

    wanted = parse_gpu_layers(n_gpu_layers_requested)
    requested = str(wanted)
    budget = free_vram_bytes - margin_bytes
    if wanted == "auto":
        # GPU cost grows with every layer, so the first count that does not fit ends the search.
        k = 0
        while k < total and costs(k + 1).gpu <= budget:
            k += 1
        if k == total:
            reason = "all layers fit"
        elif k == 0:
            reason = (f"not even the output layer fits (it needs {fmt_bytes(costs(1).gpu)} with its "
                      "compute buffer); running on CPU")
        else:
            reason = f"{k + 1} layers would need {fmt_bytes(costs(k + 1).gpu)}"
    else:
        k = total if int(wanted) < 0 else min(int(wanted), total)
        reason = ""
    chosen = costs(k)
    plan = OffloadPlan(
        model=path.name, gpu_layers=k, total_layers=total, n_ctx=n_ctx, gpu_bytes=chosen.gpu,
        ram_bytes=chosen.ram, kv_bytes=sum(kv), weights_bytes=shape.weights_bytes,
        compute_bytes=chosen.gpu_compute + chosen.ram_compute, gpu_weights_bytes=chosen.gpu_weights,
        gpu_kv_bytes=chosen.gpu_kv, gpu_compute_bytes=chosen.gpu_compute,
        free_vram_bytes=free_vram_bytes, margin_bytes=margin_bytes, requested=requested, reason=reason)
    if wanted != "auto" and not plan.fits:
        plan = dataclasses.replace(plan, reason="does not fit the free VRAM: loading may fail with out "
                                               "of memory (N_GPU_LAYERS=auto picks a count that fits)")
    return plan


def _pad(n: int) -> int:
    return -(-n // _KV_PAD) * _KV_PAD


# -- what the machine has -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GpuInfo:
    """One NVIDIA GPU as NVML or nvidia-smi reports it."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int
    uuid: str = ""


def query_free_vram() -> list[GpuInfo]:
    """The NVIDIA GPUs this process may use, with their free memory; [] when there are none.

    NVML (the `nvidia-ml-py` package) first, then `nvidia-smi`; either may be missing on a
    machine without the driver. Both list every GPU, so CUDA_VISIBLE_DEVICES is applied here.
    """
    gpus = _query_nvml()
    if gpus is None:
        gpus = _query_nvidia_smi()
    return _visible(gpus or [], os.environ.get("CUDA_VISIBLE_DEVICES"))


def _query_nvml() -> list[GpuInfo] | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:  # no driver, no library: nothing to ask
        log.debug("NVML unavailable: %s", exc)
        return None
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(GpuInfo(index=i, name=_text(pynvml.nvmlDeviceGetName(handle)),
                                total_bytes=int(memory.total), free_bytes=int(memory.free),
                                uuid=_text(pynvml.nvmlDeviceGetUUID(handle))))
        return gpus
    except pynvml.NVMLError as exc:
        log.warning("NVML could not list the GPUs: %s", exc)
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value  # older bindings return bytes


_SMI_QUERY = "--query-gpu=index,name,memory.total,memory.free,uuid"


def _query_nvidia_smi() -> list[GpuInfo]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        done = subprocess.run([exe, _SMI_QUERY, "--format=csv,noheader,nounits"], capture_output=True,
                              text=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("nvidia-smi failed: %s", exc)
        return []
    if done.returncode != 0:  # e.g. "NVIDIA-SMI has failed because it couldn't communicate with the driver"
        log.debug("nvidia-smi exited %d: %s", done.returncode, done.stderr.strip() or done.stdout.strip())
        return []
    return parse_nvidia_smi(done.stdout)


def parse_nvidia_smi(text: str) -> list[GpuInfo]:
    """Parse `nvidia-smi --query-gpu=index,name,memory.total,memory.free[,uuid]` CSV (MiB, no units)."""
    gpus = []
    for row in csv.reader(io.StringIO(text), skipinitialspace=True):
        if len(row) < 4:
            continue
        try:
            gpus.append(GpuInfo(index=int(row[0]), name=row[1].strip(), total_bytes=int(float(row[2])) * MiB,
                                free_bytes=int(float(row[3])) * MiB,
                                uuid=row[4].strip() if len(row) > 4 else ""))
        except ValueError:  # "[N/A]" on some virtual GPUs
            continue
    return gpus


def _visible(gpus: list[GpuInfo], cuda_visible: str | None) -> list[GpuInfo]:
    """Apply CUDA_VISIBLE_DEVICES (indices or GPU-UUID prefixes; CUDA stops at the first bad one).

    Indices are matched against NVML's (PCI bus) order, which is CUDA's order when
    CUDA_DEVICE_ORDER=PCI_BUS_ID; only the sum of free memory is used, so a mismatch on a machine
    with mixed GPUs misjudges at most which GPU's memory counts.
    """
    if cuda_visible is None:
        return gpus
    chosen: list[GpuInfo] = []
    for token in (t.strip() for t in cuda_visible.split(",")):
        if token.lstrip("-").isdigit():
            match = [g for g in gpus if g.index == int(token)]
        elif token.startswith("GPU-"):
            match = [g for g in gpus if g.uuid and g.uuid.startswith(token)]
        elif token.startswith("MIG-"):
            return gpus  # MIG instances: their memory is not what the GPU reports; keep it simple
        else:
            match = []
        if not match:
            break
        chosen.extend(g for g in match if g not in chosen)
    return chosen


def gpu_offload_supported() -> bool:
    """Whether the installed llama-cpp-python was built with a GPU backend (CUDA, Metal, ...)."""
    try:
        import llama_cpp
    except Exception as exc:  # a broken build must not stop `doctor` from reporting it
        log.debug("llama_cpp not importable: %s", exc)
        return False
    return bool(llama_cpp.llama_supports_gpu_offload())


def flash_attn_on(setting: str, model_path: str | os.PathLike[str], *, kv_cache_type: str, gpu: bool) -> bool:
    """FLASH_ATTN for one model: `on` and `off` as set; `auto` where flash attention pays: on a GPU,
    with a quantized KV cache (which needs it), or for a model with a sliding window (Gemma 3: its
    CPU kernel skips the cells outside the window, so eight sequences at 2,400 tokens decode 1.66x
    as fast); off for other models on CPU, where it does not decode faster (a Llama-3.2-1B shape:
    27.0 against 27.8 tokens/s at 2,700 tokens, llama-bench here) and would make every prompt part
    read at least 64 rows to keep the caches exact (engine/slot_policy.py). A file the planner
    cannot read is left to llama.cpp's own `auto` (on)."""
    if setting != "auto":
        return setting == "on"
    if gpu or kv_cache_type not in FLOAT_KV_TYPES:
        return True
    try:
        return ModelShape.from_layout(read_gguf_layout(Path(model_path))).n_swa > 0
    except (ModelRefused, OSError):
        return True


# -- the N_GPU_LAYERS rules -------------------------------------------------------------------------

def parse_gpu_layers(setting: str | int) -> str | int:
    """N_GPU_LAYERS as given: "auto", -1 (all), 0 (CPU) or a layer count."""
    text = str(setting).strip().lower()
    if text == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        value = -2
    if value < -1:
        raise SettingsError(f"N_GPU_LAYERS must be auto, -1 (all layers), 0 (CPU only) or a number of "
                            f"layers, got {setting!r}", field="N_GPU_LAYERS")
    return value


def resolve_gpu_layers(setting: str | int, model_path: str | os.PathLike[str], n_ctx: int, *,
                       n_batch: int = 512, kv_cache_type: str = "f16", flash_attn: bool = False,
                       swa_full: bool = True, margin_bytes: int = DEFAULT_MARGIN_BYTES,
                       gpus: list[GpuInfo] | None = None, offload_supported: bool | None = None,
                       n_seq: int = 1) -> tuple[int, OffloadPlan | None, str]:
    """The n_gpu_layers to pass to llama.cpp for N_GPU_LAYERS=`setting`, the plan, and a log line.

    - `auto`: plan against the free VRAM on a GPU build with a visible NVIDIA GPU, else 0.
    - `0`: 0 (CPU only).
    - a count or -1: used as given (the plan says whether it fits); on a build without GPU
      offload or with no GPU visible, `GpuUnavailableError` with the fix.

    `gpus` and `offload_supported` default to `query_free_vram()` and `gpu_offload_supported()`.
    The caller logs the returned line.
    """
    wanted = parse_gpu_layers(setting)
    if wanted == 0:
        return 0, None, "N_GPU_LAYERS=0: running on CPU"
    supported = gpu_offload_supported() if offload_supported is None else offload_supported
    if not supported:
        if wanted == "auto":
            return 0, None, ("N_GPU_LAYERS=auto: this llama-cpp-python build has no GPU offload, running on "
                             f"CPU (for a CUDA build: {CUDA_BUILD_FIX})")
        raise GpuUnavailableError(
            f"N_GPU_LAYERS={wanted} asks for GPU offload, but this llama-cpp-python build is CPU-only. "
            f"Rebuild it with CUDA: {CUDA_BUILD_FIX} (or set N_GPU_LAYERS=0 or auto to run on CPU)",
            field="N_GPU_LAYERS")
    if platform.system() == "Darwin":
        # Metal shares the system memory: there is no separate VRAM to plan against.
        return (-1 if wanted == "auto" else int(wanted)), None, f"N_GPU_LAYERS={wanted}: Metal build, offloading"
    gpus = query_free_vram() if gpus is None else gpus
    if not gpus:
        if wanted == "auto":
            return 0, None, "N_GPU_LAYERS=auto: no NVIDIA GPU visible (NVML and nvidia-smi found none), running on CPU"
        raise GpuUnavailableError(
            f"N_GPU_LAYERS={wanted} asks for GPU offload, but no NVIDIA GPU is visible (NVML and nvidia-smi "
            "found none; in Docker, run with --gpus all or the compose file's GPU reservation, and check "
            "CUDA_VISIBLE_DEVICES). Set N_GPU_LAYERS=0 or auto to run on CPU", field="N_GPU_LAYERS")
    # llama.cpp splits layers across GPUs by free memory; each GPU keeps its own margin.
    free = sum(g.free_bytes for g in gpus)
    try:
        plan = plan_offload(model_path, n_ctx, free, n_gpu_layers_requested=wanted,
                            kv_type_bytes=KV_TYPE_BYTES.get(kv_cache_type, 2.0),
                            margin_bytes=margin_bytes * len(gpus), n_batch=n_batch,
                            flash_attn=flash_attn, swa_full=swa_full, n_seq=n_seq)
    except ModelRefused as exc:
        if wanted == "auto":  # llama.cpp will say what is wrong with the file when it loads it
            return 0, None, f"N_GPU_LAYERS=auto: cannot plan the offload ({exc.message}), running on CPU"
        return int(wanted), None, f"N_GPU_LAYERS={wanted} (no plan: {exc.message})"
    layers = plan.gpu_layers if wanted == "auto" else int(wanted)
    return layers, plan, plan.describe()
