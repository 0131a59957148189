#!/usr/bin/env python3
"""The cost of structured output per token: decoding held to a grammar beside free decoding, on
the default model, side by side in one run (#20).

The engine's own generation core (LlamaRuntime + Scheduler, as a server runs it, without HTTP)
decodes the same prompt, round after round, with the runners interleaved:
  free        no grammar (the simulator's sampling: temperature 0.7, top_p 0.9, top_k 40, seed 7);
  json        the same, held to `format: "json"` (llama.cpp's json.gbnf);
  schema      the same, held to a JSON schema (nested object, array, enum);
  schema, grammar first   the schema again with the grammar applied to the whole row before each
              token (what llama-cpp-python's own sampler does), instead of checking the token the
              chain picked and resampling only when the grammar refuses it (the engine's way);
and the same runners with 4 sequences at once in the batch (aggregate tokens/s).
Reported: decode tokens/s per runner (median of the rounds), its ratio to free decoding, and the
share of tokens the grammar refused at first (each costs a pass over the 262k-token vocabulary).
A held reply ends when its JSON does: tokens/s is per generated token.

    .venv/bin/python scripts/bench_grammar.py [--rounds 5] [--tokens 96] [--note "..."]

Writes bench/results/grammar.md and grammar.json. Run it on a quiet machine (2 threads: any other
busy process slows llama.cpp's decoding many times over); compare ratios within one run only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ai_engine_common.machine import physical_cores, read_cpu_info  # noqa: E402
from engine import grammar  # noqa: E402
from engine.default_model import ensure_default_model  # noqa: E402
from engine.generation import ReplyText, SamplingParams, StopRules  # noqa: E402
from engine.grammar import GrammarSampler, structured_output  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PROMPT = ("Evaluación de una entrevista clínica de práctica.\nEstudiante: ¿Cómo ha dormido esta semana?\n"
          "Paciente: Casi nada, me despierto a las cuatro.\nEstudiante: Eso suena agotador.\n\n"
          "Devuelve la evaluación del estudiante como JSON.\nJSON: ")
SCHEMA = {"type": "object", "properties": {
    "student": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                                 "level": {"enum": ["inicial", "intermedio", "avanzado"]}},
                "required": ["name", "level"]},
    "strengths": {"type": "array", "items": {"type": "string", "maxLength": 80}, "maxItems": 4},
    "risk": {"enum": ["bajo", "medio", "alto"]}, "summary": {"type": "string", "maxLength": 200}},
    "required": ["student", "strengths", "risk", "summary"]}
RUNNERS = ("free", "json", "schema", "schema, grammar first")


def engine(model: Path, threads: int, n_parallel: int):
    import llama_cpp as L

    from engine.runtime import LlamaRuntime
    from engine.scheduler import Scheduler

    runtime = LlamaRuntime(model, n_ctx=1024, n_parallel=n_parallel, n_batch=512, n_threads=threads,
                           n_threads_batch=threads, n_gpu_layers=0, flash_attn="off", kv_type=L.GGML_TYPE_F16)
    return Scheduler(runtime, cache_bytes=0, max_queue=16)


def run(eng, params: SamplingParams, n: int) -> tuple[float, int, int, int]:
    """`n` sequences of `params` at once: (aggregate decode tokens/s, tokens generated, tokens sampled
    under the grammar (the end of generation too), tokens resampled)."""
    before = (grammar.stats.tokens, grammar.stats.resampled)
    tokens = eng.tokenize(PROMPT)
    started = time.perf_counter()
    seqs = [eng.submit(tokens, params, ReplyText(StopRules(), clean=lambda t: t), started, started + 3600)
            for _ in range(n)]
    results = [s.wait() for s in seqs]
    first = min(started + r.ttft_s for r in results)
    last = max(started + r.ttft_s + r.decode_s for r in results)
    generated = sum(r.tokens for r in results)
    rate = (generated - n) / (last - first) if last > first else 0.0
    return rate, generated, grammar.stats.tokens - before[0], grammar.stats.resampled - before[1]


def measure(model: Path, threads: int, rounds: int, max_tokens: int, n: int) -> dict:
    free = SamplingParams(max_tokens=max_tokens, seed=7)
    held = {"json": structured_output("json", "format").grammar, "schema": structured_output(SCHEMA, "format").grammar}
    eng = engine(model, threads, n)
    rows: dict[str, dict[str, list]] = {r: {"rate": [], "tokens": [], "sampled": [], "resampled": []}
                                        for r in RUNNERS}
    try:
        run(eng, free, n)  # warm-up
        for i in range(rounds):
            for name in RUNNERS:
                g = None if name == "free" else held["json" if name == "json" else "schema"]
                GrammarSampler.check_first = name != "schema, grammar first"
                params = SamplingParams(max_tokens=max_tokens, seed=7 + i, grammar=g)
                rate, generated, sampled, resampled = run(eng, params, n)
                for key, value in (("rate", rate), ("tokens", generated), ("sampled", sampled),
                                   ("resampled", resampled)):
                    rows[name][key].append(value)
                print(f"  {n} at once, round {i + 1}: {name}: {rate:.1f} tokens/s ({generated} tokens, "
                      f"{resampled} resampled)", flush=True)
    finally:
        GrammarSampler.check_first = True
        eng.close()
    return rows


def table(rows: dict, n: int) -> list[str]:
    free = statistics.median(rows["free"]["rate"])
    lines = ["| runner | sequences | decode tokens/s (median) | ratio to free | tokens | refused at first |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        rate = statistics.median(r["rate"])
        tokens = sum(r["tokens"])
        sampled = sum(r["sampled"])
        share = f"{sum(r['resampled']) / sampled:.1%}" if name != "free" and sampled else "–"
        if name == "schema, grammar first":
            share = "every token"
        lines.append(f"| {name} | {n} | {rate:.1f} | **{rate / free:.3f}** | {tokens} | {share} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=96, help="new tokens at most per reply")
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--parallel", type=int, default=4, help="sequences at once in the batched runs")
    parser.add_argument("--note", default="", help="a line on the conditions (e.g. a shared machine)")
    args = parser.parse_args()
    model = ensure_default_model(ROOT / "models")
    results = {}
    for n in (1, args.parallel):
        print(f"{n} sequence(s) at once:", flush=True)
        results[n] = measure(model, args.threads, args.rounds, args.tokens, n)
    cpu = read_cpu_info()
    header = (f"Measured {date.today()} on {cpu.model}, {args.threads} threads; model {model.name}. "
              f"{args.rounds} rounds, runners interleaved in each, up to {args.tokens} new tokens, the simulator's "
              "sampling (temperature 0.7, top_p 0.9, top_k 40, min_p 0.05, repeat penalty 1.1, seed 7 + round). "
              "A held reply ends when its JSON does: rates are per generated token. `refused at first`: tokens "
              "the chain picked that the grammar refused, each resampled with the grammar over the whole row.")
    lines = ["# Structured output: the grammar's cost per token", "", header, ""]
    if args.note:
        lines += [f"**Conditions:** {args.note}", ""]
    for n, rows in results.items():
        lines += table(rows, n) + [""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "grammar.md").write_text("\n".join(lines), encoding="utf-8")
    (RESULTS / "grammar.json").write_text(json.dumps({"date": str(date.today()), "threads": args.threads,
                                                      "rounds": args.rounds, "tokens": args.tokens,
                                                      "note": args.note, "results": results}, indent=1),
                                          encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
