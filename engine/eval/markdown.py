"""report.md: the summary, the charts (as the files beside it) and the per-question trial sheet."""

from __future__ import annotations

from engine.eval.charts import setting_label
from engine.eval.sheet import grouped, judge_text, reply_cell


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip() or "*(empty)*"


def render_markdown(results: dict, charts: list[tuple[str, str]]) -> str:
    """The report: what was run, the per-model summary, the charts, and the trial sheet."""
    trial = results["trial"]
    lines = [
        "# Model trial (`ai-engine eval`)", "",
        f"Target: {', '.join(trial['targets'])}. Started {trial['started']}, {trial['seconds']:.0f} s; "
        f"engine {trial['engine_version']}; max_length {trial['max_length']}; "
        f"cases: {', '.join(c['id'] for c in trial['cases'])}. Machine: {trial['machine']}.", "",
        f"Rule: {trial['rule']}.", "",
        *_summary(results),
        "", "## Charts", "",
        *[f"![{title}]({name})" for name, title in charts],
        "", "## Trial sheet", "",
        "Checks: " + ", ".join(f"{i + 1} {n}" for i, n in enumerate(trial["checks"])), "",
        *_sheet(results),
    ]
    return "\n".join(lines)


def _summary(results: dict) -> list[str]:
    lines = ["## Summary", "",
             "| model | temperature | top_p | mean s | p95 s | mean TTFT s | pass rate | speed | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in results["models"]:
        lines.append(f"| {s['model']} | {s['temperature']:g} | {s['top_p']:g} | {s['mean_s']:.2f} | {s['p95_s']:.2f} "
                     f"| {s['mean_ttft_s']:.2f} | {100 * s['pass_rate']:.0f}% | {s['speed']} | **{s['verdict']}** |")
    lines += ["", "Per case (replies passing / asked, mean s; ✓ meets the rule):", ""]
    for s in results["models"]:
        cases = "; ".join(f"{c['case']} {c['passed']}/{c['asked']} {c['mean_s']:.2f} s "
                          f"{'✓' if c['meets_rule'] else '✗'}" for c in s["cases"])
        failed = ", ".join(f"{k} {v}" for k, v in s["checks_failed"].items() if v) or "none"
        judge = s.get("judge")
        rated = (f" Judge: character {judge['character']}, natural {judge['natural']} ({judge['rated']} rated, "
                 f"{judge['unavailable']} unavailable)." if judge else "")
        errors = f" Errors: {s['errors']}." if s["errors"] else ""
        lines.append(f"- {setting_label(s)}: {cases}. Checks failed: {failed}.{errors}{rated}")
    return lines


def _sheet(results: dict) -> list[str]:
    """One table per model, setting and case: the simulator's trial sheet."""
    names = results["trial"]["checks"]
    judged = bool(results["trial"].get("judge"))
    lines = []
    for (model, temperature, top_p), cases in grouped(results).items():
        for case_id, replies in cases.items():
            head = ["#", "question", "reply", "TTFT s", "total s", *[str(i + 1) for i in range(len(names))], "pass"]
            head += ["judge"] if judged else []
            lines += [f"### {model}, T={temperature:g}, top_p={top_p:g}: {case_id}", "",
                      "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
            for r in replies:
                row = [str(r["question"]), _cell(r["question_text"]), _cell(reply_cell(r)), f"{r['ttft_s']:.2f}",
                       f"{r['total_s']:.2f}", *["✓" if r["checks"][n] else "✗" for n in names],
                       "✓" if r["passed"] else "✗"]
                row += [judge_text(r)] if judged else []
                lines.append("| " + " | ".join(row) + " |")
            lines.append("")
    return lines
