"""The trial's output folder: results.json, report.md, report.html and the chart files.

Everything is written into a temporary folder beside the outputs first and moved into place at
the end, so a failure leaves the previous report (or nothing), never half of a new one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from engine.eval.charts import draw_charts
from engine.eval.html import render_html
from engine.eval.markdown import render_markdown

OUTPUTS = ("results.json", "report.md", "report.html")


def write_report(results: dict, out_dir: str | Path) -> list[Path]:
    """Write the outputs into `out_dir` (created if needed); the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".eval-", dir=out))
    try:
        charts = draw_charts(results, staging)
        (staging / "results.json").write_text(json.dumps(results, ensure_ascii=False, indent=1) + "\n",
                                              encoding="utf-8")
        (staging / "report.md").write_text(render_markdown(results, charts), encoding="utf-8")
        (staging / "report.html").write_text(render_html(results, charts, staging), encoding="utf-8")
        written = []
        for name in [c[0] for c in charts] + list(OUTPUTS):
            os.replace(staging / name, out / name)
            written.append(out / name)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)
