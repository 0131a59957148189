"""`serve --ray` options: validation, what they become in Ray Serve's deployment options, and the
CLI's refusals. No Ray needed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine.errors import SettingsError
from engine.ray_options import RayOptions, engine_capacity, parallel_sequences
from engine.settings import REPO_ROOT, Settings


@pytest.fixture
def settings() -> Settings:
    return Settings.load(env={"MAX_QUEUE": "6", "N_THREADS": "3", "REQUEST_TIMEOUT_S": "90"})


def test_fixed_replicas_map_to_engine_limits(settings):
    options = RayOptions(replicas=3).deployment_options(settings)
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert options["max_ongoing_requests"] == parallel_sequences(settings) + 6 == engine_capacity(settings)
    assert options["max_queued_requests"] == 6  # MAX_QUEUE unless given
    assert options["backpressure_config"]["status_code"] == 503
    assert options["backpressure_config"]["retry_after_s"] >= 1
    assert options["ray_actor_options"] == {"num_cpus": 3, "num_gpus": 0.0}  # N_THREADS CPUs
    assert options["graceful_shutdown_timeout_s"] == 90


def test_autoscaling_range_and_resources(settings):
    options = RayOptions(min_replicas=1, max_replicas=4, replica_cpus=2, replica_gpus=0.5,
                         max_queued_requests=-1).deployment_options(settings)
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4,
                                             "target_ongoing_requests": parallel_sequences(settings)}
    assert options["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0.5}
    assert options["max_queued_requests"] == -1


@pytest.mark.parametrize("kwargs,says", [
    ({"replicas": 2, "max_replicas": 3}, "not both"),
    ({"replicas": 0}, "--replicas"),
    ({"min_replicas": 3, "max_replicas": 2}, "below --min-replicas"),
    ({"replica_cpus": 0}, "--replica-cpus"),
    ({"replica_gpus": -1}, "--replica-gpus"),
    ({"max_queued_requests": 0}, "--max-queued-requests"),
    ({"proxy_location": "Nowhere"}, "--proxy-location"),
])
def test_bad_options_are_refused(kwargs, says):
    with pytest.raises(SettingsError, match=says):
        RayOptions(**kwargs)


def test_ray_flags_without_ray_are_a_one_line_error():
    r = subprocess.run([sys.executable, "-m", "engine", "serve", "--replicas", "2"], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == "ai-engine: error: --replicas need --ray"


def test_serve_help_lists_the_ray_flags():
    r = subprocess.run([sys.executable, "-m", "engine", "serve", "--help"], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=60)
    for flag in ("--ray", "--replicas", "--min-replicas", "--max-replicas", "--replica-cpus", "--replica-gpus",
                 "--max-queued-requests", "--proxy-location", "--detach"):
        assert flag in r.stdout
    r = subprocess.run([sys.executable, "-c", "import sys, engine.cli; engine.cli.build_parser(); "
                        "sys.exit('ray' in sys.modules)"], cwd=REPO_ROOT, timeout=60)
    assert r.returncode == 0, "building the CLI imported Ray"


def test_ray_image_and_compose_file_match_the_extra():
    """Dockerfile.ray installs the `ray` extra's pin, passes hadolint, and the compose file runs a
    head that publishes the engine's port and GPU workers that join it."""
    import configparser
    import shutil

    import yaml

    extra = configparser.ConfigParser()
    extra.read(REPO_ROOT / "setup.cfg")
    pin = extra["options.extras_require"]["ray"].strip()
    dockerfile = (REPO_ROOT / "Dockerfile.ray").read_text(encoding="utf-8")
    assert f'"{pin}"' in dockerfile and "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING=0" in dockerfile
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint:
        done = subprocess.run([hadolint, "--no-color", "Dockerfile.ray"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr

    services = yaml.safe_load((REPO_ROOT / "docker-compose.ray.yml").read_text(encoding="utf-8"))["services"]
    head, worker = services["ray-head"], services["ray-gpu-worker"]
    assert "--head" in head["command"] and head["ports"][0].endswith(":5000")
    assert head["environment"]["API_HOST"] == "0.0.0.0"
    assert "--address=ray-head:6379" in worker["command"]
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    for service in (head, worker):
        assert service["environment"]["RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING"] == "0"
        assert "ai-engine-models:/models" in service["volumes"]
