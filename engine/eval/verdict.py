"""The simulator's adoption rule, and the summary of one model at one sampling setting.

The simulator's guide: for each case, six questions asked one by one; adopt when 5 of 6 replies
pass and the mean reply time is under 5 s (3 s is the target, 2 s excellent). The rule is applied
to each case's interview, as the guide words it: every case must have at least 5/6 of its replies
passing (5 of 6 for six questions) and a mean reply time under 5 s; the model at that setting is
adopted only when every case meets it. The summary's `mean_s`, `p95_s` and `pass_rate` are over
all replies of all cases.
"""

from __future__ import annotations

import math
from collections import defaultdict

PASS_NUMERATOR, PASS_DENOMINATOR = 5, 6  # 5 of 6 replies pass
MAX_MEAN_S = 5.0
TARGET_MEAN_S = 3.0
EXCELLENT_MEAN_S = 2.0
RULE = ("adopt when, in every case's interview, at least 5 of 6 replies pass (5/6 of its questions) and the "
        "mean reply time is under 5 s; otherwise reject")


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (q in 0-100) of `values` (not empty)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def speed_rating(mean_s: float) -> str:
    """The guide's words for a mean reply time."""
    if mean_s < EXCELLENT_MEAN_S:
        return "excellent"
    if mean_s < TARGET_MEAN_S:
        return "on target"
    if mean_s < MAX_MEAN_S:
        return "acceptable"
    return "too slow"


def case_meets_rule(passed: int, asked: int, mean_s: float) -> bool:
    """One interview: at least 5/6 of the replies pass and the mean reply time is under 5 s."""
    return asked > 0 and passed * PASS_DENOMINATOR >= PASS_NUMERATOR * asked and mean_s < MAX_MEAN_S


def summarize(replies: list[dict]) -> dict:
    """The summary of one model at one setting from its replies (results.json's `models` entry):
    {model, temperature, top_p, mean_s, p95_s, pass_rate, verdict, ...} with each case's interview."""
    first = replies[0]
    times = [r["total_s"] for r in replies]
    by_case: dict[str, list[dict]] = defaultdict(list)
    for r in replies:
        by_case[r["case"]].append(r)
    cases = []
    for case_id, rs in by_case.items():
        passed = sum(r["passed"] for r in rs)
        mean_s = sum(r["total_s"] for r in rs) / len(rs)
        cases.append({"case": case_id, "asked": len(rs), "passed": passed, "mean_s": round(mean_s, 3),
                      "meets_rule": case_meets_rule(passed, len(rs), mean_s)})
    mean_s = sum(times) / len(times)
    summary = {
        "model": first["model"], "temperature": first["temperature"], "top_p": first["top_p"],
        "mean_s": round(mean_s, 3), "p95_s": round(percentile(times, 95), 3),
        "pass_rate": round(sum(r["passed"] for r in replies) / len(replies), 4),
        "verdict": "adopt" if all(c["meets_rule"] for c in cases) else "reject",
        "speed": speed_rating(mean_s),
        "mean_ttft_s": round(sum(r["ttft_s"] for r in replies) / len(replies), 3),
        "replies": len(replies),
        "errors": sum(1 for r in replies if "error" in r),
        "checks_failed": _failures(replies),
        "cases": cases,
    }
    ratings = [r["judge"] for r in replies if r.get("judge", {}).get("verdict") == "rated"]
    if any("judge" in r for r in replies):
        summary["judge"] = {
            "rated": len(ratings), "unavailable": sum(1 for r in replies if "judge" in r) - len(ratings),
            "character": round(sum(j["character"] for j in ratings) / len(ratings), 2) if ratings else None,
            "natural": round(sum(j["natural"] for j in ratings) / len(ratings), 2) if ratings else None,
        }
    return summary


def _failures(replies: list[dict]) -> dict[str, int]:
    """How many replies failed each check."""
    names = list(replies[0]["checks"])
    return {name: sum(1 for r in replies if not r["checks"][name]) for name in names}


def summarize_all(replies: list[dict]) -> list[dict]:
    """One summary per (model, temperature, top_p), in the order they were run."""
    groups: dict[tuple, list[dict]] = {}
    for r in replies:
        groups.setdefault((r["model"], r["temperature"], r["top_p"]), []).append(r)
    return [summarize(rs) for rs in groups.values()]
