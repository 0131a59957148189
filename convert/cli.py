"""CLI commands of the converter, added to `ai-engine` by engine/cli.py."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `convert`, `quantize` and `verify` (each sets `func`, returning an exit status)."""
