"""Operations: /health (the simulator's fields plus readiness) and /metrics (Prometheus)."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify

bp = Blueprint("ops", __name__)


@bp.get("/health")
def health():
    """200 when a model is loaded and ready; 503 while one loads or reloads (or none is loaded).
    The simulator's fields (`status`, `model_loaded`, `model_path`) are always there."""
    host = current_app.extensions["model_host"]
    model = host.current
    body = {"status": "ok" if host.ready else "loading", "model_loaded": model is not None,
            "model_path": str(host.model_dir), "ready": host.ready}
    if model is not None:
        body.update(active=model.engine.active, queue_depth=model.engine.waiting,
                    busy=model.engine.active >= model.engine.n_parallel)
    if model is not None:
        body.update(model=model.name, model_file=str(model.path), n_ctx=model.n_ctx,
                    gpu_layers=model.gpu_layers, lora=model.describe_adapters(), preset=model.preset)
    return jsonify(body), 200 if host.ready else 503


@bp.get("/metrics")
def metrics():
    """Prometheus exposition of the engine's metrics."""
    host = current_app.extensions["model_host"]
    return Response(host.metrics.exposition(), mimetype="text/plain; version=0.0.4; charset=utf-8")
