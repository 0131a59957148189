"""One case's interview, asked as the simulator's backend asks it.

The prompt of question i is the case prompt, every earlier exchange (`Estudiante: <question>`,
`Paciente: <reply>`), then `Estudiante: <question i>` and `Paciente:` (the layout of DESIGN.md and
ai_engine_common/patient_prompt.py). Each reply is appended to the transcript as the model gave it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from engine.eval.cases import Case
from engine.eval.checks import ReplyInput, run_checks
from engine.eval.judge import judge_reply
from engine.eval.targets import generate_body

STUDENT, PATIENT = "Estudiante", "Paciente"


@dataclass(frozen=True)
class Setting:
    """A model (None: the target's default) and the sampling the simulator's backend sends."""

    model: str | None
    temperature: float
    top_p: float
    max_length: int = 150


def question_prompt(transcript: str, question: str) -> str:
    """The transcript so far, the student's question and the patient's label."""
    return f"{transcript}{STUDENT}: {question}\n{PATIENT}:"


def run_interview(target, case: Case, setting: Setting, *, model_label: str | None = None, judge: str | None = None,
                  on_reply: Callable[[dict], None] | None = None) -> list[dict]:
    """Every question of `case`, in order, on `target`: one results.json reply record each.
    `model_label` names the model in the records (default: the model the server reports)."""
    transcript = case.prompt
    earlier: list[str] = []
    records = []
    for index, question in enumerate(case.questions):
        prompt = question_prompt(transcript, question)
        reply = target.generate(generate_body(prompt, model=setting.model, temperature=setting.temperature,
                                              top_p=setting.top_p, max_length=setting.max_length))
        checks = run_checks(ReplyInput(reply.text, index, tuple(earlier), case))
        record = {
            "case": case.id, "question": index + 1, "question_text": question,
            "model": model_label or setting.model or reply.model or "default",
            "temperature": setting.temperature, "top_p": setting.top_p, "text": reply.text,
            "ttft_s": round(reply.ttft_s, 3), "total_s": round(reply.total_s, 3), "streamed": reply.streamed,
            "checks": checks, "passed": all(checks.values()),
        }
        if judge:
            record["judge"] = judge_reply(target, judge, prompt, reply.text)
        records.append(record)
        if on_reply:
            on_reply(record)
        transcript = f"{prompt} {reply.text}\n"
        earlier.append(reply.text)
    return records
