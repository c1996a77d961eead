"""The reports' charts, drawn on the server as SVG: no chart library, no script, and
nothing the strict Content-Security-Policy would refuse (classes style them, from
static/css/app.css; presentation attributes place them).

Each chart names itself (<title>, <desc>) for screen readers, labels its axes, and
every point or bar is a link to the conversations it counts; the page shows the
same numbers as a table beside it (the text alternative).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

WIDTH, HEIGHT = 960, 300
LEFT, RIGHT, TOP, BOTTOM = 52, 16, 30, 48
X_LABELS_SHOWN = 8
Y_TICKS = 4


@dataclass(frozen=True)
class Series:
    key: str  # also its CSS class: series-<key>
    label: str
    values: list[int]
    hrefs: list[str]


def nice_ceiling(value: float) -> int:
    """The y axis' top: Y_TICKS whole steps of 1, 2, 2.5, 3 or 5 times a power of ten."""
    needed = max(1.0, value / Y_TICKS)
    power = 10 ** math.floor(math.log10(needed))
    for factor in (1, 2, 2.5, 3, 5, 10):
        step = factor * power
        if step >= needed and step == int(step):
            return int(step) * Y_TICKS
    return int(10 * power) * Y_TICKS


def _n(value: float) -> str:
    """A coordinate, to a tenth of a unit (format_html takes no format specs)."""
    return f"{value:.1f}"


def _plot() -> tuple[float, float]:
    return WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM


def _y(value: float, top: int) -> float:
    _, height = _plot()
    return TOP + height - (value / top) * height


def _frame(*, chart_id: str, title: str, desc: str, x_title: str, y_title: str, top: int) -> list[SafeString]:
    """The opening tag, the names, the y grid with its numbers and the axis titles."""
    width, height = _plot()
    parts = [
        format_html(
            '<svg class="chart" id="{}" viewBox="0 0 {} {}" role="img" aria-labelledby="{}-title {}-desc">'
            '<title id="{}-title">{}</title><desc id="{}-desc">{}</desc>',
            chart_id, WIDTH, HEIGHT, chart_id, chart_id, chart_id, title, chart_id, desc,
        )
    ]
    for i in range(Y_TICKS + 1):
        value = top * i // Y_TICKS
        y = _y(value, top)
        parts.append(
            format_html(
                '<line class="chart-grid" x1="{}" y1="{}" x2="{}" y2="{}"/>'
                '<text class="chart-tick" x="{}" y="{}" text-anchor="end">{}</text>',
                LEFT, _n(y), LEFT + width, _n(y), LEFT - 6, _n(y + 4), value,
            )
        )
    parts.append(
        format_html(
            '<text class="chart-axis-title" x="{}" y="{}" text-anchor="middle">{}</text>'
            '<text class="chart-axis-title" x="14" y="{}" text-anchor="middle" transform="rotate(-90 14 {})">{}</text>',
            _n(LEFT + width / 2), HEIGHT - 6, x_title, _n(TOP + height / 2), _n(TOP + height / 2), y_title,
        )
    )
    return parts


def _x_labels(labels: list[str], xs: list[float], *, shown: int = X_LABELS_SHOWN) -> SafeString:
    every = max(1, math.ceil(len(labels) / shown))
    return format_html_join(
        "",
        '<text class="chart-tick" x="{}" y="{}" text-anchor="middle">{}</text>',
        ((_n(x), HEIGHT - BOTTOM + 16, label) for i, (x, label) in enumerate(zip(xs, labels)) if i % every == 0),
    )


def line_chart(
    *, chart_id: str, title: str, desc: str, x_title: str, y_title: str, x_labels: list[str],
    series: list[Series],
) -> SafeString:
    """A line per series over the same x points, with a linked dot on each value."""
    width, _ = _plot()
    count = len(x_labels)
    top = nice_ceiling(max((max(s.values, default=0) for s in series), default=0))
    xs = [LEFT + (width * (i + 0.5) / count) for i in range(count)]
    parts = _frame(chart_id=chart_id, title=title, desc=desc, x_title=x_title, y_title=y_title, top=top)
    parts.append(_x_labels(x_labels, xs))
    for n, s in enumerate(series):
        points = " ".join(f"{x:.1f},{_y(v, top):.1f}" for x, v in zip(xs, s.values))
        parts.append(format_html('<polyline class="chart-line series-{}" points="{}"/>', s.key, points))
        parts.append(
            format_html_join(
                "",
                '<a href="{}"><circle class="chart-point series-{}" cx="{}" cy="{}" r="3.5">'
                "<title>{}, {}: {}</title></circle></a>",
                ((href, s.key, _n(x), _n(_y(v, top)), label, s.label, v) for x, v, href, label in zip(xs, s.values, s.hrefs, x_labels)),
            )
        )
        # The legend, along the top.
        parts.append(
            format_html(
                '<rect class="chart-swatch series-{}" x="{}" y="8" width="12" height="12" rx="2"/>'
                '<text class="chart-legend" x="{}" y="18">{}</text>',
                s.key, LEFT + n * 170, LEFT + n * 170 + 17, s.label,
            )
        )
    parts.append(mark_safe("</svg>"))
    return mark_safe("".join(parts))


def bar_chart(
    *, chart_id: str, title: str, desc: str, x_title: str, y_title: str, labels: list[str],
    values: list[int], hrefs: list[str],
) -> SafeString:
    """One linked bar per label."""
    width, _ = _plot()
    count = len(labels)
    top = nice_ceiling(max(values, default=0))
    slot = width / count
    xs = [LEFT + slot * (i + 0.5) for i in range(count)]
    parts = _frame(chart_id=chart_id, title=title, desc=desc, x_title=x_title, y_title=y_title, top=top)
    parts.append(_x_labels(labels, xs, shown=count))  # every bar is named
    base = _y(0, top)
    parts.append(
        format_html_join(
            "",
            '<a href="{}"><rect class="chart-bar" x="{}" y="{}" width="{}" height="{}">'
            "<title>{}: {}</title></rect></a>",
            (
                (href, _n(x - slot * 0.35), _n(_y(v, top)), _n(slot * 0.7), _n(base - _y(v, top)), label, v)
                for x, v, href, label in zip(xs, values, hrefs, labels)
            ),
        )
    )
    parts.append(mark_safe("</svg>"))
    return mark_safe("".join(parts))
