"""How many models fit a machine: the offload planner's estimate for the simulator's models.

    .venv/bin/python scripts/models_fit.py [--n-ctx 4096] [--n-parallel 8 4] [--out bench/results/models_fit.md]

The same arithmetic the model manager uses for MEMORY_BUDGET_MB (engine/startup.py memory_plan:
weights + KV cache for N_PARALLEL × N_CTX + compute buffers + CACHE_RAM_MB). The default model is
read from its GGUF; the others are shaped from their published configurations, with the size of
their usual GGUF file, since their files are not on this machine. The budget of a machine is its
available RAM less 1 GiB (the manager's default); a GPU column shows layers that fit its VRAM.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import offload  # noqa: E402
from engine.default_model import ensure_default_model  # noqa: E402
from engine.settings import REPO_ROOT, Settings  # noqa: E402
from engine.startup import RAM_HEADROOM  # noqa: E402

GiB = 1 << 30

# name, Ollama name, GGUF size in bytes, n_layer, n_embd, n_head, n_head_kv, head_dim, n_ff, n_vocab,
# sliding window (0: none), tied embeddings
SHAPES = [
    ("Llama 3.2 1B Q4_K_M", "llama3.2:1b", 807_694_464, 16, 2048, 32, 8, 64, 8192, 128_256, 0, True),
    ("Gemma 3 4B Q4_K_M", "gemma3:4b", 2_489_757_856, 34, 2560, 8, 4, 256, 10240, 262_144, 1024, True),
    ("MedGemma 4B Q6_K", "medgemma-4b-it-Q6_K", 3_190_000_000, 34, 2560, 8, 4, 256, 10240, 262_144, 1024, True),
    ("Mistral 7B Q4_K_M", "mistral:7b", 4_368_438_944, 32, 4096, 32, 8, 128, 14336, 32_000, 0, False),
    ("Llama 3.1 8B Q4_K_M", "llama3.1:8b", 4_920_739_232, 32, 4096, 32, 8, 128, 14336, 128_256, 0, False),
]
MACHINES_GB = (8, 16, 32, 64)  # RAM; "available" taken as RAM less 1.5 GiB for the OS
GPU_GB = 24


def shape_of(name, size, n_layer, n_embd, n_head, n_kv, head_dim, n_ff, n_vocab, n_swa, tied) -> offload.ModelShape:
    """A ModelShape with `size` bytes spread as the tensors are: embeddings, blocks, output."""
    embd_params = n_vocab * n_embd
    block_params = n_layer * (n_embd * head_dim * (2 * n_head + 2 * n_kv) + 3 * n_embd * n_ff)
    out_params = 0 if tied else embd_params
    per_param = size / (embd_params + block_params + out_params)
    arch = "gemma3" if n_swa else "llama"
    swa = tuple(i % 6 < 5 for i in range(n_layer)) if n_swa else (False,) * n_layer
    return offload.ModelShape(
        arch=arch, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_ff=n_ff, n_vocab=n_vocab,
        layer_bytes=(int(block_params / n_layer * per_param),) * n_layer,
        kv_per_cell=(2 * n_kv * head_dim,) * n_layer, swa_layers=swa, n_swa=n_swa,
        output_bytes=int((embd_params if tied else out_params) * per_param),
        output_copy_bytes=int(embd_params * per_param) if tied else 0, weights_bytes=size)


def estimate(shape: offload.ModelShape, path: Path, settings: Settings, n_parallel: int, vram: int = 0):
    plan = offload.plan_offload(path, settings.n_ctx, vram, n_gpu_layers_requested="auto" if vram else 0,
                                kv_type_bytes=offload.KV_TYPE_BYTES[settings.kv_cache_type], n_batch=settings.n_batch,
                                flash_attn=settings.flash_attn != "off", shape=shape, n_seq=n_parallel)
    return plan.ram_bytes + (settings.cache_ram_mb << 20), plan


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--n-parallel", type=int, nargs="+", default=[8, 4])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "models_fit.md")
    args = parser.parse_args()
    default = ensure_default_model(REPO_ROOT / "models")
    rows = [("Gemma 3 270M Q4_K_M (default)", "gemma3:270m", default,
             offload.ModelShape.from_layout(offload.read_gguf_layout(default)))]
    rows += [(name, alias, default, shape_of(name, *rest)) for name, alias, *rest in SHAPES]
    lines = [f"Planner estimate, N_CTX {args.n_ctx}, KV f16, flash attention off, CACHE_RAM_MB 256 "
             f"(`scripts/models_fit.py`). Budget = RAM available less 1 GiB; 'fit' counts copies of one model.",
             "", "| model | Ollama name | N_PARALLEL | RAM per model | fit in " +
             " | ".join(f"{gb} GB" for gb in MACHINES_GB) + f" | {GPU_GB} GB GPU: layers on GPU, RAM left |",
             "|---|---|---|---|" + "---|" * len(MACHINES_GB) + "---|"]
    for name, alias, path, shape in rows:
        for n_parallel in args.n_parallel:
            settings = Settings.load(env={}, n_ctx=args.n_ctx, n_parallel=n_parallel)
            ram, _ = estimate(shape, path, settings, n_parallel)
            fits = [int(max(0, gb * GiB - GiB // 2 * 3 - RAM_HEADROOM) // ram) for gb in MACHINES_GB]
            gpu_ram, gpu_plan = estimate(shape, path, settings, n_parallel, vram=GPU_GB * GiB)
            lines.append(f"| {name} | `{alias}` | {n_parallel} | {ram / GiB:.1f} GiB | "
                         + " | ".join(str(n) for n in fits)
                         + f" | {gpu_plan.gpu_layers}/{gpu_plan.total_layers} ({gpu_plan.gpu_bytes / GiB:.1f} GiB), "
                           f"{gpu_ram / GiB:.1f} GiB |")
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
