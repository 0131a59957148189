"""The whole trial: every case's interview on each model at each sampling setting, with a
progress bar on stderr, gathered into the results (results.json's content)."""

from __future__ import annotations

import datetime as dt
import itertools
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from ai_engine_common.machine import read_cpu_info
from engine import __version__
from engine.eval.cases import Case
from engine.eval.checks import CHECKS
from engine.eval.interview import Setting, run_interview
from engine.eval.targets import EngineTarget, UrlTarget
from engine.eval.verdict import RULE, summarize_all


@dataclass(frozen=True)
class Trial:
    """What `ai-engine eval` was asked: the cases, the target (`url`, or this engine in process
    when None), the models (empty: the target's default), and the sampling grid."""

    cases: tuple[Case, ...]
    url: str | None = None
    models: tuple[str, ...] = ()
    temperatures: tuple[float, ...] = (0.7,)
    top_ps: tuple[float, ...] = (0.9,)
    max_length: int = 150
    judge: str | None = None
    settings: tuple[tuple[float, float], ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "settings", tuple(itertools.product(self.temperatures, self.top_ps)))

    @property
    def replies_per_model(self) -> int:
        return len(self.settings) * sum(len(c.questions) for c in self.cases)


class Progress:
    """A progress bar on stderr: redrawn in place on a terminal, one line per reply otherwise."""

    WIDTH = 30

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total, self.done = total, 0
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.started = time.monotonic()

    def update(self, record: dict) -> None:
        self.done += 1
        filled = self.WIDTH * self.done // max(1, self.total)
        elapsed = time.monotonic() - self.started
        left = elapsed / self.done * (self.total - self.done)
        line = (f"eval [{'#' * filled}{'.' * (self.WIDTH - filled)}] {self.done}/{self.total} "
                f"{record['model']} T={record['temperature']:g} top_p={record['top_p']:g} {record['case']} "
                f"q{record['question']}: {record['total_s']:.1f} s {_outcome(record)} "
                f"(about {left / 60:.0f} min left)")
        if self.tty:
            self.stream.write("\r\x1b[K" + line + ("\n" if self.done == self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _outcome(record: dict) -> str:
    if "error" in record:
        return f"ERROR ({record['error'][:80]})"
    return "pass" if record["passed"] else "FAIL"


def run_trial(trial: Trial, progress: Progress | None = None) -> dict:
    """Run the trial; the results: `trial` (what was asked), `replies` and `models` (summaries)."""
    models: list[str | None] = list(trial.models) or [None]
    progress = progress or Progress(trial.replies_per_model * len(models))
    started = dt.datetime.now(dt.timezone.utc)
    replies: list[dict] = []
    targets_seen = []
    for model in models:
        target = UrlTarget(trial.url) if trial.url else EngineTarget(model)
        try:
            targets_seen.append(target.describe())
            label = model if trial.url else target.model_name
            body_model = model if trial.url else None  # in process, the model is the target's default
            for temperature, top_p in trial.settings:
                setting = Setting(body_model, temperature, top_p, trial.max_length)
                for case in trial.cases:
                    replies += run_interview(target, case, setting, model_label=label, judge=trial.judge,
                                             on_reply=progress.update)
        finally:
            target.close()
    return {
        "trial": {
            "engine_version": __version__, "started": started.isoformat(timespec="seconds"),
            "seconds": round((dt.datetime.now(dt.timezone.utc) - started).total_seconds(), 1),
            "target": trial.url or "in process", "targets": targets_seen,
            "machine": f"{read_cpu_info().model}, {read_cpu_info().logical} logical CPUs (where eval ran)",
            "cases": [{"id": c.id, "language": c.language, "questions": list(c.questions)} for c in trial.cases],
            "temperatures": list(trial.temperatures), "top_ps": list(trial.top_ps), "max_length": trial.max_length,
            "judge": trial.judge, "checks": list(CHECKS), "rule": RULE,
        },
        "replies": replies,
        "models": summarize_all(replies),
    }
