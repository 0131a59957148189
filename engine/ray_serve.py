"""`ai-engine serve --ray`: the engine as a Ray Serve application, one engine per replica.

Every replica is the single-machine engine: a `ModelManager` with its models, and the Flask app from
`create_app`, spoken to through `engine.asgi_bridge` (Ray Serve replicas speak ASGI). There is no
second implementation of any route. Ray's HTTP proxy spreads requests over the replicas, sends a
replica no more than the engine admits (N_PARALLEL + MAX_QUEUE), holds the rest in its own bounded
queue and answers 503 + Retry-After past it; a replica that dies is restarted by Ray.

Only this module imports Ray, and only `serve --ray` imports this module.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator

# Defaults for the Ray processes this command starts (a user's own settings win). The engine
# runs offline: no usage reports to Ray's servers. And Ray's proxy would send every request to a
# replica on its own node until that one is full (N_PARALLEL + MAX_QUEUE deep) while the others
# idle; without that preference it picks the replica with the shorter queue.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING", "0")

import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve.config import BackpressureConfig  # noqa: E402

from engine.app import create_app  # noqa: E402
from engine.asgi_bridge import WsgiToAsgi  # noqa: E402
from engine.default_model import ensure_default_model  # noqa: E402
from engine.errors import ModelLoadError, SettingsError  # noqa: E402
from engine.logs import configure_logging  # noqa: E402
from engine.model_files import describe_path  # noqa: E402
from engine.model_manager import ModelManager  # noqa: E402
from engine.ray_options import RayOptions, engine_capacity  # noqa: E402
from engine.settings import Settings  # noqa: E402
from engine.startup import StartupPlan, plan_startup  # noqa: E402

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "engine"
LOCK_NAME = ".default-model.lock"


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class EngineReplica:
    """One engine: loads its model when Ray starts the replica, then serves the full API."""

    def __init__(self, settings: Settings) -> None:
        configure_logging(settings.log_level, settings.log_format, settings.log_prompts)
        # Attribute names stay clear of Ray's ASGI wrapper, a base class (it owns `app`).
        self.replica_id = _replica_id()
        plan = _startup_plan(settings)  # the same plan as `serve`: MODEL, LORA, LORA_SCALE
        plan.check()
        self.engine_host = ModelManager(settings)
        log.info("replica %s loading model %s", self.replica_id, describe_path(plan.spec.path))
        self.engine_host.load(plan.spec)  # a failure fails the replica's start; Ray reports it and retries
        flask_app = create_app(settings, self.engine_host, replica_id=self.replica_id)
        # A thread for every request Ray may send at once, as SERVER_THREADS is for waitress.
        threads = max(settings.server_threads, engine_capacity(settings))
        self.engine_bridge = WsgiToAsgi(flask_app, threads=threads, max_body_bytes=settings.max_body_bytes)

    def __serve_build_asgi_app__(self) -> Any:
        return _drop_request_id_header(self.engine_bridge)

    def check_health(self) -> None:
        """Ray's health probe: a replica whose model is gone is replaced (a /load-model swap in
        progress is not a fault)."""
        host = self.engine_host
        if not host.ready:
            raise RuntimeError(f"replica {self.replica_id} has no model loaded")

    def __del__(self) -> None:
        bridge, host = getattr(self, "engine_bridge", None), getattr(self, "engine_host", None)
        if bridge is not None:
            bridge.close()
        if host is not None:
            host.close()


def _drop_request_id_header(app: Any) -> Any:
    """Ray's proxy gives every request an X-Request-ID (the engine adopts it) and adds it to
    every response; without this the engine's own copy would make the header appear twice."""

    async def wrapped(scope: dict, receive: Any, send: Any) -> None:
        async def send_once(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [(k, v) for k, v in message["headers"] if k != b"x-request-id"]
            await send(message)

        await app(scope, receive, send_once)

    return wrapped


def _replica_id() -> str:
    """The name Ray's own logs and state use for this replica (deployment#id)."""
    context = serve.get_replica_context()
    return f"{context.deployment}#{context.replica_tag}"


def _startup_plan(settings: Settings) -> StartupPlan:
    """The start-up plan, with the embedded default model (MODEL empty) assembled once per node:
    replicas on one node wait on a lock file while the first one assembles (and sha256-checks)
    it; the others then find it there, intact."""

    def assemble(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        with _file_lock(folder / LOCK_NAME):
            return ensure_default_model(folder)

    return plan_startup(settings, assemble=assemble)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    import fcntl  # Ray nodes run Linux

    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# -- the driver's side ---------------------------------------------------------------------------

def connect(address: str | None = None) -> bool:
    """Join the Ray cluster at `address` (default RAY_ADDRESS), or start a local one that only
    uses loopback addresses and runs no dashboard. Returns True when a local one was started."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=True)
    return True


def deployment_options(settings: Settings, options: RayOptions) -> dict[str, Any]:
    """`Deployment.options()` for `options` (Ray's own config types where it needs them)."""
    values = options.deployment_options(settings)
    values["backpressure_config"] = BackpressureConfig(**values["backpressure_config"])
    return values


def deploy(settings: Settings, options: RayOptions) -> str:
    """Deploy (or update) the engine on the connected cluster and wait until its replicas are
    up. Returns the URL of Ray's HTTP proxy (API_HOST:API_PORT)."""
    serve.start(proxy_location=options.proxy_location,
                http_options={"host": settings.api_host, "port": settings.api_port})
    values = deployment_options(settings, options)
    _warn_if_unschedulable(values)
    app = EngineReplica.options(**values).bind(settings)
    try:
        serve.run(app, name=options.app_name, route_prefix="/")
    except RuntimeError as exc:
        raise ModelLoadError(f"the Ray Serve deployment failed: {exc} {_replica_error(options.app_name)}") from exc
    return f"http://{settings.api_host}:{settings.api_port}"


def _warn_if_unschedulable(values: dict[str, Any]) -> None:
    """Ray waits without end for resources no node has; say so before waiting (a cluster with an
    autoscaler may still add nodes)."""
    replicas = values.get("num_replicas") or values.get("autoscaling_config", {}).get("min_replicas", 1)
    have = ray.cluster_resources()
    for resource, key in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
        need = replicas * (values["ray_actor_options"].get(key) or 0)
        if need > have.get(resource, 0):
            log.warning("%d replica(s) need %g %s(s) in all, the cluster has %g: Ray waits until nodes "
                        "provide them (lower --replica-cpus/--replica-gpus or add nodes)",
                        replicas, need, resource, have.get(resource, 0))


def _replica_error(app_name: str) -> str:
    """The last line of the replicas' error (the engine's own message, e.g. model not found);
    the whole traceback is in Ray's logs."""
    with contextlib.suppress(Exception):
        message = serve.status().applications[app_name].deployments[DEPLOYMENT_NAME].message
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return ""


def replica_states(app_name: str = "ai-engine") -> dict[str, int]:
    """Replicas of the engine's deployment by state, e.g. {"RUNNING": 2}."""
    app = serve.status().applications.get(app_name)
    if app is None or DEPLOYMENT_NAME not in app.deployments:
        return {}
    return {str(getattr(k, "value", k)): v for k, v in app.deployments[DEPLOYMENT_NAME].replica_states.items()}


def serve_ray(settings: Settings, options: RayOptions) -> int:
    """`ai-engine serve --ray`: deploy, then keep the application up until interrupted (it is
    deleted then), or with --detach leave it running on the cluster and return."""
    if options.detach and not os.environ.get("RAY_ADDRESS"):
        raise SettingsError("--detach needs a running cluster in RAY_ADDRESS (a local one ends with this command)")
    configure_logging(settings.log_level, settings.log_format, settings.log_prompts)
    local = connect()
    try:
        url = deploy(settings, options)
        replicas = options.replicas or options.min_replicas or 1
        # One plain line that people and scripts can read, as the single-machine server prints.
        print(f"ai-engine listening on {url} (Ray Serve application {options.app_name!r}, "
              f"{replicas} replica(s){', autoscaling' if options.autoscaling else ''})", file=sys.stderr, flush=True)
        if options.detach:
            return 0
        _wait_for_interrupt()
    finally:
        # A local cluster ends with ray.shutdown(), the application with it (its processes may
        # already have had the same signal). On a cluster the application is deleted unless
        # --detach asked to leave it running.
        if not local and not options.detach:
            with contextlib.suppress(Exception):
                serve.delete(options.app_name)
        ray.shutdown()
    return 0


def _wait_for_interrupt() -> None:
    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # docker stop, systemd: the same as Ctrl-C
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopping")
