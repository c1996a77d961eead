"""Canned replies' variables: checked when a reply is saved, filled for one conversation.

A leaf module (no models): the model's `clean`, the services and the picker share it.
A filled reply is plain text, escaped wherever it is shown like any message.

Missing values fall back to words that still read well in a greeting, the
commonest use: a customer without a name is "there" ("Hi there"), an operator
without a first name is called by their display name (full name or username).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from django.core.exceptions import ValidationError

VARIABLES = {
    "customer_first_name": "The customer's first name (\"there\" when unknown)",
    "customer_name": "The customer's name as WhatsApp gives it (\"there\" when unknown)",
    "customer_phone": "The customer's phone number",
    "operator_first_name": "Your first name (your display name when not set)",
    "operator_name": "Your name as colleagues see it",
}
NAME_FALLBACK = "there"

_VARIABLE = re.compile(r"\{\{\s*([A-Za-z0-9_]*)\s*\}\}")


def template_errors(text: str) -> list[str]:
    """Why `text` cannot be saved as a canned reply: unknown or malformed variables."""
    errors = []
    for match in _VARIABLE.finditer(text or ""):
        name = match.group(1)
        if name not in VARIABLES:
            errors.append(
                f"Unknown variable {match.group(0)}: use one of "
                + ", ".join("{{%s}}" % known for known in VARIABLES)
                + "."
            )
    rest = _VARIABLE.sub("", text or "")
    if "{{" in rest or "}}" in rest:
        at = rest.find("{{") if "{{" in rest else rest.find("}}")
        errors.append(
            f"A variable is written {{{{name}}}}: check the braces near “{rest[max(0, at - 10):at + 20]}”."
        )
    return errors


def check_template(text: str) -> None:
    errors = template_errors(text)
    if errors:
        raise ValidationError(errors)


@dataclass(frozen=True)
class FillValues:
    customer_name: str
    customer_phone: str
    operator_first_name: str
    operator_name: str

    def get(self, name: str) -> str:
        if name == "customer_first_name":
            return self.customer_name.split()[0] if self.customer_name.split() else NAME_FALLBACK
        if name == "customer_name":
            return self.customer_name.strip() or NAME_FALLBACK
        return getattr(self, name)


def fill(text: str, values: FillValues) -> str:
    """The reply's text with its variables replaced (an unknown one is left as typed:
    saving refuses those, so only a reply stored before a variable was dropped has one)."""

    def value(match: re.Match) -> str:
        name = match.group(1)
        return values.get(name) if name in VARIABLES else match.group(0)

    return _VARIABLE.sub(value, text or "")
