"""The Ollama API subset: /api/generate, /api/chat, /api/tags, /api/show, /api/version.

Field names, defaults and units follow Ollama's API documentation (durations in nanoseconds,
`stream` true by default, NDJSON when streaming). Differences are listed in the README.
A `model` that names another GGUF under MODEL_PATH switches the engine to it (as Ollama loads
models on demand); an unknown one is a 404 `{"error": "model '...' not found"}`.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

from flask import Blueprint, current_app, jsonify

from engine import __version__, gguf_info, service
from engine.api import validation as v
from engine.chat import validate_messages
from engine.errors import BadRequest, EngineError
from engine.generation import SamplingParams
from engine.model_host import ModelHost

bp = Blueprint("ollama", __name__, url_prefix="/api")

# Ollama's documented defaults; num_predict -1 generates until a stop or the context is full.
DEFAULTS = SamplingParams(max_tokens=0, temperature=0.8, top_p=0.9, top_k=40, min_p=0.0, repeat_penalty=1.1)
NS = 1_000_000_000


def _host() -> ModelHost:
    return current_app.extensions["model_host"]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def ollama_name(rel: str) -> str:
    """How a file under MODEL_PATH is named on this surface: `gemma-3-270m-q4_k_m:latest`."""
    return rel.removesuffix(".gguf") + ":latest"


def _options(body: dict) -> tuple[SamplingParams, list[str] | None]:
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise BadRequest("'options' must be an object", field="options")
    num_predict = v.integer(options, "num_predict", -1, minimum=-2)
    v.integer(options, "num_ctx", None, minimum=1)  # accepted; the context is N_CTX (see README)
    params = SamplingParams(
        max_tokens=0 if num_predict < 0 else num_predict,
        temperature=v.number(options, "temperature", DEFAULTS.temperature, minimum=0, maximum=100),
        top_p=v.number(options, "top_p", DEFAULTS.top_p, minimum=0, maximum=1, min_inclusive=False),
        top_k=v.integer(options, "top_k", DEFAULTS.top_k, minimum=0),
        min_p=v.number(options, "min_p", DEFAULTS.min_p, minimum=0, maximum=1),
        repeat_penalty=v.number(options, "repeat_penalty", DEFAULTS.repeat_penalty, minimum=0, maximum=10,
                                min_inclusive=False),
        frequency_penalty=v.number(options, "frequency_penalty", 0.0, minimum=-2, maximum=2),
        presence_penalty=v.number(options, "presence_penalty", 0.0, minimum=-2, maximum=2),
        seed=v.integer(options, "seed", None, minimum=0, maximum=2**32 - 2),
    )
    if num_predict == 0:
        raise BadRequest("'options.num_predict' must be positive, or -1 for no limit", field="num_predict")
    return params, v.string_list(options, "stop")


def _refuse_unsupported(body: dict, *fields: str) -> None:
    for name in fields:
        if body.get(name):
            raise BadRequest(f"'{name}' is not supported by this engine", field=name)


def _stats(job: service.Job, load_s: float) -> dict:
    r = job.result
    total = time.perf_counter() - job.started
    prompt_eval = max(r.ttft_s - load_s, 0.0)
    return {
        "done_reason": "length" if r.finish_reason == "length" else "stop",
        "total_duration": int(total * NS),
        "load_duration": int(load_s * NS),
        "prompt_eval_count": r.prompt_tokens - r.reused_tokens,
        "prompt_eval_duration": int(prompt_eval * NS),
        "eval_count": r.tokens,
        "eval_duration": int(r.decode_s * NS),
    }


def _respond(job: service.Job, stream: bool, load_s: float, wrap):
    """One JSON reply, or NDJSON: a line per token, then the final line with the statistics.
    `wrap(text)` shapes the text field of the surface (`response` or `message`)."""
    host = _host()
    if not stream:
        text = service.complete(host, job)
        return jsonify({"model": ollama_name(job.model_name), "created_at": _now(), **wrap(text), "done": True,
                        **_stats(job, load_s)})
    run = service.Run(host, job)

    def line(obj: dict) -> str:
        return json.dumps(obj, ensure_ascii=False) + "\n"

    def lines():
        try:
            for piece in run:
                if piece:
                    yield line({"model": ollama_name(job.model_name), "created_at": _now(), **wrap(piece),
                                "done": False})
        except EngineError as exc:  # Ollama streams errors as an {"error": ...} line
            yield line({"error": exc.message})
            return
        yield line({"model": ollama_name(job.model_name), "created_at": _now(), **wrap(""), "done": True,
                    **_stats(job, load_s)})

    return service.streaming_response(lines(), run, "application/x-ndjson")


@bp.post("/generate")
def generate():
    """Complete `prompt` (with `system`); applies the model's chat template unless `raw` is true
    or the model has none (then the prompt is used as it is, like Ollama's `{{ .Prompt }}`)."""
    started = time.perf_counter()
    body = v.json_body()
    name = v.string(body, "model", required=True)
    prompt = v.string(body, "prompt", non_empty=False) or ""
    system = v.string(body, "system", non_empty=False)
    raw = v.boolean(body, "raw", False)
    stream = v.boolean(body, "stream", True)
    _refuse_unsupported(body, "images", "format", "template", "suffix")
    params, stop = _options(body)
    model, load_s = _host().ensure_model(name)
    if not prompt.strip():  # Ollama: an empty prompt just loads the model
        return jsonify(model=ollama_name(model.name), created_at=_now(), response="", done=True, done_reason="load")
    extra_stops: tuple[str, ...] = ()
    if not raw and model.metadata.get("tokenizer.chat_template"):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        chat = service.chat_prompt_for(model, messages)
        prompt, extra_stops = chat.text, chat.extra_stops
    elif system and not raw:
        prompt = f"{system}\n\n{prompt}"
    stops = (stop or []) + list(extra_stops)
    job = service.plain_job(prompt, params, stops, started)
    return _respond(job, stream, load_s, lambda text: {"response": text})


@bp.post("/chat")
def chat():
    """Reply to `messages`, rendered with the model's chat template (or the fallback transcript)."""
    started = time.perf_counter()
    body = v.json_body()
    name = v.string(body, "model", required=True)
    stream = v.boolean(body, "stream", True)
    _refuse_unsupported(body, "tools", "format")
    params, stop = _options(body)
    messages = validate_messages(body.get("messages"))
    model, load_s = _host().ensure_model(name)
    prompt = service.chat_prompt_for(model, messages)
    stops = (stop or []) + list(prompt.extra_stops)
    job = service.plain_job(prompt.text, params, stops, started)
    return _respond(job, stream, load_s, lambda text: {"message": {"role": "assistant", "content": text}})


@bp.get("/tags")
def tags():
    """Every GGUF under MODEL_PATH, with size, sha256 digest and details."""
    host = _host()
    models = []
    for rel in host.list_models():
        path = host.model_dir / rel
        try:
            d = gguf_info.describe(path, rel)
        except (OSError, ValueError, gguf_info.GGUFFormatError):
            continue  # a file that is not a readable GGUF is not a model
        if d.metadata.get("general.type") == "adapter":
            continue  # LoRA adapters are applied through presets, not run on their own
        models.append({"name": ollama_name(rel), "model": ollama_name(rel), "modified_at": d.modified_at,
                       "size": d.size, "digest": gguf_info.digest(path), "details": _details(d)})
    for preset in host.presets().values():
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
    body = v.json_body()
    name = v.string(body, "model") or v.string(body, "name", required=True)
    host = _host()
    path = host.find_model(name)
    if path is None:
        return jsonify(error=f"model '{name}' not found"), 404
    try:
        d = gguf_info.describe(path, name)
    except gguf_info.GGUFFormatError as exc:
        raise BadRequest(f"model '{name}' is not a readable GGUF file: {exc}", field="model") from exc
    template = d.metadata.get("tokenizer.chat_template") or "{{ .Prompt }}"
    parameters = "\n".join(f"{k} {getattr(DEFAULTS, a)}" for k, a in (
        ("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"), ("repeat_penalty", "repeat_penalty")))
    model_info = {k: val for k, val in d.metadata.items() if not k.startswith("tokenizer.chat_template")}
    return jsonify(modelfile=f"FROM {path}\n", parameters=parameters, template=template, details=_details(d),
                   model_info=model_info, capabilities=["completion"], modified_at=d.modified_at)


@bp.get("/version")
def version():
    """The engine's version (not an Ollama version)."""
    return jsonify(version=__version__)
