"""Small presentation helpers for the dashboard's templates.

Relative times and the WhatsApp window are rendered here on the server, and
`static/js/app.js` recomputes the same text each minute from `data-ts`, so the
two must agree: keep `ago()` and `window_chip()` in step with `fmtAgo()` and
`fmtWindow()` there.
"""

from __future__ import annotations

import re
from datetime import datetime

from django import template
from django.utils import timezone
from django.utils.html import conditional_escape
from django.utils.safestring import mark_safe

from conversations import permissions

register = template.Library()

WINDOW_SECONDS = 24 * 3600
WINDOW_WARNING_SECONDS = 2 * 3600  # "closing soon" under two hours left


def _now() -> datetime:
    return timezone.now()


@register.filter
def ts(value: datetime | None) -> str:
    """Epoch seconds, for data-ts attributes."""
    return str(int(value.timestamp())) if value else ""


def _compact(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return "now"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


@register.filter
def ago(value: datetime | None) -> str:
    """'now', '5m', '3h', '2d'."""
    if not value:
        return ""
    return _compact((_now() - value).total_seconds())


def _hours_minutes(seconds: float) -> str:
    minutes = max(0, int(seconds)) // 60
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m"


def window_info(last_customer_at: datetime | None) -> dict:
    """The 24-hour WhatsApp window: state 'none', 'open', 'closing' or 'closed', and its text."""
    if not last_customer_at:
        return {"state": "none", "text": "", "title": "The customer has not written yet."}
    elapsed = (_now() - last_customer_at).total_seconds()
    left = WINDOW_SECONDS - elapsed
    if left <= 0:
        return {
            "state": "closed",
            "text": "Window closed",
            "title": "The customer wrote more than 24 h ago: WhatsApp allows free text "
            "only within 24 h of their last message.",
        }
    if left < WINDOW_WARNING_SECONDS:
        return {
            "state": "closing",
            "text": f"{_hours_minutes(left)} left",
            "title": "The 24-hour WhatsApp window closes soon.",
        }
    return {
        "state": "open",
        "text": f"Customer {_compact(elapsed)}" + ("" if elapsed < 60 else " ago"),
        "title": "Time since the customer's last message.",
    }


@register.inclusion_tag("ui/_window_chip.html")
def window_chip(last_customer_at: datetime | None, long: bool = False):
    return {"info": window_info(last_customer_at), "ts": ts(last_customer_at), "long": long}


@register.filter
def msg_time(value: datetime | None) -> str:
    """'14:02' today, 'Nov 18, 14:02' before."""
    if not value:
        return ""
    local = timezone.localtime(value)
    if local.date() == timezone.localtime(_now()).date():
        return local.strftime("%H:%M")
    return f"{local.strftime('%b')} {local.day}, {local.strftime('%H:%M')}"


register.filter("display_name", permissions.display_name)


@register.filter
def initials(conversation) -> str:
    return name_initials(conversation.contact_name) or (
        "".join(ch for ch in conversation.contact_phone if ch.isdigit())[-2:] or "?"
    )


@register.filter
def name_initials(name: str) -> str:
    """"Ana María Ruiz": AR; "<b>Mallory</b>": M; nothing usable: ""."""
    name = re.sub(r"<[^>]*>", " ", name or "")
    words = ["".join(ch for ch in word if ch.isalnum()) for word in name.split()]
    words = [word for word in words if word]
    if not words:
        return ""
    return (words[0][:1] + (words[-1][:1] if len(words) > 1 else "")).upper()


@register.filter
def avatar_hue(conversation) -> int:
    """A stable colour per contact, so people recognise rows at a glance."""
    key = conversation.contact_phone or str(conversation.pk)
    return sum(ord(ch) * (i + 1) for i, ch in enumerate(key)) % 360


AUTHOR_LABEL = {"customer": "Customer", "ai": "AI", "human": "Human", "system": "Auto"}


@register.filter
def author_label(author: str) -> str:
    return AUTHOR_LABEL.get(author, "")


@register.filter
def ts_precise(value: datetime | None) -> str:
    """Epoch seconds with microseconds, to order rows exactly as the database does."""
    return f"{value.timestamp():.6f}" if value else "0"


@register.filter
def window_state(value: datetime | None) -> str:
    return window_info(value)["state"]


@register.filter
def words(value: str) -> str:
    """'idle_timeout' -> 'idle timeout'."""
    return (value or "").replace("_", " ")


@register.filter
def isolate(text, name):
    """`text`, escaped, with the person's `name` inside it wrapped in <bdi>.

    A right-to-left (or overriding) name then cannot reorder the words around it.
    """
    text, name = conditional_escape(text), conditional_escape(name or "")
    if not name or name not in text:
        return text
    return mark_safe(text.replace(name, f"<bdi>{name}</bdi>", 1))


@register.filter
def get_item(mapping, key):
    """`counts|get_item:key`: a dict's value in a template (None when absent)."""
    try:
        return mapping.get(key)
    except AttributeError:
        return None
