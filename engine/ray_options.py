"""Options of `ai-engine serve --ray`: how many replicas, what each one reserves, and how much the
cluster queues before it answers 503.

Kept apart from `engine.ray_serve` so that `ai-engine serve --help` can list them without
importing Ray (an optional extra).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

from engine.errors import SettingsError
from engine.settings import Settings

PROXY_LOCATIONS = ("EveryNode", "HeadOnly")
# One generation's usual length in seconds, the admission queue's starting estimate: what
# Retry-After is computed from when the whole cluster is full.
GENERATION_S_ESTIMATE = 2.0


@dataclass(frozen=True)
class RayOptions:
    """Replica count (fixed or an autoscaling range), resources, and the cluster's queue."""

    replicas: int | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    replica_cpus: float | None = None  # None: N_THREADS, the threads llama.cpp decodes with
    replica_gpus: float = 0.0
    max_queued_requests: int | None = None  # None: MAX_QUEUE
    proxy_location: str = "EveryNode"
    detach: bool = False
    app_name: str = "ai-engine"

    def __post_init__(self) -> None:
        autoscaling = self.min_replicas is not None or self.max_replicas is not None
        if autoscaling and self.replicas is not None:
            raise SettingsError("give either --replicas or --min-replicas/--max-replicas (autoscaling), not both")
        for name in ("replicas", "max_replicas"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SettingsError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.min_replicas is not None and self.min_replicas < 0:
            raise SettingsError(f"--min-replicas must be >= 0, got {self.min_replicas}")
        if autoscaling and self.min_replicas is not None and self.max_replicas is not None \
                and self.max_replicas < self.min_replicas:
            raise SettingsError(f"--max-replicas ({self.max_replicas}) is below --min-replicas ({self.min_replicas})")
        if self.replica_cpus is not None and self.replica_cpus <= 0:
            raise SettingsError(f"--replica-cpus must be > 0, got {self.replica_cpus}")
        if self.replica_gpus < 0:
            raise SettingsError(f"--replica-gpus must be >= 0, got {self.replica_gpus}")
        # Ray counts every request as queued for a moment before it reaches a replica, so 0 would
        # refuse everything; -1 is Ray's "no limit".
        if self.max_queued_requests is not None and self.max_queued_requests < 1 and self.max_queued_requests != -1:
            raise SettingsError(f"--max-queued-requests must be >= 1 (or -1: no limit), got {self.max_queued_requests}")
        if self.proxy_location not in PROXY_LOCATIONS:
            raise SettingsError(f"--proxy-location must be one of {', '.join(PROXY_LOCATIONS)}, "
                                f"got {self.proxy_location!r}")

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RayOptions":
        """The options given on the command line (unset ones keep their defaults)."""
        given = {name: getattr(args, name) for name in
                 ("replicas", "min_replicas", "max_replicas", "replica_cpus", "replica_gpus",
                  "max_queued_requests", "proxy_location") if getattr(args, name, None) is not None}
        return cls(detach=bool(getattr(args, "detach", False)), **given)

    def deployment_options(self, settings: Settings) -> dict[str, Any]:
        """Keyword arguments of Ray Serve's `Deployment.options()` for these options."""
        max_queued = settings.max_queue if self.max_queued_requests is None else self.max_queued_requests
        options: dict[str, Any] = {
            # What one engine admits: Ray sends a replica no more, so the engine's own queue never
            # refuses; the rest waits in the queue of Ray's proxy.
            "max_ongoing_requests": engine_capacity(settings),
            "max_queued_requests": max_queued,
            "backpressure_config": {"status_code": 503, "retry_after_s": self.retry_after_s(settings, max_queued)},
            "ray_actor_options": {"num_cpus": self.replica_cpus or settings.n_threads,
                                  "num_gpus": self.replica_gpus},
            # A replica that is scaled down or redeployed finishes its running generations first.
            "graceful_shutdown_timeout_s": settings.request_timeout_s,
        }
        if self.autoscaling:
            low = 1 if self.min_replicas is None else self.min_replicas
            high = self.max_replicas if self.max_replicas is not None else max(low, 1)
            # A replica whose sequences are all busy (and has requests waiting) asks for another.
            options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high,
                                             "target_ongoing_requests": parallel_sequences(settings)}
        else:
            options["num_replicas"] = self.replicas or 1
        return options

    def retry_after_s(self, settings: Settings, max_queued: int) -> int:
        """Seconds a refused client should wait: a full proxy queue, drained by every replica at
        the usual pace (the single engine's Retry-After, shared by the replicas)."""
        replicas = self.replicas or self.min_replicas or 1
        waiting = max(max_queued, settings.max_queue)
        return max(1, math.ceil(GENERATION_S_ESTIMATE * (waiting + 1) / (2 * replicas)))


def parallel_sequences(settings: Settings) -> int:
    """Requests one engine generates at once: N_PARALLEL (one where the engine's settings have
    no continuous batching, as in versions before it)."""
    return getattr(settings, "n_parallel", 1)


def engine_capacity(settings: Settings) -> int:
    """Requests one engine admits at once: those generating plus MAX_QUEUE waiting; past that
    it answers 503."""
    return parallel_sequences(settings) + settings.max_queue


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`serve`'s Ray flags (they need --ray)."""
    group = parser.add_argument_group(
        "Ray Serve (pip install 'ai-engine[ray]')",
        "Serve as Ray Serve replicas on the cluster in RAY_ADDRESS (or a local one). API_HOST and "
        "API_PORT are where Ray's HTTP proxy listens; MODEL_PATH must be valid on every node.")
    group.add_argument("--ray", action="store_true", help="deploy the engine on Ray Serve")
    group.add_argument("--replicas", type=int, metavar="N", help="fixed number of replicas (default 1)")
    group.add_argument("--min-replicas", type=int, metavar="N", help="autoscaling: fewest replicas (default 1)")
    group.add_argument("--max-replicas", type=int, metavar="N", help="autoscaling: most replicas")
    group.add_argument("--replica-cpus", type=float, metavar="CPUS",
                       help="CPUs each replica reserves (default N_THREADS)")
    group.add_argument("--replica-gpus", type=float, metavar="GPUS",
                       help="GPUs each replica reserves, fractions allowed (default 0)")
    group.add_argument("--max-queued-requests", type=int, metavar="N",
                       help="requests Ray's proxy holds while every replica is full; past that 503 + "
                            "Retry-After (default MAX_QUEUE; -1: no limit)")
    group.add_argument("--proxy-location", choices=PROXY_LOCATIONS,
                       help="where Ray's HTTP proxy runs: on every node with a replica (default) or "
                            "on the head node only")
    group.add_argument("--detach", action="store_true",
                       help="deploy and exit, leaving the application running on the cluster")


def ray_flags_without_ray(args: argparse.Namespace) -> list[str]:
    """Ray flags given without --ray (a mistake worth a one-line refusal)."""
    names = ("replicas", "min_replicas", "max_replicas", "replica_cpus", "replica_gpus",
             "max_queued_requests", "proxy_location")
    given = ["--" + n.replace("_", "-") for n in names if getattr(args, n, None) is not None]
    return given + (["--detach"] if getattr(args, "detach", False) else [])
