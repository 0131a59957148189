"""The trial's charts, drawn with matplotlib (the `eval` extra) into PNG files.

- time per question: the mean reply time at each question number, one line per model and
  setting, with the guide's 2 s / 3 s / 5 s marks;
- pass rate per setting: one bar each, green when the verdict is adopt;
- the temperature × top_p grid (when several of either are given): pass rate per cell, with its
  mean reply time, one grid per model.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from engine.errors import EngineError
from engine.eval.verdict import EXCELLENT_MEAN_S, MAX_MEAN_S, PASS_DENOMINATOR, PASS_NUMERATOR, TARGET_MEAN_S

DPI = 80


def require_matplotlib() -> None:
    """Refuse early (before any question is asked) when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise EngineError("ai-engine eval draws its charts with matplotlib, which is not installed: "
                          "in this repository .venv/bin/pip install -e '.[eval]' "
                          "(elsewhere pip install matplotlib)") from exc


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def setting_label(summary: dict) -> str:
    return f"{summary['model']} T={summary['temperature']:g} top_p={summary['top_p']:g}"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def draw_charts(results: dict, folder: Path) -> list[tuple[str, str]]:
    """Draw every chart into `folder`; [(file name, title)] in the report's order."""
    plt = _pyplot()
    charts = [("time_per_question.png", "Reply time per question"), ("pass_rate.png", "Pass rate per setting")]
    _time_per_question(plt, results, folder / charts[0][0])
    _pass_rates(plt, results, folder / charts[1][0])
    trial = results["trial"]
    if len(trial["temperatures"]) > 1 or len(trial["top_ps"]) > 1:
        for model in dict.fromkeys(s["model"] for s in results["models"]):
            name = f"grid_{slug(model)}.png"
            _grid(plt, results, model, folder / name)
            charts.append((name, f"Temperature × top_p: {model}"))
    return charts


def _time_per_question(plt, results: dict, path: Path) -> None:
    times: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))  # setting → question → s
    for r in results["replies"]:
        times[setting_label(r)][r["question"]].append(r["total_s"])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, per_question in times.items():
        xs = sorted(per_question)
        ax.plot(xs, [sum(per_question[x]) / len(per_question[x]) for x in xs], marker="o", label=label)
    for limit, name, colour in ((EXCELLENT_MEAN_S, "excellent", "tab:green"), (TARGET_MEAN_S, "target", "tab:olive"),
                                (MAX_MEAN_S, "limit", "tab:red")):
        ax.axhline(limit, linestyle="--", linewidth=1, color=colour)
        ax.annotate(f"{name} {limit:g} s", (1, limit), xycoords=("axes fraction", "data"), ha="right",
                    va="bottom", fontsize=8, color=colour)
    ax.set_xticks(sorted({r["question"] for r in results["replies"]}))
    ax.set_xlabel("question (mean over the cases)")
    ax.set_ylabel("reply time (s)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, loc="upper left")
    _save(plt, fig, path)


def _pass_rates(plt, results: dict, path: Path) -> None:
    summaries = results["models"]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(summaries) + 1.5))
    labels = [setting_label(s) for s in summaries]
    colours = ["tab:green" if s["verdict"] == "adopt" else "tab:red" for s in summaries]
    ax.barh(labels, [100 * s["pass_rate"] for s in summaries], color=colours)
    ax.axvline(100 * PASS_NUMERATOR / PASS_DENOMINATOR, linestyle="--", color="black", linewidth=1)
    ax.set_xlim(0, 100)
    ax.set_xlabel("replies that pass every check (%); dashed: 5 of 6")
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    _save(plt, fig, path)


def _grid(plt, results: dict, model: str, path: Path) -> None:
    temps, top_ps = results["trial"]["temperatures"], results["trial"]["top_ps"]
    cells = {(s["temperature"], s["top_p"]): s for s in results["models"] if s["model"] == model}
    values = [[100 * cells[(t, p)]["pass_rate"] if (t, p) in cells else float("nan") for p in top_ps] for t in temps]
    fig, ax = plt.subplots(figsize=(1.6 * len(top_ps) + 2.5, 0.9 * len(temps) + 1.6))
    image = ax.imshow(values, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    for i, t in enumerate(temps):
        for j, p in enumerate(top_ps):
            if (t, p) in cells:
                s = cells[(t, p)]
                ax.text(j, i, f"{100 * s['pass_rate']:.0f}%\n{s['mean_s']:.1f} s\n{s['verdict']}", ha="center",
                        va="center", fontsize=8)
    ax.set_xticks(range(len(top_ps)), [f"{p:g}" for p in top_ps])
    ax.set_yticks(range(len(temps)), [f"{t:g}" for t in temps])
    ax.set_xlabel("top_p")
    ax.set_ylabel("temperature")
    ax.set_title(f"{model}: pass rate, mean reply time", fontsize=9)
    fig.colorbar(image, ax=ax, label="pass rate (%)")
    _save(plt, fig, path)


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
