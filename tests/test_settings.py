"""The settings schema: defaults, environment, flags, validation."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from engine.errors import SettingsError
from engine.settings import REPO_ROOT, Settings, physical_cores


def test_defaults():
    s = Settings.load(env={})
    assert s.model_path == REPO_ROOT / "models"
    assert (s.api_host, s.api_port, s.model, s.n_gpu_layers) == ("127.0.0.1", 5000, "", "auto")
    assert s.n_threads == physical_cores() >= 1
    assert s.n_ctx >= 2048


def test_environment_then_flags():
    env = {"API_PORT": "5123", "MODEL_PATH": "/models", "N_GPU_LAYERS": "-1", "N_CTX": " 8192 "}
    s = Settings.load(env=env)
    assert (s.api_port, s.model_path, s.n_gpu_layers, s.n_ctx) == (5123, Path("/models"), "-1", 8192)
    parser = argparse.ArgumentParser()
    Settings.add_arguments(parser)
    s = Settings.load(env=env, args=parser.parse_args(["--api-port", "6000", "--model", "x.gguf"]))
    assert (s.api_port, s.model, s.model_path) == (6000, "x.gguf", Path("/models"))


def test_empty_environment_value_means_default():
    assert Settings.load(env={"API_PORT": ""}).api_port == 5000


@pytest.mark.parametrize("env,field", [
    ({"API_PORT": "0"}, "API_PORT"),
    ({"API_PORT": "http"}, "API_PORT"),
    ({"N_THREADS": "0"}, "N_THREADS"),
    ({"N_CTX": "10"}, "N_CTX"),
    ({"N_GPU_LAYERS": "-5"}, "N_GPU_LAYERS"),
    ({"FLASH_ATTN": "fast"}, "FLASH_ATTN"),
    ({"FLASH_ATTN": "off", "KV_CACHE_TYPE": "q8_0"}, "KV_CACHE_TYPE"),
    ({"N_BATCH": "4", "N_PARALLEL": "8"}, "N_BATCH"),  # llama.cpp aborts the process on it
])
def test_invalid_values_name_the_variable(env, field):
    with pytest.raises(SettingsError) as err:
        Settings.load(env=env)
    assert err.value.field == field and field in err.value.message


@pytest.mark.parametrize("raw,value", [("", "auto"), ("auto", "auto"), ("on", "on"), ("1", "on"), ("TRUE", "on"),
                                       ("off", "off"), ("no", "off")])
def test_flash_attention_is_auto_on_or_off(raw, value):
    assert Settings.load(env={"FLASH_ATTN": raw}).flash_attn == value
    # auto (the default) and on allow a quantized KV cache
    if value != "off":
        assert Settings.load(env={"FLASH_ATTN": raw, "KV_CACHE_TYPE": "q8_0"}).kv_cache_type == "q8_0"


def test_documented_configuration_table_is_current():
    """docs/configuration.md (linked from the README) has the schema's table, as generated."""
    doc = (REPO_ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert Settings.markdown_table() in doc, "regenerate with: python scripts/update_readme_settings.py"
    assert "docs/configuration.md" in (REPO_ROOT / "README.md").read_text(encoding="utf-8")


def test_the_api_key_never_shows_in_the_settings_printed_form(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("file-k3y\n")
    for settings in (Settings.load({"ENGINE_API_KEY": "env-k3y"}), Settings.load({"ENGINE_API_KEY_FILE": str(key_file)})):
        assert settings.api_key in ("env-k3y", "file-k3y")
        assert settings.api_key not in repr(settings) and settings.api_key not in str(settings)
