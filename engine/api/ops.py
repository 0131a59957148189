"""Operations: /health (the simulator's fields plus readiness) and /metrics (Prometheus)."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify

bp = Blueprint("ops", __name__)


@bp.get("/health")
def health():
    """200 once the start-up model has loaded; 503 before, and 503 with status `unhealthy` (and
    `failures`: model → why) once a model's scheduler thread has stopped. The simulator's fields (`status`,
    `model_loaded`: the default model is resident, `model_path`) are always there; the default
    model's details are at the top level, and every resident model is listed in `models`. It needs
    no API key, so it names no absolute path: `model_path` is MODEL_PATH's folder name,
    `model_file` a path relative to MODEL_PATH (a file elsewhere: its name)."""
    host = current_app.extensions["model_host"]
    model = host.default
    body = {"status": "ok" if host.ready else "loading", "model_loaded": model is not None,
            "model_path": host.model_dir.name or ".", "ready": host.ready, "loading": host.loading}
    if model is not None:
        body.update(_describe(host, model), active=model.engine.active, queue_depth=model.engine.waiting,
                    busy=model.engine.active >= model.engine.n_parallel)
    body["models"] = [{**_describe(host, m), "default": host.is_default(m), "active": m.engine.active,
                       "queue_depth": m.engine.waiting, "memory_bytes": m.ram_bytes, "vram_bytes": m.vram_bytes,
                       "expires_in_s": None if m.expires_in_s is None else round(m.expires_in_s, 1)}
                      for m in host.resident()]
    body["closing"] = [{"model": m.name, "requests": m.leases} for m in host.closing()]
    failures = host.failures()
    if failures:  # a scheduler thread stopped: its requests get 503; an orchestrator should restart us
        body.update(status="unhealthy", failures=failures)
    return jsonify(body), 200 if host.ready and not failures else 503


def _describe(host, model) -> dict:
    return {"model": model.name, "model_file": host.files.display_name(model.path), "n_ctx": model.n_ctx,
            "gpu_layers": model.gpu_layers, "lora": model.describe_adapters(), "preset": model.preset}


@bp.get("/metrics")
def metrics():
    """Prometheus exposition of the engine's metrics."""
    host = current_app.extensions["model_host"]
    return Response(host.metrics.exposition(), mimetype="text/plain; version=0.0.4; charset=utf-8")
