"""The SDK's logger: wire text in its lines is truncated and escaped, never lost."""

from __future__ import annotations

import logging

logger = logging.getLogger("pinecall_sdk")

LOG_TEXT_MAX = 200


def truncate(text: str | bytes, limit: int = LOG_TEXT_MAX) -> str:
    """At most ``limit`` characters of a frame for a log line (bytes shown escaped)."""
    head = text[:limit]
    shown = head if isinstance(head, str) else repr(bytes(head))
    if len(text) <= limit:
        return shown
    return f"{shown}... ({len(text)} {'chars' if isinstance(text, str) else 'bytes'})"


def _escape_unprintable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


class _EscapeUnprintable(logging.Filter):
    """Escape NUL and lone surrogates in this logger's lines.

    Wire text may hold both (they are delivered as sent); a lone surrogate cannot be
    written to a UTF-8 log stream, so the line would be lost in a logging error.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True  # a bad format string: let the handler report it as usual
        safe = _escape_unprintable(message)
        if safe != message:
            record.msg, record.args = safe, ()
        if record.exc_info and not record.exc_text:
            trace = logging.Formatter().formatException(record.exc_info)
            if _escape_unprintable(trace) != trace:  # else leave it to the handler's formatter
                record.exc_text = _escape_unprintable(trace)
        return True


logger.addFilter(_EscapeUnprintable())
