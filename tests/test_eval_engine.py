"""`ai-engine eval` on the real default model: this engine in process on `--model` (two names for
the model, compared), and a real engine server as the `--url` target; both end to end, one case
of two questions, producing results.json, report.md and report.html."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.cli import main
from engine.eval.cases import load_case
from engine.eval.checks import CHECKS
from tests.helpers import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def small_case(tmp_path) -> Path:
    """The first two questions of an example case."""
    data = json.loads((ROOT / "examples" / "eval" / "lucia-panico.json").read_text(encoding="utf-8"))
    data["id"], data["questions"] = "lucia-small", data["questions"][:2]
    path = tmp_path / "small.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def check_outputs(out: Path, models: list[str]) -> dict:
    """The three outputs are there and agree; results.json's content."""
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    replies = results["replies"]
    assert [(r["model"], r["question"]) for r in replies] == [(m, q) for m in models for q in (1, 2)]
    case = load_case(ROOT / "examples" / "eval" / "lucia-panico.json")
    for r in replies:
        assert r["case"] == "lucia-small" and r["question_text"] == case.questions[r["question"] - 1]
        assert r["text"].strip() and r["streamed"] and 0 < r["ttft_s"] <= r["total_s"]
        assert "Estudiante:" not in r["text"] and list(r["checks"]) == list(CHECKS)
        assert r["passed"] == all(r["checks"].values())
        assert (r["temperature"], r["top_p"]) == (0.7, 0.9)
    assert [m["model"] for m in results["models"]] == models
    for m in results["models"]:
        assert m["verdict"] in ("adopt", "reject") and 0 <= m["pass_rate"] <= 1 and m["p95_s"] >= m["mean_s"] > 0
    md = (out / "report.md").read_text(encoding="utf-8")
    html = (out / "report.html").read_text(encoding="utf-8")
    for r in replies:
        assert r["text"].replace("|", "\\|").replace("\n", " ").strip() in md
    assert html.count("data:image/png;base64,") == 2 and "<table>" in html
    return results


def test_in_process_on_two_model_names(default_model_file, small_case, tmp_path, monkeypatch, capsys):
    """The real model twice, under its own name and a second one (the same weights): two entries."""
    models = tmp_path / "models"
    models.mkdir()
    (models / DEFAULT_MODEL).symlink_to(default_model_file)
    (models / "second-name.gguf").symlink_to(default_model_file)
    monkeypatch.setenv("MODEL_PATH", str(models))
    monkeypatch.setenv("N_CTX", "2048")
    out = tmp_path / "out"
    assert main(["eval", str(small_case), "--model", DEFAULT_MODEL, "--model", "second-name.gguf",
                 "--out", str(out)]) == 0
    check_outputs(out, [DEFAULT_MODEL, "second-name.gguf"])
    err = capsys.readouterr().err
    assert "4/4" in err and "this engine" not in err


def test_a_real_engine_url(server, small_case, tmp_path):
    """The engine's own /generate over HTTP, streamed: the reply's model is the server's."""
    out = tmp_path / "out"
    assert main(["eval", str(small_case), "--url", server.url, "--out", str(out)]) == 0
    results = check_outputs(out, [DEFAULT_MODEL])
    assert results["trial"]["target"] == server.url
