"""`ai-engine eval CASE.json... [--url ENGINE_URL] [--model NAME]... [--temperature T[,T...]]
[--top-p P[,P...]] [--out DIR]`: the simulator's model trial (docs/eval.md)."""

from __future__ import annotations

import argparse
import logging
import sys

from engine.errors import EngineError

DEFAULT_OUT = "eval-report"


def add_command(sub: argparse._SubParsersAction) -> None:
    """Register `ai-engine eval` on the CLI's subparsers; it sets `args.func = run`."""
    parser = sub.add_parser(
        "eval", help="try a model before adopting it: the simulator's interview trial, checked and timed",
        description="Ask every case's questions one by one, as the simulator's backend does, against each model and "
                    "sampling setting; check and time every reply, and apply the simulator's rule (adopt when 5 of 6 "
                    "replies pass and the mean reply time is under 5 s). Writes results.json, report.md and "
                    "report.html with charts into --out. Case file format: docs/eval.md.")
    parser.add_argument("cases", nargs="+", metavar="CASE.json", help="case files (examples/eval/*.json)")
    parser.add_argument("--url", default=None, metavar="ENGINE_URL",
                        help="a server with the simulator's /generate contract (ENGINE_API_KEY, when set, is sent); "
                             "default: this engine started in process (MODEL_PATH and the other settings from the "
                             "environment)")
    parser.add_argument("--model", dest="models", action="append", default=[], metavar="NAME",
                        help="a model to try (repeat to compare): a file under MODEL_PATH, a preset or an alias; with "
                             "--url it is sent as /generate's `model`. Default: the target's default model")
    parser.add_argument("--temperature", type=_numbers("--temperature", 0.0, 2.0), default=[0.7], metavar="T[,T...]",
                        help="temperatures to try (default 0.7, the simulator's)")
    parser.add_argument("--top-p", dest="top_p", type=_numbers("--top-p", 0.0, 1.0, open_low=True), default=[0.9],
                        metavar="P[,P...]", help="top_p values to try (default 0.9, the simulator's)")
    parser.add_argument("--max-length", dest="max_length", type=int, default=150, metavar="N",
                        help="new tokens per reply at most (default 150, the simulator's max_length)")
    parser.add_argument("--judge", default=None, metavar="MODEL",
                        help="also ask this model (served by the target, through Ollama's /api/chat with a JSON "
                             "schema) to rate each reply's character consistency and naturalness")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"output folder (default {DEFAULT_OUT})")
    parser.set_defaults(func=run)


def _numbers(flag: str, low: float, high: float, *, open_low: bool = False):
    """An argparse type: comma-separated numbers within [low, high] ((low, high] with open_low)."""
    def parse(text: str) -> list[float]:
        try:
            values = [float(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes comma-separated numbers, not '{text}'") from None
        if not values or any(v < low or v > high or (open_low and v == low) for v in values):
            bounds = f"{'(' if open_low else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"{flag} values must lie in {bounds}, got '{text}'")
        return list(dict.fromkeys(values))
    return parse


def run(args: argparse.Namespace) -> int:
    """Run the trial and write the report. Exit status 0 when every question was answered
    (whatever the verdicts), 1 when the server failed some (they are in the report as errors)."""
    from engine.eval.cases import load_cases
    from engine.eval.charts import require_matplotlib
    from engine.eval.report import write_report
    from engine.eval.run import Trial, run_trial
    from engine.logs import configure_logging

    configure_logging("WARNING", "text")  # the progress bar owns stderr; warnings still show
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's load-time chatter
    if args.max_length < 1:
        raise EngineError("--max-length must be at least 1")
    require_matplotlib()
    cases = load_cases(args.cases)
    trial = Trial(tuple(cases), url=args.url, models=tuple(dict.fromkeys(args.models)),
                  temperatures=tuple(args.temperature), top_ps=tuple(args.top_p), max_length=args.max_length,
                  judge=args.judge)
    total = trial.replies_per_model * max(1, len(trial.models))
    print(f"ai-engine eval: {len(cases)} case(s), {len(trial.settings)} setting(s), "
          f"{max(1, len(trial.models))} model(s): {total} replies", file=sys.stderr, flush=True)
    results = run_trial(trial)
    written = write_report(results, args.out)
    for s in results["models"]:
        print(f"{s['model']} temperature={s['temperature']:g} top_p={s['top_p']:g}: pass rate "
              f"{100 * s['pass_rate']:.0f}%, mean {s['mean_s']:.2f} s, p95 {s['p95_s']:.2f} s -> {s['verdict']}")
    print(f"report: {', '.join(str(p) for p in written if p.suffix != '.png')}")
    errors = [r for r in results["replies"] if "error" in r]
    if errors:
        print(f"ai-engine eval: {len(errors)} of {len(results['replies'])} questions got no reply (first: "
              f"{errors[0]['error']}); they count as failed replies", file=sys.stderr)
        return 1
    return 0
