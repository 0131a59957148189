"""Patient-turn extraction: stop rules and cleaning, on hand-made model outputs."""

from __future__ import annotations

import pytest

from engine.generation import ReplyText
from engine.patient import clean_reply, stop_rules


def cut(text: str, stop=None, piece: int = 3) -> str:
    """Feed `text` in pieces as the token loop does and return what is kept."""
    reply = ReplyText(stop_rules(stop))
    for i in range(0, len(text), piece):
        if reply.add(text[i:i + piece]):
            break
    return reply.text


@pytest.mark.parametrize("raw,reply", [
    (" Me siento muy mal.\nEstudiante: ¿Desde cuándo?", "Me siento muy mal."),
    (" No sé.\nTerapeuta: Entiendo.", "No sé."),
    (" Sí.\nPaciente: y además", "Sí."),
    (" Claro.\nSistema: fin", "Claro."),
    (" Duermo poco.\n\nENTREVISTA:", "Duermo poco."),
    (" Estoy cansada.\nDoctora: ¿Y el café?", "Estoy cansada."),
    ("\n\n Me cuesta dormir.\n\nOtra cosa", "Me cuesta dormir."),  # leading blank lines are not the end
    (" Paciente: Nada, supongo.\nEstudiante: ok", "Nada, supongo."),
    (" Primera línea.\nsegunda línea sin etiqueta", "Primera línea.\nsegunda línea sin etiqueta"),
    (" Me dijo: «andá al médico».", "Me dijo: «andá al médico»."),
])
@pytest.mark.parametrize("piece", [1, 2, 5, 100])
def test_default_rules(raw, reply, piece):
    assert clean_reply(cut(raw, piece=piece)) == reply


def test_custom_stops_replace_defaults():
    assert clean_reply(cut(" Uno. Dos.\nEstudiante: tres", stop=["Dos"])) == "Uno."
    assert clean_reply(cut(" Uno.\n\nEstudiante: dos", stop=[])) == "Uno.\n\nEstudiante: dos"


STREAM_CASES = [
    " Me siento muy mal.\nEstudiante: ¿Desde cuándo?",
    " Paciente: Nada, supongo.\nEstudiante: ok",
    " Pacientes como yo no duermen.\n\nfin",
    "\n\n Sí, claro.\nDoctora: bien",
    " No sé... 😔 es difícil.\nTerapeuta: ya",
    " Uno.\nDos líneas.\nEstudiante: x",
    " Estoy   ",
]


@pytest.mark.parametrize("raw", STREAM_CASES)
@pytest.mark.parametrize("piece", [1, 2, 3, 7])
def test_streamed_pieces_add_up_to_the_reply(raw, piece):
    """What streaming emits (stable text as it grows) always adds up to the final reply."""
    from engine.patient import reply_text

    reply = reply_text(None)
    emitted = ""
    for i in range(0, len(raw), piece):
        stopped = reply.add(raw[i:i + piece])
        if stopped:
            break
        stable = reply.stable()
        assert stable.startswith(emitted), (emitted, stable)
        emitted = stable
    final = reply.final()
    assert final.startswith(emitted)
    assert final == clean_reply(cut(raw, piece=piece))
