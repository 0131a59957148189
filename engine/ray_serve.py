"""`ai-engine serve --ray`: the engine as a Ray Serve application, one engine per replica.

Every replica is the single-machine engine: a `ModelManager` with its models, and the Flask app from
`create_app`, spoken to through `engine.asgi_bridge` (Ray Serve replicas speak ASGI). There is no
second implementation of any route. Ray's HTTP proxy spreads requests over the replicas, sends a
replica no more than the engine admits (N_PARALLEL + MAX_QUEUE), holds the rest in its own bounded
queue and answers 503 + Retry-After past it; a replica that dies is restarted by Ray.

Secrets: the engine's API key is not among the deployment's arguments (Ray keeps those in its
controller and shows them to whoever can reach the cluster). The replicas get the settings without
it and a `ReplicaKey`: where to read the key on their own node (ENGINE_API_KEY_FILE, or
ENGINE_API_KEY in the environment of `ray start`) and a salted PBKDF2 verifier of the deployer's
key, so that a node without the key, or with another one, fails its replica's start instead of
serving without the key or with the wrong one. A local cluster started here uses Ray's token
authentication with a token that lives only in its processes' environment.

Only this module imports Ray, and only `serve --ray` imports this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import logging
import os
import secrets
import signal
import stat
import sys
import time
from dataclasses import dataclass
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
from engine.server import check_exposure  # noqa: E402
from engine.settings import Settings  # noqa: E402
from engine.startup import StartupPlan, plan_startup  # noqa: E402

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "engine"
LOCK_NAME = ".default-model.lock"
VERIFIER_ITERATIONS = 200_000  # PBKDF2-SHA256 rounds: about 0.1 s once per replica start
RAY_TOKEN_FILE = Path.home() / ".ray" / "auth_token"  # where Ray looks when no RAY_AUTH_TOKEN* is set


@dataclass(frozen=True)
class ReplicaKey:
    """What a replica is told about the engine's API key instead of the key: the key file to read
    on its node (ENGINE_API_KEY_FILE as the deployer had it; empty: the node's own ENGINE_API_KEY_FILE
    or ENGINE_API_KEY) and a salted PBKDF2 verifier of the deployer's key (empty: no key)."""

    file: str = ""
    verifier: str = ""

    @classmethod
    def of(cls, settings: Settings) -> "ReplicaKey":
        if not settings.api_key:
            return cls()
        salt = secrets.token_bytes(16)
        digest = _pbkdf2(settings.api_key, salt, VERIFIER_ITERATIONS)
        return cls(settings.api_key_file, f"pbkdf2_sha256${VERIFIER_ITERATIONS}${salt.hex()}${digest.hex()}")

    def matches(self, key: str) -> bool:
        _, iterations, salt, digest = self.verifier.split("$")
        return hmac.compare_digest(_pbkdf2(key, bytes.fromhex(salt), int(iterations)), bytes.fromhex(digest))

    def replica_settings(self, settings: Settings, environ: dict[str, str] | None = None) -> Settings:
        """`settings` with the key found on this node; refuses a node without it or with another."""
        if not self.verifier:
            return settings
        environ = os.environ if environ is None else environ
        key_file = self.file or environ.get("ENGINE_API_KEY_FILE", "").strip()
        key = "" if key_file else environ.get("ENGINE_API_KEY", "").strip()
        if not key_file and not key:
            raise SettingsError("the deployment needs the engine's API key, and this node has none: give every node "
                                "the same ENGINE_API_KEY_FILE (a secret file) or ENGINE_API_KEY in the environment "
                                "of `ray start` (see docs/ray.md)", field="ENGINE_API_KEY_FILE")
        node = dataclasses.replace(settings, api_key=key, api_key_file=key_file)  # reads the file here
        if not self.matches(node.api_key):
            where = f"ENGINE_API_KEY_FILE {key_file}" if key_file else "ENGINE_API_KEY"
            raise SettingsError(f"the API key in this node's {where} differs from the deploying command's: give "
                                "every node the same key", field="ENGINE_API_KEY_FILE")
        return node


def _pbkdf2(key: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", key.encode("utf-8"), salt, iterations)


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class EngineReplica:
    """One engine: loads its model when Ray starts the replica, then serves the full API."""

    def __init__(self, settings: Settings, api_key: ReplicaKey = ReplicaKey()) -> None:
        configure_logging(settings.log_level, settings.log_format, settings.log_prompts)
        settings = api_key.replica_settings(settings)  # the API key from this node, never from the arguments
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
    uses loopback addresses, runs no dashboard and needs Ray's authentication token (see
    `_local_token`). Returns True when a local one was started."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=True)
        if os.environ.get("RAY_AUTH_MODE", "").strip().lower() != "token":
            log.warning("the Ray cluster at %s is used without token authentication (RAY_AUTH_MODE is not "
                        "`token`): anyone who can reach its ports can run code on its nodes and read the "
                        "engine's traffic; see docs/ray.md", address)
        return False
    _local_token()
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=True)
    if os.environ.get("RAY_AUTH_MODE", "").strip().lower() != "token":  # Ray sets it when it turns auth on
        log.warning("the local Ray cluster runs without token authentication: any process on this machine "
                    "can use it (RAY_AUTH_MODE=token turns it on)")
    return True


def _local_token() -> None:
    """Token authentication for a local cluster: Ray (2.59 and later) turns it on for a cluster that
    `ray.init` starts unless RAY_AUTH_MODE says otherwise. Without a token of the user's own
    (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token) a random one is put in this process's
    environment, which the cluster's processes inherit: Ray would otherwise write one to
    ~/.ray/auth_token, readable by other users under a usual umask."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.strip().lower() != "token":
        log.warning("RAY_AUTH_MODE=%s: the local Ray cluster runs without token authentication; any process "
                    "on this machine can use it", mode)
        return
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    if RAY_TOKEN_FILE.is_file():
        if stat.S_IMODE(RAY_TOKEN_FILE.stat().st_mode) & 0o077:
            log.warning("%s can be read by other users; make it private: chmod 600 %s", RAY_TOKEN_FILE, RAY_TOKEN_FILE)
        return
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


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
    app = application(settings, values)
    try:
        serve.run(app, name=options.app_name, route_prefix="/")
    except RuntimeError as exc:
        raise ModelLoadError(f"the Ray Serve deployment failed: {exc} {_replica_error(options.app_name)}") from exc
    return f"http://{settings.api_host}:{settings.api_port}"


def application(settings: Settings, values: dict[str, Any]) -> Any:
    """The bound Serve application: the settings without the API key, and the `ReplicaKey` that
    tells each replica how to find it on its node (Ray keeps and shows these arguments)."""
    public = dataclasses.replace(settings, api_key="", api_key_file="")
    return EngineReplica.options(**values).bind(public, ReplicaKey.of(settings))


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
    check_exposure(settings)  # Ray's proxy listens on API_HOST: the single engine's rule
    if settings.api_key and not settings.api_key_file and not os.environ.get("RAY_ADDRESS"):
        # A local cluster's processes are this command's children: their environment carries the
        # key (given as a flag) to the replicas, as a node's `ray start` environment does.
        os.environ["ENGINE_API_KEY"] = settings.api_key
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
