"""report.md: the summary, the charts (as the files beside it) and the per-question trial sheet."""

from __future__ import annotations

from engine.eval.charts import setting_label
from engine.eval.sheet import grouped, judge_text


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip() or "*(empty)*"


def render_markdown(results: dict, charts: list[tuple[str, str]]) -> str:
    trial = results["trial"]
    check_names = trial["checks"]
    lines = [
        "# Model trial (`ai-engine eval`)", "",
        f"Target: {', '.join(trial['targets'])}. Started {trial['started']}, {trial['seconds']:.0f} s; "
        f"engine {trial['engine_version']}; max_length {trial['max_length']}; "
        f"cases: {', '.join(c['id'] for c in trial['cases'])}.", "",
        f"Rule: {trial['rule']}.", "",
        "## Summary", "",
        "| model | temperature | top_p | mean s | p95 s | mean TTFT s | pass rate | speed | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in results["models"]:
        lines.append(f"| {s['model']} | {s['temperature']:g} | {s['top_p']:g} | {s['mean_s']:.2f} | {s['p95_s']:.2f} "
                     f"| {s['mean_ttft_s']:.2f} | {100 * s['pass_rate']:.0f}% | {s['speed']} | **{s['verdict']}** |")
    lines += ["", "Per case (replies passing / asked, mean s; ✓ meets the rule):", ""]
    for s in results["models"]:
        cases = "; ".join(f"{c['case']} {c['passed']}/{c['asked']} {c['mean_s']:.2f} s {'✓' if c['meets_rule'] else '✗'}"
                          for c in s["cases"])
        failed = ", ".join(f"{k} {v}" for k, v in s["checks_failed"].items() if v) or "none"
        lines.append(f"- {setting_label(s)}: {cases}. Checks failed: {failed}.")
    lines += ["", "## Charts", ""]
    lines += [f"![{title}]({name})" for name, title in charts]
    lines += ["", "## Trial sheet", "", "Checks: " + ", ".join(f"{i + 1} {n}" for i, n in enumerate(check_names)), ""]
    judged = trial.get("judge")
    for (model, temperature, top_p), cases in grouped(results).items():
        for case_id, replies in cases.items():
            lines += [f"### {model}, T={temperature:g}, top_p={top_p:g}: {case_id}", "",
                      "| # | question | reply | TTFT s | total s | " + " | ".join(str(i + 1) for i in range(len(check_names)))
                      + " | pass |" + (" judge |" if judged else ""),
                      "|---" * (5 + len(check_names) + 1 + bool(judged)) + "|"]
            for r in replies:
                marks = " | ".join("✓" if r["checks"][n] else "✗" for n in check_names)
                lines.append(f"| {r['question']} | {_cell(r['question_text'])} | {_cell(r['text'])} | {r['ttft_s']:.2f} "
                             f"| {r['total_s']:.2f} | {marks} | {'✓' if r['passed'] else '✗'} |"
                             + (f" {judge_text(r)} |" if judged else ""))
            lines.append("")
    return "\n".join(lines)
