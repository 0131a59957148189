"""Embeddings on the Ollama and OpenAI surfaces: /api/embed, /api/embeddings (Ollama's older
route) and /v1/embeddings. The routes belong to those surfaces' blueprints (their error shapes
too); the work is engine/embed_service.py's, the same for all three.

Each API's normalization, as its reference server does it:
- /api/embed: L2-normalized (Ollama's EmbedHandler normalizes every vector, and again after
  `dimensions` cuts it);
- /api/embeddings: as the model gives it, not normalized (Ollama's EmbeddingsHandler);
- /v1/embeddings: L2-normalized (llama-server's default `embd_normalize` 2; OpenAI's vectors have
  length 1), `base64` being the little-endian float32 bytes OpenAI's clients decode.
"""

from __future__ import annotations

import time

from flask import jsonify

from engine import embed_service
from engine.api import bodies
from engine.api import validation as v
from engine.api.http import client_gone, request_fields
from engine.api.ollama import NS, bp as ollama_bp, ollama_name
from engine.api.openai import bp as openai_bp
from engine.embedding import base64_floats, l2_normalize, shorten
from engine.errors import BadRequest
from engine.model_manager import ModelManager


def _host() -> ModelManager:
    from flask import current_app

    return current_app.extensions["model_host"]


def _check_dimensions(dimensions: int | None, result: embed_service.EmbedResult) -> None:
    size = len(result.vectors[0]) if result.vectors else 0
    if dimensions is not None and size and dimensions > size:
        raise BadRequest(f"'dimensions' must be at most {size}, the model's embedding size; got {dimensions}",
                         field="dimensions")


def _load_only(host: ModelManager, name: str, keep_alive: float | None, started: float) -> str:
    """Ollama's empty input: load the model (or find it resident) and embed nothing."""
    lease = host.acquire(name, keep_alive_s=keep_alive, deadline=started + host.settings.request_timeout_s)
    lease.release()
    return lease.model.name


@ollama_bp.post("/embed")
def ollama_embed():
    """One L2-normalized vector per input text, in order (`embeddings`), with Ollama's statistics."""
    started = time.perf_counter()
    r = bodies.OLLAMA_EMBED.parse(v.json_body())
    host = _host()
    if not r.input:
        name = _load_only(host, r.model, r.keep_alive, started)
        return jsonify(model=ollama_name(name), embeddings=[], total_duration=int((time.perf_counter() - started) * NS),
                       load_duration=0, prompt_eval_count=0)
    req = embed_service.EmbedRequest(r.input, truncate=r.truncate, num_ctx=r.options.num_ctx,
                                     keep_alive_s=r.keep_alive, timeout_s=r.timeout_s, started=started,
                                     overflow_hint=", or leave 'truncate' on")
    result = embed_service.embed(host, r.model, req, request_fields(), client_gone())
    _check_dimensions(r.dimensions, result)
    vectors = [shorten(l2_normalize(x), r.dimensions).tolist() for x in result.vectors]
    return jsonify(model=ollama_name(result.model_name), embeddings=vectors,
                   total_duration=int((time.perf_counter() - started) * NS),
                   load_duration=int(result.load_seconds * NS), prompt_eval_count=result.prompt_tokens)


@ollama_bp.post("/embeddings")
def ollama_embeddings():
    """Ollama's older route: one vector for `prompt`, as the model gives it (not normalized)."""
    started = time.perf_counter()
    r = bodies.OLLAMA_EMBEDDINGS.parse(v.json_body())
    host = _host()
    if not r.prompt:
        _load_only(host, r.model, r.keep_alive, started)
        return jsonify(embedding=[])
    req = embed_service.EmbedRequest([r.prompt], truncate=True, num_ctx=r.options.num_ctx,
                                     keep_alive_s=r.keep_alive, timeout_s=r.timeout_s, started=started)
    result = embed_service.embed(host, r.model, req, request_fields(), client_gone())
    return jsonify(embedding=result.vectors[0].tolist())


@openai_bp.post("/embeddings")
def openai_embeddings():
    """One L2-normalized vector per input, in order, as floats or base64; `usage` counts the tokens
    read. An input longer than the context is a 400, as OpenAI's is."""
    started = time.perf_counter()
    r = bodies.EMBEDDING.parse(v.json_body())
    req = embed_service.EmbedRequest(r.input, truncate=False, timeout_s=r.timeout_s, started=started)
    result = embed_service.embed(_host(), r.model, req, request_fields(), client_gone())
    _check_dimensions(r.dimensions, result)
    as_base64 = r.encoding_format == "base64"
    data = []
    for index, raw in enumerate(result.vectors):
        vector = shorten(l2_normalize(raw), r.dimensions)
        data.append({"object": "embedding", "index": index,
                     "embedding": base64_floats(vector) if as_base64 else vector.tolist()})
    return jsonify(object="list", data=data, model=result.model_name,
                   usage={"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens})

