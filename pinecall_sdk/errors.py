"""Exceptions raised by the Pinecall client.

Every error the client raises on purpose is a :class:`PinecallError` with a
machine-readable ``code``:

* codes sent by the server in an ``error`` frame (``SESSION_NOT_FOUND``,
  ``INVALID_COMMAND``, ``UNKNOWN_EVENT``, ``UNAUTHORIZED``, ``AGENT_CONFLICT`` ...);
* codes made up by the client:

  ``TIMEOUT``            no confirmation within the command timeout (:class:`PinecallTimeout`)
  ``CONNECTION_TIMEOUT`` no ``connected`` within ``connect_timeout``
  ``CONNECTION_FAILED``  the socket could not be opened
  ``CONNECTION_LOST``    the connection dropped after the command was sent; whether
                         the server executed it is unknown, and it is not resent
  ``CLOSED``             the client was closed (``pc.close()``)
  ``DISPLACED``          another connection took the agent over
  ``INTERNAL``           the client failed for good (a bug; see ``Pinecall.wait_failed``)
  ``INVALID_ARGUMENT``   bad arguments, detected before anything is sent
                         (:class:`PinecallInvalidArgument`, also a ``ValueError``)
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "PinecallError",
    "PinecallTimeout",
    "PinecallInvalidArgument",
]


class PinecallError(Exception):
    """An error reported by the Pinecall server or detected by the client.

    Attributes:
        code: machine-readable code (``"SESSION_NOT_FOUND"``, ``"TIMEOUT"``, ...).
        message: human-readable text.
        frame: the raw ``error`` frame from the server (a dict), when there is one.
            Also available as ``raw``.
    """

    def __init__(
        self,
        message: str = "",
        *,
        code: str | None = None,
        frame: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.frame = frame

    @property
    def raw(self) -> dict[str, Any] | None:
        return self.frame

    @classmethod
    def from_frame(cls, frame: dict[str, Any]) -> "PinecallError":
        """Build the exception for a server ``error`` frame (``message`` or old-style ``error``)."""
        code = frame.get("code")
        message = frame.get("message")
        legacy = frame.get("error")
        if isinstance(legacy, dict):
            code = code or legacy.get("code")
            message = message or legacy.get("message")
        elif message is None and legacy is not None:
            message = legacy
        return cls(
            str(message) if message is not None else str(code or "error"),
            code=str(code) if code is not None else None,
            frame=frame,
        )

    def __str__(self) -> str:
        if self.code and self.message and self.code not in self.message:
            return f"[{self.code}] {self.message}"
        return self.message or (self.code or "")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


class PinecallTimeout(PinecallError, TimeoutError):
    """No answer from the server in time (code ``TIMEOUT`` or ``CONNECTION_TIMEOUT``).

    Also a :class:`TimeoutError`, so ``except TimeoutError`` catches it.
    """

    def __init__(
        self,
        message: str = "timed out",
        *,
        code: str | None = "TIMEOUT",
        frame: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message, code=code, frame=frame)


class PinecallInvalidArgument(PinecallError, ValueError):
    """Bad arguments to a client method (code ``INVALID_ARGUMENT``); nothing was sent.

    Also a :class:`ValueError`.
    """

    def __init__(self, message: str, *, code: str | None = "INVALID_ARGUMENT") -> None:
        super().__init__(message, code=code)
