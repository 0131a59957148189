"""`/api/create`, `/api/copy` and `/api/delete`: presets kept in MODEL_PATH/presets.toml, and GGUF files
deleted from MODEL_PATH.

- A created or copied model is a preset (engine/model_files.py `Preset`): its base GGUF, LoRA
  adapters, and the Modelfile's PARAMETER, SYSTEM and TEMPLATE. No GGUF is copied: presets share files.
- presets.toml is rewritten whole (a new 0600 file in MODEL_PATH, fsynced, then `os.replace`d),
  one change at a time (a lock file, also across processes); comments in it are not kept, other
  keys and tables are. One that does not parse is never rewritten (409).
- Deleting a preset removes only the preset. Deleting a GGUF is refused (409) while a preset uses
  it or while it is the default model; a resident one is first taken out of service (it finishes
  the requests it has, then is freed) and the file is unlinked. Only files that name resolution
  lists under MODEL_PATH can be deleted (a link is removed, never what it points to).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tomllib
import uuid
from pathlib import Path
from typing import Callable

from ai_engine_common.errors import EngineError
from engine.errors import BadRequest, ModelNotFound
from engine.hub_names import is_hub_name
from engine.model_files import Preset, check_gguf_file, plain_name
from engine.modelfile import ModelfileSpec

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")


class Conflict(EngineError):
    status = 409


class ModelAdmin:
    """Create, copy and delete models of one model manager's MODEL_PATH."""

    def __init__(self, host) -> None:
        self.host, self.files = host, host.files

    # -- create and copy ----------------------------------------------------------------------
    def create(self, name: str, spec: ModelfileSpec, parameters: dict) -> Preset:
        """A preset `name` from `spec` (FROM, ADAPTER, SYSTEM, TEMPLATE) and checked `parameters`;
        FROM another preset starts from its adapters, parameters, system and template."""
        name = self.check_name(name, "model")
        base, parent = self._base(spec.base or "")
        lora = (parent.lora if parent else ()) + tuple(self._adapter(a) for a in spec.adapters)
        scale = parent.scale if parent and not spec.adapters else (1.0,)
        preset = Preset(name=name, base=base, lora=lora, scale=scale,
                        parameters={**(parent.parameters if parent else {}), **parameters},
                        system=spec.system if spec.system is not None else (parent.system if parent else None),
                        template=spec.template or (parent.template if parent else None))
        self._update(lambda tables: tables.__setitem__(name, preset_table(preset)))
        return preset

    def copy(self, source: str, destination: str) -> None:
        """`destination` as a new name of `source` (a preset's copy, or a preset of a GGUF file)."""
        destination = self.check_name(destination, "destination")
        spec = self.files.resolve(source)

        def change(tables: dict) -> None:
            if spec.preset and spec.preset in tables:  # the preset's own table, keys the engine does not read too
                tables[destination] = {k: v for k, v in tables[spec.preset].items() if k != "aliases"}
            else:
                tables[destination] = {"base": self.files.display_name(spec.path)}

        self._update(change)

    def check_name(self, name: str, field: str) -> str:
        """A name a preset may take: not a GGUF file's, not a pulled hub name; `:latest` dropped."""
        wanted = plain_name(name)
        if not NAME.fullmatch(wanted) or ".." in wanted or "//" in wanted:
            raise BadRequest(f"'{field}' {name[:100]!r} is not a model name: letters, digits and . _ - : / (at most "
                             "128, starting with a letter or digit)", field=field)
        if is_hub_name(wanted):
            raise BadRequest(f"'{field}' {wanted!r}: hf.co/ names are for models pulled from the hub", field=field)
        if self.files.find_model(wanted) is not None:
            raise Conflict(f"'{field}' {wanted!r} is the name of a GGUF file under MODEL_PATH; choose another name",
                           field=field)
        return wanted

    def _base(self, ref: str) -> tuple[str, Preset | None]:
        """The base GGUF (relative to MODEL_PATH) that FROM names, and the preset it named, if any."""
        if not ref.strip():
            raise BadRequest("'from' (a Modelfile's FROM) is required", field="from")
        try:
            spec = self.files.resolve(ref)
        except ModelNotFound:
            spec = None
        if spec is not None and spec.preset:
            parent = self.files.presets()[spec.preset]
            return parent.base, parent
        path = spec.path if spec is not None else self.files.resolve_request_path(ref)
        check_gguf_file(path)
        if _gguf_type(path) == "adapter":
            raise BadRequest(f"FROM {ref!r} is a LoRA adapter; name it in ADAPTER (or 'adapters') over a base model",
                             field="from")
        return self.files.display_name(path), None

    def _adapter(self, ref: str) -> str:
        path = self.files.resolve_request_path(ref.strip())
        check_gguf_file(path)
        if _gguf_type(path) != "adapter":
            raise BadRequest(f"ADAPTER {ref!r} is not a LoRA adapter GGUF (general.type is not 'adapter')",
                             field="adapters")
        return self.files.display_name(path)

    # -- delete -------------------------------------------------------------------------------
    def delete(self, name: str) -> str:
        """Delete the preset or GGUF file `name` means; what was deleted (see the module docstring)."""
        presets = self.files.presets()
        wanted = plain_name(name)
        if wanted in presets:
            self._update(lambda tables: tables.pop(wanted, None))
            return f"preset {wanted}"
        spec = self.files.resolve(name)
        if spec.preset:  # one of a preset's aliases
            self._update(lambda tables: _drop_alias(tables, spec.preset, wanted))
            return f"alias {wanted} of preset {spec.preset}"
        path = spec.path
        rel = self.files.display_name(path)
        users = sorted(p.name for p in presets.values()
                       if self._means(p.base, path) or any(self._means(a, path) for a in p.lora))
        if users:
            raise Conflict(f"{rel} is used by preset(s) {', '.join(users)}; delete those first", field="model")
        default = self.host.default_spec
        if default is not None and default.path.resolve() == path.resolve():
            raise Conflict(f"{rel} is the default model; load another one (POST /load-model) before deleting it",
                           field="model")
        self.host.unload(rel)  # a resident model finishes its requests on the open file, then is freed
        link = self.files.model_dir / rel
        link.unlink()
        _remove_empty_parents(link.parent, self.files.model_dir)
        return rel

    def _means(self, ref: str, path: Path) -> bool:
        try:
            return self.files.resolve_request_path(ref) == path.resolve()
        except EngineError:
            return False

    # -- presets.toml -------------------------------------------------------------------------
    def _update(self, change: Callable[[dict], object]) -> None:
        """Read presets.toml, apply `change` to its `presets` tables (as written: keys the engine does
        not read are kept), write it back atomically, one writer at a time. A presets.toml that does
        not parse is left alone (409): rewriting it would lose what the operator wrote."""
        model_dir, path = self.files.model_dir, self.files.presets_file
        with _flock(model_dir / ".presets.lock"):
            try:
                data = tomllib.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
                raise Conflict(f"MODEL_PATH/presets.toml cannot be read ({exc}); fix it by hand first") from None
            tables = data.setdefault("presets", {})
            change(tables)
            text = HEADER + dump_toml(data)
            if tomllib.loads(text) != data:  # what is written always reads back the same
                raise Conflict("presets.toml holds values this engine cannot write back; edit it by hand")
            tmp = model_dir / f".presets.toml.{uuid.uuid4().hex[:8]}.tmp"
            try:
                with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "w",
                               encoding="utf-8") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)


def _drop_alias(tables: dict, name: str, alias: str) -> None:
    aliases = tables[name].get("aliases", [])
    aliases = [aliases] if isinstance(aliases, str) else aliases
    tables[name]["aliases"] = [a for a in aliases if plain_name(a) != alias]


def _gguf_type(path: Path) -> str | None:
    from engine.gguf_info import read_metadata

    try:
        return read_metadata(path).get("general.type")
    except Exception:  # llama.cpp decides later; the magic bytes were checked
        return None


def _remove_empty_parents(folder: Path, root: Path) -> None:
    """Folders left empty by a delete (hf.co/ORG/REPO), up to MODEL_PATH (kept)."""
    while folder != root and root in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


@contextlib.contextmanager
def _flock(path: Path):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


HEADER = "# Written by ai-engine (POST /api/create, /api/copy, /api/delete); comments are not kept.\n\n"
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def preset_table(p: Preset) -> dict:
    """A preset as its presets.toml table (the fields model_files reads; empty ones left out)."""
    table: dict = {"base": p.base}
    for key, value in (("lora", list(p.lora)), ("scale", list(p.scale) if p.lora else []),
                       ("aliases", list(p.aliases)), ("system", p.system), ("template", p.template),
                       ("parameters", dict(p.parameters))):
        if value not in (None, [], {}):
            table[key] = value
    return table


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _value(key)


def _value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        # A JSON string is a TOML basic string, once DEL (which JSON leaves as it is) is escaped too.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    raise Conflict(f"presets.toml holds a {type(value).__name__} value this engine cannot write back")


def dump_toml(data: dict, path: tuple[str, ...] = ()) -> str:
    """TOML for `data`: its plain keys, then each sub-table under its own header (arrays of tables
    and dates are not written: `_update` refuses what does not read back the same)."""
    plain = [f"{_key(k)} = {_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    out = ([f"[{'.'.join(_key(p) for p in path)}]"] if path and (plain or not data) else []) + plain
    text = "\n".join(out) + ("\n\n" if out else "")
    for k, v in data.items():
        if isinstance(v, dict):
            text += dump_toml(v, (*path, k))
    return text
