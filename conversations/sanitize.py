"""Making what Pinecall sends fit what the database can store, without losing it.

A frame may carry NUL bytes (PostgreSQL refuses them in text), lone UTF-16
surrogates (no encoding can store them), values of the wrong type, or fields
longer than their columns. Each helper returns the value to store and whether
it had to change it, so the row can say it was altered. Texts are kept whole;
ids are shortened deterministically (the same long id always maps to the same
short one, so later events still find their conversation).
"""

from __future__ import annotations

import hashlib
from typing import Any

REPLACEMENT = "\ufffd"


def clean_text(value: Any) -> tuple[str, bool]:
    """`value` as storable text: str, no NUL, no lone surrogate."""
    if value is None:
        return "", False
    altered = not isinstance(value, str)
    text = value if isinstance(value, str) else str(value)
    if "\x00" in text:
        text = text.replace("\x00", "")
        altered = True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # Pairs that belong together are joined; a lone half becomes U+FFFD.
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        altered = True
    return text, altered


def clean_field(value: Any, max_length: int) -> tuple[str, bool]:
    """A display field (a name): cleaned, then cut to its column."""
    text, altered = clean_text(value)
    if len(text) > max_length:
        return text[: max_length - 1] + "…", True
    return text, altered


def clean_id(value: Any, max_length: int) -> tuple[str, bool]:
    """An identifier: cleaned; one too long keeps a readable head and a hash of the whole."""
    text, altered = clean_text(value)
    if len(text) <= max_length:
        return text, altered
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    return f"{text[: max_length - 17]}~{digest}", True
