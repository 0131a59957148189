"""The Ollama API subset: /api/generate, /api/chat, /api/tags, /api/show, /api/version.

Field names, defaults and units follow Ollama's API documentation (durations in nanoseconds,
`stream` true by default, NDJSON when streaming). Differences are listed in the README.
A `model` that names a GGUF under MODEL_PATH (or a preset, or an alias such as `llama3.1:8b`) is
loaded on demand beside the others, within MAX_LOADED_MODELS and the memory budget, and unloaded
after `keep_alive` (see engine/model_manager.py); an unknown one is a 404
`{"error": "model '...' not found"}`. `/api/ps` lists the resident models.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

from flask import Blueprint, current_app, jsonify

from engine import __version__, gguf_info
from engine.api import service
from engine.api import bodies, replies
from engine.api import validation as v
from engine.api.bodies import OLLAMA_DEFAULTS as DEFAULTS
from engine.errors import BadRequest, EngineError, ModelNotFound
from engine.generation import SamplingParams
from engine.hub_names import pulled_name
from engine.model_files import Preset
from engine.model_manager import ModelManager

bp = Blueprint("ollama", __name__, url_prefix="/api")
NS = 1_000_000_000


def _host() -> ModelManager:
    return current_app.extensions["model_host"]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def ollama_name(rel: str) -> str:
    """How a file under MODEL_PATH is named on this surface: `gemma-3-270m-q4_k_m:latest`; a pulled
    one as it was pulled, `hf.co/ORG/REPO:QUANT`."""
    return pulled_name(rel) or rel.removesuffix(".gguf") + ":latest"


def _params(r) -> SamplingParams:
    """The sampling settings of a parsed request's `options` (num_ctx is accepted; the context is
    N_CTX), held to its `format` if it has one."""
    options = r.options
    return bodies.sampling(options, DEFAULTS, max_tokens=max(options.num_predict, 0),
                           grammar=bodies.grammar_of(r.format))


def _stats(job: service.Job, load_s: float) -> dict:
    r = job.result
    total = time.perf_counter() - job.started
    prompt_eval = max(r.ttft_s - load_s, 0.0)
    return {
        "done_reason": replies.client_finish_reason(r),
        "total_duration": int(total * NS),
        "load_duration": int(load_s * NS),
        "prompt_eval_count": r.prompt_tokens - r.reused_tokens,
        "prompt_eval_duration": int(prompt_eval * NS),
        "eval_count": r.tokens,
        "eval_duration": int(r.decode_s * NS),
    }


def _respond(run: service.Run, stream: bool, wrap, preset: Preset | None = None):
    """One JSON reply, or NDJSON: a line per token, then the final line with the statistics.
    `wrap(text)` shapes the text field of the surface (`response` or `message`); a reply from a
    `preset` carries the preset's name, as /api/tags lists it."""
    job, load_s = run.job, run.load_seconds
    shown = (preset.name if ":" in preset.name else preset.name + ":latest") if preset else ollama_name(job.model_name)
    if not stream:
        text = service.complete(run)
        return jsonify({"model": shown, "created_at": _now(), **wrap(text), "done": True,
                        **_stats(job, load_s)})

    def piece(text: str) -> dict | None:
        return {"model": shown, "created_at": _now(), **wrap(text), "done": False} \
            if text else None

    def end() -> list[dict]:
        return [{"model": shown, "created_at": _now(), **wrap(""), "done": True,
                 **_stats(job, load_s)}]

    # Ollama streams an error after the 200 as an {"error": ...} line.
    lines = replies.stream(run, replies.NDJSON, piece=piece, error=lambda exc: {"error": exc.message}, end=end)
    return service.streaming_response(lines, run, replies.NDJSON.mimetype)


def _with_preset(body: dict, host: ModelManager) -> tuple[dict, Preset | None]:
    """The request with the defaults of the preset its `model` names (POST /api/create's PARAMETER
    under the request's own `options`, SYSTEM when it sends none) and that preset; else as it is."""
    name = body.get("model")
    presets = host.files.presets() if isinstance(name, str) and name.strip() else {}
    if not presets:
        return body, None
    try:
        spec = host.files.resolve(name)
    except EngineError:
        return body, None  # the handler answers for an unknown model
    preset = presets.get(spec.preset) if spec.preset else None
    if preset is None:
        return body, None
    options = body.get("options")
    if preset.parameters and (options is None or isinstance(options, dict)):
        body = {**body, "options": {**preset.parameters, **(options or {})}}
    if preset.system is not None and body.get("system") is None:
        body = {**body, "system": preset.system}
    return body, preset


@bp.post("/generate")
def generate():
    """Complete `prompt` (with `system`); applies the model's chat template unless `raw` is true
    or the model has none (then the prompt is used as it is, like Ollama's `{{ .Prompt }}`)."""
    started = time.perf_counter()
    host = _host()
    body, preset = _with_preset(v.json_body(), host)
    r = bodies.OLLAMA_GENERATE.parse(body)
    name, prompt, system, keep_alive = r.model, r.prompt, r.system, r.keep_alive
    template = preset.template if preset else None
    params, stop = _params(r), r.options.stop
    if not prompt.strip():  # Ollama: an empty prompt just loads the model, or unloads it with keep_alive 0
        if keep_alive == 0:
            host.unload(name)
            return jsonify(model=name, created_at=_now(), response="", done=True, done_reason="unload")
        lease = host.acquire(name, keep_alive_s=keep_alive, deadline=started + host.settings.request_timeout_s)
        lease.release()
        return jsonify(model=ollama_name(lease.model.name), created_at=_now(), response="", done=True,
                       done_reason="load")

    def make_job(model) -> service.Job:
        text, extra_stops = prompt, ()
        if not r.raw and (template or model.metadata.get("tokenizer.chat_template")):
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
            chat = service.chat_prompt_for(model, messages, template)
            text, extra_stops = chat.text, chat.extra_stops
        elif system and not r.raw:
            text = f"{system}\n\n{text}"
        return service.plain_job(text, params, (stop or []) + list(extra_stops), started)

    run = service.start(host, name, make_job, keep_alive_s=keep_alive,
                        started=started, timeout_s=r.timeout_s)
    return _respond(run, r.stream, lambda text: {"response": text}, preset)


@bp.post("/chat")
def chat():
    """Reply to `messages`, rendered with the model's chat template (or the fallback transcript)."""
    started = time.perf_counter()
    body, preset = _with_preset(v.json_body(), _host())
    r = bodies.OLLAMA_CHAT.parse(body)
    params, stop = _params(r), r.options.stop
    messages = r.messages
    if preset and preset.system is not None and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": preset.system}, *messages]

    def make_job(model) -> service.Job:
        prompt = service.chat_prompt_for(model, messages, preset.template if preset else None)
        return service.plain_job(prompt.text, params, (stop or []) + list(prompt.extra_stops), started)

    run = service.start(_host(), r.model, make_job, keep_alive_s=r.keep_alive,
                        started=started, timeout_s=r.timeout_s)
    return _respond(run, r.stream, lambda text: {"message": {"role": "assistant", "content": text}}, preset)


@bp.get("/tags")
def tags():
    """Every GGUF under MODEL_PATH, with size, sha256 digest and details."""
    host = _host()
    models = []
    for rel in host.files.list_models():
        path = host.model_dir / rel
        try:
            d = gguf_info.describe(path, rel)
        except (OSError, ValueError, gguf_info.GGUFFormatError):
            continue  # a file that is not a readable GGUF is not a model
        if d.metadata.get("general.type") == "adapter":
            continue  # LoRA adapters are applied through presets, not run on their own
        models.append({"name": ollama_name(rel), "model": ollama_name(rel), "modified_at": d.modified_at,
                       "size": d.size, "digest": gguf_info.digest(path), "details": _details(d)})
    for preset in host.files.presets().values():
        base = next((m for m in models if m["name"] == ollama_name(preset.base)), None)
        if base is not None:
            models.append({**base, "name": preset.name + ":latest", "model": preset.name + ":latest",
                           "details": {**base["details"], "parent_model": base["name"], "lora": list(preset.lora)}})
    return jsonify(models=models)


def _details(d: gguf_info.ModelDetails) -> dict:
    return {"parent_model": "", "format": "gguf", "family": d.architecture, "families": [d.architecture],
            "parameter_size": d.parameter_size, "quantization_level": d.quantization_level}


@bp.post("/show")
def show():
    """Details, metadata, template and default parameters of one model."""
    r = bodies.OLLAMA_SHOW.parse(v.json_body())
    name = r.model or r.name
    host = _host()
    try:
        spec = host.files.resolve(name)
    except ModelNotFound:
        return jsonify(error=f"model '{name}' not found"), 404
    path = spec.path
    preset = host.files.presets().get(spec.preset) if spec.preset else None
    try:
        d = gguf_info.describe(path, name)
    except gguf_info.GGUFFormatError as exc:
        raise BadRequest(f"model '{name}' is not a readable GGUF file: {exc}", field="model") from exc
    template = (preset and preset.template) or d.metadata.get("tokenizer.chat_template") or "{{ .Prompt }}"
    values = {k: getattr(DEFAULTS, k) for k in ("temperature", "top_p", "top_k", "repeat_penalty")}
    values.update(preset.parameters if preset else {})
    parameters = "\n".join(f"{k} {x}" for k, val in values.items() for x in (val if isinstance(val, list) else [val]))
    model_info = {k: val for k, val in d.metadata.items() if not k.startswith("tokenizer.chat_template")}
    # MODEL_PATH-relative, as /health names files: no absolute path for a caller without a key.
    modelfile = f"FROM {host.files.display_name(path)}\n" + "".join(f"ADAPTER {a.name}\n" for a in spec.adapters)
    body = dict(modelfile=modelfile, parameters=parameters, template=template, details=_details(d),
                model_info=model_info, capabilities=["completion"], modified_at=d.modified_at)
    if preset and preset.system is not None:
        body["system"] = preset.system
    return jsonify(body)


@bp.get("/ps")
def ps():
    """The resident models, most recently used first: size (RAM + VRAM, as planned), VRAM part,
    and when each unloads if left idle (far in the future when it stays)."""
    host = _host()
    models = []
    for m in host.resident():
        try:
            d = gguf_info.describe(m.path, m.name)
            details, digest = _details(d), gguf_info.digest(m.path)
        except (OSError, ValueError, gguf_info.GGUFFormatError):
            details, digest = {}, ""
        name = ollama_name(m.preset or m.name)
        expires = m.keep_alive_s if m.leases else m.expires_in_s
        models.append({"name": name, "model": name, "size": m.ram_bytes + m.vram_bytes, "digest": digest,
                       "details": details, "expires_at": _at(expires), "size_vram": m.vram_bytes,
                       "context_length": m.n_ctx})
    return jsonify(models=models)


def _at(seconds: float | None) -> str:
    """An RFC 3339 time `seconds` from now; None (never) is Ollama's far future (now + 2^63 ns)."""
    delta = timedelta(seconds=(1 << 63) // NS if seconds is None else seconds)
    return (datetime.now(timezone.utc) + delta).isoformat().replace("+00:00", "Z")


@bp.get("/version")
def version():
    """The engine's version (not an Ollama version)."""
    return jsonify(version=__version__)
