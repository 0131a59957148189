"""Structured output: a request's JSON format or JSON schema as a llama.cpp grammar (GBNF), and the
grammar sampler each constrained sequence carries in the running batch.

`structured_output(value, field)` turns what a client sent (Ollama's `format: "json"` or a schema,
OpenAI's `response_format`, the simulator's `json_schema`) into a `StructuredOutput`: the GBNF,
checked by llama.cpp's own parser, and the schema. The JSON schema goes through llama-cpp-python's
converter (`llama_cpp.llama_grammar.SchemaConverter`, llama.cpp's json-schema-to-grammar) after
`_Normalizer` has checked it: a schema that is not valid JSON Schema, or that uses a keyword the
grammar cannot enforce (`minimum`, `not`, `uniqueItems`, ...), is a 400 naming the field and the
keyword's place, never a reply that does not validate. Keywords JSON Schema does not know are
ignored, as the specification says.

`GrammarSampler` samples as llama.cpp's common sampler does: the sequence's ordinary chain picks a
token, the grammar checks that one token, and only when it is refused is the whole row sampled
again with the grammar applied first (the grammar over all 262k tokens of Gemma's vocabulary is
the costly part; most tokens of a JSON reply pass the check). Both the chain and the grammar then
accept the token. A token the grammar refused is never accepted (llama.cpp aborts the process on
that), and a sequence's grammar is freed with it (`free`).
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import re
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.errors import BadRequest, EngineError

MAX_REPEAT = 1000  # minLength/maxLength/minItems/maxItems at most (each unrolls into grammar rules)
MAX_DEPTH = 64  # nesting of a schema at most
# JSON strings: no raw control characters (json.loads refuses them); the converter's own `char`
# rule allows them, so its line is replaced by this one (the rule of llama.cpp's json.gbnf).
CHAR_RULE = r'char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])'
# What the converter enforces (string formats: those it has rules for).
FORMATS = ("date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5")
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "$schema", "$id",
                         "deprecated", "readOnly", "writeOnly", "nullable", "discriminator"})
UNSUPPORTED = frozenset({
    "not", "if", "then", "else", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
    "minProperties", "maxProperties", "patternProperties", "propertyNames", "dependentRequired",
    "dependentSchemas", "dependencies", "unevaluatedProperties", "unevaluatedItems", "contains", "minContains",
    "maxContains", "contentMediaType", "contentEncoding", "contentSchema", "$dynamicRef", "$recursiveRef",
    "$anchor", "$dynamicAnchor", "$recursiveAnchor"})
TYPES = ("string", "number", "integer", "boolean", "object", "array", "null")
STRING_KEYS = ("minLength", "maxLength", "pattern", "format")


@dataclass(frozen=True)
class StructuredOutput:
    """A reply constrained to JSON: `grammar` (GBNF, root rule `root`) and the `schema` it came
    from (None for any JSON object)."""

    grammar: str
    schema: dict | None = None


def structured_output(value: Any, field: str) -> StructuredOutput:
    """"json" (any JSON object) or a JSON schema (a dict) as a StructuredOutput; a 400 naming
    `field` for anything the grammar cannot enforce."""
    from llama_cpp.llama_grammar import JSON_GBNF

    if value == "json":
        return StructuredOutput(check_grammar(JSON_GBNF, field))
    if not isinstance(value, dict):
        raise BadRequest(f"'{field}' must be \"json\" or a JSON schema (an object)", field=field)
    try:
        text = json.dumps(value)  # in its order: properties come out in the order they are declared
    except (ValueError, RecursionError):
        raise BadRequest(f"'{field}': a schema nested deeper than {MAX_DEPTH} levels is not supported: the grammar "
                         "cannot enforce it", field=field) from None
    return StructuredOutput(_schema_grammar(text, field), value)


@functools.lru_cache(maxsize=64)  # a backend sends the same schema every time; refusals are not kept
def _schema_grammar(text: str, field: str) -> str:
    """The grammar of a schema (given as JSON text, so that it can be a cache key)."""
    value = json.loads(text)
    _check_meta(value, field)
    clean = _Normalizer(value, field).root()
    from llama_cpp.llama_grammar import SchemaConverter

    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    try:
        converter.visit(converter.resolve_refs(clean, "input"), "")
    except (AssertionError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise BadRequest(f"'{field}': this JSON schema cannot be turned into a grammar: {exc}", field=field) from None
    lines = [CHAR_RULE if line.startswith("char ::= ") else line for line in converter.format_grammar().splitlines()]
    return check_grammar("\n".join(lines) + "\n", field)


def check_grammar(grammar: str, field: str) -> str:
    """`grammar` as llama.cpp's parser reads it (no model needed to parse); a 400 naming `field`
    when it refuses it."""
    import llama_cpp as lib

    sampler = lib.llama_sampler_init_grammar(None, grammar.encode("utf-8"), b"root")
    if not sampler:
        raise BadRequest(f"'{field}': llama.cpp could not parse the grammar made from it", field=field)
    lib.llama_sampler_free(sampler)
    return grammar


def _check_meta(schema: dict, field: str) -> None:
    """A 400 naming `field` unless `schema` is valid JSON Schema (the draft its $schema names,
    2020-12 by default)."""
    from jsonschema import exceptions, validators

    try:
        validators.validator_for(schema, default=validators.Draft202012Validator).check_schema(schema)
    except RecursionError:
        raise BadRequest(f"'{field}': a schema nested deeper than {MAX_DEPTH} levels is not supported: the grammar "
                         "cannot enforce it", field=field) from None
    except exceptions.SchemaError as exc:
        where = "/".join(map(str, exc.path))
        raise BadRequest(f"'{field}' is not a valid JSON schema{f' (at {where})' if where else ''}: {exc.message}",
                         field=field) from None


class _Normalizer:
    """A checked copy of a (meta-valid) schema in the shape the converter reads: only the keywords
    it enforces, a list of types as `anyOf`, a one-schema `allOf` unwrapped, a schema with string
    keywords and no type a string. A keyword it cannot enforce is a 400 naming where it is."""

    def __init__(self, schema: dict, field: str) -> None:
        self.schema, self.field = schema, field

    def root(self) -> dict:
        out = self.node(self.schema, "", 0)
        if "$ref" in out:  # the converter reads no $defs beside a $ref: one alternative instead
            out = {"anyOf": [out]}
        for key in ("$defs", "definitions"):  # $ref targets keep their paths
            if isinstance(self.schema.get(key), dict):
                out[key] = {name: self.node(s, f"{key}/{name}", 1) for name, s in self.schema[key].items()}
        return out

    def refuse(self, where: str, what: str) -> BadRequest:
        place = f" at {'…' + where[-80:] if len(where) > 80 else where or '(root)'}"
        return BadRequest(f"'{self.field}': {what}{place} is not supported: the grammar cannot enforce it; "
                          "remove it or use what docs/api.md lists", field=self.field)

    def node(self, s: Any, where: str, depth: int) -> dict:
        if depth > MAX_DEPTH:
            raise self.refuse(where, f"nesting deeper than {MAX_DEPTH}")
        if s is True:
            return {}
        if s is False:
            raise self.refuse(where, "the schema `false`")
        for key in s:
            if key in UNSUPPORTED or (key == "uniqueItems" and s[key]):
                raise self.refuse(where, f"the keyword '{key}'")
        kind = s.get("type")
        if isinstance(kind, list):
            if len(kind) == 1:
                kind = kind[0]
            else:
                if any(k in s for k in ("anyOf", "oneOf", "allOf", "$ref", "enum", "const")):
                    raise self.refuse(where, "a list of types beside anyOf/oneOf/allOf/$ref/enum/const")
                return {"anyOf": [self.node({**s, "type": t}, f"{where}/type/{i}", depth + 1)
                                  for i, t in enumerate(dict.fromkeys(kind))]}
        if kind is None and any(k in s for k in STRING_KEYS):
            kind = "string"
        return self.combined(s, where, depth) or self.plain(s, kind, where, depth)

    def combined(self, s: dict, where: str, depth: int) -> dict | None:
        """$ref, anyOf/oneOf, allOf: alone beside annotations (the converter reads nothing else)."""
        present = [k for k in ("$ref", "anyOf", "oneOf", "allOf") if k in s]
        if not present:
            return None
        others = [k for k in s if k not in ANNOTATIONS and k not in ("$defs", "definitions", "type", *present)]
        if len(present) > 1 or others:
            raise self.refuse(where, f"'{present[0]}' together with {', '.join(map(repr, present[1:] + others))}")
        key = present[0]
        if key == "$ref":
            ref = s["$ref"]
            if not ref.startswith("#/"):
                raise self.refuse(where, f"the reference {ref!r} (only local ones, #/$defs/...)")
            return {"$ref": ref}
        if key == "allOf":
            if len(s["allOf"]) != 1:
                raise self.refuse(where, "'allOf' with several schemas")
            return self.node(s["allOf"][0], f"{where}/allOf/0", depth + 1)
        # oneOf as anyOf: the branches the converter makes are alternatives
        return {"anyOf": [self.node(b, f"{where}/{key}/{i}", depth + 1) for i, b in enumerate(s[key])]}

    def plain(self, s: dict, kind: str | None, where: str, depth: int) -> dict:
        out: dict = {} if kind is None else {"type": kind}
        if "const" in s:
            return {"const": s["const"]}
        if "enum" in s:
            return {"enum": list(s["enum"])}
        if kind in (None, "object"):
            self._object(s, out, where, depth)
        if kind in (None, "array"):
            self._array(s, out, where, depth)
        if kind == "string":
            self._string(s, out, where)
        return out

    def _object(self, s: dict, out: dict, where: str, depth: int) -> None:
        props = s.get("properties") or {}
        if props or "properties" in s:
            out["properties"] = {n: self.node(p, f"{where}/properties/{n}", depth + 1) for n, p in props.items()}
        missing = [n for n in s.get("required", ()) if n not in props]
        if missing:
            raise self.refuse(where, f"'required' naming {missing[0]!r}, which 'properties' does not declare,")
        if s.get("required"):
            out["required"] = list(s["required"])
        extra = s.get("additionalProperties")
        if isinstance(extra, dict):
            out["additionalProperties"] = self.node(extra, f"{where}/additionalProperties", depth + 1)
        elif isinstance(extra, bool):
            out["additionalProperties"] = extra

    def _array(self, s: dict, out: dict, where: str, depth: int) -> None:
        items, prefix = s.get("items"), s.get("prefixItems")
        if prefix is not None:
            if items not in (None, False):
                raise self.refuse(where, "'prefixItems' followed by more 'items'")
            out["prefixItems"] = [self.node(x, f"{where}/prefixItems/{i}", depth + 1) for i, x in enumerate(prefix)]
        elif isinstance(items, list):  # draft 4-7 tuples
            out["prefixItems"] = [self.node(x, f"{where}/items/{i}", depth + 1) for i, x in enumerate(items)]
        elif items is not None:
            if items is False:
                raise self.refuse(where, "'items': false")
            out["items"] = self.node(items, f"{where}/items", depth + 1)
        if "prefixItems" in out and ("minItems" in s or "maxItems" in s):
            raise self.refuse(where, "'minItems'/'maxItems' with a tuple")
        for key in ("minItems", "maxItems"):
            if key in s:
                out[key] = self._count(s, key, where)
        if "minItems" in out and "items" not in out and "prefixItems" not in out:
            out["items"] = {}

    def _string(self, s: dict, out: dict, where: str) -> None:
        fmt, pattern = s.get("format"), s.get("pattern")
        if fmt is not None and fmt not in FORMATS:
            raise self.refuse(where, f"the string format {fmt!r} (only {', '.join(FORMATS[:4])})")
        given = [k for k in STRING_KEYS if k in s]
        if (fmt or pattern) and len(given) > 1:
            raise self.refuse(where, f"{' with '.join(map(repr, given))}")
        if pattern is not None:
            if not (pattern.startswith("^") and pattern.endswith("$")):
                raise self.refuse(where, f"the pattern {pattern!r} without ^ at its start and $ at its end")
            bounds = re.findall(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}", pattern)  # {n}, {n,}, {n,m}
            counts = [int(x) for pair in bounds for x in pair if x]
            if any(n > MAX_REPEAT for n in counts):
                raise self.refuse(where, f"a repetition above {MAX_REPEAT} in the pattern {pattern[:40]!r}")
            out["pattern"] = pattern
        elif fmt is not None:
            out["format"] = fmt
        for key in ("minLength", "maxLength"):
            if key in s:
                out[key] = self._count(s, key, where)

    def _count(self, s: dict, key: str, where: str) -> int:
        value = int(s[key])
        if value > MAX_REPEAT:
            raise self.refuse(where, f"'{key}' above {MAX_REPEAT}")
        return value


# -- sampling ----------------------------------------------------------------------------------------
_live = 0  # grammar samplers not yet freed (tests check that none leak)
_live_lock = threading.Lock()


def live_grammars() -> int:
    """How many grammar samplers exist now (each constrained sequence holds one until it ends)."""
    return _live


class Candidates:
    """A reusable llama_token_data_array over the whole vocabulary, filled from a logits row (one
    per runtime: sequences are sampled one at a time, on the scheduler thread)."""

    def __init__(self, lib, n_vocab: int) -> None:
        self.lib, self.n_vocab = lib, n_vocab
        self.data = (lib.llama_token_data * n_vocab)()
        self.view = np.ctypeslib.as_array(self.data)
        self.ids = np.arange(n_vocab, dtype=np.int32)
        self.array = lib.llama_token_data_array(self.data, n_vocab, -1, False)
        self.one = (lib.llama_token_data * 1)()
        self.single = lib.llama_token_data_array(self.one, 1, -1, False)

    def fill(self, logits: np.ndarray):
        """The whole row as candidates (a sampler may have reordered or shrunk the last ones)."""
        view = self.view
        view["id"] = self.ids
        view["logit"] = logits
        view["p"] = 0.0
        a = self.array
        a.data, a.size, a.selected, a.sorted = self.data, self.n_vocab, -1, False
        return ctypes.byref(a)

    def chosen(self) -> int:
        a = self.array
        if a.selected < 0 or a.selected >= a.size:
            raise EngineError("the sampler chain selected no token")
        return int(a.data[a.selected].id)

    def allows(self, grammar, token: int) -> bool:
        """Whether `grammar`, in its state now, accepts `token` next."""
        self.one[0].id, self.one[0].logit, self.one[0].p = token, 1.0, 0.0
        s = self.single
        s.data, s.size, s.selected, s.sorted = self.one, 1, -1, False
        self.lib.llama_sampler_apply(grammar, ctypes.byref(s))
        return not math.isinf(s.data[0].logit)


@dataclass
class GrammarStats:
    """Tokens sampled under a grammar, and how many of them the grammar refused at first (each
    of those cost a pass of the grammar over the whole vocabulary)."""

    tokens: int = 0
    resampled: int = 0


stats = GrammarStats()


class GrammarSampler:
    """A constrained sequence's sampler: its ordinary chain (native, also for greedy) and its
    grammar (llama_sampler_init_grammar on the model's vocabulary). `free()` frees both, once.
    `check_first` False applies the grammar to every whole row first, as llama-cpp-python's own
    sampler does (scripts/bench_grammar.py compares the two)."""

    check_first = True

    def __init__(self, lib, vocab, chain, grammar: str, candidates: Candidates) -> None:
        global _live
        self.lib, self.chain, self.candidates = lib, chain, candidates
        self.grammar = lib.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
        if not self.grammar:
            lib.llama_sampler_free(chain)
            raise BadRequest("llama.cpp could not parse the request's grammar", field="format")
        with _live_lock:
            _live += 1

    def sample(self, logits: np.ndarray) -> int:
        """The next token for this logits row, one the grammar allows; accepted by both."""
        lib, cand = self.lib, self.candidates
        stats.tokens += 1
        token = -1
        if self.check_first:
            lib.llama_sampler_apply(self.chain, cand.fill(logits))
            token = cand.chosen()
        if token < 0 or not cand.allows(self.grammar, token):  # resample with the grammar over the whole row
            stats.resampled += token >= 0
            arr = cand.fill(logits)
            lib.llama_sampler_apply(self.grammar, arr)
            lib.llama_sampler_apply(self.chain, arr)
            token = cand.chosen()
            if not cand.allows(self.grammar, token):  # never hand llama.cpp a refused token: it aborts
                raise EngineError("the grammar allows no token the sampler would pick")
        lib.llama_sampler_accept(self.grammar, token)
        lib.llama_sampler_accept(self.chain, token)
        return token

    def free(self) -> None:
        global _live
        if self.grammar:
            grammar, self.grammar = self.grammar, None
            self.lib.llama_sampler_free(grammar)
            self.lib.llama_sampler_free(self.chain)
            with _live_lock:
                _live -= 1
