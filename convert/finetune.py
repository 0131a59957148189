"""LoRA fine-tuning of a Hugging Face checkpoint on prompt/completion pairs (the `train` extra).

Data is a JSONL file of {"prompt", "completion"} lines, or a JSON file of patient cases in the
fixtures' format (tests/data/patient_cases.json): every Paciente turn becomes the completion of
the transcript before it, rendered exactly as the simulator's backend renders it, so the adapter
learns the prompts it will be served. The loss counts completion tokens only.

A plain PyTorch loop rather than transformers' Trainer: one example per micro-batch (no padding,
so no wasted compute on a CPU), gradient accumulation for a steadier step, and held-out loss
measured before and after. Output: a PEFT adapter folder plus `finetune_report.json` in it.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from ai_engine_common.patient_prompt import render_case_prompt
from convert.errors import CheckpointError, ConvertError

log = logging.getLogger(__name__)

REPORT_NAME = "finetune_report.json"
DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj"


class FinetuneError(ConvertError):
    """Fine-tuning cannot run: missing packages, unreadable data, nothing to train on."""


@dataclass
class Example:
    prompt: str
    completion: str


@dataclass
class TrainConfig:
    """CPU-friendly defaults: a small rank on the attention projections and a few dozen steps."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: DEFAULT_TARGETS.split(","))
    steps: int = 40
    grad_accum: int = 4
    lr: float = 3e-4
    max_length: int = 512
    heldout: float = 0.2      # fraction of examples held out for the before/after loss
    seed: int = 0
    threads: int | None = None


def load_examples(path: Path) -> list[Example]:
    """Prompt/completion pairs from a JSONL file or a patient-cases JSON file."""
    if not path.is_file():
        raise FinetuneError(f"training data {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            examples = [Example(str(r["prompt"]), str(r["completion"])) for r in rows]
        else:
            data = json.loads(text)
            cases = data["cases"] if isinstance(data, dict) else data
            examples = [e for case in cases for e in case_examples(case)]
    except (ValueError, KeyError, TypeError) as exc:
        raise FinetuneError(f"{path}: expected JSONL of {{\"prompt\", \"completion\"}} lines or a "
                            f"JSON file of patient cases ({type(exc).__name__}: {exc})") from None
    if not examples:
        raise FinetuneError(f"{path} holds no training examples")
    return examples


def case_examples(case: dict[str, Any]) -> list[Example]:
    """One example per Paciente turn: the prompt is the transcript up to the question before it."""
    out = []
    for i, (role, text) in enumerate(case["turnos"]):
        if role == "Paciente" and i > 0:
            prompt = render_case_prompt({**case, "turnos": case["turnos"][:i]})
            # The newline ends the reply as the transcript does, so the model learns to stop.
            out.append(Example(prompt, f" {text}\n"))
    return out


def split(examples: list[Example], heldout: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded shuffle, then the held-out share (at least one example when there are two or more)."""
    order = examples[:]
    random.Random(seed).shuffle(order)
    n_held = 0 if len(order) < 2 or heldout <= 0 else max(1, round(len(order) * heldout))
    return order[n_held:], order[:n_held]


def encode(tokenizer: Any, ex: Example, max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, labels): labels are -100 over the prompt, so only the completion is learned.

    The whole text is tokenized at once (tokenizers merge across the boundary differently from two
    separate calls); the prompt's own length marks where the completion starts. Too-long examples
    lose the start of the prompt, never the completion.
    """
    prompt_ids = tokenizer(ex.prompt)["input_ids"]
    ids = tokenizer(ex.prompt + ex.completion)["input_ids"]
    labels = [-100] * min(len(prompt_ids), len(ids)) + ids[len(prompt_ids):]
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        ids, labels = ids + [eos], labels + [eos]
    return ids[-max_length:], labels[-max_length:]


def _progress(total: int) -> Callable[[float], None]:
    """A tqdm bar showing the loss, or a log line per step where tqdm is missing."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        step = [0]

        def line(loss: float) -> None:
            step[0] += 1
            log.info("step %d/%d loss %.4f", step[0], total, loss)
        return line
    bar = tqdm(total=total, desc="finetune", unit="step", file=sys.stderr)

    def update(loss: float) -> None:
        bar.set_postfix(loss=f"{loss:.4f}")
        bar.update(1)
        if bar.n >= total:
            bar.close()
    return update


def _mean_loss(model: Any, batches: Iterable[tuple[list[int], list[int]]], device: str) -> float | None:
    """Token-weighted mean loss over completion tokens."""
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for ids, labels in batches:
            n = sum(1 for x in labels[1:] if x != -100)  # the model shifts labels by one
            if n == 0:
                continue
            out = model(input_ids=torch.tensor([ids], device=device),
                        labels=torch.tensor([labels], device=device))
            total += float(out.loss) * n
            count += n
    return total / count if count else None


def finetune(model_dir: Path, data: Path, out: Path, cfg: TrainConfig) -> dict[str, Any]:
    """Train a LoRA adapter, save it to `out` with its report, and return the report."""
    try:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise FinetuneError(f"fine-tuning needs torch, transformers and peft ({exc.name} is "
                            "missing); install them with: pip install '.[train]'") from None
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir} has no config.json; pass a Hugging Face checkpoint folder")
    started = time.monotonic()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    train, held = split(load_examples(data), cfg.heldout, cfg.seed)
    if not train:
        raise FinetuneError(f"{data}: nothing left to train on after holding out {len(held)} examples")

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # float32: CPU matmuls in half precision are slow, and LoRA's small updates need the range.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    model = get_peft_model(model, LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules, bias="none", task_type="CAUSAL_LM"))
    train_enc = [encode(tokenizer, e, cfg.max_length) for e in train]
    held_enc = [encode(tokenizer, e, cfg.max_length) for e in held]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("training %d LoRA parameters on %d examples (%d held out), %d steps × %d",
             trainable, len(train), len(held), cfg.steps, cfg.grad_accum)

    before = _mean_loss(model, held_enc, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    progress = _progress(cfg.steps)
    order: list[int] = []
    curve: list[float] = []
    for _ in range(cfg.steps):
        model.train()
        step_loss = 0.0
        for _ in range(cfg.grad_accum):
            if not order:  # a fresh shuffled pass over the training set
                order = random.sample(range(len(train_enc)), len(train_enc))
            ids, labels = train_enc[order.pop()]
            loss = model(input_ids=torch.tensor([ids], device=device),
                         labels=torch.tensor([labels], device=device)).loss / cfg.grad_accum
            loss.backward()
            step_loss += loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        curve.append(round(step_loss, 5))
        progress(step_loss)
    after = _mean_loss(model, held_enc, device)

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    report = {
        "model": str(model_dir), "data": str(data), "adapter_dir": str(out), "device": device,
        "steps": cfg.steps, "train_examples": len(train), "heldout_examples": len(held),
        "trainable_parameters": trainable, "loss_curve": curve,
        "heldout_loss_before": before, "heldout_loss_after": after,
        "seconds": round(time.monotonic() - started, 2),
        # ru_maxrss is in KiB on Linux.
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "config": asdict(cfg), "report_path": str(out / REPORT_NAME),
    }
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    log.info("saved adapter to %s (held-out loss %s → %s)", out, before, after)
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `ai-engine finetune` flags; defaults are TrainConfig's."""
    d = TrainConfig()
    p.add_argument("model", type=Path, metavar="HF_DIR", help="Hugging Face checkpoint folder to adapt")
    p.add_argument("data", type=Path, metavar="DATA",
                   help="JSONL of {\"prompt\", \"completion\"} lines, or a JSON file of patient cases")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="ADAPTER_DIR",
                   help="folder for the PEFT adapter and finetune_report.json")
    p.add_argument("--rank", type=int, default=d.rank, help=f"LoRA rank (default {d.rank})")
    p.add_argument("--alpha", type=float, default=d.alpha, help=f"LoRA alpha (default {d.alpha:g})")
    p.add_argument("--dropout", type=float, default=d.dropout, help=f"LoRA dropout (default {d.dropout})")
    p.add_argument("--target-modules", default=DEFAULT_TARGETS,
                   help=f"comma-separated module names to adapt (default {DEFAULT_TARGETS}; "
                        "add gate_proj,up_proj,down_proj for the MLP)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum,
                   help=f"examples per optimizer step (default {d.grad_accum})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"learning rate (default {d.lr:g})")
    p.add_argument("--max-length", type=int, default=d.max_length,
                   help=f"tokens per example; longer prompts lose their start (default {d.max_length})")
    p.add_argument("--heldout", type=float, default=d.heldout,
                   help=f"fraction of examples held out for the before/after loss (default {d.heldout})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    targets = [m.strip() for m in args.target_modules.split(",") if m.strip()]
    if args.steps < 1 or args.grad_accum < 1 or args.rank < 1 or not targets:
        raise FinetuneError("--steps, --grad-accum and --rank must be positive and "
                            "--target-modules non-empty")
    cfg = TrainConfig(rank=args.rank, alpha=args.alpha, dropout=args.dropout, target_modules=targets,
                      steps=args.steps, grad_accum=args.grad_accum, lr=args.lr,
                      max_length=args.max_length, heldout=args.heldout, seed=args.seed,
                      threads=args.threads)
    return finetune(args.model, args.data, args.output, cfg)
