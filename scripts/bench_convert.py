#!/usr/bin/env python3
"""Benchmark the converter on a real 268M-parameter checkpoint: wall time and peak RSS.

The checkpoint is Gemma 3 270M as a Hugging Face safetensors folder (float32, 1.07 GB), made
offline from the embedded GGUF by transformers' GGUF loader and cached (convert/reference_checkpoint.py).
Each run is a fresh `python -m engine convert … --outtype f16` process, measured with wait4(), so
the numbers include interpreter start-up and imports, as a user would see them. The quantization
to Q4_K_M (llama_model_quantize) is timed the same way.

    .venv/bin/python scripts/bench_convert.py [--runs 3] [--json out.json]

Reference on this project's 2-core machine (DESIGN.md): llama.cpp's convert_hf_to_gguf.py takes
12 s and 1.67 GB peak RSS on the same checkpoint; quantizing to Q4_K_M takes 3 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

REFERENCE = {"convert_f16": {"wall_s": 12.0, "peak_rss_mb": 1670.0}, "quantize_q4_k_m": {"wall_s": 3.0}}


def measure(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one child process."""
    # stderr goes to a file: a pipe nobody reads while we wait would block a chatty child.
    with tempfile.TemporaryFile() as log:
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            log.seek(0)
            raise SystemExit(f"{' '.join(cmd)} failed:\n{log.read().decode(errors='replace')[-2000:]}")
    return wall, usage.ru_maxrss / 1024  # Linux reports KiB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="conversions to time (median reported)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    from convert.reference_checkpoint import cached_checkpoint_from_gguf
    from engine.default_model import ensure_default_model

    print("preparing the Gemma 3 270M checkpoint (cached after the first run)…", file=sys.stderr)
    ckpt = cached_checkpoint_from_gguf(ensure_default_model(ROOT / "models"))
    size = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    py = sys.executable
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        out = Path(tmp) / "gemma-3-270m-f16.gguf"
        runs = [measure([py, "-m", "engine", "convert", str(ckpt), "-o", str(out), "--outtype", "f16"])
                for _ in range(args.runs)]
        results["convert_f16"] = {"wall_s": statistics.median(w for w, _ in runs),
                                  "peak_rss_mb": max(r for _, r in runs)}
        q = [measure([py, "-m", "engine", "quantize", str(out), str(Path(tmp) / "q4.gguf"), "--type", "Q4_K_M"])
             for _ in range(args.runs)]
        results["quantize_q4_k_m"] = {"wall_s": statistics.median(w for w, _ in q),
                                      "peak_rss_mb": max(r for _, r in q)}

    print(f"\ncheckpoint: {ckpt} ({size / 1e9:.2f} GB safetensors, float32); {args.runs} runs, median time, max RSS\n")
    print("| step | ai-engine | llama.cpp reference | ratio |")
    print("|---|---|---|---|")
    conv, ref = results["convert_f16"], REFERENCE["convert_f16"]
    print(f"| convert to f16, wall time | {conv['wall_s']:.1f} s | {ref['wall_s']:.0f} s | "
          f"{conv['wall_s'] / ref['wall_s']:.2f} |")
    print(f"| convert to f16, peak RSS | {conv['peak_rss_mb']:.0f} MB | {ref['peak_rss_mb']:.0f} MB | "
          f"{conv['peak_rss_mb'] / ref['peak_rss_mb']:.2f} |")
    qt = results["quantize_q4_k_m"]
    print(f"| quantize f16 → Q4_K_M, wall time | {qt['wall_s']:.1f} s | "
          f"{REFERENCE['quantize_q4_k_m']['wall_s']:.0f} s | {qt['wall_s'] / REFERENCE['quantize_q4_k_m']['wall_s']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": str(ckpt), "results": results, "reference": REFERENCE},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
