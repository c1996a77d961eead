"""How the reports write durations and shares."""

from __future__ import annotations

from django import template

register = template.Library()


@register.filter
def duration(seconds: float | None) -> str:
    """'45 s', '3 min 20 s', '2 h 05 min'; an em dash when there is nothing to measure."""
    if seconds is None:
        return "—"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s" if seconds else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


@register.filter
def percent(share: float | None) -> str:
    """0.4567 -> '45.7 %'; an em dash when there is no denominator."""
    return "—" if share is None else f"{share * 100:.1f} %"
