"""One typed settings schema: defaults, then environment variables, then CLI flags.

Every setting is a dataclass field whose metadata names its environment variable and describes
it; the CLI flags (`--api-port` for `api_port`) and the configuration table of docs/configuration.md are generated
from the same fields, so there is one place to add a setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ai_engine_common.machine import physical_cores
from engine.errors import SettingsError
from engine.kv_types import FLOAT_KV_TYPES, KV_CACHE_TYPES

REPO_ROOT = Path(__file__).resolve().parent.parent


def _setting(env: str, help: str, default: Any = None, *, factory: Callable[[], Any] | None = None,
             default_doc: str | None = None, minimum: int | None = None,
             maximum: int | None = None, secret: bool = False) -> Any:
    meta = {"env": env, "help": help, "default_doc": default_doc, "min": minimum, "max": maximum}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta, repr=not secret)  # a secret never shows in a log or traceback


@dataclass(frozen=True)
class Settings:
    """The engine's configuration. Build it with `Settings.load()`."""

    model_path: Path = _setting(
        "MODEL_PATH", "Folder of GGUF model files; /load-model only loads files inside it.",
        factory=lambda: REPO_ROOT / "models", default_doc="`models/` in the repo (`/models` in Docker)")
    model: str = _setting(
        "MODEL", "Model to load at start-up (the default model): a file name under MODEL_PATH, a path, a preset "
        "or an Ollama-style alias from the catalog (`llama3.1:8b`). Empty: the embedded default model (Gemma 3 "
        "270M Q4_K_M).", "",
        default_doc="empty (embedded default)")
    lora: str = _setting(
        "LORA", "LoRA adapters (GGUF, from `ai-engine convert-lora`) applied on top of the model: "
        "comma-separated file names under MODEL_PATH or paths. Empty: none.", "", default_doc="empty (none)")
    lora_scale: str = _setting(
        "LORA_SCALE", "Scale of each LoRA adapter: one number for all, or one per adapter (comma-separated).",
        "1.0")
    api_host: str = _setting(
        "API_HOST", "Address to listen on. Use 0.0.0.0 to accept other machines (Docker does).",
        "127.0.0.1")
    api_port: int = _setting("API_PORT", "TCP port to listen on.", 5000, minimum=1, maximum=65535)
    n_ctx: int = _setting(
        "N_CTX", "Context size in tokens (prompt + reply). A longer prompt is refused, "
        "never truncated.", 4096, minimum=64)
    n_threads: int = _setting(
        "N_THREADS", "CPU threads for decoding.", factory=physical_cores,
        default_doc="physical cores", minimum=1)
    n_threads_batch: int = _setting(
        "N_THREADS_BATCH", "CPU threads for prompt processing.", factory=physical_cores,
        default_doc="physical cores", minimum=1)
    n_batch: int = _setting(
        "N_BATCH", "Tokens evaluated per llama.cpp decode call: prompt tokens, and one token of each sequence "
        "being generated, so at least N_PARALLEL. Below 8 (64 with flash attention) the conversation cache "
        "can no longer keep replies exactly as without it.", 512, minimum=1)
    n_gpu_layers: str = _setting(
        "N_GPU_LAYERS", "Layers to offload to a CUDA GPU: `auto` (as many as fit the free VRAM; CPU when the "
        "build or machine has no GPU), 0 (CPU only), N, or -1 for all. N or -1 without a GPU is an error.",
        "auto")
    flash_attn: str = _setting(
        "FLASH_ATTN", "Flash attention: `off`, `on`, or `auto`: on where it pays, off elsewhere. `auto` turns it "
        "on on a GPU, with a quantized KV cache (which needs it), and for models with a sliding window (Gemma "
        "3: on a 2-core CPU eight sequences at 2,400 tokens of context each decode 1.66x as fast with it, 139 "
        "against 84 tokens/s, which a class needs); off for other models on CPU, which decode no faster with "
        "it. With it, the conversation cache reads at least 64 tokens a turn to stay exact (its CPU kernel "
        "tiles 64 query rows), and a state restored past the sliding window is close but not bit for bit "
        "(docs/class.md).", "auto")
    kv_cache_type: str = _setting(
        "KV_CACHE_TYPE", "KV cache element type: " + ", ".join(KV_CACHE_TYPES) +
        ". q8_0 halves the cache's memory (needs FLASH_ATTN auto or on).", "f16")
    cache_ram_mb: int = _setting(
        "CACHE_RAM_MB", "RAM budget of the conversation cache (KV states of recent interviews, so each "
        "turn evaluates only its new tokens). 0 turns it off: every prompt is evaluated in full.",
        256, minimum=0)
    prompt_cache_dir: str = _setting(
        "PROMPT_CACHE_DIR", "Folder of the prompt cache on disk: the KV state of prompt prefixes that several "
        "requests used (a class's case prompt), kept across restarts so the next class starts warm. One "
        "subfolder per model; files 0600; a corrupt or foreign file is removed, never loaded.", "",
        default_doc="`$XDG_CACHE_HOME/ai-engine/prompt-cache` (`~/.cache/...`)")
    prompt_cache_mb: int = _setting(
        "PROMPT_CACHE_MB", "Disk budget of the prompt cache per model (least recently used files go first). "
        "0 turns it off.", 2048, minimum=0)
    response_cache_size: int = _setting(
        "RESPONSE_CACHE_SIZE", "Replies kept for deterministic requests (temperature 0 or a seed); an "
        "identical request is answered from memory. 0 turns it off.", 256, minimum=0)
    n_parallel: int = _setting(
        "N_PARALLEL", "Sequences decoded together in one batch (continuous batching). Each has its own "
        "N_CTX tokens of KV cache, so the cache takes N_PARALLEL times the memory of one (8 × 4096 tokens: "
        "576 MB for the default model, 4 GB for a 7B one: use 4 there). 8 serves a class on 2 cores: as fast "
        "as 4 for up to 4 students, and 8 at once get their first word in 0.2 s instead of 2.9 s.", 8,
        minimum=1, maximum=64)
    prefill_chunk: int = _setting(
        "PREFILL_CHUNK", "Prompt tokens read per decode step while other requests are generating (chunked "
        "prefill): a 2,500-token case prompt then slows the others' replies instead of stopping them for seconds. "
        "Never more than half a second of reading at the measured speed (a slow model reads fewer). Alone, a prompt "
        "is read N_BATCH tokens at a time.", 256, minimum=8)
    max_queue: int = _setting(
        "MAX_QUEUE", "Requests that may wait while N_PARALLEL are generating; past that the engine "
        "answers 503 with Retry-After at once. 0: no waiting room (a request is taken only while a sequence "
        "slot is free).", 32, minimum=0)
    max_loaded_models: int = _setting(
        "MAX_LOADED_MODELS", "Models resident at once (each with its own N_PARALLEL sequences and KV cache). "
        "A request for another model unloads the least recently used idle one, as Ollama does.", 3, minimum=1)
    memory_budget_mb: int = _setting(
        "MEMORY_BUDGET_MB", "RAM that resident models may take together, as the offload planner estimates "
        "it (weights + KV cache + compute buffers + conversation cache). 0: the RAM available at start-up "
        "less 1 GiB. GPU layers are held to the VRAM free at start-up (less the planner's margin).", 0,
        default_doc="0 (available RAM at start-up less 1 GiB)", minimum=0)
    keep_alive: str = _setting(
        "KEEP_ALIVE", "How long a model loaded by a request stays after its last request (`5m`, `1h`, `30s`, "
        "seconds; 0 unloads at once; negative keeps it). A request's own `keep_alive` wins. The default model "
        "(MODEL, or the last /load-model) stays until a request says otherwise.", "5m")
    load_on_request: bool = _setting(
        "LOAD_ON_REQUEST", "Whether a request's `model` field may load a model that is not resident. `off` "
        "pins the models: only MODEL and POST /load-model load one, and requests' keep_alive is ignored.",
        True, default_doc="`on`")
    request_timeout_s: int = _setting(
        "REQUEST_TIMEOUT_S", "Deadline of a request in seconds, queue wait + generation; past it the "
        "generation stops and the client gets a 504. A client may ask for a shorter one (`X-Request-Timeout` "
        "header or `timeout_s` field, seconds). A request that the engine estimates cannot finish in time (from "
        "its measured speed and the work ahead) gets 503 with Retry-After at once.", 120, minimum=1)
    api_key: str = _setting(
        "ENGINE_API_KEY", "If set, every route but /health and /openapi.json needs it "
        "(`Authorization: Bearer KEY` or `X-API-Key: KEY`).", "", default_doc="empty (no key)", secret=True)
    api_key_file: str = _setting(
        "ENGINE_API_KEY_FILE", "File that holds the API key (a Docker or Kubernetes secret), so that the key is "
        "in neither the environment nor `ps` output. Surrounding whitespace is ignored. Setting both this and "
        "ENGINE_API_KEY is an error.", "", default_doc="empty")
    allow_no_key: bool = _setting(
        "ALLOW_NO_KEY", "Start on an address other than loopback without an API key. Without it such a start is "
        "refused: anyone who can reach the address could run generations and read replies. Set it only where "
        "nothing untrusted can reach the port (a private Docker network, a port published on 127.0.0.1).",
        False, default_doc="`off`")
    allowed_hosts: str = _setting(
        "ALLOWED_HOSTS", "Host header values accepted, comma-separated (names or addresses; a port is ignored; "
        "`*` for any). Other requests get 400, so that a web page cannot read replies through DNS rebinding. A "
        "request with a valid API key, and /health, are always accepted. Empty: localhost, 127.0.0.1, ::1 and "
        "API_HOST; when API_HOST is 0.0.0.0 or ::, also this machine's host names and addresses.", "",
        default_doc="empty (localhost names and the bind address)")
    cors_origins: str = _setting(
        "CORS_ORIGINS", "Comma-separated browser origins allowed to call the engine (`*` for any, "
        "empty for none).", "http://localhost:3000,http://127.0.0.1:3000,http://localhost:5173,"
        "http://127.0.0.1:5173", default_doc="the simulator's dev front ends: `http://localhost:3000`, "
        "`http://localhost:5173` (and 127.0.0.1)")
    max_body_bytes: int = _setting(
        "MAX_BODY_BYTES", "Largest request body accepted; larger ones get 413.", 1 << 20, minimum=1024)
    log_format: str = _setting("LOG_FORMAT", "Log format: `json` (one JSON object a line) or `text`.", "json")
    log_prompts: str = _setting(
        "ENGINE_LOG_PROMPTS", "Path of a rotating JSON-lines file where every prompt and reply is kept "
        "for later review. Contains sensitive data; off when empty.", "", default_doc="empty (off)")
    connection_limit: int = _setting(
        "CONNECTION_LIMIT", "Open HTTP connections at once; further ones wait in the kernel's backlog until one "
        "closes.", 256, minimum=8)
    client_connection_limit: int = _setting(
        "CLIENT_CONNECTION_LIMIT", "Open HTTP connections from one client address; further ones are closed at "
        "once, so that one machine cannot hold them all. A backend serving a class keeps one per student "
        "at most.", 64, minimum=1)
    read_timeout_s: int = _setting(
        "READ_TIMEOUT_S", "Seconds a client may take to send one request (headers and body); a slower one is "
        "disconnected, so that a trickling client cannot hold a connection.", 10, minimum=1)
    idle_timeout_s: int = _setting(
        "IDLE_TIMEOUT_S", "Seconds an idle keep-alive connection stays open (a request being answered is never "
        "idle).", 30, minimum=1)
    server_threads: int = _setting(
        "SERVER_THREADS", "HTTP worker threads: requests being generated, queued or streamed at once "
        "(keep it above N_PARALLEL + MAX_QUEUE to let the queue fill).", 48, minimum=1)
    shutdown_timeout_s: int = _setting(
        "SHUTDOWN_TIMEOUT_S", "On SIGTERM or Ctrl-C, seconds the engine goes on answering the requests it has "
        "received before it stops (new connections are refused, and a new request on an open one gets 503); "
        "a second signal stops it at once. Give the container as long to stop (`stop_grace_period`).", 30,
        minimum=0)
    log_level: str = _setting("LOG_LEVEL", "Logging level: DEBUG, INFO, WARNING or ERROR.", "INFO")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            lo, hi = f.metadata["min"], f.metadata["max"]
            if lo is not None and value < lo or hi is not None and value > hi:
                bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
                raise SettingsError(f"{f.metadata['env']} must be {bounds}, got {value}",
                                    field=f.metadata["env"])
        if self.n_batch < self.n_parallel:
            raise SettingsError(f"N_BATCH ({self.n_batch}) must be at least N_PARALLEL ({self.n_parallel}): each "
                                "decode step holds one token of every sequence being generated", field="N_BATCH")
        if self.kv_cache_type not in KV_CACHE_TYPES:
            raise SettingsError(f"KV_CACHE_TYPE must be one of {', '.join(KV_CACHE_TYPES)}, got "
                                f"{self.kv_cache_type!r}", field="KV_CACHE_TYPE")
        flash = _BOOLS.get(str(self.flash_attn).strip().lower(), str(self.flash_attn).strip().lower())
        if flash not in (True, False, "auto"):
            raise SettingsError(f"FLASH_ATTN must be auto, on or off, got {self.flash_attn!r}", field="FLASH_ATTN")
        object.__setattr__(self, "flash_attn", {True: "on", False: "off"}.get(flash, flash))  # normalised
        if self.kv_cache_type not in FLOAT_KV_TYPES and self.flash_attn == "off":
            raise SettingsError(f"KV_CACHE_TYPE={self.kv_cache_type} needs flash attention (FLASH_ATTN auto or "
                                "on: llama.cpp quantizes the V cache only with it)", field="KV_CACHE_TYPE")
        from engine.offload import parse_gpu_layers  # numpy-heavy: only when settings are built

        parse_gpu_layers(self.n_gpu_layers)
        try:
            scales = [float(x) for x in self.lora_scale.split(",") if x.strip()]
        except ValueError:
            raise SettingsError(f"LORA_SCALE must be numbers, got {self.lora_scale!r}", field="LORA_SCALE") from None
        n_lora = len([x for x in self.lora.split(",") if x.strip()])
        if n_lora and len(scales) not in (1, n_lora):
            raise SettingsError(f"LORA_SCALE has {len(scales)} values for {n_lora} adapters", field="LORA_SCALE")
        try:
            parse_duration(self.keep_alive)
        except ValueError as exc:
            raise SettingsError(f"KEEP_ALIVE: {exc}", field="KEEP_ALIVE") from None
        if self.api_key and self.api_key_file:
            raise SettingsError("set ENGINE_API_KEY or ENGINE_API_KEY_FILE, not both", field="ENGINE_API_KEY_FILE")
        if self.api_key_file:
            object.__setattr__(self, "api_key", _read_key_file(self.api_key_file))
        if self.client_connection_limit > self.connection_limit:
            raise SettingsError(f"CLIENT_CONNECTION_LIMIT ({self.client_connection_limit}) must not exceed "
                                f"CONNECTION_LIMIT ({self.connection_limit})", field="CLIENT_CONNECTION_LIMIT")
        if self.log_format not in ("json", "text"):
            raise SettingsError(f"LOG_FORMAT must be json or text, got {self.log_format!r}", field="LOG_FORMAT")
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise SettingsError(f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}",
                                field="LOG_LEVEL")

    @property
    def keep_alive_s(self) -> float | None:
        """KEEP_ALIVE in seconds; None: forever."""
        seconds = parse_duration(self.keep_alive)
        return None if seconds < 0 else seconds

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, args: argparse.Namespace | None = None,
             **overrides: Any) -> "Settings":
        """Defaults, overridden by environment variables, then CLI flags, then `overrides`."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f.metadata["env"])
            if raw is not None and raw.strip() != "":
                values[f.name] = _convert(f, raw.strip(), f.metadata["env"])
            if args is not None and getattr(args, f.name, None) is not None:
                values[f.name] = _convert(f, getattr(args, f.name), "--" + _flag(f.name))
        values.update(overrides)
        if "model_path" in values:
            values["model_path"] = Path(values["model_path"]).expanduser()
        return cls(**values)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add one `--flag` per setting; unset flags leave the environment's value alone."""
        for f in dataclasses.fields(cls):
            parser.add_argument("--" + _flag(f.name), dest=f.name, default=None, metavar=f.metadata["env"],
                                help=f"{f.metadata['help']} (env {f.metadata['env']})".replace("%", "%%"))

    @classmethod
    def markdown_table(cls) -> str:
        """The configuration table of docs/configuration.md."""
        rows = ["| Variable | Flag | Default | Meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            default = f.metadata["default_doc"] or f"`{f.default}`"
            rows.append(f"| `{f.metadata['env']}` | `--{_flag(f.name)}` | {default} | {f.metadata['help']} |")
        return "\n".join(rows)


_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_DURATION_PART = re.compile(rf"({_NUMBER})(ns|us|µs|ms|s|m|h)", re.ASCII)
_DURATION = re.compile(rf"([+-]?)((?:{_NUMBER}(?:ns|us|µs|ms|s|m|h))+|{_NUMBER})", re.ASCII)


def parse_duration(value: Any) -> float:
    """Seconds in an Ollama `keep_alive`: a number of seconds, or a Go duration (`5m`, `1h30m`,
    `300ms`, `-1m`); negative means forever. Raises ValueError with what is accepted."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected a duration such as 5m, 30s or -1, got {value!r}")
    if not isinstance(value, str):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"expected a finite duration, got {value!r}")
        return float(value)
    match = _DURATION.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"expected a duration such as 5m, 1h30m, 30s, 0 or -1, got {value!r}")
    sign, body = -1.0 if match.group(1) == "-" else 1.0, match.group(2)
    parts = _DURATION_PART.findall(body)
    return sign * (sum(float(n) * _DURATION_UNITS[u] for n, u in parts) if parts else float(body))


def _read_key_file(path: str) -> str:
    try:
        key = Path(path).expanduser().read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise SettingsError(f"ENGINE_API_KEY_FILE {path}: cannot read it ({reason})",
                            field="ENGINE_API_KEY_FILE") from None
    if not key or any(c.isspace() or not c.isprintable() for c in key):
        raise SettingsError(f"ENGINE_API_KEY_FILE {path} must hold one key: printable characters, no spaces",
                            field="ENGINE_API_KEY_FILE")
    return key


def _flag(name: str) -> str:
    return name.replace("_", "-")


_BOOLS = {"1": True, "true": True, "on": True, "yes": True, "0": False, "false": False, "off": False, "no": False}


def _convert(f: dataclasses.Field, raw: Any, source: str) -> Any:
    kind = f.type if isinstance(f.type, type) else {"int": int, "str": str, "Path": Path, "bool": bool}[f.type]
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        value = _BOOLS.get(str(raw).strip().lower())
        if value is None:
            raise SettingsError(f"{source} must be on or off, got {raw!r}", field=f.metadata["env"])
        return value
    if kind is int:
        try:
            return int(str(raw).strip())
        except ValueError:
            raise SettingsError(f"{source} must be an integer, got {raw!r}", field=f.metadata["env"]) from None
    return kind(raw)
