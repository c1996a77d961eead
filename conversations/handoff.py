"""The handoff: recognising the moment a customer needs a person, and what it mentions.

Pure functions over text and the policy's phrases; the services and the
ingest decide what to store. Phrases are matched as whole words, case- and
accent-insensitively, so "Quiero hablar con una persona" and "QUIERO HABLAR
CON UNA PERSONA" both count, and "personalised" does not.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

# Out of the box: English, Spanish, Portuguese, French, German. Supervisors edit
# them (one per line) in the app or in admin; this is the starting list.
DEFAULT_ASK_PHRASES = """\
a human
real person
talk to a person
speak to a person
talk to someone
speak to someone
talk to an agent
speak to an agent
operator
representative
customer service
persona real
hablar con una persona
hablar con alguien
hablar con un agente
un humano
atencion al cliente
pessoa real
falar com uma pessoa
falar com alguem
falar com um atendente
atendente humano
parler a une personne
parler a quelqu'un
un conseiller
un humain
service client
echte person
einen menschen
mit jemandem sprechen
einen mitarbeiter
kundenservice"""

# The AI's own words when it passes the conversation on.
AI_PASSES_PHRASES = """\
pass you to a colleague
transfer you to a human
connect you with a human
connect you with an agent
a human agent will
a colleague will
te paso con un compañero
un agente humano
um atendente humano
un conseiller va
ein mitarbeiter wird"""


def normalise(text: str) -> str:
    """Lower case, accents off, spaces squeezed: what phrases are compared against."""
    decomposed = unicodedata.normalize("NFKD", text or "")
    plain = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return " ".join(plain.casefold().split())


@lru_cache(maxsize=32)
def phrases_from_text(text: str) -> tuple[str, ...]:
    return tuple(p for p in (normalise(line) for line in (text or "").splitlines()) if p)


@lru_cache(maxsize=32)
def _pattern(phrases: tuple[str, ...]) -> re.Pattern | None:
    if not phrases:
        return None
    alternatives = "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)")


def first_match(text: str, phrases: tuple[str, ...]) -> str | None:
    """The phrase found in `text` (normalised), or None."""
    pattern = _pattern(phrases)
    if pattern is None:
        return None
    found = pattern.search(normalise(text))
    return found.group(0) if found else None


# ---------------------------------------------------------------- the brief

_ORDER = re.compile(r"(?:#|\border\s*(?:no\.?|number|nr\.?|n[ºo°])?\s*#?)\s*([A-Z0-9][A-Z0-9-]{3,})", re.I)
_EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")
_PHONE = re.compile(r"(?<![\w#])\+?\d[\d ()-]{7,}\d\b")
_AMOUNT = re.compile(
    r"[$€£]\s?\d+(?:[.,]\d{1,2})?|\b\d+(?:[.,]\d{1,2})?\s?(?:[€£$]|(?:eur|usd|gbp|dollars?|euros?)\b)", re.I
)


@dataclass(frozen=True)
class Mentions:
    orders: list[str]
    emails: list[str]
    phones: list[str]
    amounts: list[str]

    def __bool__(self) -> bool:
        return bool(self.orders or self.emails or self.phones or self.amounts)


def mentions(texts: list[str]) -> Mentions:
    """Order numbers, e-mails, phone numbers and amounts, in the order first said, once each."""
    found: dict[str, list[str]] = {"orders": [], "emails": [], "phones": [], "amounts": []}

    def add(kind: str, value: str) -> None:
        value = value.strip()
        if value and value not in found[kind]:
            found[kind].append(value)

    for text in texts:
        for match in _EMAIL.finditer(text):
            add("emails", match.group(0))
        for match in _ORDER.finditer(text):
            add("orders", match.group(1))
        for match in _PHONE.finditer(text):
            add("phones", match.group(0))
        for match in _AMOUNT.finditer(text):
            add("amounts", match.group(0))
    return Mentions(**found)
