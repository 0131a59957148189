"""Start-up: load the model, then serve the app with waitress (a production WSGI server)."""

from __future__ import annotations

import logging
import sys

from engine.app import create_app
from engine.cli import _configure_logging
from engine.errors import EngineError, ModelLoadError
from engine.model_host import ModelHost, describe_path
from engine.settings import Settings

log = logging.getLogger(__name__)


def serve(settings: Settings) -> int:
    """Load the configured model and serve until interrupted. Returns the exit status."""
    _configure_logging(settings.log_level)
    host = ModelHost(settings)
    path = host.startup_model_path()
    log.info("loading model %s", describe_path(path))
    try:
        host.load(path)
    except EngineError as exc:
        raise ModelLoadError(f"cannot start: {exc.message}") from exc
    app = create_app(settings, host)

    from waitress import create_server

    try:
        server = create_server(app, host=settings.api_host, port=settings.api_port,
                               threads=settings.server_threads, ident="ai-engine")
    except OSError as exc:
        raise EngineError(f"cannot listen on {settings.api_host}:{settings.api_port}: {exc.strerror}; "
                          "set API_PORT to a free port") from exc
    model = host.current
    # One plain line that people and scripts can read, whatever the log level.
    print(f"ai-engine listening on http://{settings.api_host}:{server.effective_port} "
          f"with model {model.name} ({model.path})", file=sys.stderr, flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        host.close()
    return 0
