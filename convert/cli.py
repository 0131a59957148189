"""CLI commands of the converter, added to `ai-engine` by engine/cli.py.

Each command sets `func`, which returns an exit status. Failures are `EngineError`s that the
engine's CLI prints as one line (`ai-engine: error: …`, exit status 2). SIGTERM is turned into an
exception while a command runs, so a terminated conversion cleans up its temporary file too.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import signal
import sys
from pathlib import Path
from typing import Iterator

from convert.errors import ConvertError

OUTTYPE_CHOICES = ("f32", "f16", "bf16", "q8_0")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `convert`, `quantize`, `verify`, `convert-lora` and `finetune` (each sets `func`)."""
    from convert.quantize import NEEDS_IMATRIX, QUANT_TYPES

    usable = ", ".join(t for t in QUANT_TYPES if t not in NEEDS_IMATRIX)

    conv = sub.add_parser(
        "convert", help="convert a Hugging Face checkpoint (folder or hub id) to GGUF",
        description="Convert a Hugging Face checkpoint to GGUF, optionally quantize and verify it. "
                    "SRC is a local folder or a hub repo id (org/name), downloaded with "
                    "huggingface-hub (HF_HOME, HF_TOKEN and HF_HUB_OFFLINE apply).")
    conv.add_argument("src", metavar="SRC", help="checkpoint folder or hub repo id")
    conv.add_argument("-o", "--output", required=True, type=Path, metavar="OUT.gguf",
                      help="output GGUF file (written atomically, with .sha256 and .manifest.json)")
    conv.add_argument("--outtype", choices=OUTTYPE_CHOICES, default="f16",
                      help="type of the converted weights (default f16; norms stay f32)")
    conv.add_argument("--quantize", metavar="TYPES", default="",
                      help="also quantize to these comma-separated llama.cpp types (e.g. Q4_K_M,Q8_0); "
                           "each goes to OUT-<type>.gguf (an -f16 suffix in OUT is replaced)")
    conv.add_argument("--verify", action="store_true",
                      help="compare the outputs against the original in transformers (needs torch)")
    conv.add_argument("--revision", help="hub revision (branch, tag or commit)")
    conv.add_argument("--name", help="general.name (default: the model card's or the repo's name)")
    conv.add_argument("--license", help="general.license (default: the model card's)")
    conv.add_argument("--threads", type=int, default=None, help="quantization threads")
    conv.set_defaults(func=_convert_cmd)

    quant = sub.add_parser(
        "quantize", help="quantize a GGUF file with llama.cpp",
        description=f"Quantize a GGUF file with llama.cpp's quantizer. Types: {usable}.")
    quant.add_argument("input", type=Path, metavar="IN.gguf")
    quant.add_argument("output", type=Path, metavar="OUT.gguf")
    quant.add_argument("--type", required=True, metavar="TYPE", help="e.g. Q4_K_M, Q5_K_M, Q8_0")
    quant.add_argument("--threads", type=int, default=None)
    quant.set_defaults(func=_quantize_cmd)

    ver = sub.add_parser(
        "verify", help="compare GGUF files with the original model and each other",
        description="Logit NMSE and top-1 agreement of each GGUF against the Hugging Face model "
                    "in transformers, and KL divergence against a reference GGUF (the first, "
                    "unquantized file). Prints a table and writes FILE.verify.json beside each file.")
    ver.add_argument("files", nargs="+", type=Path, metavar="FILE.gguf")
    ver.add_argument("--hf", metavar="SRC", help="original checkpoint folder or hub id (needs torch)")
    ver.add_argument("--reference", type=Path, metavar="REF.gguf",
                     help="reference for KL (default: the first f32/f16/bf16 file given)")
    ver.add_argument("--json", type=Path, metavar="PATH", help="also write the whole table here")
    ver.set_defaults(func=_verify_cmd)
    _add_lora_commands(sub)


def _add_lora_commands(sub: argparse._SubParsersAction) -> None:
    """Register `convert-lora` and `finetune` (LoRA training needs the `train` extra)."""
    lora = sub.add_parser(
        "convert-lora", help="convert a PEFT LoRA adapter to a GGUF adapter for llama.cpp",
        description="Convert a PEFT LoRA adapter folder (adapter_config.json + "
                    "adapter_model.safetensors) to a GGUF LoRA adapter, with the same tensor names "
                    "and transforms as `ai-engine convert` of BASE. The adapter then applies to "
                    "any conversion or quantization of that base.")
    lora.add_argument("adapter", type=Path, metavar="ADAPTER_DIR", help="PEFT adapter folder")
    lora.add_argument("--base", required=True, type=Path, metavar="BASE_HF_DIR",
                      help="the Hugging Face checkpoint folder the adapter was trained on")
    lora.add_argument("-o", "--output", required=True, type=Path, metavar="ADAPTER.gguf",
                      help="output GGUF adapter (written atomically, with .sha256 and .manifest.json)")
    lora.add_argument("--outtype", choices=OUTTYPE_CHOICES, default="f16",
                      help="type of the adapter matrices (default f16)")
    lora.add_argument("--name", help="general.name (default: the adapter folder's name)")
    lora.set_defaults(func=_convert_lora_cmd)

    from convert.finetune import add_arguments

    tune = sub.add_parser(
        "finetune", help="train a LoRA adapter on prompt/completion pairs or patient cases",
        description="LoRA fine-tuning of a Hugging Face checkpoint on CPU or GPU (needs the train "
                    "extra: pip install .[train]). DATA is a JSONL file of {\"prompt\", \"completion\"} "
                    "lines or a JSON file of patient cases (tests/data/patient_cases.json format: "
                    "every Paciente turn becomes a completion of the transcript before it). Loss "
                    "is computed on completion tokens only. Writes a PEFT adapter folder and "
                    "OUT/finetune_report.json; convert the adapter with `ai-engine convert-lora`.")
    add_arguments(tune)
    tune.set_defaults(func=_finetune_cmd)


@contextlib.contextmanager
def _terminate_as_exception() -> Iterator[None]:
    """Make SIGTERM raise, so `finally`/`except` blocks remove temporary files."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def quantized_name(out: Path, outtype: str, qtype: str) -> Path:
    """OUT-q4_k_m.gguf for OUT.gguf; an outtype suffix (model-f16.gguf) is replaced, not extended."""
    stem = re.sub(rf"[-_.]{re.escape(outtype)}$", "", out.stem, flags=re.I)
    return out.with_name(f"{stem}-{qtype.lower()}.gguf")


def _quiet_gguf_writer() -> None:
    # GGUFWriter logs its file plan at INFO; the converter reports what matters itself.
    logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)


def _convert_cmd(args: argparse.Namespace) -> int:
    _quiet_gguf_writer()
    from convert.hub import resolve_source
    from convert.pipeline import convert
    from convert.quantize import parse_type, quantize

    types = [parse_type(t) for t in args.quantize.split(",") if t.strip()]
    out: Path = args.output
    if out.suffix != ".gguf":
        raise ConvertError(f"the output name must end in .gguf: {out}")
    if args.verify:
        from convert.verify import check_available

        check_available()
    outputs = [out]
    with _terminate_as_exception():
        source = resolve_source(args.src, args.revision)
        result = convert(source, out, args.outtype, name=args.name, license=args.license)
        print(f"{result.path} ({result.manifest['size_bytes'] / 1e6:.1f} MB, {args.outtype}, "
              f"{result.seconds:.1f} s)")
        for qtype in types:
            target = quantized_name(out, args.outtype, qtype)
            manifest = quantize(out, target, qtype, threads=args.threads)
            print(f"{target} ({manifest['size_bytes'] / 1e6:.1f} MB, {qtype})")
            outputs.append(target)
        if args.verify:
            from convert.verify import print_table, verify_files

            report = verify_files(outputs, hf_source=source)
            print_table(report, sys.stdout)
    return 0


def _quantize_cmd(args: argparse.Namespace) -> int:
    from convert.quantize import quantize

    with _terminate_as_exception():
        manifest = quantize(args.input, args.output, args.type, threads=args.threads)
    print(f"{args.output} ({manifest['size_bytes'] / 1e6:.1f} MB, {manifest['type']})")
    return 0


def _verify_cmd(args: argparse.Namespace) -> int:
    from convert.hub import resolve_source
    from convert.verify import print_table, verify_files

    source = resolve_source(args.hf) if args.hf else None
    report = verify_files(args.files, hf_source=source, reference=args.reference, json_path=args.json)
    print_table(report, sys.stdout)
    return 0


def _convert_lora_cmd(args: argparse.Namespace) -> int:
    _quiet_gguf_writer()
    from convert.lora import convert_lora

    if args.output.suffix != ".gguf":
        raise ConvertError(f"the output name must end in .gguf: {args.output}")
    with _terminate_as_exception():
        result = convert_lora(args.adapter, args.base, args.output, args.outtype, name=args.name)
    m = result.manifest
    print(f"{result.path} ({m['size_bytes'] / 1e6:.2f} MB, {args.outtype}, {m['tensors'] // 2} "
          f"LoRA pairs, alpha {m['lora_alpha']:g}, {result.seconds:.1f} s)")
    return 0


def _finetune_cmd(args: argparse.Namespace) -> int:
    from convert.finetune import run_from_args

    with _terminate_as_exception():
        report = run_from_args(args)
    print(f"{report['adapter_dir']}: {report['steps']} steps, held-out loss "
          f"{_fmt_loss(report['heldout_loss_before'])} → {_fmt_loss(report['heldout_loss_after'])} "
          f"({report['seconds']:.0f} s); report in {report['report_path']}")
    return 0


def _fmt_loss(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
