"""The OpenAI API subset: /v1/models, /v1/completions, /v1/chat/completions.

Shapes follow OpenAI's API reference (objects, ids, `usage`, SSE chunks ending in `data: [DONE]`,
errors as `{"error": {"message", "type", "param", "code"}}`), so the official `openai` client and
tools built on it work unchanged. Differences are listed in the README.
"""

from __future__ import annotations

import json
import time
import uuid

from flask import Blueprint, current_app, jsonify
from werkzeug.exceptions import HTTPException

from engine import service
from engine.api import validation as v
from engine.chat import validate_messages
from engine.errors import BadRequest, EngineError
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
    from engine.app import http_error_headers

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


def _params(body: dict, default_max_tokens: int) -> tuple[SamplingParams, list[str]]:
    for name, allowed in (("n", (None, 1)), ("best_of", (None, 1)), ("echo", (None, False)),
                          ("logprobs", (None, False, 0)), ("top_logprobs", (None, 0)), ("suffix", (None,))):
        if body.get(name) not in allowed:
            raise BadRequest(f"'{name}'={body.get(name)!r} is not supported by this engine", field=name)
    if body.get("tools"):
        raise BadRequest("'tools' (function calling) is not supported by this engine", field="tools")
    fmt = body.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise BadRequest("only response_format {'type': 'text'} is supported", field="response_format")
    max_tokens = v.integer(body, "max_completion_tokens", None, minimum=1)
    max_tokens = v.integer(body, "max_tokens", max_tokens, minimum=1) or default_max_tokens
    stop = v.stops(body, max_items=4) or []
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=v.number(body, "temperature", 1.0, minimum=0, maximum=2),
        top_p=v.number(body, "top_p", 1.0, minimum=0, maximum=1, min_inclusive=False),
        top_k=0, min_p=0.0, repeat_penalty=1.0,
        frequency_penalty=v.number(body, "frequency_penalty", 0.0, minimum=-2, maximum=2),
        presence_penalty=v.number(body, "presence_penalty", 0.0, minimum=-2, maximum=2),
        seed=v.integer(body, "seed", None, minimum=0, maximum=2**32 - 2),
    ), stop


def _usage(job: service.Job) -> dict:
    r = job.result
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.tokens,
            "total_tokens": r.prompt_tokens + r.tokens}


def _finish(job: service.Job) -> str:
    return "length" if job.result.finish_reason == "length" else "stop"


def _run(run: service.Run, stream: bool, include_usage: bool, obj: str, choice, chunk_choice):
    """A whole `obj` reply, or SSE chunks: one per token, the finish chunk, usage if asked, [DONE]."""
    job = run.job
    rid = ("chatcmpl-" if obj == "chat.completion" else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    if not stream:
        text = service.complete(run)
        return jsonify(id=rid, object=obj, created=created, model=job.model_name,
                       choices=[choice(text, _finish(job))], usage=_usage(job))
    chunk_obj = obj + ".chunk" if obj == "chat.completion" else obj

    def sse(payload) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def events():
        base = {"id": rid, "object": chunk_obj, "created": created, "model": job.model_name}
        first = chunk_choice(None, None, first=True)
        if first is not None:
            yield sse({**base, "choices": [first]})
        try:
            for piece in run:
                if piece:
                    yield sse({**base, "choices": [chunk_choice(piece, None)]})
        except EngineError as exc:  # after the 200: an error object in the stream, as OpenAI does
            yield sse({"error": {"message": exc.message, "type": "server_error", "param": None, "code": None}})
            return
        yield sse({**base, "choices": [chunk_choice(None, _finish(job))]})
        if include_usage:
            yield sse({**base, "choices": [], "usage": _usage(job)})
        yield "data: [DONE]\n\n"

    return service.streaming_response(events(), run, "text/event-stream")


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = v.boolean(body, "stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", field="stream_options")
    return stream, v.boolean(options, "include_usage", False)


@bp.post("/completions")
def completions():
    """Complete a raw `prompt` (no chat template)."""
    started = time.perf_counter()
    body = v.json_body()
    timeout_s = v.client_timeout(body)
    name = v.string(body, "model", required=True)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest("'prompt' must be a non-empty string (lists of prompts and token ids are not supported)",
                         field="prompt")
    params, stop = _params(body, default_max_tokens=16)
    stream, include_usage = _stream_flags(body)
    run = service.start(_host(), name, lambda _model: service.plain_job(prompt, params, stop, started),
                        started=started, timeout_s=timeout_s)

    def choice(text, finish):
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    def chunk_choice(text, finish, first=False):
        return None if first else choice(text or "", finish)

    return _run(run, stream, include_usage, "text_completion", choice, chunk_choice)


@bp.post("/chat/completions")
def chat_completions():
    """Reply to `messages`, rendered with the model's chat template (or the fallback transcript)."""
    started = time.perf_counter()
    body = v.json_body()
    timeout_s = v.client_timeout(body)
    name = v.string(body, "model", required=True)
    messages = validate_messages(body.get("messages"))
    params, stop = _params(body, default_max_tokens=0)
    stream, include_usage = _stream_flags(body)

    def make_job(model) -> service.Job:
        prompt = service.chat_prompt_for(model, messages)
        return service.plain_job(prompt.text, params, stop + list(prompt.extra_stops), started)

    run = service.start(_host(), name, make_job, started=started, timeout_s=timeout_s)

    def choice(text, finish):
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}

    def chunk_choice(text, finish, first=False):
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    return _run(run, stream, include_usage, "chat.completion", choice, chunk_choice)
