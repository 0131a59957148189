"""`ai-engine eval`'s parts without a model: every check on hand-written good and bad replies, the
case file's validation, the simulator's verdict rule, and the judge's answer parsing."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from engine.eval import checks as c
from engine.eval.cases import CaseError, Hidden, load_case, load_cases, parse_case
from engine.eval.interview import question_prompt
from engine.eval.judge import judge_body, parse_verdict
from engine.eval.verdict import case_meets_rule, percentile, speed_rating, summarize, summarize_all

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples" / "eval").glob("*.json"))
PROMPT = ("Sos un paciente simulado.\n\nCASO CLÍNICO:\nNombre: Sofía Pérez\nEdad: 29\nOcupación: enfermera\n\n"
          "Motivo de consulta: insomnio\n\nHistoria: se separó.\n\nEstado emocional: cansada\n\n"
          "Personalidad: reservada\n\nENTREVISTA:\n")


def case(**overrides):
    data = {"id": "sofia", "language": "es", "prompt": PROMPT,
            "questions": ["¿Qué te trae?", "¿Cómo dormís?", "¿Vivís sola?", "¿Y tu pareja?"],
            "hidden": [{"keywords": ["separ", "divorcio"], "not_before": 2}], **overrides}
    return parse_case(data)


def reply(text: str, index: int = 0, earlier: tuple[str, ...] = (), **case_overrides) -> c.ReplyInput:
    return c.ReplyInput(text, index, earlier, case(**case_overrides))


# -- every check, good and bad replies ------------------------------------------------------------

GOOD = "No duermo bien desde hace meses, me quedo mirando el techo."
CHECK_TABLE = [
    # (check, reply text, question index, earlier replies, expected)
    ("first_person", GOOD, 0, (), True),
    ("first_person", "No sé... estoy cansada.", 0, (), True),
    ("first_person", "La paciente refiere insomnio de tres meses de evolución.", 0, (), False),
    ("first_person", "Sofía está cansada y no duerme bien.", 0, (), False),
    ("first_person", "El paciente manifiesta angustia.", 0, (), False),
    ("first_person", "The patient reports poor sleep.", 0, (), False),
    ("language", GOOD, 0, (), True),
    ("language", "Sí.", 0, (), True),  # too short to tell: passes
    ("language", "I have not been sleeping well and I feel very tired.", 0, (), False),
    ("language", "Eu não durmo bem, estou muito cansada e não tenho vontade de nada.", 0, (), False),
    ("no_role_break", GOOD, 0, (), True),
    ("no_role_break", "Como modelo de lenguaje, no puedo sentir cansancio.", 0, (), False),
    ("no_role_break", "Soy una inteligencia artificial, pero puedo contarte sobre el insomnio.", 0, (), False),
    ("no_role_break", "¿En qué más te puedo ayudar?", 0, (), False),
    ("no_role_break", "Estoy aquí para ayudarte con lo que necesites.", 0, (), False),
    ("no_role_break", "As an AI language model, I cannot answer that.", 0, (), False),
    ("one_turn", GOOD, 0, (), True),
    ("one_turn", "Me siento mal.\nEstudiante: ¿Desde cuándo?", 0, (), False),
    ("one_turn", "Me siento mal. Paciente: y no duermo.", 0, (), False),
    ("one_turn", "Paciente: no duermo.", 0, (), False),
    ("one_turn", "Me siento mal.\n\nTerapeuta: contame más", 0, (), False),
    ("one_turn", "Me siento mal.\n\nY encima no duermo.", 0, (), False),
    ("one_turn", "Un día en la cama.\nEstado emocional: está muy nerviosa.", 0, (), False),
    ("one_turn", "¿Cómo dormís?", 1, (), False),  # the student's question said back
    ("one_turn", "¿Cómo dormís? Mal, muy mal.", 1, (), True),
    ("one_turn", "Me siento mal,\ny no duermo: nada.", 0, (), True),
    ("length", GOOD, 0, (), True),
    ("length", "No.", 0, (), True),
    ("length", "", 0, (), False),
    ("length", "   ", 0, (), False),
    ("length", " ".join(["palabra"] * 81), 0, (), False),
    ("no_repetition", GOOD, 1, ("Trabajo de noche en el hospital.",), True),
    ("no_repetition", GOOD, 1, (GOOD,), False),
    ("no_repetition", "No duermo bien desde hace meses, me quedo mirando el techo!", 1, (GOOD,), False),
    ("no_repetition", "no duermo bien desde hace meses me quedo mirando el techo", 2, ("Hola.", GOOD), False),
    ("no_early_reveal", GOOD, 0, (), True),
    ("no_early_reveal", "Desde que me separé duermo mal.", 0, (), False),
    ("no_early_reveal", "Desde que me SEPARÉ duermo mal.", 1, (), False),
    ("no_early_reveal", "Hubo un divorcio el año pasado.", 1, (), False),
    ("no_early_reveal", "Desde que me separé duermo mal.", 2, (), True),  # its question has come
    ("no_early_reveal", "Desde que me separé duermo mal.", 3, (), True),
]


@pytest.mark.parametrize("name, text, index, earlier, expected", CHECK_TABLE,
                         ids=[f"{row[0]}-{i}-{'good' if row[4] else 'bad'}" for i, row in enumerate(CHECK_TABLE)])
def test_each_check(name, text, index, earlier, expected):
    assert c.CHECKS[name](reply(text, index, earlier)) is expected


def test_every_check_has_good_and_bad_rows():
    covered = {(row[0], row[4]) for row in CHECK_TABLE}
    assert covered == {(name, ok) for name in c.CHECKS for ok in (True, False)}


def test_a_reply_passes_only_when_every_check_passes():
    assert all(c.run_checks(reply(GOOD)).values())
    results = c.run_checks(reply("La paciente refiere que se separó.\nEstudiante: ¿Y?"))
    assert [n for n, ok in results.items() if not ok] == ["first_person", "one_turn", "no_early_reveal"]


def test_the_case_bounds_replace_the_default_length():
    assert not c.length(reply("Sí.", min_words=2))
    assert c.length(reply("No sé, doctora.", min_words=2, max_words=3))
    assert not c.length(reply("No sé qué decirle, doctora.", min_words=2, max_words=3))


def test_language_detection():
    assert c.detect_language(GOOD) == "es"
    assert c.detect_language("I have not been sleeping and I feel tired") == "en"
    assert c.detect_language("ok") is None


def test_english_case_language():
    r = c.ReplyInput("I have not been sleeping well and I feel tired.", 0, (), case(language="en"))
    assert c.language(r)


# -- the case file --------------------------------------------------------------------------------

def test_the_example_cases_load():
    cases = load_cases(EXAMPLES)
    assert len(cases) == 4
    for one in cases:
        assert one.language == "es" and len(one.questions) == 6 and one.hidden
        assert one.prompt.endswith("ENTREVISTA:\n") and one.patient_name
        assert all(0 < h.not_before < 6 for h in one.hidden)


def test_the_example_hidden_facts_are_in_their_case_history():
    """Each hidden fact's keywords come from the case sheet (the model has them to reveal)."""
    for one in load_cases(EXAMPLES):
        for h in one.hidden:
            assert any(c.keyword_found(k, one.prompt) for k in h.keywords), (one.id, h)


def test_a_case_parses():
    one = case()
    assert one.hidden == (Hidden(("separ", "divorcio"), 2),) and one.patient_name == "Sofía Pérez"
    assert (one.min_words, one.max_words) == (1, 80)


BAD_CASES = [
    ([], None, "JSON object"),
    ({"id": ""}, "id", "'id' must be a non-empty string"),
    ({"id": "a b"}, "id", "'id' must be 1-64 letters"),
    ({"language": "xx"}, "language", "'language' must be one of"),
    ({"language": 3}, "language", "non-empty string"),
    ({"prompt": "Sin entrevista"}, "prompt", "must end with 'ENTREVISTA:\\n'"),
    ({"prompt": PROMPT.rstrip("\n")}, "prompt", "must end with"),
    ({"questions": []}, "questions", "non-empty list"),
    ({"questions": "¿Qué te trae?"}, "questions", "non-empty list"),
    ({"questions": ["ok", ""]}, "questions[1]", "non-empty one-line string"),
    ({"questions": ["ok", "dos\nlíneas"]}, "questions[1]", "one-line"),
    ({"hidden": {}}, "hidden", "must be a list"),
    ({"hidden": [{"keywords": ["x"]}]}, "hidden[0]", "exactly 'keywords' and 'not_before'"),
    ({"hidden": [{"keywords": [], "not_before": 1}]}, "hidden[0].keywords", "non-empty list"),
    ({"hidden": [{"keywords": [""], "not_before": 1}]}, "hidden[0].keywords", "non-empty list"),
    ({"hidden": [{"keywords": ["x"], "not_before": -1}]}, "hidden[0].not_before", "index >= 0"),
    ({"hidden": [{"keywords": ["x"], "not_before": "2"}]}, "hidden[0].not_before", "index >= 0"),
    ({"hidden": [{"keywords": ["x"], "not_before": True}]}, "hidden[0].not_before", "index >= 0"),
    ({"max_words": -1}, "max_words", "whole number"),
    ({"min_words": 5, "max_words": 2}, "max_words", "below 'min_words'"),
    ({"questons": ["typo"]}, "questons", "unknown field"),
]


@pytest.mark.parametrize("overrides, field, message", BAD_CASES, ids=[f"bad-case-{i}" for i in range(len(BAD_CASES))])
def test_bad_cases_are_refused_naming_the_field(overrides, field, message):
    data = overrides if isinstance(overrides, list) else {
        "id": "sofia", "language": "es", "prompt": PROMPT, "questions": ["¿Qué te trae?"], **overrides}
    with pytest.raises(CaseError) as info:
        parse_case(data)
    assert message in info.value.message and info.value.field == field


@pytest.mark.parametrize("content, message", [
    (None, "cannot read it"), ("{not json", "not valid JSON"), (b"\xff\xfe", "not valid JSON"),
    ('{"id": "x"}', "'language' must be"),
])
def test_bad_case_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "case.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(CaseError) as info:
        load_case(path)
    assert str(path) in info.value.message and message in info.value.message


def test_two_files_with_one_id_are_refused(tmp_path):
    for name in ("a.json", "b.json"):
        (tmp_path / name).write_text(json.dumps({"id": "same", "language": "es", "prompt": PROMPT,
                                                 "questions": ["¿Hola?"]}))
    with pytest.raises(CaseError, match="already used"):
        load_cases([tmp_path / "a.json", tmp_path / "b.json"])


def test_the_question_prompt_is_the_simulators():
    assert question_prompt(PROMPT, "¿Qué te trae?") == PROMPT + "Estudiante: ¿Qué te trae?\nPaciente:"


# -- the verdict rule ------------------------------------------------------------------------------

@pytest.mark.parametrize("passed, asked, mean_s, meets", [
    (6, 6, 1.0, True), (5, 6, 4.99, True), (4, 6, 1.0, False), (6, 6, 5.0, False), (5, 6, 7.0, False),
    (0, 6, 0.5, False), (10, 12, 2.0, True), (9, 12, 2.0, False), (2, 2, 1.0, True), (1, 2, 1.0, False),
    (0, 0, 0.0, False),
])
def test_the_rule_for_one_interview(passed, asked, mean_s, meets):
    assert case_meets_rule(passed, asked, mean_s) is meets


def records(case_id: str, times: list[float], passes: list[bool], model: str = "m") -> list[dict]:
    return [{"case": case_id, "question": i + 1, "model": model, "temperature": 0.7, "top_p": 0.9,
             "ttft_s": t / 2, "total_s": t, "checks": {"length": ok}, "passed": ok}
            for i, (t, ok) in enumerate(zip(times, passes))]


def test_adopt_needs_every_case_to_meet_the_rule():
    good = records("a", [1, 1, 1, 1, 1, 1], [True] * 5 + [False])
    also_good = records("b", [2, 2, 2, 2, 2, 2], [True] * 6)
    assert summarize(good + also_good)["verdict"] == "adopt"
    weak = records("c", [1] * 6, [True] * 4 + [False] * 2)  # 4 of 6
    summary = summarize(good + also_good + weak)
    assert summary["verdict"] == "reject"
    assert summary["pass_rate"] == round(15 / 18, 4)  # 83% over all replies, yet one case fails the rule
    assert [x["meets_rule"] for x in summary["cases"]] == [True, True, False]


def test_a_slow_case_rejects():
    fast = records("a", [1] * 6, [True] * 6)
    slow = records("b", [6, 6, 6, 6, 6, 6], [True] * 6)
    summary = summarize(fast + slow)
    assert summary["verdict"] == "reject" and summary["mean_s"] == 3.5 and summary["speed"] == "acceptable"


def test_summary_numbers():
    summary = summarize(records("a", [1, 2, 3, 4, 5, 10], [True] * 6))
    assert summary["mean_s"] == round(25 / 6, 3) and summary["p95_s"] == 10
    assert summary["mean_ttft_s"] == round(25 / 12, 3)
    assert summary["checks_failed"] == {"length": 0} and summary["replies"] == 6
    assert set(summary) >= {"model", "temperature", "top_p", "mean_s", "p95_s", "pass_rate", "verdict"}


def test_one_summary_per_model_and_setting():
    rs = records("a", [1] * 6, [True] * 6, model="x") + records("a", [9] * 6, [True] * 6, model="y")
    summaries = summarize_all(rs)
    assert [(s["model"], s["verdict"]) for s in summaries] == [("x", "adopt"), ("y", "reject")]


@pytest.mark.parametrize("mean_s, rating", [(1.9, "excellent"), (2.0, "on target"), (2.9, "on target"),
                                            (3.0, "acceptable"), (4.99, "acceptable"), (5.0, "too slow")])
def test_speed_rating(mean_s, rating):
    assert speed_rating(mean_s) == rating


def test_percentile():
    assert percentile([3, 1, 2], 95) == 3 and percentile([5], 95) == 5
    assert percentile(list(range(1, 101)), 95) == 95


# -- the judge's answer ----------------------------------------------------------------------------

def chat(content) -> dict:
    return {"model": "judge", "message": {"role": "assistant", "content": content}, "done": True}


@pytest.mark.parametrize("answer, verdict", [
    (chat('{"character": 4, "natural": 5, "reason": "ok"}'), {"verdict": "rated", "character": 4, "natural": 5,
                                                              "reason": "ok"}),
    (chat('{"character": 1, "natural": 1}'), {"verdict": "rated", "character": 1, "natural": 1, "reason": ""}),
    (chat("the patient stays in character"), None),
    (chat('{"character": 7, "natural": 3, "reason": "x"}'), None),
    (chat('{"character": "4", "natural": 3, "reason": "x"}'), None),
    (chat('{"character": true, "natural": 3, "reason": "x"}'), None),
    (chat('{"natural": 3}'), None),
    (chat('[4, 5]'), None),
    (chat(None), None),
    ({"error": "model not found"}, None),
    ("not even a dict", None),
])
def test_judge_answers_are_parsed_defensively(answer, verdict):
    got = parse_verdict(answer)
    if verdict is None:
        assert got["verdict"] == "unavailable" and got["error"]
    else:
        assert got == verdict


def test_the_judge_request_is_ollamas_structured_output():
    body = judge_body("judge-model", PROMPT + "Estudiante: ¿Hola?\nPaciente:", "Hola.")
    assert body["model"] == "judge-model" and body["stream"] is False
    assert body["format"]["type"] == "object" and set(body["format"]["required"]) == {"character", "natural", "reason"}
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert body["messages"][1]["content"].startswith(PROMPT) and "Paciente: Hola." in body["messages"][1]["content"]


# -- the progress bar and the charts' dependency ---------------------------------------------------

class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream, redraws", [(io.StringIO(), False), (Terminal(), True)])
def test_the_progress_bar(stream, redraws):
    from engine.eval.run import Progress

    bar = Progress(2, stream)
    for record in records("a", [1.5, 2.5], [True, False]):
        bar.update(record)
    text = stream.getvalue()
    assert "1/2" in text and "2/2" in text and "q2: 2.5 s FAIL" in text and "q1: 1.5 s pass" in text
    assert ("\r" in text) is redraws and text.endswith("\n")
    assert ("[" + "#" * Progress.WIDTH + "]") in text


def test_without_matplotlib_the_command_says_so_before_asking(monkeypatch):
    from engine.errors import EngineError
    from engine.eval.charts import require_matplotlib

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    with pytest.raises(EngineError, match=r"matplotlib, which is not installed.*\.\[eval\]"):
        require_matplotlib()
