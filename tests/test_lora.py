"""LoRA: PEFT adapters converted to GGUF match transformers with the adapter merged; finetune trains.

Tiny Llama (Q/K permutation, untied lm_head), Gemma, Gemma 2, Gemma 3 and Qwen2 checkpoints get
a PEFT adapter with random non-zero A and B on every attention and MLP projection. The base is
converted to f32 and the adapter with `convert-lora`; llama.cpp with the adapter must match the
merged model (last-token logit NMSE < 1e-4), and without it the base. The adapter is applied both
through `Llama(lora_path=...)` and through the low-level calls a server uses to switch adapters on
a live context. Refusals are checked on numpy-built adapters (no transformers needed).
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from convert.lora import convert_lora
from convert.metadata import SourceInfo
from convert.pipeline import convert
from convert.verify import F32_CACHE, PROMPTS, nmse
from engine.cli import main
from tests.convert_fixtures import KINDS, build, numpy_llama, write_safetensors

DATA = Path(__file__).parent / "data"
NMSE_LIMIT = 1e-4
ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Llama (Q/K permutation, untied lm_head), Gemma 1/2/3 (1 + w norms, tied embeddings), Qwen2 (biases).
LORA_KINDS = {"llama2-spm": ATTN_MLP + ["lm_head"], "gemma": ATTN_MLP, "gemma2": ATTN_MLP,
              "gemma3": ATTN_MLP, "qwen2": ATTN_MLP}
GGUF_ARCH = {"llama2-spm": "llama", "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3",
             "qwen2": "qwen2"}


def _llama(path: Path, lora: Path | None = None) -> Any:
    import llama_cpp

    return llama_cpp.Llama(str(path), lora_path=str(lora) if lora else None, n_ctx=256, n_batch=256,
                           logits_all=True, type_k=F32_CACHE, type_v=F32_CACHE, n_threads=1,
                           n_threads_batch=1, verbose=False)


def _last_logits(llm: Any, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[len(ids) - 1], dtype=np.float32)


def _hf_last_logits(model: Any, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float().numpy()


def random_peft_adapter(folder: Path, out: Path, targets: list[str], seed: int = 1) -> Any:
    """A PEFT LoRA adapter with random non-zero A and B on `targets`, saved to `out`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    torch.manual_seed(seed)
    with torch.no_grad():  # large enough to move the logits well away from the base
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.1)
    peft_model.save_pretrained(out)
    return peft_model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("lora-ckpt")
    kinds = {k.id: k for k in KINDS}
    return {kid: build(kinds[kid], root / kid, root / f"{kid}-work") for kid in LORA_KINDS}


@pytest.fixture(scope="module", params=list(LORA_KINDS))
def adapted(request, checkpoints, tmp_path_factory) -> dict[str, Any]:
    """Base GGUF, adapter GGUF, and transformers' last-token logits with and without the adapter."""
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from transformers import AutoTokenizer

    kid = request.param
    folder = checkpoints[kid]
    root = tmp_path_factory.mktemp(f"lora-{kid}")
    base_gguf = convert(SourceInfo(folder), root / "base-f32.gguf", "f32").path
    peft_model = random_peft_adapter(folder, root / "adapter", LORA_KINDS[kid])
    adapter_gguf = convert_lora(root / "adapter", folder, root / "adapter-f32.gguf", "f32").path
    tok = AutoTokenizer.from_pretrained(folder)
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:2]]
    peft_model.eval()
    with peft_model.disable_adapter():
        base = [_hf_last_logits(peft_model, ids) for ids in prompts]
    merged_model = peft_model.merge_and_unload()
    merged = [_hf_last_logits(merged_model, ids) for ids in prompts]
    return dict(kid=kid, folder=folder, root=root, base_gguf=base_gguf, adapter_gguf=adapter_gguf,
                prompts=prompts, base=base, merged=merged)


def test_adapter_metadata(adapted):
    from convert.gguf_info import read_info

    info = read_info(adapted["adapter_gguf"])
    meta = info.metadata
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == pytest.approx(8.0)
    assert meta["general.architecture"] == GGUF_ARCH[adapted["kid"]]
    config = json.loads((adapted["folder"] / "config.json").read_text())
    q_rows = config["num_attention_heads"] * (config.get("head_dim") or 16)
    shapes = info.tensor_shapes
    # numpy order as llama.cpp's convert_lora_to_gguf.py writes it: lora_a [rank, in], lora_b [out, rank]
    assert tuple(shapes["blk.0.ffn_down.weight.lora_a"]) == (4, 128)
    assert tuple(shapes["blk.0.ffn_down.weight.lora_b"]) == (64, 4)
    assert tuple(shapes["blk.1.attn_q.weight.lora_b"]) == (q_rows, 4)
    assert len(shapes) == 2 * 7 * config["num_hidden_layers"] + (2 if adapted["kid"] == "llama2-spm" else 0)


def test_lora_path_matches_merged_transformers(adapted):
    with_lora, plain = _llama(adapted["base_gguf"], adapted["adapter_gguf"]), _llama(adapted["base_gguf"])
    try:
        for ids, base, merged in zip(adapted["prompts"], adapted["base"], adapted["merged"]):
            assert nmse(base, merged) > 1e-2, "the adapter should change the logits"
            got = _last_logits(with_lora, ids)
            err = nmse(got, merged)
            print(f"{adapted['kid']}: adapter NMSE {err:.2e}")
            assert err < NMSE_LIMIT
            err_base = nmse(_last_logits(plain, ids), base)
            print(f"{adapted['kid']}: base NMSE {err_base:.2e}")
            assert err_base < NMSE_LIMIT
    finally:
        with_lora.close()
        plain.close()


def test_low_level_adapter_switching(adapted):
    """The calls a server uses: init once per model, then set/clear per context at any time."""
    import llama_cpp

    llm = _llama(adapted["base_gguf"])
    try:
        adapter = llama_cpp.llama_adapter_lora_init(llm.model, str(adapted["adapter_gguf"]).encode())
        assert adapter, "llama_adapter_lora_init returned NULL"
        ids, base, merged = adapted["prompts"][0], adapted["base"][0], adapted["merged"][0]
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
        assert llama_cpp.llama_set_adapters_lora(llm.ctx, adapters, 1, (ctypes.c_float * 1)(1.0)) == 0
        assert nmse(_last_logits(llm, ids), merged) < NMSE_LIMIT
        assert llama_cpp.llama_set_adapters_lora(llm.ctx, None, 0, None) == 0  # clear
        assert nmse(_last_logits(llm, ids), base) < NMSE_LIMIT
        # scale 0.5: half the delta (LoRA is linear in B·A, but not the logits: just "in between").
        llama_cpp.llama_set_adapters_lora(llm.ctx, adapters, 1, (ctypes.c_float * 1)(0.5))
        half = _last_logits(llm, ids)
        assert nmse(half, base) > 1e-6 and nmse(half, merged) > 1e-6
        llama_cpp.llama_set_adapters_lora(llm.ctx, None, 0, None)
        llama_cpp.llama_adapter_lora_free(adapter)
    finally:
        llm.close()


def test_gemma_tied_lm_head_refused(checkpoints, tmp_path):
    """A real PEFT adapter on Gemma's tied lm_head (PEFT also saves the head's weights)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = checkpoints["gemma"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "lm_head"])).save_pretrained(
        tmp_path / "a")
    code, err = _cli(tmp_path / "a", folder, tmp_path / "a.gguf")
    assert code == 2 and "ties the output head" in err and "target_modules" in err, err


# --- refusals, on numpy-built adapters ---------------------------------------------------------


def _np_adapter(folder: Path, modules: dict[str, tuple[int, int]], rank: int = 4, *,
                extra: dict[str, np.ndarray] | None = None, **config: Any) -> Path:
    """A PEFT-layout adapter: {module: (out, in)} → base_model.model.<module>.lora_[AB].weight."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    tensors: dict[str, np.ndarray] = {}
    for module, (out, inp) in modules.items():
        prefix = module if module == "lm_head" else f"model.{module}"
        tensors[f"base_model.model.{prefix}.lora_A.weight"] = rng.standard_normal((rank, inp)) * 0.1
        tensors[f"base_model.model.{prefix}.lora_B.weight"] = rng.standard_normal((out, rank)) * 0.1
    tensors.update(extra or {})
    write_safetensors(folder / "adapter_model.safetensors", tensors)
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}), **config}))
    return folder


def _cli(adapter: Path, base: Path, out: Path) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["convert-lora", str(adapter), "--base", str(base), "-o", str(out)])
    return code, err.getvalue()


@pytest.fixture(scope="module")
def np_base(tmp_path_factory) -> Path:
    return numpy_llama(tmp_path_factory.mktemp("np-base") / "ckpt")  # hidden 64, ff 128, 2 layers


REFUSALS = [
    ("other-base-shape", {"layers.0.self_attn.q_proj": (96, 96)}, {}, {}, "another base model"),
    ("other-base-layers", {"layers.5.self_attn.q_proj": (64, 64)}, {}, {}, "another base model"),
    ("unknown-module", {"layers.0.self_attn.foo_proj": (64, 64)}, {}, {}, "no GGUF counterpart"),
    ("norm-target", {"layers.0.input_layernorm": (64, 64)}, {}, {}, "not a matrix"),
    ("dora", {"layers.0.self_attn.q_proj": (64, 64)}, {"use_dora": True}, {}, "DoRA"),
    ("embedding", {}, {},
     {"base_model.model.model.embed_tokens.lora_embedding_A": np.ones((4, 700))}, "embeddings"),
    ("trained-bias", {"layers.0.self_attn.q_proj": (64, 64)}, {"bias": "lora_only"}, {}, "bias"),
    ("not-lora", {"layers.0.self_attn.q_proj": (64, 64)}, {"peft_type": "IA3"}, {}, "peft_type"),
]


@pytest.mark.parametrize("case,modules,config,extra,needle", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals(np_base, tmp_path, case, modules, config, extra, needle):
    adapter = _np_adapter(tmp_path / "adapter", modules, extra=extra, **config)
    out = tmp_path / "out.gguf"
    code, err = _cli(adapter, np_base, out)
    assert code == 2, err
    assert err.startswith("ai-engine: error: ") and err.count("\n") == 1 and needle in err, err
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_numpy_adapter_converts(np_base, tmp_path):
    modules = {f"layers.{i}.{m}": s for i in range(2) for m, s in
               [("self_attn.q_proj", (64, 64)), ("mlp.down_proj", (64, 128))]}
    code, err = _cli(_np_adapter(tmp_path / "adapter", modules), np_base, tmp_path / "a.gguf")
    assert code == 0, err
    assert (tmp_path / "a.gguf.sha256").is_file()


# --- finetune ----------------------------------------------------------------------------------


def test_finetune_cases_then_convert(checkpoints, tmp_path):
    """A few steps on the fixture cases: loss falls; the trained adapter converts and matches."""
    pytest.importorskip("peft")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from convert.finetune import TrainConfig, finetune

    folder = checkpoints["gemma"]
    cfg = TrainConfig(rank=4, steps=6, grad_accum=2, lr=1e-2, max_length=192, heldout=0.34,
                      threads=1, dropout=0.0)
    report = finetune(folder, DATA / "patient_cases.json", tmp_path / "adapter", cfg)
    print(json.dumps({k: report[k] for k in ("loss_curve", "heldout_loss_before",
                                              "heldout_loss_after", "seconds")}))
    assert report["steps"] == 6 and len(report["loss_curve"]) == 6
    assert report["train_examples"] == 2 and report["heldout_examples"] == 1
    assert report["loss_curve"][-1] < report["loss_curve"][0]
    assert report["heldout_loss_after"] < report["heldout_loss_before"]
    assert json.loads((tmp_path / "adapter" / "finetune_report.json").read_text())["steps"] == 6

    out = tmp_path / "trained.gguf"
    code, err = _cli(tmp_path / "adapter", folder, out)
    assert code == 0, err
    base_gguf = convert(SourceInfo(folder), tmp_path / "base.gguf", "f32").path
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                                      tmp_path / "adapter").merge_and_unload()
    ids = AutoTokenizer.from_pretrained(folder)(PROMPTS[0])["input_ids"]
    llm = _llama(base_gguf, out)
    try:
        err_trained = nmse(_last_logits(llm, ids), _hf_last_logits(model, ids))
    finally:
        llm.close()
    print(f"trained adapter NMSE {err_trained:.2e}")
    assert err_trained < NMSE_LIMIT


def test_finetune_cli_jsonl(checkpoints, tmp_path):
    pytest.importorskip("peft")
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Estudiante: ¿Cómo dormís? ({i})\nPaciente:",
                                          "completion": " Muy mal, me despierto a las cuatro."})
                              for i in range(4)), encoding="utf-8")
    out = tmp_path / "adapter"
    code = main(["finetune", str(checkpoints["llama2-spm"]), str(data), "-o", str(out), "--steps", "2",
                 "--grad-accum", "1", "--rank", "2", "--threads", "1"])
    assert code == 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert json.loads((out / "finetune_report.json").read_text())["heldout_examples"] == 1


def test_finetune_bad_data(checkpoints, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "no prompt"}\n', encoding="utf-8")
    code = main(["finetune", str(checkpoints["gemma"]), str(data), "-o", str(tmp_path / "o")])
    assert code == 2 and "prompt" in capsys.readouterr().err
