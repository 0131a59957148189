"""`ai-engine` command line: serve (the default), ensure-model, settings, eval, doctor and the converter's commands.

Errors the engine knows about are one line on stderr and exit status 2; no tracebacks.
"""

from __future__ import annotations

import argparse
import logging
import sys

from engine import __version__
from engine.errors import EngineError, SettingsError
from engine.ray_options import RayOptions, ray_flags_without_ray
from engine.ray_options import add_arguments as add_ray_arguments
from engine.settings import Settings

log = logging.getLogger("engine")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ai-engine", description="Local LLM engine: serve GGUF models over HTTP.")
    parser.add_argument("--version", action="version", version=f"ai-engine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="load the model and serve the HTTP API (default)",
                           description="Load the model and serve the HTTP API. Every flag can also be "
                                       "set by the environment variable shown.")
    Settings.add_arguments(serve)
    add_ray_arguments(serve)

    ensure = sub.add_parser("ensure-model", help="put the embedded default model into MODEL_PATH and print its path")
    ensure.add_argument("--model-path", dest="model_path", default=None, metavar="MODEL_PATH",
                        help="folder to put it in (env MODEL_PATH)")

    pull = sub.add_parser("pull", help="download a GGUF from the Hugging Face hub into MODEL_PATH",
                          description="Download a GGUF from the Hugging Face hub (through huggingface-hub: HF_TOKEN "
                                      "and HF_ENDPOINT apply) into MODEL_PATH/hf.co/ORG/REPO/, resumed after a cut "
                                      "connection, checked against the hub's sha256, placed atomically. It is then "
                                      "served as hf.co/ORG/REPO:QUANT.")
    pull.add_argument("name", metavar="NAME", help="hf.co/ORG/REPO[:QUANT] (or huggingface.co/..., or ORG/REPO)")
    pull.add_argument("--quant", default=None, help="the quant tag of the GGUF to take (e.g. Q4_K_M; default: Q4_K_M "
                                                    "when the repo has it, else its only GGUF)")
    pull.add_argument("--model-path", dest="model_path", default=None, metavar="MODEL_PATH",
                      help="folder of GGUF models (env MODEL_PATH)")

    sub.add_parser("settings", help="print the configuration table (Markdown, as in docs/configuration.md)")

    # Converter commands (convert, quantize, verify) live in the convert package; each sets
    # `func`, called with the parsed args and returning an exit status. This module is the
    # command's composition root: the one place in engine that imports convert, and only
    # `python -m engine` imports it (tests/test_import_graph.py).
    from convert.cli import add_commands
    from engine.doctor import add_command as add_doctor
    from engine.eval.command import add_command as add_eval

    add_commands(sub)
    add_doctor(sub)
    add_eval(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["serve", *argv]
    args = parser.parse_args(argv)
    try:
        if args.command == "serve" and args.ray:
            from engine.ray_serve import serve_ray  # Ray is an optional extra: imported only here

            return serve_ray(Settings.load(args=args), RayOptions.from_args(args))
        if args.command == "serve":
            if ray_flags_without_ray(args):
                raise SettingsError(f"{', '.join(ray_flags_without_ray(args))} need --ray")
            from engine.server import serve

            return serve(Settings.load(args=args))
        if args.command == "ensure-model":
            _configure_logging("INFO")
            from engine.default_model import ensure_default_model

            print(ensure_default_model(Settings.load(args=args).model_path.resolve()))
            return 0
        if args.command == "pull":
            _configure_logging("WARNING")
            return _pull(args)
        if args.command == "settings":
            print(Settings.markdown_table())
            return 0
        if getattr(args, "func", None) is not None:
            _configure_logging("INFO")
            return args.func(args)
    except EngineError as exc:
        print(f"ai-engine: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    parser.print_help()
    return 2


def _configure_logging(level: str) -> None:
    """Plain text logs for the one-shot commands (the server configures its own)."""
    from engine.logs import configure_logging

    configure_logging(level, "text")


def _pull(args: argparse.Namespace) -> int:
    """`ai-engine pull`: the status lines as Ollama's CLI shows them, a progress bar for the download."""
    from tqdm import tqdm

    from engine.hub_names import parse_ref
    from engine.hub_pull import Pull, plan

    ref = parse_ref(args.name, args.quant, field="NAME")
    model_dir = Settings.load(args=args).model_path.expanduser().resolve()
    bar = None

    def show(event: dict) -> None:
        nonlocal bar
        if "completed" in event:
            if bar is None:
                bar = tqdm(total=event["total"], initial=event["completed"], unit="B", unit_scale=True,
                           unit_divisor=1024, desc=event["status"], file=sys.stderr)
            bar.update(event["completed"] - bar.n)
            return
        if bar is not None:
            bar.close()
            bar = None
        print(event["status"], file=sys.stderr)

    try:
        target = Pull(plan(ref), model_dir).run(show)
    finally:
        if bar is not None:
            bar.close()
    print(target)
    return 0
