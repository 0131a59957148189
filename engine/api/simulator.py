"""The clinical-interview simulator's contract: /generate, /health, /models, /load-model.

Byte-compatible with what the simulator's Node backend reads (see DESIGN.md); fields are only
ever added (inside `metadata`, or beside the contract's fields), never renamed or removed.
"""

from __future__ import annotations

import json
import logging
import time

from flask import Blueprint, current_app, jsonify

from engine import service
from engine.api import validation as v
from engine.errors import BadRequest, EngineError, ModelLoadError, ModelRefused
from engine.generation import SamplingParams
from engine.model_files import ModelSpec
from engine.patient import reply_text

log = logging.getLogger(__name__)

bp = Blueprint("simulator", __name__)

MAX_NEW_TOKENS = 8192


def _host():
    return current_app.extensions["model_host"]


@bp.post("/generate")
def generate():
    """The patient's next line for the transcript in `prompt`.

    Body: `prompt` (required), `max_length` (new tokens, default 150), `temperature` (default 0.7),
    `top_p` (default 0.9); optional `top_k`, `min_p`, `repeat_penalty`, `seed`, `stop` (a list
    that replaces the speaker-turn stops; `[]` for none), `stream` (server-sent events: one
    `data:` event per token with the new text, then one with the whole reply as without `stream`),
    `model` (any name the Ollama and OpenAI surfaces accept; default: the default model) and
    `keep_alive` (as Ollama's).
    """
    started = time.perf_counter()
    body = v.json_body()
    timeout_s = v.client_timeout(body)
    prompt = v.string(body, "prompt", required=True)
    defaults = SamplingParams()
    params = SamplingParams(
        max_tokens=v.integer(body, "max_length", 150, minimum=1, maximum=MAX_NEW_TOKENS),
        temperature=v.number(body, "temperature", defaults.temperature, minimum=0, maximum=2),
        top_p=v.number(body, "top_p", defaults.top_p, minimum=0, maximum=1, min_inclusive=False),
        top_k=v.integer(body, "top_k", defaults.top_k, minimum=0),
        min_p=v.number(body, "min_p", defaults.min_p, minimum=0, maximum=1),
        repeat_penalty=v.number(body, "repeat_penalty", defaults.repeat_penalty, minimum=0,
                                maximum=10, min_inclusive=False),
        seed=v.integer(body, "seed", None, minimum=0, maximum=2**32 - 2),
    )
    stop = v.stops(body)
    stream = v.boolean(body, "stream", False)
    name = v.string(body, "model")
    keep_alive = v.duration(body, "keep_alive")

    def make_job(_model) -> service.Job:
        return service.Job(prompt=prompt, params=params, new_reply=lambda: reply_text(stop),
                           cache_key=("patient", *service.stop_key(stop)), started=started)

    # Model, queue, timeout and prompt errors are plain 4xx/5xx, before any stream starts.
    run = service.start(_host(), name, make_job, keep_alive_s=keep_alive,
                        started=started, timeout_s=timeout_s)
    job = run.job
    if not stream:
        service.complete(run)
        return jsonify(_reply_body(job))

    def events():
        try:
            for piece in run:
                yield _sse({"text": piece})
        except EngineError as exc:  # after the 200: the stream ends with an error event
            yield _sse({"error": exc.message})
            return
        yield _sse(_reply_body(job))

    return service.streaming_response(events(), run, "text/event-stream")


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _reply_body(job: service.Job) -> dict:
    """The contract's reply: `texto`, `confianza`, `metadata` (fields only ever added)."""
    result = job.result
    metadata = {
        "modelo": job.model_name,
        "tokens": result.tokens,
        "temperature": job.params.temperature,
        "top_p": job.params.top_p,
        "prompt_tokens": result.prompt_tokens,
        "cached_prompt_tokens": result.reused_tokens,
        "duration_ms": round((time.perf_counter() - job.started) * 1000, 1),
        "ttft_ms": round(result.ttft_s * 1000, 1),
        "tokens_per_second": round(result.tokens_per_second, 2),
        "finish_reason": result.finish_reason,
        "cached": result.cached,
    }
    if job.adapters:
        metadata["lora"] = job.adapters
    if job.fields.get("replica"):  # which replica answered, when several serve one address (Ray Serve)
        metadata["replica"] = job.fields["replica"]
    if not result.text:
        # Never silently: the caller (and the log) learn that the model said nothing usable.
        metadata["warning"] = f"the model produced no reply text (finish_reason={result.finish_reason})"
        log.warning("empty reply: %d tokens generated, finish_reason=%s", result.tokens, result.finish_reason)
    return {"texto": result.text, "confianza": round(result.confidence, 4), "metadata": metadata}


@bp.get("/models")
def models():
    """The GGUF files under MODEL_PATH, which one is the default (`loaded`), and every resident one."""
    host = _host()
    model = host.default
    return jsonify(models=host.files.list_models(), model_path=host.model_dir.name or ".",  # no absolute path
                   loaded=model.name if model else None, lora=model.describe_adapters() if model else [],
                   presets=sorted(host.files.presets()), resident=[m.name for m in host.resident()])


@bp.post("/load-model")
def load_model():
    """Load a GGUF under MODEL_PATH, optionally with LoRA adapters (`lora`: a file name or a list,
    `lora_scale`: a number or a list), and make it the default model (requests without `model`).
    A model already resident is not loaded again; other resident models stay (until evicted or
    idle past their keep_alive). On any failure the current default stays. Refusals name files as
    the request did or relative to MODEL_PATH, never by absolute path."""
    body = v.json_body()
    name = v.string(body, "model_name", required=True)
    folder = v.string(body, "model_path")
    lora = v.string_list(body, "lora") or []
    scale = body.get("lora_scale", 1.0)
    scales = scale if isinstance(scale, list) else [scale]
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 10 for x in scales):
        raise BadRequest("'lora_scale' must be a number between 0 and 10, or a list of them", field="lora_scale")
    host = _host()
    path = host.files.resolve_request_path(name, folder)
    adapters = host.files.resolve_adapters(lora, scales)
    try:
        loaded, seconds = host.load(ModelSpec(path, adapters))
    except (ModelRefused, ModelLoadError) as exc:
        # llama.cpp's and the OS's messages name files by absolute path: the log keeps it, the
        # client gets names relative to MODEL_PATH.
        log.warning("/load-model %s: %s", path, exc.message)
        current = host.default
        keep = f"; still serving {current.name}" if current else ""
        raise type(exc)(host.files.public_text(exc.message) + keep, field="model_name") from exc
    how = f"loaded in {seconds:.2f} s" if seconds else "loaded in 0.00 s (it was already resident)"
    return jsonify(status="success", model_name=loaded.name, lora=loaded.describe_adapters(),
                   message=f"model {loaded.name} {how}")
