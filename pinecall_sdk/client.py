"""The asyncio Pinecall client: one WebSocket, agents, WhatsApp channels, human takeover.

Quick tour::

    pc = Pinecall(api_key="...", url="ws://127.0.0.1:8765")
    support = pc.agent("support", language="en", llm="openai/gpt-4.1-mini", prompt="...")
    support.add_whatsapp(phone_number_id="123", access_token="EAA...")

    @support.on("whatsapp.message")
    async def on_message(event):          # plain functions work too
        print(event.session_id, event.from_, event.text, event.paused)

    await pc.connect()                    # returns once the server said `connected`
    await support.wait_registered(timeout=10)
    await support.pause("wa-abc123")      # returns the session.paused confirmation
    await support.send_message(session_id="wa-abc123", contact="34612345678", text="Hi")
    await support.resume("wa-abc123")
    history = await support.get_history("wa-abc123")   # [{"role": "user", "content": ...}, ...]
    await pc.close()

Delivery guarantees of commands (``pause``, ``resume``, ``send_message``):

* A command issued while the client is disconnected, or before its agent is
  registered, waits in a per-agent queue and is sent once, in order, right after
  the agent is (re-)registered and its channels re-added. If the caller's timeout
  expires while the command still waits, it is withdrawn and never sent.
* A command that was already written to the socket when the connection dropped is
  **not** resent (it may or may not have been executed): the call fails at once
  with ``PinecallError(code="CONNECTION_LOST")``. The caller decides whether to
  retry (pause/resume are idempotent; a resent ``send_message`` may duplicate).
* Frames carry no request id: confirmations (``session.paused``, ``session.resumed``,
  ``session.sent``) and ``error`` frames are matched to commands by event and target,
  first in first out, per agent. ``session.paused``/``session.resumed`` only match a
  command with exactly that target (they also arrive unsolicited, as state);
  ``session.sent`` falls back to the oldest send in flight (the server may answer a
  contact send with the session it used). An ``error`` goes to the oldest command in
  flight for its ``session_id``, else to the oldest command in flight; an error no
  command is waiting for goes to the ``"error"`` handlers.
  Caveat: a server that *repeats* earlier events after a reconnect (the simulator
  replays the last few, ``session.paused`` included) can make an old confirmation
  with the same event and target confirm a command flushed right after re-registration
  a little early; the state it reports is the same.
* Timeouts: ``command_timeout`` (or ``timeout=`` per call) covers the wait in the
  queue and for the confirmation: :class:`PinecallTimeout` (code ``TIMEOUT``).
* ``get_history`` follows the same rules (queued, not resent, timed out). Its answer,
  ``history.data``, is matched by the ``request_id`` the server echoes; from a server
  that echoes none, by ``call_id`` and else first in first out.

Connection: ``connect()`` tries once and raises (``UNAUTHORIZED``, ``CONNECTION_TIMEOUT``,
``CONNECTION_FAILED``). After that, any unexpected close is followed by reconnects,
forever, ``min(1 s * 2**attempt, 30 s)`` + 0-25 % jitter apart, and by a full
re-registration (``agent.create``, ``channel.add``, queued commands). The client stops
for good (``"disconnected"`` with ``reconnect=False`` and a fatal ``"error"``) after
``close()``, a rejected key (``UNAUTHORIZED`` / close 1008) or a displacement (close
reason containing "Displaced", or ``agent.displaced`` for all its agents); a later
explicit ``connect()`` starts again. Registration refusals: ``AGENT_CONFLICT`` /
``AGENT_IN_USE`` are retried with backoff (at least ``retry_after_s``) for
``conflict_give_up_after`` (90 s), then reported; ``AGENT_CONFLICT_FATAL`` and
``SERVER_AT_CAPACITY`` are reported at once. A refused agent stays unregistered on that
connection (its commands fail with the refusal's code) until the next connection or
``agent.reregister()``.

After a reconnect, events may be missing or repeated (the protocol promises at most
once per connection): deduplicate by ``message_id``; the client does not.

Voice calls (``pinecall-voice-protocol.md``), on the same connection::

    support.add_phone("+13186330963")           # re-added after every (re-)registration

    @support.on("*")
    async def on_any(event):                    # call events are CallEvent subclasses
        if event.event == "bot.word":
            print(event.call_id, event.message_id, event.word)

    message_id = await support.call_say(call_id, "A colleague will call you back today.")
    await support.call_hold(call_id); await support.call_unhold(call_id)
    await support.call_mute(call_id); said = await support.call_unmute(call_id)
    await support.call_cancel_speech(call_id)  # None if nothing was being said
    await support.call_forward(call_id, "+15551234567")  # the call leaves Pinecall
    await support.call_hangup(call_id)

* Phone numbers: one ``channel.add`` (``type: "phone"``) per number after the WhatsApp
  channel, after every ``agent.created`` / ``agent.resumed``. ``channel.added`` marks a
  number added (``agent.phones``); ``PHONE_IN_USE`` (another agent holds it) is an
  ``error`` event of the agent, with ``code == "PHONE_IN_USE"``, ``phone`` and a clear
  ``message``; the number is then not re-added until ``add_phone`` is called again.
* Per-call commands carry ``call_id`` and no ``agent_id`` (they still go through the
  agent's queue: same queueing, timeout and ``CONNECTION_LOST`` rules as above). Their
  answers carry no request id: matched by event and ``call_id`` (and ``message_id``),
  first in first out. ``call_say`` waits for ``bot.speaking`` of its line (the line may
  wait behind what the bot is saying: keep ``timeout`` generous), ``reply.rejected`` /
  ``message.aborted`` fail it (``REPLY_REJECTED`` / ``MESSAGE_ABORTED``). A call the
  server does not know fails with the server's code (the simulator: ``CALL_NOT_FOUND``).
  A call that ends while a command waits fails it with ``CALL_ENDED`` (``call_hangup``
  is confirmed by that ``call.ended``).
* ``call_cancel_speech``: when the client knows the bot is silent on that call (it saw
  the call start and every line end), nothing is sent and it returns None at once;
  otherwise it sends ``bot.cancel`` and returns the ``bot.interrupted`` (``message.aborted``
  for a line still waiting its turn), or None when the line ended by itself
  (``bot.finished``) or the call ended first.
* When the connection is lost, the client ends every call it knew live with a
  ``call.ended`` of its own (``local=True``, ``reason="connection_lost"``): the server
  sends none for those.

Events are handed to handlers in arrival order by one dispatch task, so a slow
handler delays later handlers but never the socket reader (pings and confirmations
keep flowing). Exceptions in handlers are logged and swallowed.

Hostile or odd frames never stop the client: a frame that cannot be decoded or is not
a JSON object with an ``event`` string (invalid UTF-8, not JSON, nesting deep enough
for a RecursionError, ``[]``, ``null``...) is logged in one line (truncated) and
skipped; a known field of the wrong type is read leniently (see ``parse_event``) and
the event is delivered. Frames are parsed whatever their size up to ``max_frame_size``
(16 MiB; nothing in this protocol comes near it, a WhatsApp text is at most 4096
characters), so a large but valid frame, such as a long transcript, is delivered, not
set aside. A bigger frame makes websockets close the connection (1009) and the client
reconnects; that limit only bounds the memory one frame may take.

Crash-only: if an unexpected exception escapes the client's own loops (reading and
handling frames, dispatching, registering, pinging; a bug, never a handler's
exception), the client does not idle on. It stops for good: ``failure`` is that
exception, every pending command fails with ``PinecallError(code="INTERNAL")``, the
socket is closed, ``"disconnected"`` (``reconnect=False``) and a fatal ``"error"``
are delivered after the events already received, and then the ``"fatal"`` handlers
are called with the exception and ``wait_failed()`` returns it. The process should
exit and be restarted (the server keeps the agent's events meanwhile).

The client is not thread-safe: use it from the event loop that called ``connect()``
(from another thread, go through ``asyncio.run_coroutine_threadsafe``).

Layout: this module is the facade. The protocol itself (frames in, effects and frames
out, confirmation matching, registration, displacement) is ``pinecall_sdk.protocol``,
sans I/O; the socket, its one ``State`` and the fatal-or-retry ``classify`` are
``pinecall_sdk.connection``; handlers are ``pinecall_sdk.dispatch``; the futures of
waiting calls and the close / crash-only sequences are ``pinecall_sdk.runtime``.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from . import protocol
from .connection import State
from .dispatch import Handler
from .errors import PinecallInvalidArgument
from .events import (
    BotInterruptedEvent,
    CallEndedEvent,
    CallForwardedEvent,
    CallHeldEvent,
    CallMutedEvent,
    CallRejectedEvent,
    CallStartedEvent,
    CallUnheldEvent,
    Event,
    MessageAbortedEvent,
)
from .protocol import AgentState, Phase, PhoneChannel, reconnect_delay
from .runtime import Runtime

__all__ = ["Pinecall", "Agent", "reconnect_delay", "DEFAULT_URL"]

DEFAULT_URL = "wss://voice.pinecall.io"


def _check_target(session_id: Any, contact: Any) -> None:
    for name, value in (("session_id", session_id), ("contact", contact)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise PinecallInvalidArgument(f"{name} must be a non-empty string, not {value!r}")


def _check_call_id(call_id: Any) -> None:
    if not isinstance(call_id, str) or not call_id.strip():
        raise PinecallInvalidArgument(f"call_id must be a non-empty string, not {call_id!r}")


#: add_phone's options: name -> the JSON types it may have
_PHONE_OPTIONS: dict[str, tuple[type, ...]] = {
    "voice": (str, dict),
    "stt": (str, dict),
    "language": (str,),
    "llm": (str, dict),
    "config": (dict,),
    "ringing": (bool,),
}


def _expand_stt(stt: Any) -> Any:
    """``"provider:model:lang"`` -> ``{provider, model, language}``; anything else as given."""
    if isinstance(stt, str):
        parts = stt.split(":")
        if len(parts) == 3 and all(parts):
            return {"provider": parts[0], "model": parts[1], "language": parts[2]}
    return stt


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0
    ):
        raise PinecallInvalidArgument(f"timeout must be a positive number or None, not {timeout!r}")


class Agent:
    """One Pinecall agent on the client's connection. Make it with :meth:`Pinecall.agent`."""

    def __init__(self, runtime: Runtime, state: AgentState) -> None:
        self._runtime = runtime
        self._state = state  # the protocol core's record of this agent
        self.agent_id = state.agent_id

    def __repr__(self) -> str:
        return f"<Agent {self.agent_id!r} registered={self.registered}>"

    # -- configuration -------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.agent_id

    @property
    def config(self) -> dict[str, Any]:
        """The ``agent.create`` options (None values left out); used at every registration."""
        return self._state.config

    @property
    def registered(self) -> bool:
        """True while the agent is registered on the live connection (channels added)."""
        return self._state.phase is Phase.REGISTERED

    @property
    def displaced(self) -> bool:
        """True once another connection took this agent over (it is not re-registered)."""
        return self._state.phase is Phase.DISPLACED

    @property
    def whatsapp(self) -> dict[str, Any] | None:
        """The WhatsApp channel settings given to :meth:`add_whatsapp`, if any."""
        return dict(self._state.whatsapp) if self._state.whatsapp else None

    def add_whatsapp(
        self,
        phone_number_id: str,
        access_token: str,
        verify_token: str | None = None,
        app_secret: str | None = None,
        *,
        phone: str | None = None,
    ) -> None:
        """Attach the agent to a WhatsApp business number.

        Sent as ``channel.add`` after every (re-)registration; if the agent is
        already registered, it is sent now (after any command already queued).
        ``verify_token``, ``app_secret`` and ``phone`` go out only when set (not None, not "").
        """
        for name, value in (("phone_number_id", phone_number_id), ("access_token", access_token)):
            if not isinstance(value, str) or not value:
                raise PinecallInvalidArgument(f"{name} must be a non-empty string")
        for name, value in (("verify_token", verify_token), ("app_secret", app_secret), ("phone", phone)):
            if value is not None and not isinstance(value, str):
                raise PinecallInvalidArgument(f"{name} must be a string or None")
        # Optional settings are sent only when set; "" (an unset env var) counts as unset.
        self._runtime.set_whatsapp(self.agent_id, {
            "phone_number_id": phone_number_id,
            "access_token": access_token,
            "verify_token": verify_token or None,
            "app_secret": app_secret or None,
            "phone": phone or None,
        })

    @property
    def phones(self) -> dict[str, PhoneChannel]:
        """The phone numbers given to :meth:`add_phone`, in order, and where each stands
        (``status`` ``"pending"`` / ``"added"`` / ``"refused"``, ``error``); copies."""
        return {ref: phone.copy() for ref, phone in self._state.phones.items()}

    @property
    def live_calls(self) -> frozenset[str]:
        """The ids of this agent's calls the client has seen and not seen end."""
        return frozenset(t.call_id for t in self._runtime.core.calls.values() if t.agent_id == self.agent_id)

    def add_phone(
        self,
        ref: str,
        *,
        voice: str | dict[str, Any] | None = None,
        stt: str | dict[str, Any] | None = None,
        language: str | None = None,
        llm: str | dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
        ringing: bool | None = None,
    ) -> None:
        """Take the phone calls of a number: ``channel.add`` with ``type: "phone"``.

        ``ref`` is E.164 (``+`` and 7-15 digits) or a ``sip:`` URI, checked as the
        JavaScript SDK does and sent as given. Options that are set go into the frame
        (per-number ``voice``, ``stt``, ``language``, ``llm``, ``config``; ``ringing=True``
        for ``call.ringing`` before each call); an ``stt`` of ``"provider:model:lang"`` is
        sent as ``{provider, model, language}``. Sent after every (re-)registration (after
        the WhatsApp channel); if the agent is registered, now (after the commands already
        queued). Adding the same ``ref`` again replaces its options (and forgets a refusal).
        ``PHONE_IN_USE``: see :attr:`phones` and the ``"error"`` handlers.
        """
        if not protocol.check_phone_ref(ref):
            raise PinecallInvalidArgument(
                f"ref must be an E.164 number (+ and 7-15 digits) or a sip: URI, not {ref!r}"
            )
        options = {"voice": voice, "stt": stt, "language": language, "llm": llm, "config": config,
                   "ringing": ringing}
        for name, value in options.items():
            if value is not None and (
                not isinstance(value, _PHONE_OPTIONS[name]) or (isinstance(value, str) and not value)
            ):
                kinds = " or ".join(t.__name__ for t in _PHONE_OPTIONS[name])
                raise PinecallInvalidArgument(f"{name} must be a non-empty {kinds} or None, not {value!r}")
        options["stt"] = _expand_stt(stt)
        self._runtime.set_phone(self.agent_id, ref, options)

    # -- handlers ------------------------------------------------------------------

    def on(self, event: str, handler: Handler | None = None) -> Any:
        """Call ``handler(event)`` for this agent's events named ``event`` (``"*"``: all).

        Works as a decorator too: ``@agent.on("whatsapp.message")``.
        """
        return self._runtime.dispatch.add(self.agent_id, event, handler)

    def off(self, event: str, handler: Handler) -> None:
        """Remove a handler added with :meth:`on`."""
        self._runtime.dispatch.remove(self.agent_id, event, handler)

    # -- commands ------------------------------------------------------------------

    async def pause(
        self, session_id: str | None = None, *, contact: str | None = None, timeout: float | None = None
    ) -> Event:
        """Pause the AI: one session, every session of ``contact``, or (no arguments) the agent.

        Returns the ``session.paused`` confirmation. Raises :class:`PinecallError` when the
        server answers with ``error``, :class:`PinecallTimeout` without an answer in time.
        """
        return await self._target_command("session.pause", session_id, contact, timeout)

    async def resume(
        self, session_id: str | None = None, *, contact: str | None = None, timeout: float | None = None
    ) -> Event:
        """Hand back to the AI; same three shapes as :meth:`pause`.

        ``resume()`` with no target clears every pause level on the server.
        """
        return await self._target_command("session.resume", session_id, contact, timeout)

    async def send_message(
        self,
        session_id: str | None = None,
        contact: str | None = None,
        text: str | None = None,
        *,
        timeout: float | None = None,
    ) -> Event:
        """Send ``text`` on WhatsApp as a human; returns the ``session.sent`` confirmation.

        Needs ``session_id`` or ``contact``; give both so the server can fall back to a
        direct send when the session has ended.
        """
        _check_target(session_id, contact)
        if session_id is None and contact is None:
            raise PinecallInvalidArgument("send_message needs session_id or contact")
        if not isinstance(text, str) or not text.strip():
            raise PinecallInvalidArgument("send_message needs a non-empty text")
        _check_timeout(timeout)
        frame = protocol.send_frame(self.agent_id, session_id, contact, text)
        return await self._runtime.command(
            self.agent_id, frame, session_id=session_id, contact=contact, timeout=timeout
        )

    async def get_history(self, session_id: str, timeout: float | None = None) -> list[dict[str, Any]]:
        """The server's chat history of a WhatsApp session, oldest first.

        Entries are ``{"role": "user"|"assistant", "content": "..."}`` (customer messages
        have role ``user``; servers may add keys). Sends ``history.get`` with
        ``call_id=session_id`` and a fresh ``request_id``. Raises :class:`PinecallError`
        with code ``SESSION_NOT_FOUND`` when the server has no such session, and
        :class:`PinecallTimeout` without an answer in time. Entries that are not
        objects are left out (``history.data`` handlers still see them in ``raw``).
        """
        _check_target(session_id, None)
        if session_id is None:
            raise PinecallInvalidArgument("get_history needs a session_id")
        _check_timeout(timeout)
        frame = protocol.history_frame(self.agent_id, session_id)
        reply = await self._runtime.command(
            self.agent_id, frame, session_id=session_id, contact=None, timeout=timeout,
            request_id=frame["request_id"],
        )
        return [entry for entry in reply.messages or () if isinstance(entry, dict)]

    # -- voice calls: supervisor commands ------------------------------------------------

    async def call_say(
        self,
        call_id: str,
        text: str,
        message_id: str | None = None,
        add_to_history: bool = True,
        *,
        timeout: float | None = None,
    ) -> str:
        """Make the agent say ``text`` on the call; returns the line's ``message_id``.

        Sends ``bot.reply`` with ``in_reply_to: ""`` (and ``add_to_history: true`` to put
        the line into the LLM history as an assistant message); returns once the line
        starts (``bot.speaking`` with that ``message_id``). Its words, ``message.confirmed``
        and ``bot.finished`` / ``bot.interrupted`` follow as events. ``message_id``: a fresh
        ``msg_…`` if not given. Fails with ``REPLY_REJECTED`` / ``MESSAGE_ABORTED`` when the
        server drops the line.
        """
        _check_call_id(call_id)
        if not isinstance(text, str) or not text.strip():
            raise PinecallInvalidArgument("call_say needs a non-empty text")
        if message_id is not None and (not isinstance(message_id, str) or not message_id.strip()):
            raise PinecallInvalidArgument(f"message_id must be a non-empty string or None, not {message_id!r}")
        if not isinstance(add_to_history, bool):
            raise PinecallInvalidArgument(f"add_to_history must be a boolean, not {add_to_history!r}")
        _check_timeout(timeout)
        message_id = message_id or f"msg_{uuid.uuid4().hex}"
        await self._call_command(
            protocol.say_frame(call_id, message_id, text, add_to_history), call_id, timeout,
            message_id=message_id,
        )
        return message_id

    async def call_forward(self, call_id: str, to: str, *, timeout: float | None = None) -> CallForwardedEvent:
        """Forward the call to ``to`` (E.164 or ``sip:``), e.g. a human's phone; returns
        ``call.forwarded``. The call then leaves Pinecall (a ``call.ended`` follows)."""
        _check_call_id(call_id)
        if not protocol.check_phone_ref(to):
            raise PinecallInvalidArgument(f"to must be an E.164 number or a sip: URI, not {to!r}")
        _check_timeout(timeout)
        return await self._call_command(protocol.forward_frame(call_id, to), call_id, timeout)

    async def call_hold(self, call_id: str, *, timeout: float | None = None) -> CallHeldEvent:
        """Put the caller on hold (music, mic muted); returns ``call.held``."""
        return await self._simple_call_command("call.hold", call_id, timeout)

    async def call_unhold(self, call_id: str, *, timeout: float | None = None) -> CallUnheldEvent:
        """Take the caller off hold; returns ``call.unheld``."""
        return await self._simple_call_command("call.unhold", call_id, timeout)

    async def call_mute(self, call_id: str, *, timeout: float | None = None) -> CallMutedEvent:
        """Mute the caller for the AI (still transcribed); returns ``call.muted``."""
        return await self._simple_call_command("call.mute", call_id, timeout)

    async def call_unmute(self, call_id: str, *, timeout: float | None = None) -> str | None:
        """Unmute the caller; returns ``muted_transcript`` (what they said meanwhile, or None)."""
        ev = await self._simple_call_command("call.unmute", call_id, timeout)
        return getattr(ev, "muted_transcript", None)

    async def call_cancel_speech(
        self, call_id: str, message_id: str | None = None, *, timeout: float | None = None
    ) -> BotInterruptedEvent | MessageAbortedEvent | None:
        """Stop what the bot is saying on the call (only line ``message_id``, if given).

        Returns the ``bot.interrupted`` (or, for a line of ours still waiting its turn,
        its ``message.aborted``). When the client knows nothing (or not that line) is
        being said or on its way, it sends nothing and returns None at once; it also
        returns None when the line ended by itself (``bot.finished``) or the call ended
        before the cancel took effect.
        """
        _check_call_id(call_id)
        if message_id is not None and (not isinstance(message_id, str) or not message_id.strip()):
            raise PinecallInvalidArgument(f"message_id must be a non-empty string or None, not {message_id!r}")
        _check_timeout(timeout)
        if self._runtime.core.is_speaking(call_id, message_id) is False:
            return None
        ev = await self._call_command(
            protocol.cancel_frame(call_id, message_id), call_id, timeout, message_id=message_id
        )
        return ev if isinstance(ev, (BotInterruptedEvent, MessageAbortedEvent)) else None

    async def call_hangup(self, call_id: str, *, timeout: float | None = None) -> CallEndedEvent:
        """Hang up; returns the ``call.ended`` (reason ``client_hangup``)."""
        return await self._simple_call_command("call.hangup", call_id, timeout)

    async def call_accept(self, call_id: str, *, timeout: float | None = None) -> CallStartedEvent:
        """Answer a ``call.ringing`` call; returns its ``call.started``."""
        _check_call_id(call_id)
        _check_timeout(timeout)
        return await self._call_command(protocol.accept_frame(self.agent_id, call_id), call_id, timeout)

    async def call_reject(
        self, call_id: str, reason: str = "busy", *, timeout: float | None = None
    ) -> CallRejectedEvent:
        """Refuse a ``call.ringing`` call (``reason`` ``"busy"`` or ``"rejected"``);
        returns ``call.rejected``."""
        _check_call_id(call_id)
        if reason not in ("busy", "rejected"):
            raise PinecallInvalidArgument(f'reason must be "busy" or "rejected", not {reason!r}')
        _check_timeout(timeout)
        return await self._call_command(protocol.reject_frame(self.agent_id, call_id, reason), call_id, timeout)

    async def _simple_call_command(self, kind: str, call_id: str, timeout: float | None) -> Any:
        _check_call_id(call_id)
        _check_timeout(timeout)
        return await self._call_command(protocol.call_frame(kind, call_id), call_id, timeout)

    async def _call_command(
        self, frame: dict[str, Any], call_id: str, timeout: float | None, *, message_id: str | None = None
    ) -> Any:
        return await self._runtime.command(
            self.agent_id, frame, session_id=None, contact=None, timeout=timeout,
            call_id=call_id, message_id=message_id,
        )

    async def _target_command(
        self, kind: str, session_id: str | None, contact: str | None, timeout: float | None
    ) -> Event:
        _check_target(session_id, contact)
        if session_id is not None and contact is not None:
            raise PinecallInvalidArgument(
                f"{kind.split('.')[1]}: give session_id or contact, not both"
            )
        _check_timeout(timeout)
        frame = protocol.target_frame(kind, self.agent_id, session_id, contact)
        return await self._runtime.command(
            self.agent_id, frame, session_id=session_id, contact=contact, timeout=timeout
        )

    # -- registration --------------------------------------------------------------

    async def wait_registered(self, timeout: float | None = None) -> None:
        """Wait until the agent is registered (again) on a live connection.

        Raises :class:`PinecallTimeout` after ``timeout`` seconds, and
        :class:`PinecallError` when registration was given up (conflict, capacity,
        displaced, rejected key, client closed).
        """
        await self._runtime.wait_registered(self.agent_id, timeout)

    def reregister(self) -> None:
        """Try to register again after a registration was given up or the agent displaced.

        Registration happens now if the client is connected, else on the next connection.
        (Registering a displaced agent takes it back from the other connection.)
        """
        self._runtime.reregister(self.agent_id)


class Pinecall:
    """The Pinecall client: one WebSocket to ``{url}/client`` shared by all agents.

    Args:
        api_key: the API key; default: env ``PINECALL_API_KEY``.
        url: server base URL; default: env ``PINECALL_URL``, else ``wss://voice.pinecall.io``.
        command_timeout: seconds a command waits for its confirmation (per call: ``timeout=``).
        connect_timeout: seconds to open the socket and get ``connected``.
        ping_interval: seconds between keep-alive ``ping`` frames (None or 0: off).

    Backoff constants are instance attributes (also keyword options) so tests can
    shrink them: ``reconnect_base_delay`` (1 s), ``reconnect_max_delay`` (30 s),
    ``reconnect_jitter`` (0.25), ``conflict_base_delay`` (1 s), ``conflict_max_delay``
    (15 s), ``conflict_give_up_after`` (90 s), ``conflict_retry_after_cap`` (None: the
    server's ``retry_after_s`` is honoured in full), ``close_timeout`` (5 s); and
    ``max_frame_size`` (16 MiB), the largest frame read (see the module docstring).
    Options are read when used: changing one takes effect from the next decision.

    Lifecycle handlers (``pc.on(name, handler)``): ``"connected"`` (the wire event),
    ``"disconnected"`` (:class:`DisconnectedEvent`, ``reconnect`` says whether the client
    will try again), ``"reconnecting"`` (:class:`ReconnectingEvent` with ``attempt``
    (from 1) and ``delay``), ``"error"`` (:class:`ErrorEvent`: server errors not tied to
    a command, and failures the client gives up on, with ``fatal=True``),
    ``"registered"`` (:class:`RegisteredEvent`, per agent, after every (re-)registration;
    also on ``agent.on("registered")``), ``"fatal"`` (called with the exception, not an
    event, when the client failed for good; see :meth:`wait_failed`; never called for
    a wire frame named "fatal", and not part of ``"*"``). ``pc.on`` with any other event
    name gets that event of every agent; ``"*"`` gets every event.
    """

    reconnect_base_delay: float = 1.0
    reconnect_max_delay: float = 30.0
    reconnect_jitter: float = 0.25
    conflict_base_delay: float = 1.0
    conflict_max_delay: float = 15.0
    conflict_give_up_after: float = 90.0
    conflict_retry_after_cap: float | None = None
    close_timeout: float = 5.0
    max_frame_size: int = 16 * 2**20

    def __init__(
        self,
        api_key: str | None = None,
        url: str | None = None,
        *,
        command_timeout: float | None = 10.0,
        connect_timeout: float | None = 10.0,
        ping_interval: float | None = 30.0,
        reconnect_base_delay: float | None = None,
        reconnect_max_delay: float | None = None,
        reconnect_jitter: float | None = None,
        conflict_base_delay: float | None = None,
        conflict_max_delay: float | None = None,
        conflict_give_up_after: float | None = None,
        conflict_retry_after_cap: float | None = None,
        close_timeout: float | None = None,
    ) -> None:
        self.api_key = api_key if api_key is not None else os.environ.get("PINECALL_API_KEY")
        base = url or os.environ.get("PINECALL_URL") or DEFAULT_URL
        self.url = base.rstrip("/")
        self.command_timeout = command_timeout
        self.connect_timeout = connect_timeout
        self.ping_interval = ping_interval
        for name, value in (
            ("reconnect_base_delay", reconnect_base_delay),
            ("reconnect_max_delay", reconnect_max_delay),
            ("reconnect_jitter", reconnect_jitter),
            ("conflict_base_delay", conflict_base_delay),
            ("conflict_max_delay", conflict_max_delay),
            ("conflict_give_up_after", conflict_give_up_after),
            ("conflict_retry_after_cap", conflict_retry_after_cap),
            ("close_timeout", close_timeout),
        ):
            if value is not None:
                setattr(self, name, value)
        self._runtime = Runtime(self)
        self._agents: dict[str, Agent] = {}

    def __repr__(self) -> str:
        return f"<Pinecall {self.url!r} connected={self.connected} agents={list(self._agents)}>"

    @property
    def ws_url(self) -> str:
        return f"{self.url}/client"

    @property
    def state(self) -> State:
        """Where the connection stands (``pinecall_sdk.connection.State``)."""
        return self._runtime.conn.state

    @property
    def connected(self) -> bool:
        """True while the socket is up and the server said ``connected``."""
        return self._runtime.conn.connected

    @property
    def agents(self) -> dict[str, Agent]:
        return dict(self._agents)

    @property
    def last_pong(self) -> float | None:
        """When the last ``pong`` came (``time.monotonic()``), if one did."""
        return self._runtime.core.last_pong

    @property
    def failure(self) -> BaseException | None:
        """The unexpected exception that stopped the client for good, else None.

        Set as soon as it happens (a rejected key or a displacement is not a failure).
        """
        return self._runtime.failure

    async def wait_failed(self) -> BaseException:
        """Wait until the client has failed for good; return the exception.

        Returns once the socket is closed, pending commands have failed and the events
        received before the failure have been handed to handlers (right before the
        ``"fatal"`` handlers are called). Typical use: run it beside the application
        and exit the process when it returns. It never returns for a client that is
        only closed.
        """
        return await self._runtime.wait_failed()

    # -- public API ----------------------------------------------------------------------

    def agent(self, agent_id: str, **config: Any) -> Agent:
        """Declare an agent (``language``, ``llm``, ``prompt``, ... as keyword options).

        Config keys set to None are left out of ``agent.create``. Asking again for the
        same ``agent_id`` returns the same object (new non-None options are merged in
        and used from the next registration on).
        """
        if not isinstance(agent_id, str) or not agent_id:
            raise PinecallInvalidArgument("agent_id must be a non-empty string")
        existing = self._agents.get(agent_id)
        if existing is not None:
            existing.config.update((k, v) for k, v in config.items() if v is not None)
            return existing
        agent = Agent(self._runtime, self._runtime.add_agent(agent_id, config))
        self._agents[agent_id] = agent
        return agent

    def on(self, event: str, handler: Handler | None = None) -> Any:
        """Lifecycle and global handlers; also usable as a decorator.

        ``"fatal"`` handlers get the exception (see :meth:`wait_failed`), not an event.
        """
        return self._runtime.dispatch.add(None, event, handler)

    def off(self, event: str, handler: Handler) -> None:
        self._runtime.dispatch.remove(None, event, handler)

    async def connect(self) -> None:
        """Open the connection; return once the server sent ``connected``.

        Raises ``PinecallError`` with code ``UNAUTHORIZED`` (rejected key: no retry),
        ``CONNECTION_TIMEOUT`` (no ``connected`` within ``connect_timeout``; a
        :class:`PinecallTimeout`) or ``CONNECTION_FAILED`` (socket could not be opened).
        The first connection is tried once; after it succeeded, the client
        reconnects on its own after any unexpected close.
        """
        await self._runtime.connect()

    async def close(self) -> None:
        """Close the connection for good: no reconnect; pending commands fail with ``CLOSED``."""
        await self._runtime.close()

    async def __aenter__(self) -> "Pinecall":
        await self.connect()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
