"""`ai-engine doctor`: the report on this machine, with a fake GPU, and the parsing behind it.

`engine.doctor.run` is called directly with the arguments the CLI would parse.
"""

from __future__ import annotations

import argparse

import pytest

from engine import doctor, offload
from engine.offload import GiB, MiB, GpuInfo
from tests.test_offload import write_model

ENV = ("MODEL", "MODEL_PATH", "N_CTX", "N_BATCH", "N_GPU_LAYERS", "KV_CACHE_TYPE", "FLASH_ATTN", "N_PARALLEL",
       "CUDA_VISIBLE_DEVICES")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


def run(capsys, **kw) -> tuple[int, str]:
    status = doctor.run(argparse.Namespace(**{"model": None, "n_ctx": None, **kw}))
    # Rows are aligned in columns; compare their words.
    return status, "\n".join(" ".join(line.split()) for line in capsys.readouterr().out.splitlines())


def test_report_on_this_machine(capsys, default_model_file, monkeypatch):
    monkeypatch.setenv("MODEL_PATH", str(default_model_file.parent))
    monkeypatch.setenv("N_PARALLEL", "2")
    status, out = run(capsys, n_ctx=2048)
    for text in ("System", "CPU features:", "AVX2", "AMX", "threads:", "physical cores", "RAM:",
                 "llama-cpp-python:", "system info:", "AMX crash:", "GPU offload:", "GPUs",
                 f"Model: {default_model_file}", "gemma3, 18 blocks + output layer",
                 "KV cache: 72 MiB (N_PARALLEL 2 × n_ctx 2048, f16)", "compute buffer:", "all on GPU:"):
        assert text in out, text
    if not offload.gpu_offload_supported():
        assert '-DGGML_CUDA=on' in out and "N_GPU_LAYERS=auto: this llama-cpp-python build has no GPU offload" in out
    assert status == (0 if "No problems found." in out else 1)


def test_report_with_a_gpu(capsys, tmp_path, monkeypatch):
    model = write_model(tmp_path / "tiny.gguf")
    monkeypatch.setattr(offload, "gpu_offload_supported", lambda: True)
    monkeypatch.setattr(offload, "query_free_vram", lambda: [GpuInfo(0, "Fake RTX 3060", 12 * GiB, 11 * GiB)])
    monkeypatch.setenv("N_GPU_LAYERS", "0")
    status, out = run(capsys, model=str(model), n_ctx=1024)
    assert "GPU 0: Fake RTX 3060, 12.00 GiB total, 11.00 GiB free" in out
    assert "GPU offload: yes" in out
    assert "N_GPU_LAYERS=0: running on CPU" in out
    assert "N_GPU_LAYERS=auto: 7/7 layers of tiny.gguf on GPU" in out


def test_explicit_layers_without_a_gpu_are_a_problem(capsys, tmp_path, monkeypatch):
    model = write_model(tmp_path / "tiny.gguf")
    monkeypatch.setattr(offload, "gpu_offload_supported", lambda: False)
    monkeypatch.setenv("N_GPU_LAYERS", "10")
    status, out = run(capsys, model=str(model))
    assert status == 1
    assert "Problems found:" in out and 'CMAKE_ARGS="-DGGML_CUDA=on" scripts/serve.sh' in out


def test_missing_model(capsys, tmp_path):
    status, out = run(capsys, model=str(tmp_path / "nope.gguf"))
    assert status == 1 and "model file not found" in out


def test_model_name_under_model_path(capsys, tmp_path, monkeypatch):
    write_model(tmp_path / "tiny.gguf")
    monkeypatch.setenv("MODEL_PATH", str(tmp_path))
    _status, out = run(capsys, model="tiny.gguf")
    assert f"Model: {tmp_path / 'tiny.gguf'}" in out and "llama, 6 blocks + output layer" in out


def test_add_command():
    parser = argparse.ArgumentParser(prog="ai-engine")
    doctor.add_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["doctor", "--model", "m.gguf", "--n-ctx", "123"])
    assert (args.func, args.model, args.n_ctx) == (doctor.run, "m.gguf", 123)


SYSTEM_INFO = ("CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 | OPENMP = 1 | "
               "CUDA : ARCHS = 750,860,890 | USE_GRAPHS = 1 | ")


def test_parse_system_info():
    parsed = doctor.parse_system_info(SYSTEM_INFO)
    assert parsed["CPU"]["AMX_INT8"] == "1" and parsed["CPU"]["AVX2"] == "1"
    assert parsed["CUDA"] == {"ARCHS": "750,860,890", "USE_GRAPHS": "1"}


@pytest.mark.parametrize("cpu_amx, build_amx, ok, text", [
    (True, True, False, "AT RISK"),
    (True, False, True, "avoided"),
    (False, True, True, "not affected"),
    (False, False, True, "not affected"),
])
def test_amx_verdict(cpu_amx, build_amx, ok, text):
    flags = frozenset({"avx2", "amx_tile", "amx_int8"} if cpu_amx else {"avx2"})
    build = {"AVX2": "1", **({"AMX_INT8": "1"} if build_amx else {})}
    verdict_ok, verdict = doctor.amx_verdict(flags, build)
    assert verdict_ok is ok and verdict.startswith(text)


def test_missing_cpu_features():
    flags = frozenset({"sse2", "ssse3", "avx", "avx2", "fma", "f16c"})
    assert doctor.missing_cpu_features(flags, {"AVX2": "1", "AVX512": "1", "AMX_INT8": "1"}) == ["AVX512", "AMX_INT8"]
    assert doctor.missing_cpu_features(frozenset({"neon"}), {"AVX2": "1"}) == []  # not x86: not checked


def test_read_cpu_info():
    text = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
            "flags\t\t: fpu sse2 avx2 avx512f avx512_vnni amx_tile amx_int8 amx_bf16\n\n"
            "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu\n")
    cpu = doctor.read_cpu_info(text)
    assert cpu.model == "Intel(R) Xeon(R) Platinum 8480+" and "amx_int8" in cpu.flags
    assert doctor.describe_cpu_features(cpu.flags) == \
        "AVX2 yes, AVX-512 yes (F VNNI), AVX-VNNI no, AMX yes (amx_tile amx_int8 amx_bf16)"


def test_memory_info():
    total, available = doctor.memory_info()
    assert total > 256 * MiB and 0 < available <= total
