"""The Flask app factory: settings and model host attached, one blueprint per API surface, and
the cross-cutting parts: API key, CORS, body size limit, request ids, access log, metrics."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
import socket
import threading
import time
import uuid

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

# embeddings: its routes are on ollama.bp and openai.bp
from engine.api import docs, embeddings, ollama, ollama_models, openai, ops, simulator
from engine.api.http import HostRefused, Unauthorized, http_error_headers, request_fields
from engine.admission import ShuttingDown
from engine.api.openai import openai_http_error
from engine.errors import EngineError
from engine.logs import log_access
from engine.model_manager import ModelManager
from engine.settings import Settings

log = logging.getLogger(__name__)

PUBLIC_PATHS = {"/health", "/openapi.json"}
# A client's X-Request-ID is kept (echoed and logged) only when it looks like an id.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def create_app(settings: Settings | None = None, host: ModelManager | None = None,
               replica_id: str | None = None) -> Flask:
    """Build the app. `host` is the model manager (a new, empty one if not given). `replica_id`
    names this copy of the engine when several serve one address (Ray Serve replicas): it is
    sent as the X-AI-Engine-Replica header, logged, and put in /generate's metadata."""
    settings = settings or Settings.load()
    app = Flask(__name__)
    app.json.ensure_ascii = False  # Spanish replies stay readable on the wire
    app.json.sort_keys = False
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions["settings"] = settings
    app.extensions["model_host"] = host or ModelManager(settings)
    app.extensions["replica_id"] = replica_id
    app.extensions["draining"] = threading.Event()  # set on SIGTERM: new requests get 503 (engine/server.py)

    for blueprint in (simulator.bp, ollama.bp, ollama_models.bp, openai.bp, ops.bp, docs.bp):
        app.register_blueprint(blueprint)
    _register_hooks(app, settings)
    _register_error_handlers(app)
    return app


def _register_hooks(app: Flask, settings: Settings) -> None:
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    hosts = allowed_hosts(settings)
    host: ModelManager = app.extensions["model_host"]
    replica_id: str | None = app.extensions["replica_id"]
    draining: threading.Event = app.extensions["draining"]

    @app.before_request
    def start_request():
        request.environ["ai_engine.started"] = time.perf_counter()
        given_id = request.headers.get("X-Request-ID", "")
        request_fields()["request_id"] = given_id if REQUEST_ID.fullmatch(given_id) else uuid.uuid4().hex[:16]
        if replica_id:
            request_fields()["replica"] = replica_id  # the access log and /generate's metadata
        if draining.is_set():
            raise ShuttingDown()
        public = request.path in PUBLIC_PATHS
        authorized = bool(settings.api_key) and _authorized(settings.api_key)
        if hosts is not None and not public and not authorized and host_name(request.host) not in hosts:
            # DNS rebinding: a web page whose name now points here; its requests carry its own name.
            raise HostRefused(f"Host '{request.host[:100]}' is not one this engine answers to; add it to "
                              "ALLOWED_HOSTS (or send the API key)")
        if request.method == "OPTIONS":
            return _preflight(origins)
        if settings.api_key and not public and not authorized:
            raise Unauthorized("a valid API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                               headers={"WWW-Authenticate": 'Bearer realm="ai-engine"'})
        return None

    @app.after_request
    def finish_request(response: Response):
        fields = request_fields()
        response.headers["X-Request-ID"] = fields["request_id"]
        if replica_id:
            response.headers["X-AI-Engine-Replica"] = replica_id
        origin = request.headers.get("Origin")
        if origin and ("*" in origins or origin in origins):
            response.headers["Access-Control-Allow-Origin"] = "*" if "*" in origins else origin
            response.headers["Vary"] = "Origin"
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        started = request.environ["ai_engine.started"]
        method, path, remote, status = request.method, request.path, request.remote_addr, response.status_code

        def done():  # after the body is sent: streamed responses end here, not in after_request
            host.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
            host.metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - started)
            log_access(fields.pop("request_id"), method, path, status, started, remote, fields)

        response.call_on_close(done)
        return response


def allowed_hosts(settings: Settings) -> set[str] | None:
    """The Host names ALLOWED_HOSTS accepts, lower case without port; None: any."""
    names = [h.strip() for h in settings.allowed_hosts.split(",") if h.strip()]
    if "*" in names:
        return None
    if names:
        return {host_name(n) for n in names}
    hosts = {"localhost", "127.0.0.1", "::1", host_name(settings.api_host)}
    try:
        wildcard = ipaddress.ip_address(settings.api_host.strip("[]")).is_unspecified
    except ValueError:
        wildcard = False
    if wildcard:  # every address of this machine: its names and what they resolve to
        for name in {socket.gethostname(), socket.getfqdn()}:
            hosts.add(host_name(name))
            try:
                hosts.update(host_name(info[4][0]) for info in socket.getaddrinfo(name, None))
            except OSError:
                pass
    return hosts


def host_name(host: str) -> str:
    """A Host header's name, lower case, without port, brackets or a trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:5000
        host = host[1:host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:  # name:port (an IPv6 address without brackets has several colons)
        host = host.split(":")[0]
    return host.rstrip(".")


def _authorized(key: str) -> bool:
    auth = request.headers.get("Authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("X-API-Key", "")
    return bool(given) and hmac.compare_digest(given.encode(), key.encode())


def _preflight(origins: list[str]) -> Response:
    """CORS preflight: allowed origins get the methods and headers the APIs use."""
    response = Response(status=204)
    origin = request.headers.get("Origin")
    if origin and ("*" in origins or origin in origins):
        response.headers.update({
            "Access-Control-Allow-Origin": "*" if "*" in origins else origin,
            "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
            "Access-Control-Allow-Headers": "Content-Type, Authorization, X-API-Key, X-Request-ID",
            "Access-Control-Max-Age": "600", "Vary": "Origin"})
    return response


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(EngineError)
    def engine_error(exc: EngineError):
        if exc.status >= 500:
            log.warning("%s: %s", type(exc).__name__, exc.message)
        return jsonify(error=exc.message), exc.status, exc.headers

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        # A URL that matches no route never reaches the OpenAI blueprint's handler (Flask decides
        # the blueprint by the route), so paths under /v1/ get OpenAI's error shape here.
        if request.path.startswith("/v1/"):
            return openai_http_error(exc)
        return jsonify(error=f"{exc.name}: {exc.description}"), exc.code, http_error_headers(exc)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unhandled error")
        return jsonify(error=f"internal error: {type(exc).__name__}"), 500
