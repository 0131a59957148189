"""The subset of Ollama's Modelfile that `POST /api/create` keeps as a preset.

    FROM <a GGUF under MODEL_PATH, a pulled hf.co name, a preset, or a path under MODEL_PATH>
    PARAMETER <name> <value>      (repeatable; `stop` may be given several times)
    SYSTEM <text>                 (or a block over several lines between triple quotes)
    TEMPLATE <a Jinja chat template, as in a GGUF's tokenizer.chat_template>
    ADAPTER <a LoRA GGUF under MODEL_PATH>
    # comments, and LICENSE / MESSAGE, which are refused

Instructions are case-insensitive; a value may be quoted ("..." or a triple-quoted block). Anything
else is a 400 that names the line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import BadRequest

FIELD = "modelfile"


@dataclass
class ModelfileSpec:
    """What a Modelfile (or /api/create's own fields) asks for; values are checked by engine.model_admin."""

    base: str | None = None
    adapters: list[str] = field(default_factory=list)
    parameters: dict = field(default_factory=dict)  # name -> value as written (strings), stop -> list
    system: str | None = None
    template: str | None = None


def parse(text: str) -> ModelfileSpec:
    """The instructions of `text`; a 400 naming the first line that is not in the subset."""
    spec = ModelfileSpec()
    lines = text.replace("\r\n", "\n").split("\n")
    i = 0
    while i < len(lines):
        line, number = lines[i].strip(), i + 1
        i += 1
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        rest = rest.strip()
        if rest.startswith('"""'):
            rest, i = _block(rest[3:], lines, i, number)
        elif len(rest) >= 2 and rest[0] == rest[-1] == '"':
            rest = rest[1:-1]
        _apply(spec, word.upper(), rest, number)
    if spec.base is None:
        raise BadRequest("the Modelfile has no FROM line", field=FIELD)
    return spec


def _block(first: str, lines: list[str], i: int, number: int) -> tuple[str, int]:
    """A triple-quoted value that may span lines; the text and the index of the line after it."""
    parts = [first]
    while '"""' not in parts[-1]:
        if i >= len(lines):
            raise BadRequest(f'Modelfile line {number}: a """ block is not closed', field=FIELD)
        parts.append(lines[i])
        i += 1
    text = "\n".join(parts)
    value, _, after = text.partition('"""')
    if after.strip():
        raise BadRequest(f'Modelfile line {number}: text after the closing """', field=FIELD)
    return value, i


def _apply(spec: ModelfileSpec, word: str, value: str, number: int) -> None:
    if not value and word != "SYSTEM":
        raise BadRequest(f"Modelfile line {number}: {word} needs a value", field=FIELD)
    if word == "FROM":
        spec.base = value
    elif word == "ADAPTER":
        spec.adapters.append(value)
    elif word == "SYSTEM":
        spec.system = value
    elif word == "TEMPLATE":
        spec.template = value
    elif word == "PARAMETER":
        name, _, raw = value.partition(" ")
        raw = raw.strip()
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            raw = raw[1:-1]
        if not raw:
            raise BadRequest(f"Modelfile line {number}: PARAMETER {name} needs a value", field=FIELD)
        if name == "stop":
            spec.parameters.setdefault("stop", []).append(raw)
        else:
            spec.parameters[name] = raw
    else:
        raise BadRequest(f"Modelfile line {number}: {word} is not supported (FROM, PARAMETER, SYSTEM, TEMPLATE and "
                         "ADAPTER are)", field=FIELD)
