"""`ai-engine doctor`: what this machine and this build can do, and what a model will need.

Prints the CPU and its vector features (and whether the installed llama.cpp build avoided the AMX
crash described in DESIGN.md), threads, RAM, whether the build can offload to a GPU, the GPUs with
their free VRAM, and for a model the offload plan and memory estimate. Exit status 0 when nothing
is wrong, 1 when a problem was found (each is listed with its fix).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import platform
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from ai_engine_common.machine import memory_info, physical_cores, read_cpu_info
from engine import offload
from engine.default_model import DEFAULT_MODEL_NAME
from engine.errors import EngineError, SettingsError
from engine.offload import fmt_bytes

# llama.cpp CPU-backend features (llama_print_system_info) and the /proc/cpuinfo flag each needs.
# A build feature the CPU lacks means "illegal instruction" on the first matrix multiply.
_BUILD_FEATURE_FLAGS = {
    "SSSE3": "ssse3", "AVX": "avx", "AVX2": "avx2", "F16C": "f16c", "FMA": "fma", "BMI2": "bmi2",
    "AVX_VNNI": "avx_vnni", "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi",
    "AVX512_VNNI": "avx512_vnni", "AVX512_BF16": "avx512_bf16", "AMX_INT8": "amx_int8",
}
_AMX_FLAGS = ("amx_tile", "amx_int8", "amx_bf16")
_SETTINGS_USED = ("model_path", "model", "n_ctx", "n_batch", "kv_cache_type", "flash_attn", "n_gpu_layers",
                  "n_threads", "n_parallel", "cache_ram_mb", "memory_budget_mb", "max_loaded_models")


def add_command(sub: argparse._SubParsersAction) -> None:
    """Register `ai-engine doctor` on the CLI's subparsers; it sets `args.func = run`."""
    parser = sub.add_parser(
        "doctor", help="check this machine: CPU features, RAM, GPU offload, free VRAM, a model's memory plan",
        description="Print the CPU and its features (and whether this llama.cpp build avoids the AMX crash), "
                    "threads, RAM, whether the build supports GPU offload, the GPUs with their free VRAM, and "
                    "for a model the offload plan and estimated memory. Exit status 1 if a problem was found.")
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="GGUF file to plan for: a path or a file name under MODEL_PATH "
                             "(default: MODEL, else the embedded default model)")
    parser.add_argument("--n-ctx", dest="n_ctx", type=int, default=None, metavar="N",
                        help="context size for the KV cache estimate (default: N_CTX, 4096)")
    parser.set_defaults(func=run)


def parse_system_info(text: str) -> dict[str, dict[str, str]]:
    """`llama_print_system_info()` as {backend: {feature: value}}, e.g. {"CPU": {"AVX2": "1"}}."""
    backends: dict[str, dict[str, str]] = {}
    current = backends.setdefault("CPU", {})
    for token in text.split("|"):
        token = token.strip()
        if " : " in token:  # "CUDA : ARCHS = 860" starts the next backend's features
            name, token = (part.strip() for part in token.split(" : ", 1))
            current = backends.setdefault(name, {})
        key, sep, value = token.partition("=")
        if sep:
            current[key.strip()] = value.strip()
    return backends


def amx_verdict(cpu_flags: frozenset[str], build: dict[str, str]) -> tuple[bool, str]:
    """(ok, explanation) about ggml's AMX kernels, which crash on the first decode (DESIGN.md)."""
    cpu_amx = any(flag in cpu_flags for flag in _AMX_FLAGS)
    build_amx = build.get("AMX_INT8") == "1"
    if build_amx and cpu_amx:
        return False, ("AT RISK: this build has ggml's AMX kernels and this CPU has AMX; the first decode may "
                       "crash in ggml_backend_amx_mul_mat. Rebuild without a native build: remove .venv/"
                       ".llama-cpp-build and run scripts/serve.sh (it sets GGML_NATIVE=OFF and this CPU's flags)")
    if cpu_amx:
        return True, "avoided: this CPU has AMX, and the build has no AMX kernels (GGML_NATIVE=OFF)"
    if build_amx:
        return True, "not affected: the build has AMX kernels, but this CPU has no AMX"
    return True, "not affected: no AMX in this CPU or in the build"


def missing_cpu_features(cpu_flags: frozenset[str], build: dict[str, str]) -> list[str]:
    """Build features this CPU does not have (only checked where /proc/cpuinfo lists x86 flags)."""
    if "sse2" not in cpu_flags:
        return []
    return [feature for feature, flag in _BUILD_FEATURE_FLAGS.items()
            if build.get(feature) == "1" and flag not in cpu_flags]


def describe_cpu_features(flags: frozenset[str]) -> str:
    """"AVX2 yes, AVX-512 yes (F BW VNNI …), AVX-VNNI no, AMX no" from /proc/cpuinfo flags."""
    def listed(names: list[str]) -> str:
        return f"yes ({' '.join(names)})" if names else "no"

    avx512 = sorted(f[len("avx512"):].strip("_").upper() for f in flags if f.startswith("avx512"))
    return ", ".join([f"AVX2 {'yes' if 'avx2' in flags else 'no'}", f"AVX-512 {listed(avx512)}",
                      f"AVX-VNNI {'yes' if 'avx_vnni' in flags else 'no'}",
                      f"AMX {listed([f for f in _AMX_FLAGS if f in flags])}"])


class _Report:
    """Collects the printed sections and the problems found."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    @staticmethod
    def section(title: str) -> None:
        print(f"\n{title}")

    @staticmethod
    def row(label: str, value: str) -> None:
        print(f"  {label + ':':<19} {value}")

    def problem(self, text: str) -> None:
        self.problems.append(text)


def run(args: argparse.Namespace) -> int:
    """Print the report; 0 when no problem was found, else 1."""
    report = _Report()
    settings = _load_settings(report)
    print("ai-engine doctor")
    _report_system(report, settings)
    offload_ok = _report_build(report)
    gpus = _report_gpus(report)
    _report_model(report, args, settings, offload_ok, gpus)
    print()
    if report.problems:
        print("Problems found:")
        for text in report.problems:
            print(f"  - {text}")
        return 1
    print("No problems found.")
    return 0


def _load_settings(report: _Report) -> dict[str, Any]:
    """The engine's settings from the environment, as a plain dict (defaults where they are invalid)."""
    from engine.settings import REPO_ROOT, Settings

    # The schema's defaults (None where a default is computed), used where the environment is invalid.
    values = {f.name: None if f.default is dataclasses.MISSING else f.default
              for f in dataclasses.fields(Settings) if f.name in _SETTINGS_USED}
    values["model_path"] = REPO_ROOT / "models"
    try:
        loaded = Settings.load()
    except SettingsError as exc:
        report.problem(f"settings: {exc.message}")
        return values
    return {name: getattr(loaded, name) for name in values}


def _report_system(report: _Report, settings: dict[str, Any]) -> None:
    cpu = read_cpu_info()
    report.section("System")
    report.row("OS", f"{platform.system()} {platform.release()} {platform.machine()}, "
                     f"Python {platform.python_version()}")
    report.row("CPU", cpu.model)
    if cpu.flags:
        report.row("CPU features", describe_cpu_features(cpu.flags))
    threads = settings.get("n_threads") or physical_cores()
    report.row("threads", f"{cpu.logical} logical CPUs, {physical_cores()} physical cores; "
                          f"N_THREADS {threads}")
    total, available = memory_info()
    report.row("RAM", f"{fmt_bytes(total)} total, {fmt_bytes(available)} available")


def _report_build(report: _Report) -> bool:
    """The llama.cpp build: version, features, AMX verdict, GPU offload. Returns offload support."""
    report.section("llama.cpp build")
    try:
        import llama_cpp
    except Exception as exc:  # a broken build is exactly what doctor is for
        report.row("llama-cpp-python", f"cannot be imported: {exc}")
        report.problem(f"llama-cpp-python cannot be imported ({exc}); run scripts/serve.sh to build it")
        return False
    info = llama_cpp.llama_print_system_info()
    info = info.decode(errors="replace") if isinstance(info, bytes) else str(info)
    backends = parse_system_info(info)
    report.row("llama-cpp-python", llama_cpp.__version__)
    stamp = Path(sys.prefix) / ".llama-cpp-build"  # written by scripts/_setup.sh
    if stamp.is_file():
        report.row("built with", stamp.read_text(encoding="utf-8").strip().partition(" ")[2] or "?")
    report.row("system info", re.sub(r"\s*\|\s*$", "", info.strip()))
    cpu = read_cpu_info()
    ok, verdict = amx_verdict(cpu.flags, backends.get("CPU", {}))
    report.row("AMX crash", verdict)
    if not ok:
        report.problem(verdict)
    missing = missing_cpu_features(cpu.flags, backends.get("CPU", {}))
    if missing:
        report.problem(f"the build uses {', '.join(missing)}, which this CPU lacks (illegal instruction); "
                       "rebuild on this machine with scripts/serve.sh")
    supported = offload.gpu_offload_supported()
    gpu_backends = [name for name in backends if name not in ("CPU",)]
    report.row("GPU offload", f"yes ({', '.join(gpu_backends) or 'GPU backend'})" if supported else
               f"no (CPU-only build; for CUDA: {offload.CUDA_BUILD_FIX})")
    return supported


def _report_gpus(report: _Report) -> list[offload.GpuInfo]:
    report.section("GPUs")
    gpus = offload.query_free_vram()
    for gpu in gpus:
        report.row(f"GPU {gpu.index}", f"{gpu.name}, {fmt_bytes(gpu.total_bytes)} total, "
                                       f"{fmt_bytes(gpu.free_bytes)} free")
    if not gpus:
        nvml = ("NVML found no GPU or no driver" if importlib.util.find_spec("pynvml")
                else "nvidia-ml-py not installed")
        smi = "nvidia-smi found none" if shutil.which("nvidia-smi") else "no nvidia-smi"
        report.row("NVIDIA GPUs", f"none visible ({nvml}; {smi})")
    return gpus


def _report_model(report: _Report, args: argparse.Namespace, settings: dict[str, Any],
                  offload_ok: bool, gpus: list[offload.GpuInfo]) -> None:
    path = _model_file(args, settings)
    n_ctx = getattr(args, "n_ctx", None) or int(settings["n_ctx"])
    report.section(f"Model: {path}")
    if not path.is_file():
        report.row("file", "not found")
        if getattr(args, "model", None) or settings.get("model"):
            report.problem(f"model file not found: {path}")
        else:
            report.row("fix", "the default model is assembled on first start; or run: ai-engine ensure-model")
        return
    try:
        _report_memory(report, path, n_ctx, settings)
    except EngineError as exc:
        report.row("file", f"cannot be read: {exc.message}")
        report.problem(exc.message)
        return
    configured = str(settings["n_gpu_layers"])
    for setting in dict.fromkeys([configured, "auto"]):  # the configured value, then what auto does
        try:
            _layers, _plan, message = offload.resolve_gpu_layers(
                setting, path, n_ctx, kv_cache_type=str(settings["kv_cache_type"]), n_batch=int(settings["n_batch"]),
                flash_attn=settings["flash_attn"] != "off", gpus=gpus, offload_supported=offload_ok,
                n_seq=int(settings["n_parallel"]))
        except SettingsError as exc:
            message = exc.message
            report.problem(message)
        report.row(f"N_GPU_LAYERS={setting}", message.removeprefix(f"N_GPU_LAYERS={setting}: "))


def _report_memory(report: _Report, path: Path, n_ctx: int, settings: dict[str, Any]) -> None:
    """The model's shape and what it needs on the CPU alone and fully offloaded."""
    kv_type, n_batch = str(settings["kv_cache_type"]), int(settings["n_batch"])
    shape = offload.ModelShape.from_layout(offload.read_gguf_layout(path))
    n_seq = int(settings["n_parallel"])
    common = dict(shape=shape, n_batch=n_batch, flash_attn=settings["flash_attn"] != "off",
                  kv_type_bytes=offload.KV_TYPE_BYTES.get(kv_type, 2.0), n_seq=n_seq)
    cpu = offload.plan_offload(path, n_ctx, 0, n_gpu_layers_requested=0, **common)
    full = offload.plan_offload(path, n_ctx, 0, n_gpu_layers_requested=-1, **common)
    report.row("architecture", f"{shape.arch}, {shape.n_layer} blocks + output layer, "
                               f"vocabulary {shape.n_vocab:,}")
    report.row("weights", fmt_bytes(cpu.weights_bytes))
    report.row("KV cache", f"{fmt_bytes(cpu.kv_bytes)} (N_PARALLEL {n_seq} × n_ctx {n_ctx}, {kv_type})")
    report.row("compute buffer", f"{fmt_bytes(cpu.compute_bytes)} (n_batch {n_batch})")
    report.row("on CPU only", f"about {fmt_bytes(cpu.ram_bytes)} of RAM")
    report.row("all on GPU", f"about {fmt_bytes(full.gpu_bytes)} of VRAM (+ {fmt_bytes(offload.DEFAULT_MARGIN_BYTES)}"
                             f" margin) and {fmt_bytes(full.ram_bytes)} of RAM")
    _total, available = memory_info()
    if settings.get("memory_budget_mb") is not None:  # what the model manager plans with (engine/startup.py)
        per_model = cpu.ram_bytes + (int(settings["cache_ram_mb"]) << 20)
        from engine.startup import ram_budget

        budget = ram_budget(int(settings["memory_budget_mb"]), available)
        fit = min(budget // per_model, int(settings["max_loaded_models"]))
        report.row("models resident", f"{fit} of this size at once on CPU (about {fmt_bytes(per_model)} each with "
                                      f"the conversation cache; budget {fmt_bytes(budget)}, MAX_LOADED_MODELS "
                                      f"{settings['max_loaded_models']})")
    if available and cpu.ram_bytes > available:
        report.problem(f"the model needs about {fmt_bytes(cpu.ram_bytes)} of RAM on CPU, but only "
                       f"{fmt_bytes(available)} is available; pick a smaller quantization or lower N_CTX")


def _model_file(args: argparse.Namespace, settings: dict[str, Any]) -> Path:
    """The file `serve` would load: --model (a path, a file under MODEL_PATH, a preset or an alias),
    else MODEL, else the embedded default model (named, not assembled), by the one start-up plan."""
    from engine.settings import Settings
    from engine.startup import plan_startup

    overrides = {k: v for k, v in settings.items() if v is not None}
    if getattr(args, "model", None):
        overrides["model"] = args.model
    plan = plan_startup(Settings.load(env={}, **overrides), assemble=lambda folder: folder / DEFAULT_MODEL_NAME)
    return plan.spec.path.resolve()
