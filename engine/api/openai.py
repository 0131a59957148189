"""The OpenAI API subset: /v1/models, /v1/completions, /v1/chat/completions.

Shapes follow OpenAI's API reference (objects, ids, `usage`, SSE chunks ending in `data: [DONE]`,
errors as `{"error": {"message", "type", "param", "code"}}`), so the official `openai` client and
tools built on it work unchanged. Differences are listed in the README.
"""

from __future__ import annotations

import time
import uuid

from flask import Blueprint, current_app, jsonify
from werkzeug.exceptions import HTTPException

from engine.api import service
from engine.api import bodies, replies
from engine.api import validation as v
from engine.errors import EngineError
from engine.generation import SamplingParams
from engine.model_manager import ModelManager

bp = Blueprint("openai", __name__, url_prefix="/v1")


def _host() -> ModelManager:
    return current_app.extensions["model_host"]


@bp.errorhandler(EngineError)
def openai_error(exc: EngineError):
    kind = "invalid_request_error" if exc.status < 500 else "server_error"
    code = "model_not_found" if exc.status == 404 else None
    return jsonify(error={"message": exc.message, "type": kind, "param": exc.field, "code": code}), exc.status, \
        exc.headers


@bp.errorhandler(HTTPException)
def openai_http_error(exc: HTTPException):
    """Body too large, bad method and the like, in OpenAI's error shape too."""
    from engine.api.http import http_error_headers

    return jsonify(error={"message": f"{exc.name}: {exc.description}", "type": "invalid_request_error",
                          "param": None, "code": None}), exc.code, http_error_headers(exc)


@bp.get("/models")
def models():
    """Every GGUF under MODEL_PATH and every preset; `id` is what `model` accepts. Resident
    models say `loaded` (and their adapters)."""
    host = _host()
    data = [_model_object(host, rel) for rel in host.files.list_models()]
    data += [_model_object(host, p.name) for p in host.files.presets().values()]
    return jsonify(object="list", data=data)


@bp.get("/models/<path:model_id>")
def model(model_id: str):
    """One model by any name `model` accepts (file, preset, alias); 404 `model_not_found` if none."""
    host = _host()
    host.files.resolve(model_id)  # ModelNotFound: 404 in OpenAI's shape
    return jsonify(_model_object(host, model_id))


def _model_object(host: ModelManager, model_id: str) -> dict:
    spec = host.files.resolve(model_id)
    try:
        created = int(spec.path.stat().st_mtime) if spec.preset is None else 0
    except OSError:
        created = 0
    entry = {"id": model_id, "object": "model", "created": created, "owned_by": "ai-engine"}
    if spec.preset is not None:
        preset = host.files.presets()[spec.preset]
        entry.update(base=preset.base, lora=list(preset.lora))
    resident = next((m for m in host.resident() if m.spec.key == spec.key), None)
    if resident is not None:  # loaded, and with which adapters
        entry["loaded"], entry["active_lora"] = True, resident.describe_adapters()
    return entry


def _params(r) -> SamplingParams:
    """The sampling settings of a parsed request: OpenAI's sampler has no top-k, min-p or repeat
    penalty; no `max_tokens` means until the context is full. `response_format` JSON: a grammar."""
    return bodies.sampling(r, max_tokens=r.max_tokens or 0, top_k=0, min_p=0.0, repeat_penalty=1.0,
                           grammar=bodies.grammar_of(r.response_format))


def _usage(job: service.Job) -> dict:
    r = job.result
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.tokens,
            "total_tokens": r.prompt_tokens + r.tokens}


def _finish(job: service.Job) -> str:
    return replies.client_finish_reason(job.result)


def _run(run: service.Run, stream: bool, include_usage: bool, obj: str, choice, chunk_choice):
    """A whole `obj` reply, or SSE chunks: one per token, the finish chunk, usage if asked, [DONE]."""
    job = run.job
    rid = ("chatcmpl-" if obj == "chat.completion" else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    if not stream:
        text = service.complete(run)
        return jsonify(id=rid, object=obj, created=created, model=job.model_name,
                       choices=[choice(text, _finish(job))], usage=_usage(job))
    base = {"id": rid, "object": obj + ".chunk" if obj == "chat.completion" else obj, "created": created,
            "model": job.model_name}
    first = chunk_choice(None, None, first=True)

    def end() -> list[dict]:
        usage = [{**base, "choices": [], "usage": _usage(job)}] if include_usage else []
        return [{**base, "choices": [chunk_choice(None, _finish(job))]}, *usage]

    events = replies.stream(
        run, replies.SSE, start=[{**base, "choices": [first]}] if first is not None else [],
        piece=lambda text: {**base, "choices": [chunk_choice(text, None)]} if text else None,
        # after the 200: an error object in the stream, as OpenAI does
        error=lambda exc: {"error": {"message": exc.message, "type": "server_error", "param": None, "code": None}},
        end=end, done="data: [DONE]\n\n")
    return service.streaming_response(events, run, replies.SSE.mimetype)


@bp.post("/completions")
def completions():
    """Complete a raw `prompt` (no chat template)."""
    started = time.perf_counter()
    r = bodies.COMPLETION.parse(v.json_body())
    params = _params(r)
    run = service.start(_host(), r.model, lambda _model: service.plain_job(r.prompt, params, r.stop or [], started),
                        started=started, timeout_s=r.timeout_s)

    def choice(text, finish):
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    def chunk_choice(text, finish, first=False):
        return None if first else choice(text or "", finish)

    return _run(run, r.stream, r.stream_options.include_usage, "text_completion", choice, chunk_choice)


@bp.post("/chat/completions")
def chat_completions():
    """Reply to `messages`, rendered with the model's chat template (or the fallback transcript)."""
    started = time.perf_counter()
    r = bodies.CHAT_COMPLETION.parse(v.json_body())
    params = _params(r)

    def make_job(model) -> service.Job:
        prompt = service.chat_prompt_for(model, r.messages)
        return service.plain_job(prompt.text, params, (r.stop or []) + list(prompt.extra_stops), started)

    run = service.start(_host(), r.model, make_job, started=started, timeout_s=r.timeout_s)

    def choice(text, finish):
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}

    def chunk_choice(text, finish, first=False):
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    return _run(run, r.stream, r.stream_options.include_usage, "chat.completion", choice, chunk_choice)
