"""Chat prompts: messages rendered with the model's own `tokenizer.chat_template`.

The template is Jinja, run in an immutable sandbox with the variables transformers'
`apply_chat_template` provides (`messages`, `bos_token`, `eos_token`, `add_generation_prompt`,
`raise_exception`, `strftime_now`), so a GGUF's template renders here exactly as it does there.

A model without a template (a base model such as the embedded default) gets a plain transcript,
which base models continue naturally:

    <system prompt>

    User: <message>
    Assistant: <message>
    Assistant:

and generation also stops at the next `\\nUser:` line.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.errors import BadRequest, EngineError

ROLES = ("system", "user", "assistant", "tool")
FALLBACK_STOPS = ("\nUser:",)


class ChatTemplateError(EngineError):
    """The model's chat template is broken (a fault of the model file, not of the request)."""

    status = 500


@dataclass(frozen=True)
class ChatPrompt:
    text: str
    extra_stops: tuple[str, ...]  # stops the prompt format needs (the fallback's next "User:" line)
    templated: bool


def validate_messages(messages: Any, field: str = "messages") -> list[dict[str, str]]:
    """A non-empty list of {role, content} with known roles and string content (400 otherwise)."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest(f"'{field}' must be a non-empty list of messages", field=field)
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRequest(f"'{field}[{i}]' must be an object with 'role' and 'content'", field=field)
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise BadRequest(f"'{field}[{i}].role' must be one of {', '.join(ROLES)}, got {role!r}", field=field)
        if isinstance(content, list):  # OpenAI content parts: only text is supported
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise BadRequest(f"'{field}[{i}].content' parts must all be text (images are not supported)",
                                 field=field)
            content = "".join(p["text"] for p in content)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise BadRequest(f"'{field}[{i}].content' must be a string", field=field)
        out.append({"role": role, "content": content})
    return out


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the model's chat template does not compile: {exc}") from exc


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False) -> str:
    import json

    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


def render_template(template: str, messages: Sequence[dict[str, str]], *, bos_token: str = "",
                    eos_token: str = "", add_generation_prompt: bool = True) -> str:
    """Render `messages` with a chat template. A template that rejects the conversation (its
    `raise_exception`, e.g. roles that do not alternate) is a 400 with the template's reason."""
    compiled = _compile(template)
    try:
        return compiled.render(messages=list(messages), bos_token=bos_token, eos_token=eos_token,
                               add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as exc:
        raise BadRequest(f"the model's chat template refused these messages: {exc}", field="messages") from exc
    except Exception as exc:  # a template bug (undefined attribute, bad filter use, ...)
        raise ChatTemplateError(f"the model's chat template failed to render: {type(exc).__name__}: {exc}") from exc


def render_fallback(messages: Sequence[dict[str, str]]) -> str:
    parts = []
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"].strip() + "\n")
        else:
            speaker = "User" if m["role"] in ("user", "tool") else "Assistant"
            parts.append(f"{speaker}: {m['content'].strip()}")
    parts.append("Assistant:")
    return "\n".join(parts)


def chat_prompt(template: str | None, messages: Sequence[dict[str, str]], *, bos_token: str = "",
                eos_token: str = "", tokenizer_adds_bos: bool = True) -> ChatPrompt:
    """The prompt for `messages` with the model's template (None: the fallback transcript).

    When the tokenizer adds BOS itself, a BOS that the template writes is removed from the text:
    two BOS tokens change a model's output."""
    if not template:
        return ChatPrompt(render_fallback(messages), FALLBACK_STOPS, templated=False)
    text = render_template(template, messages, bos_token=bos_token, eos_token=eos_token)
    if tokenizer_adds_bos and bos_token and text.startswith(bos_token):
        text = text[len(bos_token):]
    return ChatPrompt(text, (), templated=True)
