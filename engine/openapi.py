"""The engine's OpenAPI 3.0 document, served at /openapi.json.

Request bodies are not written here: each endpoint's fields are declared once in
engine/api/bodies.py (type, range, default, description), its handler parses requests with that
declaration and this document states it (`Body.schema`). Responses are written here as Python
data, from the same shared pieces where there are some (finish reasons, output types). Two tests
keep it honest: tests/test_openapi.py compares it with the app's URL map and validates it as
OpenAPI, and tests/test_fuzz.py runs schemathesis against it (a request the schema accepts must be
accepted, one it rejects refused with a 4xx; a response must match the schema of its status).

Conventions:
- Optional fields are `nullable`: every handler treats `null` as "not given" (the default).
  Where a handler reads a field as `body.get(name) or default`, any empty value ("", [], {},
  false, 0) means "not given" too, and the schema says so.
- A schema may be wider than what the handler accepts where the limit depends on the model (a
  prompt that does not fit N_CTX with the requested new tokens is a 400; a chat template may refuse
  a conversation; an unknown `model` is a 404), never narrower. The field descriptions say so.
"""

from __future__ import annotations

from engine import __version__
from engine.api import bodies, replies
from engine.api.fields import Schema, object_schema as _object, ref as _ref
from engine.chat import ROLES


def _adapters(description: str = "LoRA adapters applied to the loaded model, with their scales.") -> Schema:
    return {"type": "array", "description": description, "items": _object(
        {"name": {"type": "string"}, "scale": {"type": "number"}}, ("name", "scale"))}


# -- responses -------------------------------------------------------------------------------------
ERROR_REASONS = {
    "400": "Bad request: the message names the field (missing, wrong type, out of range, a prompt that "
           "does not fit the context).",
    "401": "ENGINE_API_KEY is set and the request has no valid key.",
    "404": "The model (or file) named is not under MODEL_PATH.",
    "409": "In conflict with what is there: a model file a preset uses or the default model (delete), a name "
           "that is a GGUF file's (create, copy), the same file being pulled already.",
    "502": "The Hugging Face hub could not be reached, refused the request, or sent bytes whose sha256 is not "
           "the one it states (nothing is written to MODEL_PATH).",
    "413": "The request body is larger than MAX_BODY_BYTES.",
    "415": "The body was not sent as `Content-Type: application/json`.",
    "403": "The model is not loaded and LOAD_ON_REQUEST is off.",
    "422": "llama.cpp could not load the model file (truncated, unsupported); the current model stays.",
    "500": "A server fault (e.g. the model's chat template is broken).",
    "503": "Busy: the admission queue is full, or no room to load the model while the others are in use "
           "(Retry-After says when to retry); or no model is ready yet; or the model exceeds the memory budget.",
    "504": "The request's deadline (REQUEST_TIMEOUT_S: queue wait + generation) passed.",
}

ERROR_HEADERS = {
    "401": {"WWW-Authenticate": {"description": "`Bearer realm=\"ai-engine\"`.", "schema": {"type": "string"}}},
    "503": {"Retry-After": {"description": "Seconds to wait before retrying (sent when the queue is full).",
                            "required": False, "schema": {"type": "integer", "minimum": 1}}},
}


def _json(schema: Schema, description: str, headers: dict | None = None) -> dict:
    response: dict = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


def _errors(*statuses: int, shape: str = "Error") -> dict:
    """Error responses of a route: `{"error": "..."}` (or OpenAI's shape on /v1, also for the
    refusals that waitress makes before the app runs, such as 413)."""
    out = {}
    for status in map(str, statuses):
        ref = _ref(shape)
        out[status] = _json(ref, ERROR_REASONS[status], ERROR_HEADERS.get(status))
    return out


def _stream_schema(output: replies.OutputType, description: str) -> Schema:
    """A streamed body. For server-sent events, the schema describes one event, as tools read it
    (OpenAPI 3.2's reading of a 3.0 `schema`); its `data` is the JSON text the description names."""
    if output is not replies.SSE:
        return {"type": "string", "description": description}
    return _object({"data": {"type": "string", "description": description},
                    "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}},
                   ("data",))


def _ok(schema: Schema, description: str, stream: replies.OutputType | None = None,
        stream_description: str = "") -> dict:
    response = _json(schema, description)
    if stream:
        response["content"][stream.mimetype] = {"schema": _stream_schema(stream, stream_description)}
    return {"200": response}


def _body(schema: Schema) -> dict:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


# Statuses every generating route can answer beside its own: key, body size, queue, deadline.
GENERATION_ERRORS = (400, 401, 403, 404, 413, 415, 422, 503, 504)


def _model_entry() -> Schema:
    """One resident model in /health."""
    return _object({
        "model": {"type": "string"}, "model_file": {"type": "string"}, "n_ctx": {"type": "integer"},
        "gpu_layers": {"type": "integer"}, "lora": _adapters(),
        "preset": {"type": "string", "nullable": True},
        "default": {"type": "boolean", "description": "Requests without `model` use it."},
        "active": {"type": "integer", "minimum": 0}, "queue_depth": {"type": "integer", "minimum": 0},
        "memory_bytes": {"type": "integer", "minimum": 0, "description": "Planned RAM."},
        "vram_bytes": {"type": "integer", "minimum": 0, "description": "Planned VRAM."},
        "expires_in_s": {"type": "number", "nullable": True,
                         "description": "Seconds until it unloads if left idle; null: it stays (or is in use)."},
    }, ("model", "default"))


# -- the simulator's contract ----------------------------------------------------------------------
def _generate_reply() -> dict[str, Schema]:
    return {
        "GenerateReply": _object({
            "texto": {"type": "string", "description": "The patient's reply only (may be empty: see "
                                                       "metadata.warning)."},
            "confianza": {"type": "number", "minimum": 0, "maximum": 1,
                          "description": "Geometric mean of the generated tokens' probabilities."},
            "metadata": _ref("GenerateMetadata"),
        }, ("texto", "confianza", "metadata")),
        "GenerateMetadata": _object({
            "modelo": {"type": "string"},
            "tokens": {"type": "integer", "minimum": 0, "description": "Generated tokens."},
            "temperature": {"type": "number"},
            "top_p": {"type": "number"},
            "prompt_tokens": {"type": "integer", "minimum": 0},
            "cached_prompt_tokens": {"type": "integer", "minimum": 0,
                                     "description": "Prompt tokens whose KV state was reused."},
            "duration_ms": {"type": "number", "minimum": 0},
            "ttft_ms": {"type": "number", "minimum": 0},
            "tokens_per_second": {"type": "number", "minimum": 0},
            "finish_reason": {"type": "string", "enum": list(replies.FINISH_REASONS)},
            "cached": {"type": "boolean", "description": "Answered from the response cache."},
            "warning": {"type": "string", "description": "Present when the model produced no reply text."},
            "lora": _adapters("Present when LoRA adapters are applied."),
            "replica": {"type": "string", "description": "Which replica answered (when several serve one address)."},
        }, ("modelo", "tokens", "temperature"), description="Fields are only ever added, never removed."),
    }


def _health() -> Schema:
    """ops.health: the simulator's fields, readiness, the default model and every resident one."""
    return _object({
        "status": {"type": "string", "enum": ["ok", "loading", "unhealthy"],
                   "description": "`ok` when ready; `unhealthy` once a model's scheduler has stopped."},
        "model_loaded": {"type": "boolean"},
        "model_path": {"type": "string", "description": "MODEL_PATH."},
        "ready": {"type": "boolean", "description": "The start-up model has loaded."},
        "loading": {"type": "boolean", "description": "A model is being loaded (the others keep serving)."},
        "active": {"type": "integer", "minimum": 0, "description": "Sequences generating (at most N_PARALLEL)."},
        "queue_depth": {"type": "integer", "minimum": 0, "description": "Requests waiting for a sequence slot."},
        "busy": {"type": "boolean", "description": "All N_PARALLEL sequence slots are generating."},
        "model": {"type": "string"},
        "model_file": {"type": "string"},
        "n_ctx": {"type": "integer"},
        "gpu_layers": {"type": "integer"},
        "lora": _adapters(),
        "preset": {"type": "string", "nullable": True, "description": "The preset loaded (presets.toml)."},
        "models": {"type": "array", "items": _model_entry(), "description": "Every resident model."},
        "closing": {"type": "array", "description": "Models out of service that still finish requests.",
                    "items": _object({"model": {"type": "string"}, "requests": {"type": "integer"}},
                                     ("model", "requests"))},
        "failures": {"type": "object", "additionalProperties": {"type": "string"},
                     "description": "With `unhealthy`: model → why its scheduler stopped."},
    }, ("status", "model_loaded", "model_path"))


def _simulator_schemas() -> dict[str, Schema]:
    return {
        **_generate_reply(),
        "Health": _health(),
        "ModelList": _object({
            "models": {"type": "array", "items": {"type": "string"},
                       "description": "GGUF files under MODEL_PATH, relative to it."},
            "model_path": {"type": "string"},
            "loaded": {"type": "string", "nullable": True},
            "lora": _adapters(),
            "presets": {"type": "array", "items": {"type": "string"},
                        "description": "Names of the presets in MODEL_PATH/presets.toml."},
            "resident": {"type": "array", "items": {"type": "string"}, "description": "Every resident model."},
        }, ("models", "model_path")),
        "LoadModelReply": _object({
            "status": {"type": "string", "enum": ["success"]},
            "message": {"type": "string"},
            "model_name": {"type": "string"},
            "lora": _adapters(),
        }, ("status", "message", "model_name")),
    }


def _simulator_paths() -> dict:
    return {
        "/generate": {"post": {
            "tags": ["simulator"], "operationId": "generate",
            "summary": "The simulated patient's next line for the transcript in `prompt`.",
            "requestBody": _body(_ref("GenerateRequest")),
            "responses": {**_ok(_ref("GenerateReply"), "The reply (JSON), or server-sent events when `stream`.",
                                replies.SSE, "`data: {\"text\": ...}` per token, then `data: "
                                "<GenerateReply>`; an error after the 200 (e.g. the deadline) ends the "
                                "stream with `data: {\"error\": ...}`."),
                          **_errors(*GENERATION_ERRORS)}}},
        "/health": {"get": {
            "tags": ["simulator", "operations"], "operationId": "health", "security": [],
            "summary": "Readiness, the default model and every resident one (no API key needed).",
            "responses": {"200": _json(_ref("Health"), "Ready: a model is loaded."),
                          "503": _json(_ref("Health"), "Not ready: the start-up model is still loading, or "
                                                       "`unhealthy` (see `failures`).")}}},
        "/models": {"get": {
            "tags": ["simulator"], "operationId": "models", "summary": "The GGUF files under MODEL_PATH.",
            "responses": {**_ok(_ref("ModelList"), "The files and the loaded one."), **_errors(401)}}},
        "/load-model": {"post": {
            "tags": ["simulator"], "operationId": "loadModel",
            "summary": "Load a GGUF under MODEL_PATH (optionally with LoRA adapters) and make it the default "
                       "model; on any failure the current default stays.",
            "requestBody": _body(_ref("LoadModelRequest")),
            "responses": {**_ok(_ref("LoadModelReply"), "Loaded."),
                          **_errors(400, 401, 404, 413, 415, 422, 503)}}},
    }


# -- Ollama ---------------------------------------------------------------------------------------
def _ollama_replies() -> dict[str, Schema]:
    """/api/generate's and /api/chat's replies: the last NDJSON line, or the whole JSON reply."""
    assistant = _object({"role": {"type": "string", "enum": ["assistant"]}, "content": {"type": "string"}},
                        ("role", "content"))
    return {
        "OllamaGenerateReply": _object({
            "model": {"type": "string", "description": "`name:latest`."},
            "created_at": {"type": "string", "format": "date-time"},
            "response": {"type": "string"},
            "done": {"type": "boolean"},
            **_ollama_stats(),
        }, ("model", "created_at", "response", "done")),
        "OllamaChatReply": _object({
            "model": {"type": "string"},
            "created_at": {"type": "string", "format": "date-time"},
            "message": assistant,
            "done": {"type": "boolean"},
            **_ollama_stats(),
        }, ("model", "created_at", "message", "done")),
    }


def _ollama_models() -> dict[str, Schema]:
    """/api/tags, /api/show, /api/ps and /api/version."""
    return {
        "OllamaModelDetails": _object({
            "parent_model": {"type": "string"}, "format": {"type": "string"}, "family": {"type": "string"},
            "families": {"type": "array", "items": {"type": "string"}},
            "parameter_size": {"type": "string"}, "quantization_level": {"type": "string"},
            "lora": {"type": "array", "items": {"type": "string"}, "description": "A preset's adapters."},
        }, ("format", "family", "parameter_size", "quantization_level")),
        "OllamaTags": _object({"models": {"type": "array", "items": _object({
            "name": {"type": "string"}, "model": {"type": "string"},
            "modified_at": {"type": "string", "format": "date-time"},
            "size": {"type": "integer", "minimum": 0},
            "digest": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "details": _ref("OllamaModelDetails"),
        }, ("name", "model", "modified_at", "size", "digest", "details"))}}, ("models",)),
        "OllamaShowReply": _object({
            "modelfile": {"type": "string"}, "parameters": {"type": "string"}, "template": {"type": "string"},
            "details": _ref("OllamaModelDetails"), "model_info": {"type": "object"},
            "capabilities": {"type": "array", "items": {"type": "string"}},
            "modified_at": {"type": "string", "format": "date-time"},
        }, ("modelfile", "parameters", "template", "details", "model_info")),
        "OllamaVersion": _object({"version": {"type": "string"}}, ("version",)),
        "OllamaEmbedReply": _object({
            "model": {"type": "string", "description": "`name:latest`."},
            "embeddings": {"type": "array", "items": _vector("Length 1 (L2-normalized).")},
            "total_duration": {"type": "integer", "minimum": 0}, "load_duration": {"type": "integer", "minimum": 0},
            "prompt_eval_count": {"type": "integer", "minimum": 0, "description": "Tokens read, all inputs."},
        }, ("model", "embeddings")),
        "OllamaEmbeddingsReply": _object({"embedding": _vector("As the model gives it (not normalized).")},
                                         ("embedding",)),
        "OllamaProcesses": _object({"models": {"type": "array", "items": _object({
            "name": {"type": "string"}, "model": {"type": "string"},
            "size": {"type": "integer", "minimum": 0, "description": "Planned RAM + VRAM."},
            "digest": {"type": "string"}, "details": {"type": "object"},
            "expires_at": {"type": "string", "format": "date-time",
                           "description": "When it unloads if left idle (far future: it stays)."},
            "size_vram": {"type": "integer", "minimum": 0}, "context_length": {"type": "integer"},
        }, ("name", "model", "size", "digest", "details", "expires_at", "size_vram"))}}, ("models",)),
    }


def _vector(description: str) -> Schema:
    return {"type": "array", "items": {"type": "number"}, "description": description}


def _ollama_stats() -> dict[str, Schema]:
    """The final reply's statistics (durations in nanoseconds, as Ollama's)."""
    count = {"type": "integer", "minimum": 0}
    return {
        "done_reason": {"type": "string", "enum": [*replies.CLIENT_FINISH_REASONS, "load", "unload"]},
        "total_duration": count, "load_duration": count, "prompt_eval_count": count,
        "prompt_eval_duration": count, "eval_count": count, "eval_duration": count,
    }


NDJSON_EVENTS = "One JSON object a line: each new piece of text with `done: false`, then the final object with " \
         "`done: true` and the statistics; an error after the 200 ends the stream with `{\"error\": ...}`."


def _ollama_paths() -> dict:
    generation_errors = _errors(*GENERATION_ERRORS)
    return {
        "/api/generate": {"post": {
            "tags": ["ollama"], "operationId": "ollamaGenerate",
            "summary": "Complete `prompt` (with the model's chat template unless `raw`).",
            "requestBody": _body(_ref("OllamaGenerateRequest")),
            "responses": {**_ok(_ref("OllamaGenerateReply"), "The reply (JSON), or NDJSON when `stream` "
                                "(the default).", replies.NDJSON, NDJSON_EVENTS), **generation_errors}}},
        "/api/chat": {"post": {
            "tags": ["ollama"], "operationId": "ollamaChat",
            "summary": "Reply to `messages`, rendered with the model's chat template (or the fallback).",
            "requestBody": _body(_ref("OllamaChatRequest")),
            "responses": {**_ok(_ref("OllamaChatReply"), "The reply (JSON), or NDJSON when `stream` "
                                "(the default).", replies.NDJSON, NDJSON_EVENTS),
                          **generation_errors, **_errors(500)}}},
        "/api/embed": {"post": {
            "tags": ["ollama"], "operationId": "ollamaEmbed",
            "summary": "L2-normalized embeddings of one text or a list of texts, in order.",
            "requestBody": _body(_ref("OllamaEmbedRequest")),
            "responses": {**_ok(_ref("OllamaEmbedReply"), "One vector per input."), **generation_errors}}},
        "/api/embeddings": {"post": {
            "tags": ["ollama"], "operationId": "ollamaEmbeddings",
            "summary": "Ollama's older route: the embedding of `prompt`, not normalized.",
            "requestBody": _body(_ref("OllamaEmbeddingsRequest")),
            "responses": {**_ok(_ref("OllamaEmbeddingsReply"), "The vector."), **generation_errors}}},
        "/api/tags": {"get": {
            "tags": ["ollama"], "operationId": "ollamaTags", "summary": "Every GGUF under MODEL_PATH.",
            "responses": {**_ok(_ref("OllamaTags"), "The models."), **_errors(401)}}},
        "/api/ps": {"get": {
            "tags": ["ollama"], "operationId": "ollamaPs", "summary": "The resident models.",
            "responses": {**_ok(_ref("OllamaProcesses"), "Most recently used first."), **_errors(401)}}},
        "/api/show": {"post": {
            "tags": ["ollama"], "operationId": "ollamaShow",
            "summary": "Details, metadata, template and default parameters of one model.",
            "requestBody": _body(_ref("OllamaShowRequest")),
            "responses": {**_ok(_ref("OllamaShowReply"), "The model."), **_errors(400, 401, 404, 413, 415)}}},
        "/api/version": {"get": {
            "tags": ["ollama"], "operationId": "ollamaVersion", "summary": "ai-engine's version.",
            "responses": {**_ok(_ref("OllamaVersion"), "The version."), **_errors(401)}}},
    }


def _ollama_management_paths() -> dict:
    """/api/pull, /api/create, /api/copy and /api/delete (engine/api/ollama_models.py)."""
    status = _object({"status": {"type": "string"}, "digest": {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"},
                      "total": {"type": "integer", "minimum": 0}, "completed": {"type": "integer", "minimum": 0}},
                     ("status",), description="`{\"status\": \"success\"}` when `stream` is false.")
    lines = ("One JSON object a line: `{\"status\": ...}` (a download's lines add `digest`, `total` and "
             "`completed` bytes), the last `{\"status\": \"success\"}`; a failure after the 200 ends the "
             "stream with `{\"error\": ...}`.")
    empty = {"200": {"description": "Done (an empty body, as Ollama answers)."}}
    return {
        "/api/pull": {"post": {
            "tags": ["ollama"], "operationId": "ollamaPull",
            "summary": "Download a GGUF from the Hugging Face hub into MODEL_PATH (resumed, sha256-checked).",
            "requestBody": _body(_ref("OllamaPullRequest")),
            "responses": {**_ok(status, "The last status, or NDJSON when `stream` (the default).", replies.NDJSON,
                                lines), **_errors(400, 401, 404, 409, 413, 415, 500, 502)}}},
        "/api/create": {"post": {
            "tags": ["ollama"], "operationId": "ollamaCreate",
            "summary": "Create a model (a preset) from a Modelfile or from `from`, `parameters`, `system`, ...",
            "requestBody": _body(_ref("OllamaCreateRequest")),
            "responses": {**_ok(status, "The last status, or NDJSON when `stream` (the default).", replies.NDJSON,
                                lines), **_errors(400, 401, 404, 409, 413, 415)}}},
        "/api/copy": {"post": {
            "tags": ["ollama"], "operationId": "ollamaCopy", "summary": "Give a model a second name (a preset).",
            "requestBody": _body(_ref("OllamaCopyRequest")),
            "responses": {**empty, **_errors(400, 401, 404, 409, 413, 415)}}},
        "/api/delete": {"delete": {
            "tags": ["ollama"], "operationId": "ollamaDelete",
            "summary": "Delete a preset, or a GGUF file under MODEL_PATH.",
            "requestBody": _body(_ref("OllamaDeleteRequest")),
            "responses": {**empty, **_errors(400, 401, 404, 409, 413, 415)}}},
    }


# -- OpenAI ---------------------------------------------------------------------------------------
def _openai_schemas() -> dict[str, Schema]:
    usage = _object({k: {"type": "integer", "minimum": 0} for k in ("prompt_tokens", "completion_tokens",
                                                                     "total_tokens")},
                    ("prompt_tokens", "completion_tokens", "total_tokens"))
    finish = {"type": "string", "enum": list(replies.CLIENT_FINISH_REASONS)}

    def reply(obj: str, choice: Schema) -> Schema:
        return _object({"id": {"type": "string"}, "object": {"type": "string", "enum": [obj]},
                        "created": {"type": "integer"}, "model": {"type": "string"},
                        "choices": {"type": "array", "items": choice, "minItems": 1, "maxItems": 1},
                        "usage": _ref("OpenAIUsage")},
                       ("id", "object", "created", "model", "choices", "usage"))

    return {
        "OpenAIError": _object({"error": _object({
            "message": {"type": "string"}, "type": {"type": "string"},
            "param": {"type": "string", "nullable": True}, "code": {"type": "string", "nullable": True},
        }, ("message", "type"))}, ("error",)),
        "OpenAIUsage": usage,
        "Completion": reply("text_completion", _object({
            "index": {"type": "integer"}, "text": {"type": "string"},
            "logprobs": {"type": "object", "nullable": True}, "finish_reason": finish,
        }, ("index", "text", "finish_reason"))),
        "ChatCompletion": reply("chat.completion", _object({
            "index": {"type": "integer"},
            "message": _object({"role": {"type": "string", "enum": ["assistant"]}, "content": {"type": "string"}},
                               ("role", "content")),
            "logprobs": {"type": "object", "nullable": True}, "finish_reason": finish,
        }, ("index", "message", "finish_reason"))),
        "OpenAIModel": _object({
            "id": {"type": "string"}, "object": {"type": "string", "enum": ["model"]},
            "created": {"type": "integer"}, "owned_by": {"type": "string"},
            "base": {"type": "string", "description": "A preset's base model."},
            "lora": {"type": "array", "items": {"type": "string"}, "description": "A preset's adapters."},
            "loaded": {"type": "boolean", "description": "Present (true) on resident entries."},
            "active_lora": _adapters(),
        }, ("id", "object", "created", "owned_by")),
        "EmbeddingList": _object({
            "object": {"type": "string", "enum": ["list"]},
            "data": {"type": "array", "items": _object({
                "object": {"type": "string", "enum": ["embedding"]}, "index": {"type": "integer", "minimum": 0},
                "embedding": {"anyOf": [_vector("Length 1 (L2-normalized)."), {
                    "type": "string", "format": "byte",
                    "description": "`encoding_format: base64`: the little-endian float32 bytes."}]},
            }, ("object", "index", "embedding"))},
            "model": {"type": "string"},
            "usage": _object({"prompt_tokens": {"type": "integer", "minimum": 0},
                              "total_tokens": {"type": "integer", "minimum": 0}}, ("prompt_tokens", "total_tokens")),
        }, ("object", "data", "model", "usage")),
        "OpenAIModelList": _object({
            "object": {"type": "string", "enum": ["list"]},
            "data": {"type": "array", "items": _ref("OpenAIModel")},
        }, ("object", "data")),
    }


def _openai_paths() -> dict:
    errors = _errors(*GENERATION_ERRORS, shape="OpenAIError")
    sse = "`data: <chunk>` events, then `data: [DONE]`; an error after the 200 ends the stream with " \
          "`data: {\"error\": {...}}`."
    return {
        "/v1/models": {"get": {
            "tags": ["openai"], "operationId": "openaiModels", "summary": "Every GGUF under MODEL_PATH.",
            "responses": {**_ok(_ref("OpenAIModelList"), "The models."), **_errors(401, shape="OpenAIError")}}},
        "/v1/models/{model_id}": {"get": {
            "tags": ["openai"], "operationId": "openaiModel", "summary": "One model by any name `model` accepts.",
            "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {**_ok(_ref("OpenAIModel"), "The model."), **_errors(401, 404, shape="OpenAIError")}}},
        "/v1/embeddings": {"post": {
            "tags": ["openai"], "operationId": "openaiEmbeddings",
            "summary": "L2-normalized embeddings of one input or a list, as floats or base64.",
            "requestBody": _body(_ref("EmbeddingRequest")),
            "responses": {**_ok(_ref("EmbeddingList"), "One vector per input, in order."), **errors}}},
        "/v1/completions": {"post": {
            "tags": ["openai"], "operationId": "openaiCompletions", "summary": "Complete a raw `prompt`.",
            "requestBody": _body(_ref("CompletionRequest")),
            "responses": {**_ok(_ref("Completion"), "The completion, or SSE chunks when `stream`.",
                                replies.SSE, sse), **errors}}},
        "/v1/chat/completions": {"post": {
            "tags": ["openai"], "operationId": "openaiChatCompletions",
            "summary": "Reply to `messages`, rendered with the model's chat template (or the fallback).",
            "requestBody": _body(_ref("ChatCompletionRequest")),
            "responses": {**_ok(_ref("ChatCompletion"), "The reply, or SSE chunks when `stream`.",
                                replies.SSE, sse), **errors, **_errors(500, shape="OpenAIError")}}},
    }


# -- shared and operations ---------------------------------------------------------------------
def _chat_message() -> Schema:
    """chat.validate_messages: a known role and text content (content may be absent for assistant)."""
    part = _object({"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}, ("type", "text"))
    content = {"anyOf": [{"type": "string"}, {"type": "array", "items": part}]}
    others = [r for r in ROLES if r != "assistant"]
    return {"anyOf": [
        _object({"role": {"type": "string", "enum": others}, "content": content}, ("role", "content")),
        _object({"role": {"type": "string", "enum": ["assistant"]}, "content": {**content, "nullable": True}}, ("role",)),
    ]}


def _operations_paths() -> dict:
    return {
        "/metrics": {"get": {
            "tags": ["operations"], "operationId": "metrics",
            "summary": "Prometheus metrics: requests, latency, time to first token, tokens, queue, caches, model.",
            "responses": {"200": {"description": "Prometheus text exposition format.",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}},
                          **_errors(401)}}},
        "/openapi.json": {"get": {
            "tags": ["operations"], "operationId": "openapi", "security": [],
            "summary": "This document (no API key needed).",
            "responses": _ok({"type": "object"}, "The OpenAPI document.")}},
    }


def openapi_document() -> dict:
    """The whole document, built anew on each call (from the request declarations as they are)."""
    schemas = {**{body.name: body.schema() for body in bodies.BODIES},
               **_simulator_schemas(), **_ollama_replies(), **_ollama_models(), **_openai_schemas(),
               "ChatMessage": _chat_message(),
               "Error": _object({"error": {"type": "string"}}, ("error",))}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "ai-engine", "version": __version__,
            "description": "A local LLM engine: the clinical-interview simulator's /generate, an Ollama subset "
                           "(/api) and an OpenAI subset (/v1). Errors are `{\"error\": \"...\"}` (OpenAI's "
                           "shape under /v1); 4xx for a bad request, 5xx only for a server fault.",
        },
        "servers": [{"url": "/"}],
        "tags": [{"name": n} for n in ("simulator", "ollama", "openai", "operations")],
        # An API key is optional (ENGINE_API_KEY): the empty requirement says "none needed when unset".
        "security": [{}, {"bearerAuth": []}, {"apiKeyHeader": []}],
        "paths": {**_simulator_paths(), **_ollama_paths(), **_ollama_management_paths(), **_openai_paths(),
                  **_operations_paths()},
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer",
                               "description": "`Authorization: Bearer <ENGINE_API_KEY>`."},
                "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key",
                                 "description": "`X-API-Key: <ENGINE_API_KEY>`."},
            },
        },
    }
