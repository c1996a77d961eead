"""Who may do what, and how a person is named: a leaf module every layer can import."""

from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser

# Take over, reply to and hand back conversations (the Operators group).
TAKE_OVER_PERMISSION = "conversations.take_over_conversation"
# Pause a contact or the whole agent: the kill switch (the Supervisors group).
PAUSE_WIDE_PERMISSION = "conversations.pause_contact_or_agent"


def can_take_over(user: AbstractBaseUser) -> bool:
    return bool(user and user.has_perm(TAKE_OVER_PERMISSION))


def can_pause_wide(user: AbstractBaseUser) -> bool:
    return bool(user and user.has_perm(PAUSE_WIDE_PERMISSION))


def display_name(user: AbstractBaseUser | None) -> str:
    """A person as operators see them: their full name, else their username."""
    if user is None:
        return "Someone"
    full = user.get_full_name() if hasattr(user, "get_full_name") else ""
    return full or user.get_username()
