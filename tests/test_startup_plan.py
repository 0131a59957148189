"""One start-up plan for `serve`, `serve --ray` and `doctor`: the same file for every way MODEL
can name it, LORA's adapters everywhere (Ray replicas used to drop them), and memory planned the
way the model manager budgets it."""

from __future__ import annotations

import argparse

import pytest

from engine.doctor import _model_file, _SETTINGS_USED
from engine.settings import Settings
from engine.startup import memory_plan, plan_startup, ram_budget
from tests.helpers import DEFAULT_MODEL, link_or_copy

MiB = 1 << 20


@pytest.fixture
def folder(tmp_path, default_model_file):
    root = tmp_path / "models"
    link_or_copy(default_model_file, root / DEFAULT_MODEL)
    link_or_copy(default_model_file, root / "Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf")  # llama3.1:8b in the catalog
    link_or_copy(default_model_file, root / "adapters" / "clinic.gguf")  # any GGUF stands in for an adapter here
    (root / "presets.toml").write_text('[presets.paciente]\nbase = "gemma-3-270m-q4_k_m.gguf"\n'
                                       'lora = "adapters/clinic.gguf"\nscale = 0.5\n')
    return root


def doctor_path(settings: Settings, model: str | None = None):
    values = {name: getattr(settings, name) for name in _SETTINGS_USED}
    return _model_file(argparse.Namespace(model=model), values)


@pytest.mark.parametrize("model,expected,adapters", [
    (DEFAULT_MODEL, DEFAULT_MODEL, ()),
    ("gemma-3-270m-q4_k_m", DEFAULT_MODEL, ()),  # a stem, as Ollama clients name it
    ("llama3.1:8b", "Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf", ()),
    ("paciente", DEFAULT_MODEL, (("clinic.gguf", 0.5),)),
])
def test_model_names_resolve_the_same_for_serve_and_doctor(folder, model, expected, adapters):
    settings = Settings.load(env={}, model_path=folder, model=model)
    plan = plan_startup(settings)
    assert plan.spec.path.name == expected
    assert tuple((a.path.name, a.scale) for a in plan.spec.adapters) == adapters
    assert doctor_path(settings) == plan.spec.path.resolve()
    plan.check()


def test_lora_setting_reaches_the_plan(folder):
    settings = Settings.load(env={}, model_path=folder, model=DEFAULT_MODEL, lora="adapters/clinic.gguf",
                             lora_scale="0.8")
    spec = plan_startup(settings).spec
    assert [(a.name, a.scale) for a in spec.adapters] == [("adapters/clinic.gguf", 0.8)]


def test_ray_replicas_use_the_same_plan_with_its_adapters(folder):
    ray_serve = pytest.importorskip("engine.ray_serve")
    settings = Settings.load(env={}, model_path=folder, model=DEFAULT_MODEL, lora="adapters/clinic.gguf")
    assert ray_serve._startup_plan(settings).spec == plan_startup(settings).spec
    empty = tmp = folder.parent / "empty"
    plan = ray_serve._startup_plan(Settings.load(env={}, model_path=empty))  # the default model, assembled once
    assert plan.spec.path == tmp.resolve() / DEFAULT_MODEL and plan.spec.path.is_file()


def test_doctor_names_the_default_model_without_assembling_it(tmp_path):
    settings = Settings.load(env={}, model_path=tmp_path)
    assert doctor_path(settings) == (tmp_path / DEFAULT_MODEL).resolve()
    assert not (tmp_path / DEFAULT_MODEL).exists()


def test_a_missing_start_up_model_is_one_clear_error(folder):
    from engine.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="cannot start: model file not found"):
        plan_startup(Settings.load(env={}, model_path=folder, model="nope.gguf")).check()


def test_memory_plan_counts_weights_kv_buffers_and_the_conversation_cache(folder):
    spec = plan_startup(Settings.load(env={}, model_path=folder, model=DEFAULT_MODEL)).spec
    small = Settings.load(env={}, model_path=folder, n_ctx=1024, n_parallel=2, cache_ram_mb=0)
    big = Settings.load(env={}, model_path=folder, n_ctx=4096, n_parallel=8, cache_ram_mb=256)
    n_gpu, ram_small, vram, _line = memory_plan(small, spec, offload_supported=False)
    assert n_gpu == 0 and vram == 0
    _n, ram_big, _v, _l = memory_plan(big, spec, offload_supported=False)
    weights = spec.path.stat().st_size
    assert weights < ram_small < ram_big
    # 32768 - 2048 more KV cells (18 layers × 1 KV head × 256 × 2 (K, V) × 2 bytes) and 256 MiB of cache
    assert ram_big - ram_small == (32768 - 2048) * 18 * 1024 * 2 // 2 + 256 * MiB


def test_ram_budget():
    assert ram_budget(300, 10 << 30) == 300 * MiB
    assert ram_budget(0, 10 << 30) == 9 << 30
    assert ram_budget(0, 1 << 30) == 512 * MiB  # never below what one small model needs
