"""The prompt the simulator's backend builds for a clinical case (layout in DESIGN.md).

The engine serves continuations of it (engine/patient.py ends the patient's turn); the converter's
fine-tuning builds its training examples with it (convert/finetune.py); tests and benchmarks send it.
"""

from __future__ import annotations


def render_case_prompt(case: dict) -> str:
    """The prompt the simulator's backend builds for a case (layout in DESIGN.md).

    `case` has the fields of `tests/data/patient_cases.json`: the system context, the case sheet,
    and `turnos` ([role, text] pairs) whose last entry is the student's current question.
    """
    lines = [
        case["contexto_sistema"], "",
        "CASO CLÍNICO:",
        f"Nombre: {case['nombre']}",
        f"Edad: {case['edad']}",
        f"Ocupación: {case['ocupacion']}", "",
        f"Motivo de consulta: {case['motivo_consulta']}", "",
        f"Historia: {case['historia']}", "",
        f"Estado emocional: {case['estado_emocional']}", "",
        f"Personalidad: {case['personalidad']}", "",
        "ENTREVISTA:",
    ]
    lines += [f"{role}: {text}" for role, text in case["turnos"]]
    lines.append("Paciente:")
    return "\n".join(lines)
