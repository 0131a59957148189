"""One case's interview, asked as the simulator's backend asks it.

The prompt of question i is the case prompt, every earlier exchange (`Estudiante: <question>`,
`Paciente: <reply>`), then `Estudiante: <question i>` and `Paciente:` (the layout of DESIGN.md and
ai_engine_common/patient_prompt.py). Each reply is appended to the transcript as the model gave it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from engine.eval.cases import Case
from engine.eval.checks import ReplyInput, run_checks
from engine.eval.judge import judge_reply
from engine.eval.targets import Reply, TargetError, Unreachable, generate_body

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


def ask(target, body: dict) -> tuple[Reply, str | None]:
    """The target's reply, or an empty one and the error when the server failed this question
    (a server that cannot be reached at all stops the trial: Unreachable is raised)."""
    started = time.perf_counter()
    try:
        return target.generate(body), None
    except Unreachable:
        raise
    except TargetError as exc:
        elapsed = time.perf_counter() - started
        return Reply("", elapsed, elapsed, None, streamed=False), exc.message


def run_interview(target, case: Case, setting: Setting, *, model_label: str | None = None, judge: str | None = None,
                  on_reply: Callable[[dict], None] | None = None) -> list[dict]:
    """Every question of `case`, in order, on `target`: one results.json reply record each.
    `model_label` names the model in the records (default: the model the server reports). A
    question the server fails (an error status, a timeout) is recorded as a failed reply with its
    `error`, and left out of the transcript the next questions see."""
    transcript = case.prompt
    earlier: list[str] = []
    records = []
    for index, question in enumerate(case.questions):
        prompt = question_prompt(transcript, question)
        reply, error = ask(target, generate_body(prompt, model=setting.model, temperature=setting.temperature,
                                                 top_p=setting.top_p, max_length=setting.max_length))
        checks = run_checks(ReplyInput(reply.text, index, tuple(earlier), case))
        record = {
            "case": case.id, "question": index + 1, "question_text": question,
            "model": model_label or setting.model or reply.model or "default",
            "temperature": setting.temperature, "top_p": setting.top_p, "text": reply.text,
            "ttft_s": round(reply.ttft_s, 3), "total_s": round(reply.total_s, 3), "streamed": reply.streamed,
            "checks": checks, "passed": error is None and all(checks.values()),
        }
        if error is not None:
            record["error"] = error
        elif judge:
            record["judge"] = judge_reply(target, judge, prompt, reply.text)
        records.append(record)
        if on_reply:
            on_reply(record)
        if error is None:
            transcript = f"{prompt} {reply.text}\n"
            earlier.append(reply.text)
    return records
