"""The request bodies of every API surface, declared once (see engine/api/fields.py).

Each table lists an endpoint's fields with type, range, default and description; its handler
parses requests with it and engine/openapi.py documents it from it. A rule changes here, in one
place, for both. Defaults of sampling fields come from generation.SamplingParams (the simulator's)
and from Ollama's documented ones.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

from engine.api.fields import (Body, Boolean, Duration, EmbeddingInput, Integer, Messages, Nested, Number, Only,
                               OnePrompt, Scales, Stops, StringList, Text, Texts, Timeout, Unsupported)
from engine.embedding import MAX_INPUTS
from engine.generation import SamplingParams

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
    "format": Unsupported("Structured output."),
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
    "format": Unsupported("Structured output."),
    "options": _OPTIONS,
    "keep_alive": KEEP_ALIVE,
    "messages": Messages("The conversation; a chat template may refuse one (e.g. roles that do not alternate): a "
                         "400 that says so." + CONTEXT_NOTE),
})

OLLAMA_SHOW = Body("OllamaShowRequest", {
    "model": Text("The model's name (as in /api/tags)."),
    "name": Text("Older name of `model`."),
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
        "response_format": Only("Only `{\"type\": \"text\"}`.", values=({"type": "text"},)),
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
BODIES = (GENERATE, LOAD_MODEL, OLLAMA_OPTIONS, OLLAMA_GENERATE, OLLAMA_CHAT, OLLAMA_SHOW, COMPLETION,
          CHAT_COMPLETION, OLLAMA_EMBED, OLLAMA_EMBEDDINGS, EMBEDDING)

_SAMPLING = {f.name for f in dataclasses.fields(SamplingParams)}


def sampling(values: SimpleNamespace, defaults: SamplingParams = SIMULATOR_DEFAULTS, **fixed) -> SamplingParams:
    """SamplingParams from a parsed body's fields of the same names, then `fixed`."""
    given = {k: v for k, v in vars(values).items() if k in _SAMPLING}
    return dataclasses.replace(defaults, **{**given, **fixed})
