"""The request bodies of every API surface, declared once (see engine/api/fields.py).

Each table lists an endpoint's fields with type, range, default and description; its handler
parses requests with it and engine/openapi.py documents it from it. A rule changes here, in one
place, for both. Defaults of sampling fields come from generation.SamplingParams (the simulator's)
and from Ollama's documented ones.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

from engine.api.fields import (SCHEMA_NOTE, Body, Boolean, Duration, EmbeddingInput, Integer, JsonFormat, Messages,
                               NameMap, Nested, Number, Only, OnePrompt, ResponseFormat, Scales, Stops, StringList,
                               Text, Texts, Timeout, Unsupported)
from engine.embedding import MAX_INPUTS
from engine.generation import SamplingParams
from engine.grammar import StructuredOutput

MAX_NEW_TOKENS = 8192  # the simulator's max_length at most
MAX_SEED = 2**32 - 2  # llama.cpp's LLAMA_DEFAULT_SEED (2**32 - 1) means "random"
SIMULATOR_DEFAULTS = SamplingParams()
# Ollama's documented defaults; num_predict -1 generates until a stop or the context is full.
OLLAMA_DEFAULTS = SamplingParams(max_tokens=0, temperature=0.8, top_p=0.9, top_k=40, min_p=0.0, repeat_penalty=1.1)

# Fields that read the same on every surface.
SEED = Integer("Same seed and settings → same output. Absent: random.", minimum=0, maximum=MAX_SEED)
TIMEOUT = Timeout("The client's deadline in seconds (also the `X-Request-Timeout` header); REQUEST_TIMEOUT_S "
                  "when absent or longer. A request the engine estimates cannot finish by then gets 503 with "
                  "Retry-After at once.", minimum=1)
KEEP_ALIVE = Duration("How long the model stays loaded after this request (Ollama's format): seconds, or `5m`, "
                      "`1h30m`, `300ms`; 0 unloads it as soon as it is idle, negative keeps it. Default: "
                      "KEEP_ALIVE (the default model stays).")
PENALTY = {name: Number(description, minimum=-2, maximum=2, default=0.0) for name, description in (
    ("frequency_penalty", "Lowers the odds of tokens by how often they already appeared."),
    ("presence_penalty", "Lowers the odds of tokens that already appeared."))}
CONTEXT_NOTE = " A prompt that does not fit N_CTX with the new tokens asked for is a 400 that says so."
NO_STOPS = " Stop strings do not apply to a reply held to JSON: the grammar ends it."
OLLAMA_FORMAT = JsonFormat("Structured output: `\"json\"` (any JSON object) or a JSON schema." + SCHEMA_NOTE + NO_STOPS)


def _ollama_model() -> Text:
    return Text("A GGUF under MODEL_PATH (`name:latest`, the file name, with or without `.gguf`), a preset, or a "
                "catalog alias (`llama3.1:8b`). One that is not resident is loaded beside the others; an unknown "
                "one is a 404.", required=True, example="gemma-3-270m-q4_k_m")


def _openai_model() -> Text:
    return Text("An `id` of /v1/models (a GGUF under MODEL_PATH, a preset) or a catalog alias; one that is not "
                "resident is loaded beside the others; an unknown one is a 404 `model_not_found`.",
                required=True, example="gemma-3-270m-q4_k_m.gguf")


# -- the simulator ---------------------------------------------------------------------------------
_d = SIMULATOR_DEFAULTS
GENERATE = Body("GenerateRequest", {
    "timeout_s": TIMEOUT,
    "prompt": Text("The interview transcript; it ends with `Paciente:`." + CONTEXT_NOTE, required=True),
    "max_length": Integer("New tokens to generate at most (not prompt + reply).", minimum=1,
                          maximum=MAX_NEW_TOKENS, default=150),
    "temperature": Number("0 is greedy (deterministic).", minimum=0, maximum=2, default=_d.temperature),
    "top_p": Number("Nucleus sampling.", minimum=0, maximum=1, exclusive_minimum=True, default=_d.top_p),
    "top_k": Integer("Top-k sampling; 0 turns it off.", minimum=0, default=_d.top_k),
    "min_p": Number("Min-p sampling.", minimum=0, maximum=1, default=_d.min_p),
    "repeat_penalty": Number("Penalty on the last 64 generated tokens.", minimum=0, maximum=10,
                             exclusive_minimum=True, default=_d.repeat_penalty),
    "seed": SEED,
    "stop": Stops("Replaces the default speaker-turn stops; `[]`: only end-of-sequence or max_length end the "
                  "reply."),
    "stream": Boolean("Server-sent events: one `data:` event per token (`{\"text\": ...}`), then one with the "
                      "whole reply.", default=False),
    "model": Text("Any model name the Ollama and OpenAI surfaces accept (a file under MODEL_PATH, a preset, a "
                  "catalog alias such as `llama3.1:8b`); loaded beside the others if it is not resident. Default: "
                  "the default model."),
    "keep_alive": KEEP_ALIVE,
    "json_schema": JsonFormat("Structured output: `texto` is JSON that follows this schema (e.g. feedback on an "
                              "interview), not a patient's line; the speaker-turn stops and `stop` do not apply "
                              "to it, and `metadata.json_complete` says whether it ended before `max_length`."
                              + SCHEMA_NOTE, json_ok=False),
})

LOAD_MODEL = Body("LoadModelRequest", {
    "model_name": Text("A GGUF file under MODEL_PATH (or under `model_path`).", required=True),
    "model_path": Text("A folder under MODEL_PATH holding `model_name`, or a file under it."),
    "lora": StringList("LoRA adapter GGUF files under MODEL_PATH to apply (a name or a list).", max_items=16),
    "lora_scale": Scales("One scale for every adapter, or one per adapter.", default=1.0, minimum=0, maximum=10),
})

# -- Ollama ----------------------------------------------------------------------------------------
_o = OLLAMA_DEFAULTS
OLLAMA_OPTIONS = Body("OllamaOptions", {
    "num_predict": Integer("New tokens at most; -1 (or -2): until the context is full. 0 is refused.",
                           minimum=-2, default=-1, excluded=0,
                           excluded_message="'options.num_predict' must be positive, or -1 for no limit"),
    "num_ctx": Integer("Accepted; the context is N_CTX.", minimum=1),
    "temperature": Number(minimum=0, maximum=100, default=_o.temperature),
    "top_p": Number(minimum=0, maximum=1, exclusive_minimum=True, default=_o.top_p),
    "top_k": Integer("0 turns it off.", minimum=0, default=_o.top_k),
    "min_p": Number(minimum=0, maximum=1, default=_o.min_p),
    "repeat_penalty": Number(minimum=0, maximum=10, exclusive_minimum=True, default=_o.repeat_penalty),
    **PENALTY,
    "seed": SEED,
    "stop": Stops("Strings that end the reply."),
})
_OPTIONS = Nested("Sampling options (Ollama's names and defaults).", body=OLLAMA_OPTIONS)
_NDJSON = "NDJSON: a line per token, then a final line with the statistics."

OLLAMA_GENERATE = Body("OllamaGenerateRequest", {
    "timeout_s": TIMEOUT,
    "model": _ollama_model(),
    "prompt": Text("Empty or absent: only load the model." + CONTEXT_NOTE, blank_ok=True, default=""),
    "system": Text("System prompt.", blank_ok=True),
    "raw": Boolean("Use the prompt as it is (no chat template).", default=False),
    "stream": Boolean(_NDJSON, default=True),
    "images": Unsupported("Images."),
    "format": OLLAMA_FORMAT,
    "template": Unsupported("Prompt template."),
    "suffix": Unsupported("Fill-in-the-middle suffix."),
    "options": _OPTIONS,
    "keep_alive": KEEP_ALIVE,
})

OLLAMA_CHAT = Body("OllamaChatRequest", {
    "timeout_s": TIMEOUT,
    "model": _ollama_model(),
    "stream": Boolean(_NDJSON, default=True),
    "tools": Unsupported("Function calling."),
    "format": OLLAMA_FORMAT,
    "options": _OPTIONS,
    "keep_alive": KEEP_ALIVE,
    "messages": Messages("The conversation; a chat template may refuse one (e.g. roles that do not alternate): a "
                         "400 that says so." + CONTEXT_NOTE),
})

OLLAMA_SHOW = Body("OllamaShowRequest", {
    "model": Text("The model's name (as in /api/tags)."),
    "name": Text("Older name of `model`."),
}, one_of=("model", "name"))

_NAME = Text("Older name of `model`.")
_STATUS_LINES = "NDJSON status lines (`{\"status\": ...}`), the last `{\"status\": \"success\"}`; false: only the last."
OLLAMA_PULL = Body("OllamaPullRequest", {
    "model": Text("`hf.co/ORG/REPO:QUANT` (or `huggingface.co/...`, or `ORG/REPO[:QUANT]`): a GGUF of a Hugging Face "
                  "repo, by its quant tag (case-insensitive); without one Q4_K_M when the repo has it, else its only "
                  "GGUF. Saved as MODEL_PATH/hf.co/ORG/REPO/<file>. Example: "
                  "`hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M`."),
    "name": _NAME,
    "insecure": Boolean("Accepted and ignored: the hub is reached over HTTPS (or HF_ENDPOINT).", default=False),
    "stream": Boolean(_STATUS_LINES + " Errors after the first line come as an `{\"error\": ...}` line.",
                      default=True),
}, one_of=("model", "name"))

OLLAMA_DELETE = Body("OllamaDeleteRequest", {
    "model": Text("A preset (removed; its GGUF stays) or a GGUF under MODEL_PATH (deleted; 409 while a preset uses "
                  "it or it is the default model)."),
    "name": _NAME,
}, one_of=("model", "name"))

OLLAMA_COPY = Body("OllamaCopyRequest", {
    "source": Text("A model name (a preset, a GGUF under MODEL_PATH, a pulled `hf.co/...` name).", required=True),
    "destination": Text("The new name: a preset (no file is copied). An existing preset of that name is replaced.",
                        required=True),
})

OLLAMA_CREATE = Body("OllamaCreateRequest", {
    "model": Text("The new model's name: a preset in MODEL_PATH/presets.toml (one of that name is replaced)."),
    "name": _NAME,
    "from": Text("The base: a GGUF under MODEL_PATH, a pulled `hf.co/...` name, or a preset (whose adapters, "
                 "parameters, system and template it starts from). Overrides the Modelfile's FROM."),
    "modelfile": Text("A Modelfile: FROM, PARAMETER, SYSTEM, TEMPLATE and ADAPTER (older clients send this).",
                      blank_ok=True),
    "adapters": NameMap("LoRA adapter GGUFs under MODEL_PATH (names, or an object whose keys are the names).",
                        max_items=16),
    "parameters": Nested("Default options of the new model (Ollama's names); a request's own `options` win.",
                         body=OLLAMA_OPTIONS),
    "system": Text("Default system prompt.", blank_ok=True),
    "template": Text("A Jinja chat template (as a GGUF's tokenizer.chat_template) used instead of the model's. "
                     "Ollama's Go templates are refused.", blank_ok=True),
    "stream": Boolean(_STATUS_LINES, default=True),
    "files": Unsupported("Uploaded blobs: put GGUF files under MODEL_PATH and name them in `from`."),
    "quantize": Unsupported("Quantizing: use `ai-engine quantize`."),
    "messages": Unsupported("Messages."),
    "license": Unsupported("License text."),
}, one_of=("model", "name"))

EMBED_NOTE = (" An input longer than the context (N_CTX, the model's training context; N_BATCH too for a model "
              "that pools natively) is a 400 saying the context holds fewer tokens.")
DIMENSIONS = Integer("Keep the first `dimensions` values and normalize again (Matryoshka truncation, meaningful for "
                     "models trained for it); more than the model's embedding size is a 400 naming it.", minimum=1)

OLLAMA_EMBED = Body("OllamaEmbedRequest", {
    "timeout_s": TIMEOUT,
    "model": _ollama_model(),
    "input": Texts(f"A text or a list of texts (at most {MAX_INPUTS}, none empty); absent, `\"\"` or `[]`: only load "
                   "the model (`embeddings: []`).", max_items=MAX_INPUTS),
    "truncate": Boolean("Cut an input longer than the context to fit (keeping its start); false: such an input is "
                        "a 400." + EMBED_NOTE, default=True),
    "dimensions": DIMENSIONS,
    "options": _OPTIONS,
    "keep_alive": KEEP_ALIVE,
})

OLLAMA_EMBEDDINGS = Body("OllamaEmbeddingsRequest", {
    "timeout_s": TIMEOUT,
    "model": _ollama_model(),
    "prompt": Text("The text (Ollama's older embeddings route). Empty or absent: only load the model "
                   "(`embedding: []`). Cut to the context when longer, as /api/embed's default does.",
                   blank_ok=True, default=""),
    "options": _OPTIONS,
    "keep_alive": KEEP_ALIVE,
})

# -- OpenAI ----------------------------------------------------------------------------------------
_ONLY = "Only the value(s) listed are accepted; others are refused with a 400."


def _openai(name: str, first: dict, max_tokens: Integer) -> Body:
    """The fields both /v1 generation endpoints read, in the order they are checked."""
    return Body(name, {
        "timeout_s": TIMEOUT,
        "model": _openai_model(),
        **first,
        "n": Only(_ONLY, values=(1,)),
        "best_of": Only(_ONLY, values=(1,)),
        "echo": Only(_ONLY, values=(False,)),
        # OpenAI's completions take a count, its chat a flag; both surfaces accept "none" in either form.
        "logprobs": Only("Not supported: only `false` or `0`.", values=(False, 0)),
        "top_logprobs": Only(_ONLY, values=(0,)),
        "suffix": Only("Not supported: must be absent."),
        "tools": Unsupported("Function calling.", label="function calling"),
        "response_format": ResponseFormat("`{\"type\": \"text\"}` (the default), `{\"type\": \"json_object\"}` "
                                          "(any JSON object) or `{\"type\": \"json_schema\", \"json_schema\": "
                                          "{\"name\", \"schema\", \"strict\"}}`." + SCHEMA_NOTE + NO_STOPS),
        "max_completion_tokens": Integer("Used when `max_tokens` is absent.", minimum=1),
        "max_tokens": max_tokens,
        "stop": Stops("Strings that end the reply.", max_items=4),
        "temperature": Number(minimum=0, maximum=2, default=1.0),
        "top_p": Number(minimum=0, maximum=1, exclusive_minimum=True, default=1.0),
        **PENALTY,
        "seed": SEED,
        "stream": Boolean("Server-sent events: chunks, then `data: [DONE]`.", default=False),
        "stream_options": Nested("Streaming options.", body=Body("", {
            "include_usage": Boolean("A last chunk with `usage`.", default=False)})),
    })


COMPLETION = _openai("CompletionRequest", {
    "prompt": OnePrompt("One prompt (a list of exactly one string is accepted too)." + CONTEXT_NOTE)},
    Integer("New tokens at most; absent: `max_completion_tokens`, else 16.", minimum=1, default=16,
            fallback="max_completion_tokens"))
CHAT_COMPLETION = _openai("ChatCompletionRequest", {"messages": OLLAMA_CHAT.fields["messages"]}, Integer(
    "New tokens at most; absent: `max_completion_tokens`, else until the context is full.", minimum=1,
    fallback="max_completion_tokens"))

EMBEDDING = Body("EmbeddingRequest", {
    "timeout_s": TIMEOUT,
    "model": _openai_model(),
    "input": EmbeddingInput(f"A text, a list of texts (at most {MAX_INPUTS}), token ids, or a list of token-id lists; "
                            "none empty. Token ids must be in the model's vocabulary (a 400 saying what the "
                            "vocabulary holds otherwise)." + EMBED_NOTE, max_items=MAX_INPUTS),
    "encoding_format": Only("`float` (the default) or `base64` (little-endian float32 bytes).",
                            values=("float", "base64")),
    "dimensions": DIMENSIONS,
    "user": Text("An end-user id (accepted, not used).", blank_ok=True),
})

# Every body that has a name in the OpenAPI document's components.
BODIES = (GENERATE, LOAD_MODEL, OLLAMA_OPTIONS, OLLAMA_GENERATE, OLLAMA_CHAT, OLLAMA_SHOW, OLLAMA_PULL,
          OLLAMA_DELETE, OLLAMA_COPY, OLLAMA_CREATE, COMPLETION, CHAT_COMPLETION, OLLAMA_EMBED, OLLAMA_EMBEDDINGS,
          EMBEDDING)

_SAMPLING = {f.name for f in dataclasses.fields(SamplingParams)}


def grammar_of(output: StructuredOutput | None) -> str | None:
    """The grammar of a parsed structured-output field (JsonFormat, ResponseFormat), or None."""
    return None if output is None else output.grammar


def sampling(values: SimpleNamespace, defaults: SamplingParams = SIMULATOR_DEFAULTS, **fixed) -> SamplingParams:
    """SamplingParams from a parsed body's fields of the same names, then `fixed`."""
    given = {k: v for k, v in vars(values).items() if k in _SAMPLING}
    return dataclasses.replace(defaults, **{**given, **fixed})
