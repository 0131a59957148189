"""Request fields, declared once: the kinds of field a JSON body is made of.

A `Body` is a table of named `Field`s; each field knows its type, range, default and description.
The handler reads a request with `Body.parse` (a 400 that names the field for anything outside
the declaration) and engine/openapi.py describes the same body with `Body.schema`, so the rules a
handler enforces and the ones its documentation states come from one place. The tables of the
three surfaces are in engine/api/bodies.py.

What every kind does alike:
- absent and `null` both mean "not given": the field's default (the schema says `nullable`);
- JSON has one number type: an integer field takes 150.0 for 150 and refuses 1.5 and booleans;
- a refusal names the field: `'max_length' must be >= 1 and <= 8192, got 0`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, ClassVar, Mapping

from flask import has_request_context, request

from engine.chat import validate_messages
from engine.errors import BadRequest
from engine.generation import MAX_STOP_CHARS, MAX_STOPS, check_stops
from engine.grammar import TYPES, StructuredOutput, structured_output

Schema = dict[str, Any]

NON_BLANK = r"\S"  # a schema pattern for "not empty, not only whitespace"


# -- schema builders (engine/openapi.py builds its response schemas with them too) ---------------
def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def object_schema(properties: dict[str, Schema], required: tuple[str, ...] = (), **extra: Any) -> Schema:
    schema: Schema = {"type": "object", "properties": properties, **extra}
    if required:
        schema["required"] = list(required)
    return schema


def empty_or(schema: Schema | None, description: str) -> Schema:
    """`schema`, or any empty value: for fields a handler reads as `body.get(name) or default` (or
    refuses when truthy), where "", [], {}, false and 0 all mean "not given"."""
    empty = [{"type": "string", "maxLength": 0}, {"type": "array", "maxItems": 0, "items": {}},
             {"type": "object", "maxProperties": 0}, {"type": "boolean", "enum": [False]},
             {"type": "number", "enum": [0]}]
    return {"description": description, "anyOf": ([schema] if schema else []) + empty, "nullable": True}


# -- refusals ---------------------------------------------------------------------------------------
def kind_of(value: Any) -> str:
    """How a refusal names the JSON type a client sent."""
    return {bool: "a boolean", str: "a string", list: "a list", dict: "an object",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def check_range(name: str, value: float, minimum: float | None, maximum: float | None,
                exclusive_minimum: bool = False) -> None:
    low_bad = minimum is not None and (value < minimum or (exclusive_minimum and value == minimum))
    high_bad = maximum is not None and value > maximum
    if low_bad or high_bad:
        lo = "" if minimum is None else f"{'>' if exclusive_minimum else '>='} {minimum}"
        hi = "" if maximum is None else f"<= {maximum}"
        raise BadRequest(f"'{name}' must be {' and '.join(p for p in (lo, hi) if p)}, got {value}", field=name)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# -- the kinds of field ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Field:
    """A field of a JSON body. Subclasses say what a given value must be (`check`, a 400 naming the
    field otherwise) and how the schema states it (`shape`)."""

    description: str = ""
    default: Any = None
    required: bool = False
    example: Any = None
    fallback: str | None = None  # absent: the value of this field of the body (declared before it), if given

    def read(self, body: Mapping[str, Any], name: str) -> Any:
        value = body.get(name)
        if value is None:
            if self.required:
                raise BadRequest(f"'{name}' is required", field=name)
            return self.default
        return self.check(value, name)

    def check(self, value: Any, name: str) -> Any:
        return value

    def shape(self) -> Schema:
        """The schema of a given value: its type and range (no description, default or null)."""
        return {}

    def schema(self) -> Schema:
        schema = self.shape()
        for key, value in (("description", self.description), ("default", self.default),
                           ("example", self.example)):
            if value not in (None, ""):
                schema[key] = value
        if not self.required:
            schema["nullable"] = True
        return schema


@dataclass(frozen=True)
class Text(Field):
    """A string; unless `blank_ok`, one with something besides whitespace."""

    blank_ok: bool = False

    def check(self, value: Any, name: str) -> str:
        if not isinstance(value, str):
            raise BadRequest(f"'{name}' must be a string, not {kind_of(value)}", field=name)
        if not self.blank_ok and not value.strip():
            raise BadRequest(f"'{name}' must not be empty", field=name)
        return value

    def shape(self) -> Schema:
        return {"type": "string"} if self.blank_ok else {"type": "string", "minLength": 1, "pattern": NON_BLANK}


@dataclass(frozen=True)
class Integer(Field):
    """A whole number within [minimum, maximum]; `excluded` is one more value refused, with
    `excluded_message` (Ollama's num_predict 0)."""

    minimum: int | None = None
    maximum: int | None = None
    excluded: int | None = None
    excluded_message: str = ""

    def check(self, value: Any, name: str) -> int:
        if not _is_number(value) or (isinstance(value, float) and not value.is_integer()):
            raise BadRequest(f"'{name}' must be an integer, not {kind_of(value)}", field=name)
        value = int(value)
        check_range(name, value, self.minimum, self.maximum)
        if self.excluded is not None and value == self.excluded:
            raise BadRequest(self.excluded_message or f"'{name}' must not be {value}", field=name)
        return value

    def shape(self) -> Schema:
        schema: Schema = {"type": "integer"}
        schema.update({k: v for k, v in (("minimum", self.minimum), ("maximum", self.maximum)) if v is not None})
        if self.excluded is not None:
            schema["not"] = {"enum": [self.excluded]}
        return schema


@dataclass(frozen=True)
class Number(Field):
    """A finite number within [minimum, maximum] (above `minimum` when `exclusive_minimum`)."""

    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False

    def check(self, value: Any, name: str) -> float:
        if not _is_number(value):
            raise BadRequest(f"'{name}' must be a number, not {kind_of(value)}", field=name)
        check_range(name, value, self.minimum, self.maximum, self.exclusive_minimum)
        return float(value)

    def shape(self) -> Schema:
        schema: Schema = {"type": "number"}
        schema.update({k: v for k, v in (("minimum", self.minimum), ("maximum", self.maximum)) if v is not None})
        if self.exclusive_minimum:
            schema["exclusiveMinimum"] = True
        return schema


@dataclass(frozen=True)
class Boolean(Field):
    def check(self, value: Any, name: str) -> bool:
        if not isinstance(value, bool):
            raise BadRequest(f"'{name}' must be true or false, not {kind_of(value)}", field=name)
        return value

    def shape(self) -> Schema:
        return {"type": "boolean"}


@dataclass(frozen=True)
class StringList(Field):
    """One string or a list of them (read as a list), none empty, at most `max_items`."""

    max_items: int = 16
    expected: ClassVar[str] = "a list of strings"  # the refusal's words

    def check(self, value: Any, name: str) -> list[str]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise BadRequest(f"'{name}' must be {self.expected}", field=name)
        if any(v == "" for v in value):
            raise BadRequest(f"'{name}' must not contain empty strings", field=name)
        if len(value) > self.max_items:
            raise BadRequest(f"'{name}' has {len(value)} entries; at most {self.max_items} are allowed", field=name)
        return value

    def item(self) -> Schema:
        return {"type": "string", "minLength": 1}

    def shape(self) -> Schema:
        return {"anyOf": [self.item(), {"type": "array", "items": self.item(), "maxItems": self.max_items}]}


@dataclass(frozen=True)
class NameMap(StringList):
    """Names given as one string, a list, or the keys of an object (Ollama's `adapters`: file name ->
    digest); read as a list of the names."""

    def check(self, value: Any, name: str) -> list[str]:
        if isinstance(value, dict):
            if not all(isinstance(v, str) for v in value.values()):
                raise BadRequest(f"'{name}' must map names to strings", field=name)
            value = list(value)
        return super().check(value, name)

    def shape(self) -> Schema:
        return {"anyOf": [*super().shape()["anyOf"], {"type": "object", "additionalProperties": {"type": "string"},
                                                      "maxProperties": self.max_items}]}


@dataclass(frozen=True)
class Stops(StringList):
    """Stop strings: also within generation.check_stops's limits. A schema bounds each string's
    length, not their sum: the description says it."""

    max_items: int = MAX_STOPS

    def check(self, value: Any, name: str) -> list[str]:
        stops = super().check(value, name)
        check_stops(stops, name)
        return stops

    def item(self) -> Schema:
        return {**super().item(), "maxLength": MAX_STOP_CHARS}

    def schema(self) -> Schema:
        schema = super().schema()
        schema["description"] = (schema.get("description", "") + f" At most {MAX_STOP_CHARS:,} characters "
                                 "in all (a 400 otherwise).").strip()
        return schema


@dataclass(frozen=True)
class Scales(Field):
    """One number for all, or a list of numbers, each within [minimum, maximum]; read as a list."""

    minimum: float = 0
    maximum: float = 10

    def check(self, value: Any, name: str) -> list[float]:
        values = value if isinstance(value, list) else [value]
        if not all(_is_number(x) and self.minimum <= x <= self.maximum for x in values):
            raise BadRequest(f"'{name}' must be a number between {self.minimum} and {self.maximum}, or a list "
                             "of them", field=name)
        return values

    def read(self, body: Mapping[str, Any], name: str) -> list[float]:
        value = super().read(body, name)
        return value if isinstance(value, list) else [value]

    def shape(self) -> Schema:
        one = {"type": "number", "minimum": self.minimum, "maximum": self.maximum}
        return {"anyOf": [one, {"type": "array", "items": one}]}


@dataclass(frozen=True)
class Duration(Field):
    """Ollama's `keep_alive`: seconds (a number) or a Go duration string (`5m`, `1h`, `-1`)."""

    def check(self, value: Any, name: str) -> float:
        from engine.settings import parse_duration

        try:
            return parse_duration(value)
        except ValueError as exc:
            raise BadRequest(f"'{name}': {exc}", field=name) from None

    def shape(self) -> Schema:
        return {"anyOf": [{"type": "number"}, {"type": "string", "pattern": (
            r"^\s*[+-]?((\d+(\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h))+\s*$|^\s*[+-]?(\d+(\.\d*)?|\.\d+)\s*$")}]}


@dataclass(frozen=True)
class Timeout(Number):
    """The client's own deadline in seconds: this field, else the `header` (the same rule)."""

    header: str = "X-Request-Timeout"

    def read(self, body: Mapping[str, Any], name: str) -> float | None:
        value = super().read(body, name)
        raw = request.headers.get(self.header) if has_request_context() else None
        if value is not None or not raw:
            return value
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < self.minimum:
            raise BadRequest(f"the {self.header} header must be a number of seconds >= {self.minimum}, "
                             f"got {raw[:40]!r}", field=self.header)
        return value


@dataclass(frozen=True)
class Unsupported(Field):
    """A field this engine does not support: any non-empty value is refused."""

    label: str = ""  # what it is, in the refusal: `'tools' (function calling) is not supported ...`

    def read(self, body: Mapping[str, Any], name: str) -> None:
        if body.get(name):
            label = f" ({self.label})" if self.label else ""
            raise BadRequest(f"'{name}'{label} is not supported by this engine", field=name)
        return None

    def schema(self) -> Schema:
        return empty_or(None, f"{self.description} Not supported: a non-empty value is refused with a 400.".strip())


@dataclass(frozen=True)
class Only(Field):
    """A field that only takes the listed values (its "off" values); others are refused. Values
    compare as Python's == does, so 1 and true (0 and false) are the same."""

    values: tuple = ()

    def read(self, body: Mapping[str, Any], name: str) -> Any:
        value = body.get(name)
        if value not in (None, *self.values):
            only = f"; only {' or '.join(map(repr, self.values))}" if self.values else "; leave it out"
            raise BadRequest(f"'{name}'={value!r} is not supported by this engine{only}", field=name)
        return value

    def shape(self) -> Schema:
        scalars = [v for v in self.values if isinstance(v, (bool, int))]
        if not scalars:
            return {"enum": [*self.values, None]}
        ints = sorted({int(v) for v in scalars})
        bools = sorted({bool(v) for v in scalars if int(v) in (0, 1)})
        forms = [{"type": "integer", "enum": ints}] + ([{"type": "boolean", "enum": bools}] if bools else [])
        return {"anyOf": forms}


# -- structured output (engine/grammar.py) ------------------------------------------------------------
# A JSON schema as the document states it: an object whose `type`, if given, names JSON types. The
# rest of the meta-schema, and what the grammar cannot enforce, are 400s the descriptions mention.
_TYPE_NAME = {"type": "string", "enum": list(TYPES)}
JSON_SCHEMA = {"type": "object",
               "properties": {"type": {"anyOf": [_TYPE_NAME, {"type": "array", "items": _TYPE_NAME}]}}}
SCHEMA_NOTE = (" The reply is held to it by a llama.cpp grammar: it parses and validates, unless it ends at the "
               "token limit (`length`). A schema that is not valid JSON Schema, or that uses a keyword the grammar "
               "cannot enforce (see docs/api.md), is a 400 that names it.")


@dataclass(frozen=True)
class JsonFormat(Field):
    """Structured output: a JSON schema (an object), or, when `json_ok`, the string "json" for any
    JSON object (Ollama's `format`); absent, null or "": none. Read as a StructuredOutput or None."""

    json_ok: bool = True

    def read(self, body: Mapping[str, Any], name: str) -> StructuredOutput | None:
        value = body.get(name)
        if value is None or (self.json_ok and value == ""):
            return None
        if isinstance(value, dict) or (self.json_ok and value == "json"):
            return structured_output(value, name)
        either = '"json" or ' if self.json_ok else ""
        raise BadRequest(f"'{name}' must be {either}a JSON schema (an object), not {kind_of(value)}", field=name)

    def shape(self) -> Schema:
        if not self.json_ok:
            return dict(JSON_SCHEMA)
        return {"anyOf": [{"type": "string", "enum": ["json", ""]}, JSON_SCHEMA]}


def _openai_format(value: Any, name: str) -> StructuredOutput | None:
    """OpenAI's response_format: {"type": "text"}, {"type": "json_object"}, or {"type":
    "json_schema", "json_schema": {"name", "schema"?, "strict"?, "description"?}}."""
    if not isinstance(value, dict):
        raise BadRequest(f"'{name}' must be an object: {{\"type\": \"text\"}}, {{\"type\": \"json_object\"}} or "
                         f"{{\"type\": \"json_schema\", \"json_schema\": {{...}}}}", field=name)
    if value.get("type") not in ("text", "json_object", "json_schema"):
        raise BadRequest(f"'{name}.type' must be \"text\", \"json_object\" or \"json_schema\", got "
                         f"{value.get('type')!r}", field=f"{name}.type")
    if value["type"] == "text":
        return None
    if value["type"] == "json_object":
        return structured_output("json", name)
    inner, where = value.get("json_schema"), f"{name}.json_schema"
    if not isinstance(inner, dict):
        raise BadRequest(f"'{where}' must be an object with 'name' and 'schema'", field=where)
    label = inner.get("name")
    if not isinstance(label, str) or not OPENAI_NAME.fullmatch(label):
        raise BadRequest(f"'{where}.name' must be 1 to 64 letters, digits, '_' or '-'", field=f"{where}.name")
    for key, kinds, what in (("strict", (bool,), "true or false"), ("description", (str,), "a string")):
        if inner.get(key) is not None and not isinstance(inner[key], kinds):
            raise BadRequest(f"'{where}.{key}' must be {what}", field=f"{where}.{key}")
    schema = inner.get("schema")
    if schema is None:
        return structured_output("json", where)
    if not isinstance(schema, dict):
        raise BadRequest(f"'{where}.schema' must be a JSON schema (an object)", field=f"{where}.schema")
    return structured_output(schema, f"{where}.schema")


OPENAI_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class ResponseFormat(Field):
    """OpenAI's `response_format`; read as a StructuredOutput, or None for text."""

    def read(self, body: Mapping[str, Any], name: str) -> StructuredOutput | None:
        value = body.get(name)
        return None if value is None else _openai_format(value, name)

    def shape(self) -> Schema:
        def kind(*names: str, **props: Schema) -> Schema:
            return object_schema({"type": {"type": "string", "enum": list(names)}, **props},
                                 ("type", *props))

        inner = object_schema({
            "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
            "schema": {**JSON_SCHEMA, "nullable": True, "description": "The JSON schema; absent: any JSON object."},
            "strict": {"type": "boolean", "nullable": True, "description": "Accepted; the schema is always "
                       "enforced."},
            "description": {"type": "string", "nullable": True}}, ("name",))
        return {"anyOf": [kind("text", "json_object"), kind("json_schema", json_schema=inner)]}


@dataclass(frozen=True)
class Messages(Field):
    """A chat: a non-empty list of {role, content} (engine.chat.validate_messages)."""

    required: bool = True

    def read(self, body: Mapping[str, Any], name: str) -> list[dict[str, str]]:
        return validate_messages(body.get(name), name)

    def shape(self) -> Schema:
        return {"type": "array", "items": ref("ChatMessage"), "minItems": 1}


@dataclass(frozen=True)
class OnePrompt(Field):
    """One non-empty prompt string, also given as a list of exactly one (OpenAI's completions)."""

    required: bool = True

    def read(self, body: Mapping[str, Any], name: str) -> str:
        value = body.get(name)
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
            value = value[0]
        if not isinstance(value, str) or not value:
            raise BadRequest(f"'{name}' must be a non-empty string (lists of prompts and token ids are not "
                             "supported)", field=name)
        return value

    def shape(self) -> Schema:
        text = {"type": "string", "minLength": 1}
        return {"anyOf": [text, {"type": "array", "items": text, "minItems": 1, "maxItems": 1}]}


@dataclass(frozen=True)
class Texts(StringList):
    """Ollama's embedding `input`: a string or a list of strings, read as a list. Absent, "" or []
    mean no input (Ollama then only loads the model); an empty string inside a list is refused."""

    max_items: int = 2048
    expected: ClassVar[str] = "a string or a list of strings"

    def read(self, body: Mapping[str, Any], name: str) -> list[str]:
        value = body.get(name)
        if value is None or value == "":
            return []
        return self.check(value, name)

    def shape(self) -> Schema:
        return {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string", "minLength": 1},
                                               "maxItems": self.max_items}]}


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class EmbeddingInput(Field):
    """OpenAI's embedding `input`: a string, a list of strings, a list of token ids or a list of
    such lists, none empty; read as a list of inputs (each a string or a list of token ids)."""

    required: bool = True
    max_items: int = 2048

    def read(self, body: Mapping[str, Any], name: str) -> list:
        value = body.get(name)
        if isinstance(value, str) and value:
            return [value]
        if isinstance(value, list) and value:
            if all(_is_token(v) for v in value):
                return [value]
            strings = all(isinstance(v, str) and v for v in value)
            if strings or all(isinstance(v, list) and v and all(_is_token(t) for t in v) for v in value):
                if len(value) > self.max_items:
                    raise BadRequest(f"'{name}' has {len(value)} entries; at most {self.max_items} are allowed",
                                     field=name)
                return value
        raise BadRequest(f"'{name}' must be a non-empty string, a list of non-empty strings, a list of token ids "
                         "(integers >= 0) or a list of non-empty lists of token ids", field=name)

    def shape(self) -> Schema:
        token = {"type": "integer", "minimum": 0}
        text = {"type": "string", "minLength": 1}
        return {"anyOf": [text, {"type": "array", "items": text, "minItems": 1, "maxItems": self.max_items},
                          {"type": "array", "items": token, "minItems": 1},
                          {"type": "array", "items": {"type": "array", "items": token, "minItems": 1},
                           "minItems": 1, "maxItems": self.max_items}]}


@dataclass(frozen=True)
class Nested(Field):
    """An object of its own fields (Ollama's `options`, OpenAI's `stream_options`); any empty value
    means "not given". Read as the nested body's values."""

    body: Body | None = None

    def read(self, body: Mapping[str, Any], name: str) -> SimpleNamespace:
        value = body.get(name) or {}
        if not isinstance(value, dict):
            raise BadRequest(f"'{name}' must be an object", field=name)
        return self.body.parse(value)

    def schema(self) -> Schema:
        inner = ref(self.body.name) if self.body.name else self.body.schema()
        return empty_or(inner, self.description)


# -- a body ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Body:
    """One endpoint's JSON body: its fields in the order they are checked.

    `name` is its schema's name in the OpenAPI document (empty: written inline where it is used).
    `one_of`: fields of which at least one must be given (Ollama's `model` or older `name`)."""

    name: str
    fields: dict[str, Field]
    one_of: tuple[str, ...] = ()

    def parse(self, body: Mapping[str, Any]) -> SimpleNamespace:
        """Every field's value (its default when not given), by name; a 400 naming the first field
        outside its declaration."""
        if self.one_of and all(body.get(n) is None for n in self.one_of):
            first, *others = self.one_of
            also = "".join(f" (or '{n}')" for n in others)
            raise BadRequest(f"'{first}'{also} is required", field=first)
        values: dict[str, Any] = {}
        for name, f in self.fields.items():
            values[name] = f.read(body, name)
            if f.fallback and body.get(name) is None and values[f.fallback] is not None:
                values[name] = values[f.fallback]
        return SimpleNamespace(**values)

    def schema(self) -> Schema:
        required = tuple(name for name, f in self.fields.items() if f.required)
        # Given means present and not null: each alternative requires the field's value itself.
        extra = {"anyOf": [{"required": [n], "properties": {n: self.fields[n].shape()}} for n in self.one_of]} \
            if self.one_of else {}
        return object_schema({name: f.schema() for name, f in self.fields.items()}, required, **extra)
