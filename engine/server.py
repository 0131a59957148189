"""Start-up: listen at once (/health says 503 while loading), load the model, then serve with
waitress (a production WSGI server). A model that cannot be loaded stops the engine with one
clear line and exit status 2."""

from __future__ import annotations

import ipaddress
import logging
import sys
import threading

from engine.app import create_app
from engine.errors import EngineError, ModelLoadError
from engine.logs import configure_logging
from engine.model_files import describe_path
from engine.model_manager import ModelManager
from engine.settings import Settings
from engine.startup import plan_startup

log = logging.getLogger(__name__)


def serve(settings: Settings) -> int:
    """Serve until interrupted. Returns the exit status."""
    configure_logging(settings.log_level, settings.log_format, settings.log_prompts)
    plan = plan_startup(settings)
    plan.check()  # the quick refusals (missing, not GGUF) before anything listens
    host = ModelManager(settings)
    app = create_app(settings, host)

    from waitress import create_server

    threads = settings.server_threads
    if threads < settings.n_parallel + settings.max_queue + 1:
        log.warning("SERVER_THREADS=%d is below N_PARALLEL + MAX_QUEUE + 1 = %d: waitress will hold requests "
                    "before the engine's queue sees them", threads, settings.n_parallel + settings.max_queue + 1)
    try:
        server = create_server(app, host=settings.api_host, port=settings.api_port, threads=threads,
                               ident="ai-engine", channel_timeout=max(120, settings.request_timeout_s + 30))
    except OSError as exc:
        raise EngineError(f"cannot listen on {settings.api_host}:{settings.api_port}: {exc.strerror}; "
                          "set API_PORT to a free port") from exc
    _warn_if_exposed(settings)
    url = f"http://{settings.api_host}:{server.effective_port}"
    failure: list[str] = []

    def load() -> None:
        log.info("loading model %s", describe_path(plan.spec.path))
        try:
            model, _seconds = host.load(plan.spec)
        except EngineError as exc:
            failure.append(f"cannot start: {exc.message}")
            _close_from_another_thread(server)  # run() returns once nothing is left to serve
            return
        # One plain line that people and scripts can read, whatever the log format.
        print(f"ai-engine listening on {url} with model {model.name} ({model.path})", file=sys.stderr, flush=True)

    threading.Thread(target=load, name="model-loader", daemon=True).start()
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        host.close()
    if failure:
        raise ModelLoadError(failure[0])
    return 0


def _close_from_another_thread(server) -> None:
    """Close every socket of a running waitress server from a thread other than its loop's.

    The closing runs in the loop thread, through waitress's own trigger (the way its channels
    wake the loop): closing the sockets here while that thread waits in select() would make
    select() fail with EBADF, and the engine exit with a traceback instead of its one line."""
    from waitress import wasyncore
    from waitress.server import BaseWSGIServer

    servers = [server] if isinstance(server, BaseWSGIServer) else \
        [s for s in server.map.values() if isinstance(s, BaseWSGIServer)]  # several listening addresses
    socket_map = servers[0]._map
    servers[0].trigger.pull_trigger(lambda: wasyncore.close_all(socket_map, ignore_all=True))


def _warn_if_exposed(settings: Settings) -> None:
    try:
        loopback = ipaddress.ip_address(settings.api_host).is_loopback
    except ValueError:
        loopback = settings.api_host == "localhost"
    if not loopback and not settings.api_key:
        log.warning("listening on %s without ENGINE_API_KEY: anyone who can reach this address can use the "
                    "engine and read its replies; set ENGINE_API_KEY", settings.api_host)
