"""The Flask app factory: settings and model host attached, one blueprint per API surface."""

from __future__ import annotations

import logging

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from engine.errors import EngineError
from engine.model_host import ModelHost
from engine.settings import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, host: ModelHost | None = None) -> Flask:
    """Build the app. `host` is the model host (a new, empty one if not given)."""
    settings = settings or Settings.load()
    app = Flask(__name__)
    app.json.ensure_ascii = False  # Spanish replies stay readable on the wire
    app.json.sort_keys = False
    app.extensions["settings"] = settings
    app.extensions["model_host"] = host or ModelHost(settings)

    from engine.api import ollama, openai, simulator

    for blueprint in (simulator.bp, ollama.bp, openai.bp):
        app.register_blueprint(blueprint)
    _register_error_handlers(app)
    return app


def model_host(app: Flask) -> ModelHost:
    return app.extensions["model_host"]


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(EngineError)
    def engine_error(exc: EngineError):
        if exc.status >= 500:
            log.error("%s: %s", type(exc).__name__, exc.message)
        return jsonify(error=exc.message), exc.status

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return jsonify(error=f"{exc.name}: {exc.description}"), exc.code

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unhandled error")
        return jsonify(error=f"internal error: {type(exc).__name__}"), 500
