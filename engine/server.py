"""Start-up: listen at once (/health says 503 while loading), load the model, then serve with
waitress (a production WSGI server). A model that cannot be loaded stops the engine with one
clear line and exit status 2."""

from __future__ import annotations

import ipaddress
import logging
import queue
import signal
import sys
import threading

from engine.app import create_app
from engine.errors import EngineError, ModelLoadError, SettingsError
from engine.http_server import Loop, build_server, drain
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
    check_exposure(settings)
    host = ModelManager(settings)
    app = create_app(settings, host)

    threads = settings.server_threads
    if threads < settings.n_parallel + settings.max_queue + 1:
        log.warning("SERVER_THREADS=%d is below N_PARALLEL + MAX_QUEUE + 1 = %d: waitress will hold requests "
                    "before the engine's queue sees them", threads, settings.n_parallel + settings.max_queue + 1)
    try:
        server = build_server(app, settings)
    except OSError as exc:
        raise EngineError(f"cannot listen on {settings.api_host}:{settings.api_port}: {exc.strerror}; "
                          "set API_PORT to a free port") from exc
    url = f"http://{settings.api_host}:{server.effective_port}"
    failure: list[str] = []
    loop = Loop(server)  # now: a multi-address server's listeners leave its map as they close

    def load() -> None:
        log.info("loading model %s", describe_path(plan.spec.path))
        try:
            model, _seconds = host.load(plan.spec)
        except EngineError as exc:
            failure.append(f"cannot start: {exc.message}")
            loop.close()  # run() returns once nothing is left to serve
            return
        # One plain line that people and scripts can read, whatever the log format.
        print(f"ai-engine listening on {url} with model {model.name} ({model.path})", file=sys.stderr, flush=True)

    threading.Thread(target=load, name="model-loader", daemon=True).start()
    stop = None
    if threading.current_thread() is threading.main_thread():
        # docker stop, systemd, a supervisor, Ctrl-C: a graceful stop, so that no request received
        # is lost and the models are closed in order (the prompt cache's files being written are
        # finished) rather than the process cut off. A second signal stops at once.
        stop = GracefulStop(loop, app.extensions["draining"], settings.shutdown_timeout_s)
        previous = {signum: signal.signal(signum, stop.signal) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        if stop is not None:
            stop.closing()
        loop.close_here()  # requests still running see their clients gone and stop
        host.close()
        if stop is not None:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    if failure:
        raise ModelLoadError(failure[0])
    return 0


class GracefulStop:
    """The first SIGTERM or SIGINT: refuse new connections, answer new requests on open ones 503
    (`draining`), and go on serving those received, for up to `timeout_s`; then the server closes
    and serve() returns. The second: close every connection at once (the requests still running
    stop), and serve() returns. Once serve() is past run() (`closing`), signals change nothing: it
    is stopping already, and an exception raised while it closes the models would leave them
    half-closed.

    The handler runs in the main thread between two of its steps, wherever it is, even holding a
    lock: it only hands the signal to a thread of its own (SimpleQueue.put is reentrant), which
    does the rest."""

    def __init__(self, loop: Loop, draining: threading.Event, timeout_s: float) -> None:
        self.loop, self.draining, self.timeout_s = loop, draining, timeout_s
        self.cancel = threading.Event()  # the drain stops waiting and closes nothing
        self._signals: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._closing = False
        self._watcher = threading.Thread(target=self._watch, name="graceful-stop", daemon=True)
        self._watcher.start()

    def signal(self, signum, frame) -> None:
        if not self._closing:
            self._signals.put(signal.Signals(signum).name)

    def closing(self) -> None:
        """serve() is past run(): later signals change nothing, and the threads are done."""
        self._closing = True
        self._signals.put(None)
        self._watcher.join()

    def _watch(self) -> None:
        name = self._signals.get()
        if name is None:
            return
        self.draining.set()
        print(f"ai-engine: {name}: finishing the requests received (at most {self.timeout_s} s; again to stop "
              "at once)", file=sys.stderr, flush=True)
        drainer = threading.Thread(target=self._drain, name="graceful-stop-drain", daemon=True)
        drainer.start()
        again = self._signals.get()  # a second signal, or serve() past run()
        self.cancel.set()
        drainer.join()
        if again is not None:
            log.warning("%s again: closing every connection now", again)
            self.loop.close()

    def _drain(self) -> None:
        cut = 0
        try:
            cut = drain(self.loop, self.timeout_s, cancel=self.cancel)
        finally:
            if not self.cancel.is_set():
                self.loop.close()  # whatever happened: run() returns
        if cut and not self.cancel.is_set():
            log.warning("stopping with %d request(s) unanswered after SHUTDOWN_TIMEOUT_S=%s", cut, self.timeout_s)


def check_exposure(settings: Settings) -> None:
    """Refuse to listen beyond loopback without an API key, unless ALLOW_NO_KEY says that nothing
    untrusted can reach the port (then warn once)."""
    if is_loopback(settings.api_host) or settings.api_key:
        return
    if not settings.allow_no_key:
        raise SettingsError(
            f"API_HOST={settings.api_host} lets other machines reach the engine, and no API key is set: anyone who "
            "can reach it could run generations and read replies. Set ENGINE_API_KEY or ENGINE_API_KEY_FILE; or "
            "ALLOW_NO_KEY=1 where only trusted machines can reach the port (a private Docker network, a port "
            "published on 127.0.0.1); or API_HOST=127.0.0.1", field="API_HOST")
    log.warning("listening on %s without an API key (ALLOW_NO_KEY): anyone who can reach this address can use "
                "the engine and read its replies", settings.api_host)


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return address.lower() == "localhost"
