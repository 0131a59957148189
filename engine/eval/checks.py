"""The automatic checks on every reply of a trial, one named function each (docs/eval.md).

Each check reads the reply, its place in the interview and the case, and says pass (True) or
fail (False). A reply passes when every check passes. The checks are deliberately plain text
rules, so that a clinic can read why a reply failed; the optional judge model (judge.py) rates
what rules cannot (character consistency, naturalness).
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from dataclasses import dataclass
from typing import Callable

from engine.eval.cases import Case
from engine.patient import SPEAKERS


@dataclass(frozen=True)
class ReplyInput:
    """What a check reads: the reply, the index of the question it answers, the earlier replies
    of the same interview, and the case."""

    text: str
    index: int
    earlier: tuple[str, ...]
    case: Case


def fold(text: str) -> str:
    """Lower case without accents ("Sofía" → "sofia"): keyword and phrase matching ignore both."""
    decomposed = unicodedata.normalize("NFKD", text.lower())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def words(text: str) -> list[str]:
    return re.findall(r"[^\W\d_]+(?:'[^\W\d_]+)?", fold(text))


# -- first person -----------------------------------------------------------------------------------

# A clinical summary about the patient rather than the patient speaking (matched on folded text).
THIRD_PERSON = [re.compile(p) for p in (
    r"\b(?:el|la|del|al|los|las) (?:paciente|consultante)s?\b",
    r"\b(?:refiere|manifiesta|relata|reporta|presenta sintomas|se muestra|impresiona)\b",
    r"\bthe patient\b", r"\b(?:she|he) (?:reports|states|presents|describes|denies)\b",
    r"\b(?:o|a) paciente (?:relata|refere|apresenta)\b",
)]
# Verbs that, right after the patient's own name, make a sentence about the patient.
NAME_VERBS = r"(?:es|esta|tiene|siente|refiere|dice|cuenta|vive|trabaja|duerme|se|no|is|has|feels|says)"


def first_person(r: ReplyInput) -> bool:
    """The patient speaks as themself, not as a clinical third-person summary ("La paciente
    refiere...", "Sofía está cansada")."""
    text = fold(r.text)
    if any(p.search(text) for p in THIRD_PERSON):
        return False
    name = r.case.patient_name
    if name:
        first_name = re.escape(fold(name).split()[0])
        if re.search(rf"(?:^|[.!?]\s+){first_name}\s+{NAME_VERBS}\b", text):
            return False
    return True


# -- language ---------------------------------------------------------------------------------------

# Common words that tell these languages apart (folded: no accents). A reply whose words are
# mostly another language's fails; one too short to tell passes.
STOPWORDS = {
    "es": set("el la los las que de en y no me mi yo es pero por con una un lo se muy mas sin ya porque "
              "cuando tengo estoy siento hace nada algo eso esto bien vez tambien como para".split()),
    "en": set("the and i my me is not but with you it that this was have feel very what when because "
              "about just don't can't really so to of".split()),
    "pt": set("o os as e nao eu meu minha com uma um mas muito tenho estou sinto isso isto voce nada "
              "tambem quando porque para do da em".split()),
    "fr": set("le les et je ne pas mon ma mes est mais avec une un tres suis j'ai sens rien quand parce "
              "pour du dans c'est".split()),
    "it": set("il lo gli e non io mio mia sono ma con una un molto ho sento niente quando perche per "
              "del della nel che".split()),
    "de": set("der die das und ich nicht mein meine ist aber mit ein eine sehr habe bin fuhle nichts "
              "wenn weil fur zu".split()),
}
MIN_EVIDENCE = 2  # distinctive words needed before the check judges a reply's language


def detect_language(text: str) -> str | None:
    """The language with most distinctive common words in `text`, or None when too few are seen."""
    found = words(text)
    scores = {}
    for lang, table in STOPWORDS.items():
        others = set().union(*(t for other, t in STOPWORDS.items() if other != lang))
        scores[lang] = sum(1 for w in found if w in table and w not in others)
    best = max(scores, key=scores.get)
    if scores[best] < MIN_EVIDENCE or list(scores.values()).count(scores[best]) > 1:
        return None
    return best


def language(r: ReplyInput) -> bool:
    """The reply is in the case's language (a reply too short to tell passes)."""
    found = detect_language(r.text)
    return found is None or found == r.case.language


# -- role break ------------------------------------------------------------------------------------

ROLE_BREAK = [re.compile(p) for p in (
    r"\bcomo (?:un |una )?(?:modelo de lenguaje|ia\b|inteligencia artificial|asistente)",
    r"\bsoy (?:un |una )?(?:modelo de lenguaje|ia\b|inteligencia artificial|asistente|chatbot|programa)",
    r"\bmodelo de lenguaje\b", r"\bpaciente simulad[oa]\b", r"\bsimulacion\b",
    r"\ben (?:que|qué) (?:mas |más )?(?:te|le|les) (?:puedo|podria) ayudar",
    r"\b(?:puedo|podria) ayudar(?:te|le|los)\b", r"\bestoy (?:aqui|aca) para ayudar",
    r"\b(?:te|le) (?:recomiendo|sugiero) (?:consultar|buscar|que consultes)",
    r"\bno puedo (?:dar|ofrecer|proporcionar) (?:consejos?|diagnosticos?)",
    r"\bas an? (?:ai|language model|assistant)\b", r"\blanguage model\b", r"\bhow can i (?:help|assist)\b",
    r"\bi(?:'m| am) (?:an? )?(?:ai|assistant|chatbot)\b",
    r"\bcomo (?:paciente|personaje)\b.*\b(?:responderia|diria)\b",
)]


def no_role_break(r: ReplyInput) -> bool:
    """No assistant-style role break: "como modelo de lenguaje...", offering help, stepping out
    of the character to comment on the simulation."""
    text = fold(r.text)
    return not any(p.search(text) for p in ROLE_BREAK)


# -- one speaker turn -------------------------------------------------------------------------------

OTHER_LABELS = SPEAKERS + ("Psicologo", "Psicologa", "Psicólogo", "Psicóloga", "Doctor", "Doctora", "Entrevistador",
                           "Entrevistadora", "Student", "Patient", "Therapist")
SPEAKER_LABEL = re.compile(r"(?:^|\n|[.!?…]\s+)\s*(?:%s)\s*:" % "|".join(OTHER_LABELS), re.IGNORECASE)
# A later line that starts like a case sheet's field or another speaker ("Estado emocional: ...").
LABEL_LINE = re.compile(r"\n\s*[A-ZÁÉÍÓÚÑ][A-Za-zÁÉÍÓÚÑáéíóúñü]*(?: [A-Za-zÁÉÍÓÚÑáéíóúñü]+){0,2}\s*:")


def one_turn(r: ReplyInput) -> bool:
    """The reply is one turn of the patient's: no speaker label (`Estudiante:`, `Paciente:`, ...)
    inside it, no later line starting with a label (a case sheet's `Estado emocional:`), no blank
    line followed by more text, and not the student's question said back (the model playing the
    student)."""
    text = r.text.strip()
    if SPEAKER_LABEL.search(text) or LABEL_LINE.search(text) or re.search(r"\n\s*\n\s*\S", text):
        return False
    question = " ".join(words(r.case.questions[r.index])) if r.index < len(r.case.questions) else ""
    return not question or " ".join(words(text)) != question


# -- length ----------------------------------------------------------------------------------------

def length(r: ReplyInput) -> bool:
    """Between the case's `min_words` and `max_words` words (default 1 to 80): an empty reply
    fails, and so does a speech no patient gives in one turn."""
    n = len(words(r.text))
    return r.case.min_words <= n <= r.case.max_words and bool(r.text.strip())


# -- repetition ------------------------------------------------------------------------------------

REPEAT_RATIO = 0.85  # difflib similarity from which a reply counts as the same as an earlier one


def no_repetition(r: ReplyInput) -> bool:
    """Not a repetition of an earlier reply in the same interview (the same words, or nearly:
    similarity 0.85 or more after folding case, accents and punctuation)."""
    now = " ".join(words(r.text))
    if not now:
        return True  # nothing to repeat; `length` fails an empty reply
    for before in r.earlier:
        then = " ".join(words(before))
        if then and (now == then or difflib.SequenceMatcher(None, now, then).ratio() >= REPEAT_RATIO):
            return False
    return True


# -- hidden facts ----------------------------------------------------------------------------------

def keyword_found(keyword: str, text: str) -> bool:
    """`keyword` as a word or the start of one ("separ" finds "separé", "separación"), folded."""
    return re.search(rf"\b{re.escape(fold(keyword))}", fold(text)) is not None


def revealed(r: ReplyInput) -> list[str]:
    """The hidden facts' keywords that this reply brings out before their question."""
    return [k for h in r.case.hidden if r.index < h.not_before for k in h.keywords if keyword_found(k, r.text)]


def no_early_reveal(r: ReplyInput) -> bool:
    """No hidden fact before its question: a reply to a question before a fact's `not_before`
    contains none of its keywords."""
    return not revealed(r)


Check = Callable[[ReplyInput], bool]
CHECKS: dict[str, Check] = {
    "first_person": first_person,
    "language": language,
    "no_role_break": no_role_break,
    "one_turn": one_turn,
    "length": length,
    "no_repetition": no_repetition,
    "no_early_reveal": no_early_reveal,
}


def run_checks(r: ReplyInput) -> dict[str, bool]:
    """Every check by name."""
    return {name: bool(check(r)) for name, check in CHECKS.items()}
