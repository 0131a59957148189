"""The clinical-interview simulator's contract: /generate, /health, /models, /load-model.

Byte-compatible with what the simulator's Node backend reads (see DESIGN.md); fields are only
ever added (inside `metadata`, or beside the contract's fields), never renamed or removed.
"""

from __future__ import annotations

import logging
import time

from flask import Blueprint, current_app, jsonify

from engine.api import service
from engine.api import bodies, replies
from engine.api import validation as v
from engine.errors import ModelLoadError, ModelRefused
from engine.model_files import ModelSpec
from engine.patient import reply_text

log = logging.getLogger(__name__)

bp = Blueprint("simulator", __name__)


def _host():
    return current_app.extensions["model_host"]


@bp.post("/generate")
def generate():
    """The patient's next line for the transcript in `prompt`.

    The body's fields, with their ranges and defaults, are declared in bodies.GENERATE: `prompt`
    (required), `max_length` (new tokens), the sampling settings, `stop` (replaces the speaker-turn
    stops), `json_schema` (structured output: `texto` is JSON that follows it), `stream` (server-sent
    events: one `data:` event per token with the new text, then one with the whole reply as without
    `stream`), `model` and `keep_alive`.
    """
    started = time.perf_counter()
    r = bodies.GENERATE.parse(v.json_body())
    params = bodies.sampling(r, max_tokens=r.max_length, grammar=bodies.grammar_of(r.json_schema))

    def make_job(_model) -> service.Job:
        if params.grammar:  # structured feedback: the JSON itself, no patient-reply rules
            return service.json_job(r.prompt, params, started)
        return service.Job(prompt=r.prompt, params=params, new_reply=lambda: reply_text(r.stop),
                           cache_key=("patient", *service.stop_key(r.stop)), started=started)

    # Model, queue, timeout and prompt errors are plain 4xx/5xx, before any stream starts.
    run = service.start(_host(), r.model, make_job, keep_alive_s=r.keep_alive,
                        started=started, timeout_s=r.timeout_s)
    job = run.job
    if not r.stream:
        service.complete(run)
        return jsonify(_reply_body(job))
    events = replies.stream(run, replies.SSE, piece=lambda text: {"text": text},
                            error=lambda exc: {"error": exc.message}, end=lambda: [_reply_body(job)])
    return service.streaming_response(events, run, replies.SSE.mimetype)


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
    if job.params.grammar:  # json_schema: the JSON is whole unless max_length cut it
        metadata["json_complete"] = result.finish_reason != "length"
        if result.finish_reason == "length":
            metadata["warning"] = "max_length cut the JSON short: texto is incomplete and does not parse"
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
    r = bodies.LOAD_MODEL.parse(v.json_body())
    host = _host()
    path = host.files.resolve_request_path(r.model_name, r.model_path)
    adapters = host.files.resolve_adapters(r.lora or [], r.lora_scale)
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
