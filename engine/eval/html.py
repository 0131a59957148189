"""report.html: the trial report as one self-contained page (charts embedded as PNG data URLs),
so it can be mailed or opened from a folder without its chart files."""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path

from engine.eval.sheet import grouped, judge_text, reply_cell

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1150px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 6px; vertical-align: top; }
th { background: #f0f0f0; }
td.ok { color: #176f2c; text-align: center; } td.bad { color: #b00020; text-align: center; font-weight: bold; }
.adopt { color: #176f2c; font-weight: bold; } .reject { color: #b00020; font-weight: bold; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
td.reply { max-width: 420px; }
"""


def _mark(ok: bool) -> str:
    return '<td class="ok">✓</td>' if ok else '<td class="bad">✗</td>'


def _summary(results: dict) -> list[str]:
    rows = ["<table><tr><th>model</th><th>temperature</th><th>top_p</th><th>mean s</th><th>p95 s</th>"
            "<th>mean TTFT s</th><th>pass rate</th><th>speed</th><th>per case (passed/asked, mean s)</th>"
            "<th>verdict</th></tr>"]
    for s in results["models"]:
        cases = "<br>".join(f"{escape(c['case'])}: {c['passed']}/{c['asked']}, {c['mean_s']:.2f} s "
                            f"{'✓' if c['meets_rule'] else '✗'}" for c in s["cases"])
        rows.append(f"<tr><td>{escape(s['model'])}</td><td>{s['temperature']:g}</td><td>{s['top_p']:g}</td>"
                    f"<td>{s['mean_s']:.2f}</td><td>{s['p95_s']:.2f}</td><td>{s['mean_ttft_s']:.2f}</td>"
                    f"<td>{100 * s['pass_rate']:.0f}%</td><td>{escape(s['speed'])}</td><td>{cases}</td>"
                    f"<td class=\"{s['verdict']}\">{s['verdict']}</td></tr>")
    rows.append("</table>")
    return rows


def _sheet(results: dict) -> list[str]:
    names = results["trial"]["checks"]
    judged = bool(results["trial"].get("judge"))
    out = []
    for (model, temperature, top_p), cases in grouped(results).items():
        for case_id, replies in cases.items():
            out.append(f"<h3>{escape(model)}, T={temperature:g}, top_p={top_p:g}: {escape(case_id)}</h3>")
            out.append("<table><tr><th>#</th><th>question</th><th>reply</th><th>TTFT s</th><th>total s</th>"
                       + "".join(f"<th>{escape(n)}</th>" for n in names) + "<th>pass</th>"
                       + ("<th>judge</th>" if judged else "") + "</tr>")
            for r in replies:
                out.append(f"<tr><td>{r['question']}</td><td>{escape(r['question_text'])}</td>"
                           f"<td class=\"reply\">{escape(reply_cell(r)) or '<em>(empty)</em>'}</td>"
                           f"<td>{r['ttft_s']:.2f}</td><td>{r['total_s']:.2f}</td>"
                           + "".join(_mark(r["checks"][n]) for n in names) + _mark(r["passed"])
                           + (f"<td>{escape(judge_text(r))}</td>" if judged else "") + "</tr>")
            out.append("</table>")
    return out


def render_html(results: dict, charts: list[tuple[str, str]], folder: Path) -> str:
    """The page; `folder` holds the chart files named in `charts`."""
    trial = results["trial"]
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        "<title>Model trial (ai-engine eval)</title>", f"<style>{STYLE}</style></head><body>",
        "<h1>Model trial (<code>ai-engine eval</code>)</h1>",
        f"<p>Target: {escape(', '.join(trial['targets']))}. Started {escape(trial['started'])}, "
        f"{trial['seconds']:.0f} s; engine {escape(trial['engine_version'])}; max_length {trial['max_length']}; "
        f"cases: {escape(', '.join(c['id'] for c in trial['cases']))}. Machine: {escape(trial['machine'])}.</p>",
        f"<p>Rule: {escape(trial['rule'])}.</p>", "<h2>Summary</h2>", *_summary(results), "<h2>Charts</h2>",
    ]
    for name, title in charts:
        data = base64.b64encode((folder / name).read_bytes()).decode("ascii")
        parts.append(f'<figure><img alt="{escape(title)}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{escape(title)}</figcaption></figure>")
    parts += ["<h2>Trial sheet</h2>", *_sheet(results), "</body></html>"]
    return "\n".join(parts) + "\n"
