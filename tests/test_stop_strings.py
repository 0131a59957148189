"""Stop strings: the limits a request's stop list must keep (400 naming the field), and the matcher
that reads only each token's new text — checked against a brute-force reference that rescans the
whole text, by hand-made cases and random ones, and on the real model's streamed replies."""

from __future__ import annotations

import random

import pytest

from engine.errors import BadRequest
from engine.generation import MAX_STOP_CHARS, MAX_STOPS, ReplyText, StopRules, check_stops
from tests.helpers import Fakes, real_scheduler, submit


@pytest.mark.parametrize("stops", [None, [], ["\nUser:"], ["x"] * MAX_STOPS, ["a" * (MAX_STOP_CHARS - 1), "b"]])
def test_stop_lists_within_the_limits_pass(stops):
    check_stops(stops)
    StopRules(strings=stops or ())


@pytest.mark.parametrize("stops,says", [
    (["x"] * (MAX_STOPS + 1), f"at most {MAX_STOPS}"),
    (["a" * (MAX_STOP_CHARS - 1), "bc"], f"at most {MAX_STOP_CHARS:,} are allowed in all"),
    (["y" * 100_000], "100,000 characters"),
    (["ok", ""], "empty"),
])
@pytest.mark.parametrize("field", ["stop", "options.stop"])
def test_stop_lists_past_the_limits_are_a_400_naming_the_field(stops, says, field):
    with pytest.raises(BadRequest) as refused:
        check_stops(stops, field)
    assert refused.value.status == 400 and refused.value.field == field
    assert f"'{field}'" in refused.value.message and says in refused.value.message


def test_the_rules_refuse_too_many_characters_whichever_surface_built_them():
    with pytest.raises(BadRequest) as refused:
        StopRules(strings=["\nUser:", "z" * MAX_STOP_CHARS])
    assert refused.value.field == "stop" and "chat template" in refused.value.message


class Reference:
    """The stop rules as a rescan of the whole text after every piece: the earliest stop from the
    first visible character on, and streaming holds back the earliest tail that a stop begins with."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.text, self.start = "", -1

    def add(self, piece: str) -> bool:
        self.text += piece
        if self.start < 0 and self.text.strip():
            self.start = len(self.text) - len(self.text.lstrip())
        if self.start < 0:
            return False
        found = [i for i in (self.text.find(s, self.start) for s in self.stops) if i >= 0]
        if found:
            self.text = self.text[:min(found)]
        return bool(found)

    def stable(self) -> str:
        if self.start < 0:
            return ""
        for i in range(self.start, len(self.text)):
            if any(s.startswith(self.text[i:]) for s in self.stops):
                return self.text[:i]
        return self.text


def feed(stops: list[str], pieces: list[str]) -> list[tuple]:
    """Each piece's (stopped, text, stable) from ReplyText and from the reference, side by side."""
    reply, ref = ReplyText(StopRules(strings=stops), clean=lambda t: t), Reference(stops)
    steps = []
    for piece in pieces:
        got = reply.add(piece)
        want = ref.add(piece)
        steps.append(((got, reply.text, reply.stable()), (want, ref.text, ref.stable())))
        if got or want:
            break
    return steps


@pytest.mark.parametrize("stops,pieces,kept", [
    (["\nUser:"], ["Hola", "\nUs", "er:", " chau"], "Hola"),  # across pieces
    (["abcd", "bc"], ["xx", "abcd"], "xx"),  # in one piece, the stop that begins first wins
    (["bc", "abcd"], ["xxa", "bc"], "xxa"),  # ...and one that ends first, across pieces
    (["aab"], ["a", "a", "a", "b"], "a"),  # a partial match that fails still overlaps the next
    (["abac"], ["ab", "ab", "ac"], "ab"),  # "abab" falls back to "ab", which then completes
    (["\n"], ["\n\n", " Sí.", "\n", "Estudiante"], "\n\n Sí."),  # leading whitespace is no stop
    (["FIN"], ["  ", "FI", "N"], "  "),  # a stop right at the first visible character
    (["😔 ya"], ["No sé ", "😔", " y", "a no"], "No sé "),
    (["</s>", "<|im_end|>"], ["Listo.<|im", "_end|>"], "Listo."),
    (["zzz"], ["Ninguna ", "parada ", "aquí"], "Ninguna parada aquí"),
])
def test_cases_match_the_reference(stops, pieces, kept):
    steps = feed(stops, pieces)
    for got, want in steps:
        assert got == want
    assert steps[-1][0][1] == kept


def test_random_texts_match_the_reference_and_never_stream_a_stop():
    """Small alphabets make stops overlap, share prefixes and nearly match all the time."""
    rng = random.Random(20261130)
    for _ in range(400):
        alphabet = rng.choice(["ab", "ab\n ", "abc", "aé😔 "])
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 20)))) if len(text) > 1 else []
        pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        emitted = ""
        for got, want in feed(stops, pieces):
            assert got == want, (stops, pieces)
            stopped, text, stable = got
            shown = text if stopped else stable  # after a stop the reply is final: it is what is sent
            visible = len(shown) - len(shown.lstrip())  # stops count from the first visible character
            assert shown.startswith(emitted) and all(shown.find(s, visible) < 0 for s in stops)
            emitted = shown


# -- the real model ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real(default_model_file):
    eng = real_scheduler(default_model_file, n_ctx=1024, n_parallel=2)
    yield eng
    eng.close()


def streamed(eng, prompt: str, reply: ReplyText, max_tokens: int = 48) -> tuple[list[str], str]:
    from engine.generation import SamplingParams

    seq = submit(eng, prompt, SamplingParams(temperature=0, repeat_penalty=1.0, max_tokens=max_tokens), reply)
    pieces = list(seq.stream())
    return pieces, seq.result.text


def test_a_stop_inside_the_real_models_reply_is_cut_and_never_streamed(real, cases):
    """The real model's greedy reply, then the same request with a stop string taken from the middle
    of that reply (several tokens long): the reply ends where the stop begins, and the streamed
    pieces add up to it with no part of the stop in them (its beginning was held back)."""
    from engine.patient import render_case_prompt

    prompt = render_case_prompt(cases[0])
    _pieces, full = streamed(real, prompt, ReplyText(StopRules(), clean=lambda t: t))
    words = full.split(" ")
    assert len(words) >= 6, full
    k = full.index(" " + words[len(words) // 2])
    stop = full[k:k + 12]
    assert full.find(stop) == k and len(real.tokenize(stop)) >= 3, stop
    pieces, text = streamed(real, prompt, ReplyText(StopRules(strings=[stop, "\n\n\n\n"]), clean=lambda t: t))
    assert text == full[:k] and "".join(pieces) == text
    assert sum(1 for p in pieces if p) >= 2  # it streamed, token by token


def test_the_simulators_default_stops_stream_the_real_models_reply_exactly(real, cases):
    """The default speaker-turn rules (strings and the speaker-line pattern) on the real model:
    what streams adds up to the reply, which holds no next speaker's line."""
    from engine.patient import SPEAKERS, render_case_prompt, reply_text

    for case in cases[:3]:
        pieces, text = streamed(real, render_case_prompt(case), reply_text(None), max_tokens=64)
        assert text and "".join(pieces) == text
        assert not any(f"\n{s}:" in text for s in SPEAKERS) and "\n\n" not in text


LONG_STOP = "\nEstudiante: " + "x" * MAX_STOP_CHARS


@pytest.mark.parametrize("path,body", [
    ("/generate", {"prompt": "Estudiante: Hola\nPaciente:", "stop": [LONG_STOP]}),
    ("/api/generate", {"model": "a", "prompt": "Hola", "stream": False, "options": {"stop": [LONG_STOP]}}),
    ("/api/chat", {"model": "a", "messages": [{"role": "user", "content": "Hola"}], "stream": False,
                   "options": {"stop": LONG_STOP}}),
    ("/v1/completions", {"model": "a", "prompt": "Hola", "stop": [LONG_STOP]}),
    ("/v1/chat/completions", {"model": "a", "messages": [{"role": "user", "content": "Hola"}], "stream": True,
                              "stop": [LONG_STOP]}),
])
def test_every_surface_answers_too_long_stops_with_a_400(tmp_path, path, body):
    """Whichever surface builds the stop rules, more than MAX_STOP_CHARS characters of stops is a
    400 that names `stop`, before any token is generated (streaming or not)."""
    f = Fakes(tmp_path).load("a.gguf")
    try:
        r = f.app().test_client().post(path, json=body)
        assert r.status_code == 400, r.get_data(as_text=True)
        assert "'stop'" in r.get_data(as_text=True) and f"{MAX_STOP_CHARS:,}" in r.get_data(as_text=True)
        assert all(rt.decode_calls == 0 for rt in f.runtimes)
    finally:
        f.manager.close()
