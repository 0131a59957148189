"""The engine's OpenAPI 3.0 document, written by hand as Python data and served at /openapi.json.

Every route of the app is described here with the fields, defaults, ranges and error statuses its
handler actually enforces (engine/api/*.py, validation.py). Two tests keep it honest:
tests/test_openapi.py compares it with the app's URL map and validates it as OpenAPI, and
tests/test_fuzz.py runs schemathesis against it (a request the schema rejects must get a 4xx; a
response must match the schema of its status).

Conventions:
- Optional fields are `nullable`: every handler treats `null` as "not given" (the default).
  Where a handler reads a field as `body.get(name) or default`, any empty value ("", [], {},
  false, 0) means "not given" too, and the schema says so.
- A schema may be wider than what the handler accepts where the limit depends on the model (a
  prompt that does not fit N_CTX with the requested new tokens is a 400; a chat template may refuse
  a conversation; an unknown `model` is a 404), never narrower.
"""

from __future__ import annotations

from typing import Any

from engine import __version__
from engine.api.ollama import DEFAULTS as OLLAMA_DEFAULTS
from engine.api.simulator import MAX_NEW_TOKENS
from engine.chat import ROLES
from engine.generation import MAX_STOP_CHARS, MAX_STOPS, SamplingParams

Schema = dict[str, Any]

MAX_SEED = 2**32 - 2  # llama.cpp's LLAMA_DEFAULT_SEED (2**32 - 1) means "random"
SIMULATOR_DEFAULTS = SamplingParams()
NON_BLANK = r"\S"  # the handlers refuse strings that are empty or only whitespace


# -- small schema builders -----------------------------------------------------------------------
def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _optional(schema: Schema) -> Schema:
    """`schema`, or null (the handler's default)."""
    return {**schema, "nullable": True}


def _integer(description: str, *, minimum: int | None = None, maximum: int | None = None,
             default: int | None = None) -> Schema:
    schema: Schema = {"type": "integer", "description": description}
    if minimum is not None:
        schema["minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum
    if default is not None:
        schema["default"] = default
    return _optional(schema)


def _number(description: str, *, minimum: float, maximum: float, default: float | None = None,
            exclusive_minimum: bool = False) -> Schema:
    schema: Schema = {"type": "number", "description": description, "minimum": minimum, "maximum": maximum}
    if exclusive_minimum:
        schema["exclusiveMinimum"] = True
    if default is not None:
        schema["default"] = default
    return _optional(schema)


def _boolean(description: str, default: bool) -> Schema:
    return _optional({"type": "boolean", "description": description, "default": default})


def _text(description: str, *, non_blank: bool = True) -> Schema:
    schema: Schema = {"type": "string", "description": description}
    if non_blank:
        schema.update(minLength=1, pattern=NON_BLANK)
    return schema


def _stop(max_items: int, description: str) -> Schema:
    """validation.stops: one string or a list of them, none empty, at most `max_items`, and
    generation.MAX_STOP_CHARS characters in all (said in the description: a schema cannot bound
    the sum of a list's lengths, only each string's)."""
    item = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}
    return _optional({"description": description, "anyOf": [
        item, {"type": "array", "items": item, "maxItems": max_items}]})


def _seed() -> Schema:
    return _integer("Same seed and settings → same output. Absent: random.", minimum=0, maximum=MAX_SEED)


def _empty_or(schema: Schema | None, description: str) -> Schema:
    """`schema`, or any empty value. The handlers read these fields as `body.get(name) or default`
    (or refuse them when truthy), so "", [], {}, false and 0 all mean "not given"."""
    empty = [{"type": "string", "maxLength": 0}, {"type": "array", "maxItems": 0, "items": {}},
             {"type": "object", "maxProperties": 0}, {"type": "boolean", "enum": [False]},
             {"type": "number", "enum": [0]}]
    return _optional({"description": description, "anyOf": ([schema] if schema else []) + empty})


def _refused(description: str) -> Schema:
    """A field this engine does not support: only an empty value is accepted (400 otherwise)."""
    return _empty_or(None, description + " Not supported: a non-empty value is refused with a 400.")


def _object(properties: dict[str, Schema], required: tuple[str, ...] = (), **extra: Any) -> Schema:
    schema: Schema = {"type": "object", "properties": properties, **extra}
    if required:
        schema["required"] = list(required)
    return schema


def _adapters(description: str = "LoRA adapters applied to the loaded model, with their scales.") -> Schema:
    return {"type": "array", "description": description, "items": _object(
        {"name": {"type": "string"}, "scale": {"type": "number"}}, ("name", "scale"))}


# -- responses -------------------------------------------------------------------------------------
ERROR_REASONS = {
    "400": "Bad request: the message names the field (missing, wrong type, out of range, a prompt that "
           "does not fit the context).",
    "401": "ENGINE_API_KEY is set and the request has no valid key.",
    "404": "The model (or file) named is not under MODEL_PATH.",
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


def _stream_schema(media_type: str, description: str) -> Schema:
    """A streamed body. For server-sent events, the schema describes one event, as tools read it
    (OpenAPI 3.2's reading of a 3.0 `schema`); its `data` is the JSON text the description names."""
    if media_type != "text/event-stream":
        return {"type": "string", "description": description}
    return _object({"data": {"type": "string", "description": description},
                    "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}},
                   ("data",))


def _ok(schema: Schema, description: str, stream_type: str | None = None, stream_description: str = "") -> dict:
    response = _json(schema, description)
    if stream_type:
        response["content"][stream_type] = {"schema": _stream_schema(stream_type, stream_description)}
    return {"200": response}


def _body(schema: Schema) -> dict:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


# Statuses every generating route can answer beside its own: key, body size, queue, deadline.
GENERATION_ERRORS = (400, 401, 403, 404, 413, 415, 422, 503, 504)


def _keep_alive() -> Schema:
    """validation.duration: seconds, or a Go duration string; negative: keep the model loaded."""
    return {"description": "How long the model stays loaded after this request (Ollama's format): seconds, "
                           "or `5m`, `1h30m`, `300ms`; 0 unloads it as soon as it is idle, negative keeps it. "
                           "Default: KEEP_ALIVE (the default model stays).", "nullable": True,
            "anyOf": [{"type": "number"},
                      {"type": "string", "pattern": r"^\s*[+-]?((\d+(\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h))+\s*$|"
                                                    r"^\s*[+-]?(\d+(\.\d*)?|\.\d+)\s*$"}]}


def _timeout() -> Schema:
    """validation.client_timeout: the client's own deadline (the X-Request-Timeout header too)."""
    return {"type": "number", "minimum": 1, "nullable": True,
            "description": "The client's deadline in seconds (also the `X-Request-Timeout` header); REQUEST_TIMEOUT_S "
                           "when absent or longer. A request the engine estimates cannot finish by then gets 503 with "
                           "Retry-After at once."}


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
def _lora_scale() -> Schema:
    return {"type": "number", "minimum": 0, "maximum": 10}


def _simulator_schemas() -> dict[str, Schema]:
    d = SIMULATOR_DEFAULTS
    return {
        "GenerateRequest": _object({
            "prompt": _text("The interview transcript; it ends with `Paciente:`."),
            "max_length": _integer("New tokens to generate at most (not prompt + reply).", minimum=1,
                                   maximum=MAX_NEW_TOKENS, default=150),
            "temperature": _number("0 is greedy (deterministic).", minimum=0, maximum=2, default=d.temperature),
            "top_p": _number("Nucleus sampling.", minimum=0, maximum=1, exclusive_minimum=True, default=d.top_p),
            "top_k": _integer("Top-k sampling; 0 turns it off.", minimum=0, default=d.top_k),
            "min_p": _number("Min-p sampling.", minimum=0, maximum=1, default=d.min_p),
            "repeat_penalty": _number("Penalty on the last 64 generated tokens.", minimum=0, maximum=10,
                                      exclusive_minimum=True, default=d.repeat_penalty),
            "seed": _seed(),
            "stop": _stop(MAX_STOPS, "Replaces the default speaker-turn stops; `[]`: only end-of-sequence or "
                                     f"max_length end the reply. At most {MAX_STOP_CHARS:,} characters in all."),
            "stream": _boolean("Server-sent events: one `data:` event per token (`{\"text\": ...}`), then one "
                               "with the whole reply.", False),
            "model": _optional(_text("Any model name the Ollama and OpenAI surfaces accept (a file under "
                                     "MODEL_PATH, a preset, a catalog alias such as `llama3.1:8b`); loaded "
                                     "beside the others if it is not resident. Default: the default model.")),
            "keep_alive": _keep_alive(),
            "timeout_s": _timeout(),
        }, ("prompt",)),
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
            "finish_reason": {"type": "string", "enum": ["stop", "eos", "length"]},
            "cached": {"type": "boolean", "description": "Answered from the response cache."},
            "warning": {"type": "string", "description": "Present when the model produced no reply text."},
            "lora": _adapters("Present when LoRA adapters are applied."),
            "replica": {"type": "string", "description": "Which replica answered (when several serve one address)."},
        }, ("modelo", "tokens", "temperature"), description="Fields are only ever added, never removed."),
        "Health": _object({
            "status": {"type": "string", "enum": ["ok", "loading"], "description": "`ok` when ready."},
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
        }, ("status", "model_loaded", "model_path")),
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
        "LoadModelRequest": _object({
            "model_name": _text("A GGUF file under MODEL_PATH (or under `model_path`)."),
            "model_path": _optional(_text("A folder under MODEL_PATH holding `model_name`, or a file under it.")),
            "lora": _stop(16, "LoRA adapter GGUF files under MODEL_PATH to apply (a name or a list)."),
            "lora_scale": {"description": "One scale for every adapter, or one per adapter.", "default": 1.0,
                           "anyOf": [_lora_scale(), {"type": "array", "items": _lora_scale()}]},
        }, ("model_name",)),
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
                                "text/event-stream", "`data: {\"text\": ...}` per token, then `data: "
                                "<GenerateReply>`; an error after the 200 (e.g. the deadline) ends the "
                                "stream with `data: {\"error\": ...}`."),
                          **_errors(*GENERATION_ERRORS)}}},
        "/health": {"get": {
            "tags": ["simulator", "operations"], "operationId": "health", "security": [],
            "summary": "Readiness, the default model and every resident one (no API key needed).",
            "responses": {"200": _json(_ref("Health"), "Ready: a model is loaded."),
                          "503": _json(_ref("Health"), "Not ready: the start-up model is still loading.")}}},
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
def _ollama_schemas() -> dict[str, Schema]:
    d = OLLAMA_DEFAULTS
    model = {**_text("A GGUF under MODEL_PATH (`name:latest`, the file name, with or without `.gguf`), a preset, "
                     "or a catalog alias (`llama3.1:8b`). One that is not resident is loaded beside the others; "
                     "an unknown one is a 404."),
             "example": "gemma-3-270m-q4_k_m"}
    message = _ref("ChatMessage")
    return {
        "OllamaOptions": _empty_or(_object({
            "num_predict": {**_integer("New tokens at most; -1 (or -2): until the context is full. 0 is "
                                       "refused.", minimum=-2, default=-1), "not": {"enum": [0]}},
            "num_ctx": _integer("Accepted; the context is N_CTX.", minimum=1),
            "temperature": _number("", minimum=0, maximum=100, default=d.temperature),
            "top_p": _number("", minimum=0, maximum=1, exclusive_minimum=True, default=d.top_p),
            "top_k": _integer("0 turns it off.", minimum=0, default=d.top_k),
            "min_p": _number("", minimum=0, maximum=1, default=d.min_p),
            "repeat_penalty": _number("", minimum=0, maximum=10, exclusive_minimum=True, default=d.repeat_penalty),
            "frequency_penalty": _number("", minimum=-2, maximum=2, default=0),
            "presence_penalty": _number("", minimum=-2, maximum=2, default=0),
            "seed": _seed(),
            "stop": _stop(MAX_STOPS, f"Strings that end the reply; at most {MAX_STOP_CHARS:,} characters in all."),
        }), "Sampling options (Ollama's names and defaults)."),
        "OllamaGenerateRequest": _object({
            "model": model,
            "prompt": _optional(_text("Empty or absent: only load the model.", non_blank=False)),
            "system": _optional(_text("System prompt.", non_blank=False)),
            "raw": _boolean("Use the prompt as it is (no chat template).", False),
            "stream": _boolean("NDJSON: a line per token, then a final line with the statistics.", True),
            "options": _ref("OllamaOptions"),
            "keep_alive": _keep_alive(),
            "timeout_s": _timeout(),
            "images": _refused("Images."),
            "format": _refused("Structured output."),
            "template": _refused("Prompt template."),
            "suffix": _refused("Fill-in-the-middle suffix."),
        }, ("model",)),
        "OllamaChatRequest": _object({
            "model": model,
            "messages": {"type": "array", "items": message, "minItems": 1},
            "stream": _boolean("NDJSON: a line per token, then a final line with the statistics.", True),
            "options": _ref("OllamaOptions"),
            "keep_alive": _keep_alive(),
            "timeout_s": _timeout(),
            "tools": _refused("Function calling."),
            "format": _refused("Structured output."),
        }, ("model", "messages")),
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
            "message": _object({"role": {"type": "string", "enum": ["assistant"]}, "content": {"type": "string"}},
                               ("role", "content")),
            "done": {"type": "boolean"},
            **_ollama_stats(),
        }, ("model", "created_at", "message", "done")),
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
        "OllamaShowRequest": _object({
            "model": _optional(_text("The model's name (as in /api/tags).")),
            "name": _optional(_text("Older name of `model`.")),
        }, anyOf=[{"required": ["model"]}, {"required": ["name"]}]),
        "OllamaShowReply": _object({
            "modelfile": {"type": "string"}, "parameters": {"type": "string"}, "template": {"type": "string"},
            "details": _ref("OllamaModelDetails"), "model_info": {"type": "object"},
            "capabilities": {"type": "array", "items": {"type": "string"}},
            "modified_at": {"type": "string", "format": "date-time"},
        }, ("modelfile", "parameters", "template", "details", "model_info")),
        "OllamaVersion": _object({"version": {"type": "string"}}, ("version",)),
        "OllamaProcesses": _object({"models": {"type": "array", "items": _object({
            "name": {"type": "string"}, "model": {"type": "string"},
            "size": {"type": "integer", "minimum": 0, "description": "Planned RAM + VRAM."},
            "digest": {"type": "string"}, "details": {"type": "object"},
            "expires_at": {"type": "string", "format": "date-time",
                           "description": "When it unloads if left idle (far future: it stays)."},
            "size_vram": {"type": "integer", "minimum": 0}, "context_length": {"type": "integer"},
        }, ("name", "model", "size", "digest", "details", "expires_at", "size_vram"))}}, ("models",)),
    }


def _ollama_stats() -> dict[str, Schema]:
    """The final reply's statistics (durations in nanoseconds, as Ollama's)."""
    count = {"type": "integer", "minimum": 0}
    return {
        "done_reason": {"type": "string", "enum": ["stop", "length", "load", "unload"]},
        "total_duration": count, "load_duration": count, "prompt_eval_count": count,
        "prompt_eval_duration": count, "eval_count": count, "eval_duration": count,
    }


NDJSON = "One JSON object a line: each new piece of text with `done: false`, then the final object with " \
         "`done: true` and the statistics; an error after the 200 ends the stream with `{\"error\": ...}`."


def _ollama_paths() -> dict:
    generation_errors = _errors(*GENERATION_ERRORS)
    return {
        "/api/generate": {"post": {
            "tags": ["ollama"], "operationId": "ollamaGenerate",
            "summary": "Complete `prompt` (with the model's chat template unless `raw`).",
            "requestBody": _body(_ref("OllamaGenerateRequest")),
            "responses": {**_ok(_ref("OllamaGenerateReply"), "The reply (JSON), or NDJSON when `stream` "
                                "(the default).", "application/x-ndjson", NDJSON), **generation_errors}}},
        "/api/chat": {"post": {
            "tags": ["ollama"], "operationId": "ollamaChat",
            "summary": "Reply to `messages`, rendered with the model's chat template (or the fallback).",
            "requestBody": _body(_ref("OllamaChatRequest")),
            "responses": {**_ok(_ref("OllamaChatReply"), "The reply (JSON), or NDJSON when `stream` "
                                "(the default).", "application/x-ndjson", NDJSON),
                          **generation_errors, **_errors(500)}}},
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


# -- OpenAI ---------------------------------------------------------------------------------------
def _openai_common() -> dict[str, Schema]:
    """Fields shared by /v1/completions and /v1/chat/completions (openai.py's `_params`)."""
    refused = "Only the value(s) listed are accepted; others are refused with a 400."
    return {
        "model": {**_text("An `id` of /v1/models (a GGUF under MODEL_PATH, a preset) or a catalog alias; one that "
                          "is not resident is loaded beside the others; an unknown one is a 404 `model_not_found`."),
                  "example": "gemma-3-270m-q4_k_m.gguf"},
        "timeout_s": _timeout(),
        "max_tokens": _integer("New tokens at most.", minimum=1),
        "max_completion_tokens": _integer("Used when `max_tokens` is absent.", minimum=1),
        "temperature": _number("", minimum=0, maximum=2, default=1),
        "top_p": _number("", minimum=0, maximum=1, exclusive_minimum=True, default=1),
        "frequency_penalty": _number("", minimum=-2, maximum=2, default=0),
        "presence_penalty": _number("", minimum=-2, maximum=2, default=0),
        "seed": _seed(),
        "stop": _stop(4, f"Strings that end the reply; at most {MAX_STOP_CHARS:,} characters in all."),
        "stream": _boolean("Server-sent events: chunks, then `data: [DONE]`.", False),
        "stream_options": _empty_or(_object({"include_usage": _boolean("A last chunk with `usage`.", False)}),
                                    "Streaming options."),
        "n": _only(1, refused),
        "best_of": _only(1, refused),
        "echo": _only(False, refused),
        "top_logprobs": _only(0, refused),
        "suffix": _optional({"type": "string", "enum": [None], "description": "Not supported: must be absent."}),
        "tools": _refused("Function calling."),
        "response_format": _optional(_object({"type": {"type": "string", "enum": ["text"]}}, ("type",),
                                             additionalProperties=False,
                                             description="Only `{\"type\": \"text\"}`.")),
    }


def _only(value: int | bool, description: str) -> Schema:
    """A field that only takes its "off" value. The handler compares with Python's ==, for which
    1 == true and 0 == false, so both spellings are accepted."""
    forms = [{"type": "integer", "enum": [int(value)]}, {"type": "boolean", "enum": [bool(value)]}]
    return _optional({"description": description, "anyOf": forms})


def _no_logprobs() -> Schema:
    # OpenAI's completions take a count, its chat a flag; both surfaces accept "none" in either form.
    return _only(False, "Not supported: only `false` or `0`.")


def _openai_schemas() -> dict[str, Schema]:
    usage = _object({k: {"type": "integer", "minimum": 0} for k in ("prompt_tokens", "completion_tokens",
                                                                     "total_tokens")},
                    ("prompt_tokens", "completion_tokens", "total_tokens"))
    finish = {"type": "string", "enum": ["stop", "length"]}
    prompt_text = {"type": "string", "minLength": 1}

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
        "CompletionRequest": _object({
            **_openai_common(),
            "prompt": {"description": "One prompt (a list of exactly one string is accepted too).",
                       "anyOf": [prompt_text, {"type": "array", "items": prompt_text, "minItems": 1, "maxItems": 1}]},
            "max_tokens": _integer("New tokens at most.", minimum=1, default=16),
            "logprobs": _no_logprobs(),
        }, ("model", "prompt")),
        "ChatCompletionRequest": _object({
            **_openai_common(),
            "messages": {"type": "array", "items": _ref("ChatMessage"), "minItems": 1},
            "max_tokens": _integer("New tokens at most; absent: until the context is full.", minimum=1),
            "logprobs": _no_logprobs(),
        }, ("model", "messages")),
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
        "/v1/completions": {"post": {
            "tags": ["openai"], "operationId": "openaiCompletions", "summary": "Complete a raw `prompt`.",
            "requestBody": _body(_ref("CompletionRequest")),
            "responses": {**_ok(_ref("Completion"), "The completion, or SSE chunks when `stream`.",
                                "text/event-stream", sse), **errors}}},
        "/v1/chat/completions": {"post": {
            "tags": ["openai"], "operationId": "openaiChatCompletions",
            "summary": "Reply to `messages`, rendered with the model's chat template (or the fallback).",
            "requestBody": _body(_ref("ChatCompletionRequest")),
            "responses": {**_ok(_ref("ChatCompletion"), "The reply, or SSE chunks when `stream`.",
                                "text/event-stream", sse), **errors, **_errors(500, shape="OpenAIError")}}},
    }


# -- shared and operations ---------------------------------------------------------------------
def _chat_message() -> Schema:
    """chat.validate_messages: a known role and text content (content may be absent for assistant)."""
    part = _object({"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}, ("type", "text"))
    content = {"anyOf": [{"type": "string"}, {"type": "array", "items": part}]}
    others = [r for r in ROLES if r != "assistant"]
    return {"anyOf": [
        _object({"role": {"type": "string", "enum": others}, "content": content}, ("role", "content")),
        _object({"role": {"type": "string", "enum": ["assistant"]}, "content": _optional(content)}, ("role",)),
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
    """The whole document, built anew on each call."""
    schemas = {**_simulator_schemas(), **_ollama_schemas(), **_openai_schemas(),
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
        "paths": {**_simulator_paths(), **_ollama_paths(), **_openai_paths(), **_operations_paths()},
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
