"""CSV downloads, streamed: rows are written as the database yields them, in chunks,
so a year of the audit trail never sits whole in memory.

Every cell goes through `csv_cell`: a spreadsheet runs a cell that starts with
= + - @ (or a tab or carriage return before them) as a formula, so such a cell
is prefixed with a single quote (OWASP's advice on CSV injection).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from datetime import datetime

from django.http import StreamingHttpResponse
from django.utils import timezone

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
CHUNK_SIZE = 1000


def csv_cell(value) -> str:
    """A value as a cell a spreadsheet shows as text, never runs."""
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a number, not text: -2 stays a number
    if isinstance(value, datetime):
        value = timezone.localtime(value).isoformat(timespec="seconds")
    text = str(value)
    return "'" + text if text.startswith(FORMULA_STARTS) else text


class _Echo:
    """A file-like whose write hands back what it is given: csv.writer formats, we stream."""

    def write(self, value: str) -> str:
        return value


def csv_response(filename: str, header: list[str], rows: Iterable[Iterable]) -> StreamingHttpResponse:
    """A streamed CSV download: the header, then each row as it comes."""
    writer = csv.writer(_Echo())

    def lines():
        yield writer.writerow(header)
        for row in rows:
            yield writer.writerow([csv_cell(value) for value in row])

    response = StreamingHttpResponse(lines(), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response
