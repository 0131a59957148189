"""What the report's two renderings share: the replies grouped into trial sheets, and the judge's cell."""

from __future__ import annotations

from collections import defaultdict


def grouped(results: dict) -> dict[tuple, dict[str, list[dict]]]:
    """{(model, temperature, top_p): {case: [replies in question order]}}, in run order."""
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for r in results["replies"]:
        groups.setdefault((r["model"], r["temperature"], r["top_p"]), defaultdict(list))[r["case"]].append(r)
    return groups


def judge_text(reply: dict) -> str:
    judge = reply.get("judge")
    if not judge:
        return ""
    if judge["verdict"] != "rated":
        return "unavailable"
    return f"character {judge['character']}/5, natural {judge['natural']}/5"


def reply_cell(reply: dict) -> str:
    """The reply's text, or what went wrong when the server failed the question."""
    if "error" in reply:
        return f"(error: {reply['error']})"
    return reply["text"]
