"""The GPU offload planner: GGUF layout, memory arithmetic, layer choice, and the N_GPU_LAYERS rules.

Synthetic models are written in-test with gguf.GGUFWriter (f32 tensors, so every size is known);
the default model checks the estimates against what llama.cpp itself reports for it.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from unittest import mock

import gguf
import numpy as np
import pytest

from engine import offload
from engine.errors import ModelRefused, SettingsError
from engine.offload import (GiB, MiB, GpuInfo, GpuUnavailableError, ModelShape, compute_buffer_bytes,
                            kv_cache_bytes, parse_nvidia_smi, plan_offload, read_gguf_layout,
                            resolve_gpu_layers)

N_LAYER, N_EMBD, N_HEAD, N_HEAD_KV, N_FF, N_VOCAB = 6, 64, 4, 2, 128, 1000
HEAD_DIM = N_EMBD // N_HEAD
MARGIN = 64 * MiB
N_CTX = 1024


def write_model(path: Path, *, arch: str = "llama", n_layer: int = N_LAYER, tied: bool = False,
                sliding_window: int = 0, pattern: int | list[bool] | None = None,
                n_tokens: int = 0) -> Path:
    """A tiny model: per block attn_q (E×E), attn_k and attn_v (E×kv), ffn_up (E×F), attn_norm (E), f32."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(n_layer)
    writer.add_embedding_length(N_EMBD)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_feed_forward_length(N_FF)
    writer.add_context_length(4096)
    if sliding_window:
        writer.add_sliding_window(sliding_window)
    if pattern is not None:
        writer.add_sliding_window_pattern(pattern)
    if n_tokens:  # a vocabulary big enough that the layout reader must skip it
        writer.add_token_list([f"tok{i}" for i in range(n_tokens)])
    kv_dim = N_HEAD_KV * HEAD_DIM
    writer.add_tensor("token_embd.weight", np.zeros((N_VOCAB, N_EMBD), np.float32))
    for i in range(n_layer):
        writer.add_tensor(f"blk.{i}.attn_q.weight", np.zeros((N_EMBD, N_EMBD), np.float32))
        writer.add_tensor(f"blk.{i}.attn_k.weight", np.zeros((kv_dim, N_EMBD), np.float32))
        writer.add_tensor(f"blk.{i}.attn_v.weight", np.zeros((kv_dim, N_EMBD), np.float32))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", np.zeros((N_FF, N_EMBD), np.float32))
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.zeros((N_EMBD,), np.float32))
    writer.add_tensor("output_norm.weight", np.zeros((N_EMBD,), np.float32))
    if not tied:
        writer.add_tensor("output.weight", np.zeros((N_VOCAB, N_EMBD), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


BLOCK_BYTES = 4 * (N_EMBD * N_EMBD + 2 * N_HEAD_KV * HEAD_DIM * N_EMBD + N_FF * N_EMBD + N_EMBD)
EMBD_BYTES = 4 * N_VOCAB * N_EMBD
OUTPUT_BYTES = 4 * N_EMBD + EMBD_BYTES  # output_norm + output (or, tied, the token_embd copy)
KV_LAYER = N_CTX * N_HEAD_KV * 2 * HEAD_DIM * 2  # cells × (K + V per cell) × f16
N_UBATCH = 512
COMPUTE_OUT = 4 * N_UBATCH * (3 * N_EMBD + max((N_HEAD + 1) * N_CTX, 2 * N_FF, N_VOCAB))
COMPUTE_NO_OUT = 4 * N_UBATCH * (3 * N_EMBD + max((N_HEAD + 1) * N_CTX, 2 * N_FF))


def gpu_cost(k: int) -> int:
    """What n_gpu_layers = k puts on the GPU: output layer first, then the last k-1 blocks."""
    if k == 0:
        return 0
    return OUTPUT_BYTES + (k - 1) * (BLOCK_BYTES + KV_LAYER) + COMPUTE_OUT


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("gguf") / "tiny.gguf", n_tokens=5000)


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("gguf") / "tied.gguf", tied=True)


def plan(path: Path, free: int, **kw) -> offload.OffloadPlan:
    return plan_offload(path, N_CTX, free, margin_bytes=MARGIN, **kw)


# -- reading the file -----------------------------------------------------------------------------

def test_layout_matches_gguf_reader(model):
    layout = read_gguf_layout(model)
    reader = gguf.GGUFReader(model)
    assert {t.name: int(t.n_bytes) for t in reader.tensors} == {n: b for n, (_s, b) in layout.tensors.items()}
    assert layout.metadata["llama.block_count"] == N_LAYER
    assert "tokenizer.ggml.tokens" not in layout.metadata  # 5000 strings: skipped, not kept


def test_layout_reads_quantized_sizes(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    # 64 rows of 256 Q8_0 values: 8 blocks of 34 bytes per row.
    writer.add_tensor("blk.0.ffn_up.weight", np.zeros((64, 8 * 34), np.uint8),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    shape, nbytes = read_gguf_layout(tmp_path / "q.gguf").tensors["blk.0.ffn_up.weight"]
    assert (shape, nbytes) == ((256, 64), 64 * 8 * 34)


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "notes.gguf").write_text("not weights\n" * 10)
    with pytest.raises(ModelRefused, match="not a readable GGUF"):
        read_gguf_layout(tmp_path / "notes.gguf")


def test_model_shape(model, tied_model):
    shape = ModelShape.from_layout(read_gguf_layout(model))
    assert (shape.arch, shape.n_layer, shape.total_layers, shape.n_vocab) == ("llama", N_LAYER, N_LAYER + 1, N_VOCAB)
    assert shape.layer_bytes == (BLOCK_BYTES,) * N_LAYER
    assert shape.kv_per_cell == (N_HEAD_KV * 2 * HEAD_DIM,) * N_LAYER
    assert (shape.output_bytes, shape.output_copy_bytes) == (OUTPUT_BYTES, 0)
    assert shape.weights_bytes == EMBD_BYTES + N_LAYER * BLOCK_BYTES + OUTPUT_BYTES
    tied = ModelShape.from_layout(read_gguf_layout(tied_model))
    assert (tied.output_bytes, tied.output_copy_bytes) == (OUTPUT_BYTES, EMBD_BYTES)
    assert tied.weights_bytes == EMBD_BYTES + N_LAYER * BLOCK_BYTES + 4 * N_EMBD


# -- choosing layers ------------------------------------------------------------------------------

def test_no_vram_keeps_everything_in_ram(model):
    p = plan(model, 0)
    assert (p.gpu_layers, p.gpu_bytes, p.total_layers) == (0, 0, N_LAYER + 1)
    assert p.kv_bytes == N_LAYER * KV_LAYER
    assert p.ram_bytes == p.weights_bytes + p.kv_bytes + COMPUTE_OUT
    assert "running on CPU" in p.describe() and "0/7 layers" in p.describe()


def test_too_small_for_one_layer(model):
    p = plan(model, MARGIN + gpu_cost(1) - 1)
    assert p.gpu_layers == 0 and p.gpu_bytes == 0
    assert "not even the output layer fits" in p.reason


def test_exactly_one_layer_is_the_output_layer(model):
    p = plan(model, MARGIN + gpu_cost(1))
    assert p.gpu_layers == 1
    assert (p.gpu_weights_bytes, p.gpu_kv_bytes, p.gpu_compute_bytes) == (OUTPUT_BYTES, 0, COMPUTE_OUT)
    # Blocks stay on the CPU, with their KV cache and a compute buffer without the logits.
    assert p.ram_bytes == EMBD_BYTES + N_LAYER * BLOCK_BYTES + N_LAYER * KV_LAYER + COMPUTE_NO_OUT


@pytest.mark.parametrize("half", [N_LAYER // 2, N_LAYER // 2 + 1])
def test_half_the_layers(model, half):
    assert plan(model, MARGIN + gpu_cost(half)).gpu_layers == half
    assert plan(model, MARGIN + gpu_cost(half) - 1).gpu_layers == half - 1
    p = plan(model, MARGIN + gpu_cost(half))
    assert p.gpu_bytes == gpu_cost(half) and p.fits
    assert p.gpu_kv_bytes == (half - 1) * KV_LAYER and p.kv_bytes == N_LAYER * KV_LAYER
    assert p.ram_bytes == (p.weights_bytes - p.gpu_weights_bytes) + (N_LAYER - half + 1) * KV_LAYER + COMPUTE_NO_OUT
    assert f"{half + 1} layers would need" in p.reason


def test_all_layers(model):
    p = plan(model, 100 * GiB)
    assert p.gpu_layers == p.total_layers == N_LAYER + 1
    assert p.gpu_bytes == gpu_cost(N_LAYER + 1)
    # Only the input layer (token_embd) and its lookup's buffer stay in RAM.
    assert p.ram_bytes == EMBD_BYTES + 4 * N_UBATCH * N_EMBD
    assert p.reason == "all layers fit"


def test_every_layer_count_conserves_bytes(model, tied_model):
    for path, copy in ((model, 0), (tied_model, EMBD_BYTES)):
        for k in range(N_LAYER + 2):
            p = plan(path, 0, n_gpu_layers_requested=k)
            assert p.gpu_layers == k
            assert p.gpu_weights_bytes + p.ram_weights_bytes == p.weights_bytes + (copy if k else 0)
            assert p.gpu_kv_bytes + p.ram_kv_bytes == p.kv_bytes


def test_tied_embeddings_copy_to_gpu_and_stay_in_ram(tied_model):
    p = plan(tied_model, 100 * GiB)
    assert p.gpu_layers == N_LAYER + 1
    assert p.gpu_weights_bytes == N_LAYER * BLOCK_BYTES + OUTPUT_BYTES
    assert p.ram_weights_bytes == EMBD_BYTES


def test_explicit_count_wins(model):
    p = plan(model, 0, n_gpu_layers_requested=3)
    assert p.gpu_layers == 3 and p.gpu_bytes == gpu_cost(3) and not p.fits
    assert "does not fit" in p.describe()
    assert plan(model, 0, n_gpu_layers_requested=-1).gpu_layers == N_LAYER + 1
    assert plan(model, 0, n_gpu_layers_requested=99).gpu_layers == N_LAYER + 1
    assert plan(model, 100 * GiB, n_gpu_layers_requested=0).gpu_bytes == 0


def test_kv_cache_type_and_context(model):
    q8 = plan(model, 0, kv_type_bytes=offload.KV_TYPE_BYTES["q8_0"])
    assert offload.KV_TYPE_BYTES["q8_0"] == 34 / 32 and offload.KV_TYPE_BYTES["f32"] == 4
    assert q8.kv_bytes == N_LAYER * KV_LAYER * 34 // 64
    # The context is padded to 256 cells, as llama.cpp pads it.
    assert plan_offload(model, 1000, 0).kv_bytes == plan_offload(model, 1024, 0).kv_bytes


def test_flash_attention_drops_the_score_matrix(model):
    shape = ModelShape.from_layout(read_gguf_layout(model))
    big_ctx = 65536
    assert compute_buffer_bytes(shape, big_ctx, 512, with_output=False) == \
        4 * 512 * (3 * N_EMBD + (N_HEAD + 1) * big_ctx)
    assert compute_buffer_bytes(shape, big_ctx, 512, with_output=False, flash_attn=True) == \
        4 * 512 * (3 * N_EMBD + big_ctx)


def test_sliding_window_layers(tmp_path):
    path = write_model(tmp_path / "g3.gguf", arch="gemma3", n_layer=12, sliding_window=128)
    shape = ModelShape.from_layout(read_gguf_layout(path))
    # Gemma 3: five local layers, then one global.
    assert shape.swa_layers == tuple(i % 6 != 5 for i in range(12))
    per_cell = N_HEAD_KV * 2 * HEAD_DIM * 2
    full = kv_cache_bytes(shape, 4096, swa_full=True)
    assert full == [4096 * per_cell] * 12
    windowed = kv_cache_bytes(shape, 4096, n_ubatch=512, swa_full=False)
    assert windowed == [(768 if swa else 4096) * per_cell for swa in shape.swa_layers]  # pad(128 + 512)
    explicit = write_model(tmp_path / "pat.gguf", arch="llama", n_layer=4, sliding_window=128,
                           pattern=[True, False, True, False])
    assert ModelShape.from_layout(read_gguf_layout(explicit)).swa_layers == (True, False, True, False)
    no_window = write_model(tmp_path / "nw.gguf", arch="gemma3", n_layer=4)
    assert not any(ModelShape.from_layout(read_gguf_layout(no_window)).swa_layers)


# -- the default model ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def default_shape(default_model_file) -> ModelShape:
    # gguf.GGUFReader takes over 10 s on the 262k-string vocabulary: the layout is read without it,
    # and the vocabulary is counted, not decoded.
    with mock.patch.object(gguf, "GGUFReader", side_effect=AssertionError("GGUFReader used")):
        layout = read_gguf_layout(default_model_file)
    assert "tokenizer.ggml.tokens" not in layout.metadata and "tokenizer.ggml.model" in layout.metadata
    return ModelShape.from_layout(layout)


def test_default_model_estimates_match_llama_cpp(default_model_file, default_shape):
    s = default_shape
    assert (s.arch, s.n_layer, s.n_vocab, s.n_swa) == ("gemma3", 18, 262144, 512)
    assert s.output_copy_bytes > 0  # Gemma ties its embeddings
    # What llama.cpp reports loading it with n_ctx 4096 / 512 and n_batch 512: "KV buffer size"
    # 12 + 60 MiB, "CPU compute buffer size = 515.75 MiB", "CPU_Mapped model buffer size = 235.16 MiB".
    p = plan_offload(default_model_file, 4096, 0, shape=s)
    assert p.kv_bytes == 72 * MiB
    assert plan_offload(default_model_file, 512, 0, shape=s).compute_bytes == int(515.75 * MiB)
    assert p.weights_bytes == 246_587_904 and round(p.weights_bytes / MiB, 2) == 235.16
    assert p.ram_bytes == p.weights_bytes + p.kv_bytes + p.compute_bytes


@pytest.mark.parametrize("free, expected", [
    (0, 0),                           # no GPU memory
    (GiB + 600 * MiB, 0),             # output layer + logits buffer (686 MiB) do not fit
    (GiB + 760 * MiB, None),          # part of the blocks
    (GiB + 2 * GiB, 19),              # everything
])
def test_default_model_layer_choice(default_model_file, default_shape, free, expected):
    p = plan_offload(default_model_file, 4096, free, shape=default_shape)
    if expected is None:
        assert 1 < p.gpu_layers < p.total_layers
    else:
        assert p.gpu_layers == expected
    assert p.gpu_bytes + p.margin_bytes <= free or p.gpu_layers == 0
    if p.gpu_layers < p.total_layers:  # the next layer would not have fit
        more = plan_offload(default_model_file, 4096, 0, n_gpu_layers_requested=p.gpu_layers + 1,
                            shape=default_shape)
        assert more.gpu_bytes + more.margin_bytes > free


# -- the machine's GPUs ---------------------------------------------------------------------------

def test_parse_nvidia_smi():
    text = ("0, NVIDIA GeForce RTX 3060, 12288, 11050, GPU-aaaa\n"
            "1, NVIDIA H100 80GB HBM3, 81559, [N/A], GPU-bbbb\n"
            "2, Tesla T4, 15360, 15000\n")
    assert parse_nvidia_smi(text) == [
        GpuInfo(0, "NVIDIA GeForce RTX 3060", 12288 * MiB, 11050 * MiB, "GPU-aaaa"),
        GpuInfo(2, "Tesla T4", 15360 * MiB, 15000 * MiB, "")]


@pytest.mark.parametrize("visible, indices", [
    (None, [0, 1, 2]), ("", []), ("-1", []), ("1", [1]), ("2,0", [2, 0]), ("0,7,1", [0]),
    ("GPU-bb", [1]), ("MIG-xyz", [0, 1, 2]),
])
def test_cuda_visible_devices(visible, indices):
    gpus = [GpuInfo(i, f"gpu{i}", GiB, GiB, f"GPU-{c * 4}") for i, c in enumerate("abc")]
    assert [g.index for g in offload._visible(gpus, visible)] == indices


def test_no_gpu_on_this_machine():
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi")
    assert offload._query_nvidia_smi() == []


# -- the N_GPU_LAYERS rules -----------------------------------------------------------------------

def test_auto_on_a_cpu_build_runs_on_cpu(default_model_file):
    layers, plan_, message = resolve_gpu_layers("auto", default_model_file, 4096, offload_supported=False)
    assert (layers, plan_) == (0, None)
    assert "no GPU offload" in message and "running on CPU" in message and "-DGGML_CUDA=on" in message


def test_this_machine_auto_runs_on_cpu_and_explicit_fails(default_model_file):
    """No GPU here: auto falls back to the CPU with one line, an explicit count is an error."""
    layers, _plan, message = resolve_gpu_layers("auto", default_model_file, 4096)
    assert layers == 0 and "running on CPU" in message
    for explicit in ("10", -1):
        with pytest.raises(GpuUnavailableError) as caught:
            resolve_gpu_layers(explicit, default_model_file, 4096)
        assert isinstance(caught.value, SettingsError) and caught.value.field == "N_GPU_LAYERS"
        assert 'CMAKE_ARGS="-DGGML_CUDA=on" scripts/serve.sh' in caught.value.message
        assert "N_GPU_LAYERS=0" in caught.value.message
    assert resolve_gpu_layers(0, default_model_file, 4096) == (0, None, "N_GPU_LAYERS=0: running on CPU")


def test_gpu_build_without_a_visible_gpu(default_model_file):
    layers, _plan, message = resolve_gpu_layers("auto", default_model_file, 4096, offload_supported=True, gpus=[])
    assert layers == 0 and "no NVIDIA GPU visible" in message
    with pytest.raises(GpuUnavailableError, match="no NVIDIA GPU is visible.*--gpus all"):
        resolve_gpu_layers("10", default_model_file, 4096, offload_supported=True, gpus=[])


@pytest.mark.parametrize("bad", ["lots", "-2", "1.5"])
def test_bad_values(bad, default_model_file):
    with pytest.raises(SettingsError, match="N_GPU_LAYERS must be auto, -1"):
        resolve_gpu_layers(bad, default_model_file, 4096, offload_supported=False)


def test_with_a_gpu(model):
    big = [GpuInfo(0, "big", 80 * GiB, 80 * GiB)]
    layers, p, message = resolve_gpu_layers("AUTO", model, N_CTX, offload_supported=True, gpus=big)
    assert layers == p.gpu_layers == N_LAYER + 1 and message == p.describe()
    layers, p, _ = resolve_gpu_layers("3", model, N_CTX, offload_supported=True, gpus=big)
    assert (layers, p.gpu_layers) == (3, 3)
    layers, p, _ = resolve_gpu_layers(-1, model, N_CTX, offload_supported=True, gpus=big)
    assert (layers, p.gpu_layers) == (-1, N_LAYER + 1)
    # Two GPUs: their free memory adds up, and each keeps its margin.
    free = offload.DEFAULT_MARGIN_BYTES + gpu_cost(3) // 2 + 1
    two = [GpuInfo(0, "a", GiB, free), GpuInfo(1, "b", GiB, free)]
    layers, p, _ = resolve_gpu_layers("auto", model, N_CTX, offload_supported=True, gpus=two)
    assert layers == 3 and p.margin_bytes == 2 * offload.DEFAULT_MARGIN_BYTES


def test_auto_plans_with_the_kv_cache_type(model):
    big = [GpuInfo(0, "big", 80 * GiB, 80 * GiB)]
    _, f16, _ = resolve_gpu_layers("auto", model, N_CTX, offload_supported=True, gpus=big)
    _, q8, _ = resolve_gpu_layers("auto", model, N_CTX, offload_supported=True, gpus=big,
                                  kv_cache_type="q8_0", flash_attn=True)
    assert q8.kv_bytes < f16.kv_bytes


def test_unreadable_model_falls_back_for_auto(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    big = [GpuInfo(0, "big", 80 * GiB, 80 * GiB)]
    layers, p, message = resolve_gpu_layers("auto", bad, 512, offload_supported=True, gpus=big)
    assert (layers, p) == (0, None) and "cannot plan" in message
    layers, p, _ = resolve_gpu_layers("4", bad, 512, offload_supported=True, gpus=big)
    assert (layers, p) == (4, None)


def test_plan_is_a_frozen_record(model):
    p = plan(model, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.gpu_layers = 3  # type: ignore[misc]


# -- a real GPU -----------------------------------------------------------------------------------

@pytest.mark.gpu
def test_default_model_on_the_gpu_with_the_auto_plan(default_model_file):
    if not offload.gpu_offload_supported():
        pytest.skip("llama-cpp-python is a CPU-only build (rebuild with CMAKE_ARGS=\"-DGGML_CUDA=on\")")
    if not offload.query_free_vram():
        pytest.skip("no NVIDIA GPU visible")
    import llama_cpp

    layers, p, message = resolve_gpu_layers("auto", default_model_file, 2048)
    assert p is not None and layers == p.total_layers, message  # 0.8 GiB fits any CUDA GPU
    llm = llama_cpp.Llama(model_path=str(default_model_file), n_ctx=2048, n_gpu_layers=layers, verbose=False)
    try:
        out = llm.create_completion("Estudiante: ¿Cómo dormís?\nPaciente:", max_tokens=8, temperature=0)
        assert out["usage"]["completion_tokens"] > 0
    finally:
        llm.close()


def test_kv_cache_of_every_parallel_sequence_is_planned(model):
    """N_PARALLEL sequences each have N_CTX cells: the plan counts all of them, and fewer layers fit."""
    one, eight = plan_offload(model, 1024, 0), plan_offload(model, 1024, 0, n_seq=8)
    assert eight.kv_bytes == 8 * one.kv_bytes
    budget = plan_offload(model, 1024, 0, n_gpu_layers_requested=-1).gpu_bytes + offload.DEFAULT_MARGIN_BYTES
    assert plan_offload(model, 1024, budget).gpu_layers == N_LAYER + 1
    assert plan_offload(model, 1024, budget, n_seq=8).gpu_layers < N_LAYER + 1


@pytest.mark.parametrize("setting, window, kv, gpu, expected", [
    ("on", 0, "f16", False, True),
    ("off", 512, "f16", True, False),
    ("auto", 512, "f16", False, True),  # a sliding window (Gemma 3): it skips the cells outside it
    ("auto", 0, "f16", False, False),  # a Llama shape on CPU: no faster, and 64-row prompt parts
    ("auto", 0, "f16", True, True),  # on a GPU
    ("auto", 0, "q8_0", False, True),  # a quantized KV cache needs it
])
def test_flash_attention_auto_is_resolved_per_model(tmp_path, setting, window, kv, gpu, expected):
    path = write_model(tmp_path / "m.gguf", arch="gemma3" if window else "llama", sliding_window=window)
    assert offload.flash_attn_on(setting, path, kv_cache_type=kv, gpu=gpu) is expected


def test_flash_attention_auto_for_an_unreadable_file_is_llama_cpps_auto(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf")
    assert offload.flash_attn_on("auto", tmp_path / "bad.gguf", kv_cache_type="f16", gpu=False) is True


def test_the_memory_plan_counts_the_attention_each_model_gets(tmp_path):
    """`auto` on CPU: a model without a sliding window runs without flash attention, so its plan
    counts the score matrix (more compute buffer) where a windowed model's does not."""
    from engine.model_files import ModelSpec
    from engine.settings import Settings
    from engine.startup import memory_plan

    llama = write_model(tmp_path / "llama.gguf")
    settings = Settings.load(env={"MODEL_PATH": str(tmp_path), "N_GPU_LAYERS": "0", "CACHE_RAM_MB": "0"})
    _n, auto_ram, _v, _m = memory_plan(settings, ModelSpec(path=llama))
    on = Settings.load(env={"MODEL_PATH": str(tmp_path), "N_GPU_LAYERS": "0", "CACHE_RAM_MB": "0", "FLASH_ATTN": "on"})
    _n, on_ram, _v, _m = memory_plan(on, ModelSpec(path=llama))
    assert auto_ram > on_ram
