"""Ollama's model management: /api/pull, /api/delete, /api/copy, /api/create.

Shapes follow Ollama's API: pull and create stream NDJSON status lines (`{"status": ...}`, pull's
download lines with `digest`, `total`, `completed`) ending in `{"status": "success"}`, or only that
last line with `stream: false`; a failure after the first line is an `{"error": ...}` line, one before
it a 4xx/5xx JSON error. Delete and copy answer 200 with an empty body, 404 for an unknown model.
The work is engine/hub_pull.py (downloads) and engine/model_admin.py (presets, deleting files).
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Iterator

from flask import Blueprint, Response, current_app, jsonify

from ai_engine_common.errors import EngineError
from engine import hub_pull
from engine.api import bodies, replies
from engine.api import validation as v
from engine.api.fields import Integer, Number, Stops
from engine.chat import ChatTemplateError, render_template
from engine.errors import BadRequest, ModelNotFound
from engine.hub_names import parse_ref
from engine.model_admin import ModelAdmin
from engine.model_manager import ModelManager
from engine.modelfile import ModelfileSpec, parse

log = logging.getLogger(__name__)
bp = Blueprint("ollama_models", __name__, url_prefix="/api")
_END = object()


def _host() -> ModelManager:
    return current_app.extensions["model_host"]


def _ndjson(lines: Iterator[dict]) -> Response:
    return Response((replies.NDJSON.frame(line) for line in lines), mimetype=replies.NDJSON.mimetype,
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@bp.post("/pull")
def pull():
    """Download a GGUF from the Hugging Face hub into MODEL_PATH (engine/hub_pull.py): resumed,
    checked against the hub's sha256, placed atomically. The repo and file are looked up before
    the response starts (an unknown repo or quant is a 404 listing the repo's GGUFs)."""
    r = bodies.OLLAMA_PULL.parse(v.json_body())
    job = hub_pull.Pull(hub_pull.plan(parse_ref(r.model or r.name)), _host().model_dir)
    if not r.stream:
        job.run(lambda event: None)
        return jsonify(status="success")
    return _ndjson(_in_thread(job))


def _in_thread(job: hub_pull.Pull) -> Iterator[dict]:
    """The pull's status lines as it runs in its own thread. A client that leaves does not stop it:
    the file is still verified and placed (or resumed by the next pull)."""
    lines: queue.Queue = queue.Queue()

    def work() -> None:
        try:
            job.run(lines.put)
        except EngineError as exc:
            lines.put({"error": exc.message})
        except Exception as exc:  # noqa: BLE001 - reported on the stream, logged in full
            log.exception("pull of %s failed", job.plan.rel)
            lines.put({"error": f"internal error: {type(exc).__name__}"})
        finally:
            lines.put(_END)

    threading.Thread(target=work, name="pull", daemon=True).start()
    while (line := lines.get()) is not _END:
        yield line


@bp.delete("/delete")
def delete():
    """Delete a preset, or a GGUF file under MODEL_PATH (engine/model_admin.py); 404 when unknown."""
    r = bodies.OLLAMA_DELETE.parse(v.json_body())
    name = r.model or r.name
    try:
        ModelAdmin(_host()).delete(name)
    except ModelNotFound:
        return jsonify(error=f"model '{name}' not found"), 404
    return Response(status=200)


@bp.post("/copy")
def copy():
    """Give a model a second name: a preset (no file is copied)."""
    r = bodies.OLLAMA_COPY.parse(v.json_body())
    try:
        ModelAdmin(_host()).copy(r.source, r.destination)
    except ModelNotFound:
        return jsonify(error=f"model '{r.source}' not found"), 404
    return Response(status=200)


@bp.post("/create")
def create():
    """A preset from a Modelfile (`modelfile`) and/or Ollama's newer fields (`from`, `adapters`,
    `parameters`, `system`, `template`); the fields win over the Modelfile's lines."""
    body = v.json_body()
    r = bodies.OLLAMA_CREATE.parse(body)
    spec = parse(r.modelfile) if r.modelfile and r.modelfile.strip() else ModelfileSpec()
    spec.base = r.__dict__["from"] or spec.base
    spec.adapters += r.adapters or []
    spec.system = r.system if r.system is not None else spec.system
    spec.template = r.template if r.template is not None else spec.template
    parameters = {**_modelfile_parameters(spec.parameters), **_given(body.get("parameters") or {}, "parameters")}
    if spec.template:
        _check_template(spec.template)
    ModelAdmin(_host()).create(r.model or r.name, spec, parameters)
    if not r.stream:
        return jsonify(status="success")
    lines = ([{"status": "parsing modelfile"}] if r.modelfile else []) + [
        {"status": "using existing layer"}, {"status": "writing manifest"}, {"status": "success"}]
    return _ndjson(iter(lines))


def _given(values: dict, field: str) -> dict:
    """Options given by name, checked by OllamaOptions' declarations; unknown names are a 400."""
    known = bodies.OLLAMA_OPTIONS.fields
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise BadRequest(f"'{field}': {', '.join(unknown)} not supported; these are: {', '.join(known)}", field=field)
    parsed = vars(bodies.OLLAMA_OPTIONS.parse(values))
    return {k: parsed[k] for k in values}


def _modelfile_parameters(raw: dict) -> dict:
    """A Modelfile's PARAMETER values (text) as the option's type, then checked like `parameters`."""
    out = {}
    for name, text in raw.items():
        kind = bodies.OLLAMA_OPTIONS.fields.get(name)
        try:
            if isinstance(kind, Stops):
                out[name] = list(text)
            elif isinstance(kind, Integer):
                out[name] = int(text)
            elif isinstance(kind, Number):
                out[name] = float(text)
            else:
                out[name] = text
        except ValueError:
            raise BadRequest(f"Modelfile: PARAMETER {name} {text!r} is not a number", field="modelfile") from None
    return _given(out, "modelfile")


def _check_template(template: str) -> None:
    """TEMPLATE is a Jinja chat template (rendered like a GGUF's); Ollama's Go templates are refused."""
    if "{{ ." in template or "{{- ." in template or "{{." in template:
        raise BadRequest("TEMPLATE looks like an Ollama Go template; this engine renders Jinja chat templates (as "
                         "in a GGUF's tokenizer.chat_template)", field="template")
    try:
        render_template(template, [{"role": "user", "content": "hola"}])
    except (ChatTemplateError, BadRequest) as exc:
        raise BadRequest(f"TEMPLATE: {exc.message}", field="template") from None
