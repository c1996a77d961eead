"""The Pinecall worker: holds the connection, stores every event, carries out the outbox.

It runs in `python manage.py runworker pinecall` (its own process, production)
or inside the one embedded process of `manage.py serve` (the demo). Either way
it is the channel-layer consumer of the `pinecall` channel, created at start
(not on the first message, as Channels' runworker would do), and only this
module imports `pinecall_sdk`.

Delivery rules:
- Events: each is appended to the spool (`conversations.spool`) the moment the
  client hands it over, then stored from there, in order, by one idempotent
  ingest service. A database that is unreachable is waited for (the spool
  holds what arrives meanwhile); an event the database refuses even after
  sanitising goes to the dead letters (`DeadLetter`), never silently away.
- Crash-only: if the connection or the store loop dies for an unexpected
  reason, the process exits non-zero for its manager to restart it.
- Commands: the outbox in the database is the queue. A command is marked sent
  before its frame goes out and is never sent again after that, except pauses
  and resumes left in flight by a crash, which are safe to repeat.
- After every (re)registration the worker re-asserts the pauses that humans
  hold, then drains the outbox; it also polls, so a lost wake-up only delays.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

from asgiref.sync import sync_to_async
from channels.consumer import AsyncConsumer
from channels.routing import ChannelNameRouter
from channels.worker import Worker
from django.conf import settings
from django.utils import timezone
from django.db import (
    DatabaseError,
    InterfaceError,
    OperationalError,
    ProgrammingError,
    close_old_connections,
    connection,
    transaction,
)

from conversations import ingest, metrics, notify, selectors, services
from conversations.notify import WORKER_CHANNEL
from conversations.models import (
    Command,
    ContactPause,
    Conversation,
    DeadLetter,
    IngestCursor,
    WorkerProcess,
)
from conversations.leadership import Leadership
from conversations.sanitize import clean_text
from conversations.spool import Spool
from pinecall_sdk import Pinecall, PinecallError, PinecallTimeout
from pinecall_sdk.events import parse_event
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

logger = logging.getLogger("conversations.worker")

OUTBOX_POLL_SECONDS = 2.0
OUTBOX_BATCH = 200
# Events per transaction when they pile up (a burst, a replay): each batch also
# pays a fixed price after its commit (the newest page of inbox rows, the tab
# counts), which larger batches share among more messages.
INGEST_BATCH = 2000
# How long a write's inbox rows wait for its other fragments to be published.
ROWS_WAIT_SECONDS = 0.05
# After Redis failed a fragment's PUBLISH from the ORM thread: the loop publishes for this long.
DIRECT_PUBLISH_PAUSE = 10.0
HEARTBEAT_SECONDS = 5.0
HANDOFF_TICK_SECONDS = 1.0
# After losing the lock, how long the worker keeps its Pinecall connection
# (not sending) hoping to get the lock back before leaving it to another.
LEADERSHIP_GRACE_SECONDS = 10.0
DATABASE_RETRY_MAX_SECONDS = 5.0
# Written into the spool when a connection registers: the replies that follow
# may be repeats whose customer message came before the server's replay.
REGISTERED_MARK = {"event": "_worker.registered"}


def is_database_outage(error: BaseException) -> bool:
    """An error of the database's availability, not of the data: wait and retry.

    Connection refused or reset, a pool timeout, a server restarting (all
    OperationalError or InterfaceError in Django), and a schema not migrated
    yet (ProgrammingError): none is a reason to give an event up.
    """
    return isinstance(error, (OperationalError, InterfaceError, ProgrammingError))


def _db(func: Callable) -> Callable:
    """Run an ORM call off the event loop, on a thread that drops stale connections."""

    def call(*args, **kwargs):
        close_old_connections()
        return func(*args, **kwargs)

    return sync_to_async(call, thread_sensitive=True)


# ---------------------------------------------------------------- the database side, sync


def _recover_in_flight() -> None:
    """Commands marked sent when the last worker died: their outcome is unknown."""
    for command in Command.objects.filter(status=Command.Status.SENT).order_by("id"):
        if command.kind in (Command.Kind.SEND, Command.Kind.SAY):
            # Pinecall may or may not have delivered it; never risk a double send.
            services.command_fail(
                command=command,
                code="OUTCOME_UNKNOWN",
                message="The worker stopped before Pinecall confirmed this message; "
                "check the conversation before sending it again.",
            )
        else:
            services.command_requeue(command=command)


def _pauses_to_reassert(agent_id: str) -> tuple[list[str], list[str], bool]:
    sessions = list(
        # Confirmed holds only: a claim still pending is carried by its own command.
        Conversation.objects.filter(
            agent_id=agent_id,
            state=Conversation.State.ACTIVE,
            held_by__isnull=False,
            ai_paused=True,
        ).values_list("session_id", flat=True)
    )
    contacts = list(
        ContactPause.objects.filter(agent_id=agent_id).values_list("contact_phone", flat=True)
    )
    agent_paused = services.agent_state_get(agent_id).ai_paused
    return sessions, contacts, agent_paused


class WorkerIdentity:
    """This process as the banner and the other workers see it (its WorkerProcess row)."""

    def __init__(self, *, agent_id: str) -> None:
        self.agent_id = agent_id
        self.host = socket.gethostname()[:255]
        self.pid = os.getpid()
        self.started_at = timezone.now()
        self.active_since = None

    def __str__(self) -> str:
        return f"{self.host} pid {self.pid}"

    def become_active(self) -> None:
        self.active_since = timezone.now()

    def report(self, *, stopped: bool = False) -> None:
        if stopped:
            role = WorkerProcess.Role.STOPPED
        else:
            role = WorkerProcess.Role.ACTIVE if self.active_since else WorkerProcess.Role.STANDBY
        WorkerProcess.objects.update_or_create(
            agent_id=self.agent_id,
            host=self.host,
            pid=self.pid,
            started_at=self.started_at,
            defaults={"role": role, "active_since": self.active_since, "seen_at": timezone.now()},
        )


class ReplyAnchors:
    """Which customer message each reply follows, in the order events arrive.

    Replies carry no id; their place in the stream does (see
    `ingest.ingest_response`). Forgotten when a connection registers: what the
    server replays then may start with a reply whose customer message it did
    not repeat.
    """

    def __init__(self) -> None:
        self._by_session: dict[str, tuple[str, Counter]] = {}

    def forget(self) -> None:
        self._by_session.clear()

    def customer_message(self, session_id: str, message_id: str) -> None:
        self._by_session[session_id] = (message_id, Counter())

    def reply(self, session_id: str, text: str) -> tuple[str | None, int]:
        anchor = self._by_session.get(session_id)
        if anchor is None:
            return None, 1
        message_id, seen = anchor
        seen[text] += 1
        return message_id, seen[text]


def store_batch(
    events: list, agent_id: str, *, spool_id: str = "", seq: int = 0, rows_later: set[int] | None = None
) -> None:
    """Store events in one transaction, with how far the spool is stored.

    The fast path takes no savepoints (each is two more round trips before the
    commit, which is the time to every operator's screen): runs of session
    starts and customer messages go in set-wise, other events each in a
    savepoint of their own. If the batch is refused it is stored again one
    event at a time, each in its savepoint, so a refused event goes to the
    dead letters alone. A database outage raises (the caller keeps the batch
    and tries again), so nothing is given up because the database was away.
    With `rows_later`, the inbox rows are left to the caller (`notify.coalesced`).
    """
    with notify.coalesced(rows_later=rows_later):
        try:
            with transaction.atomic():
                for run in _set_wise_runs(events):
                    if run[0].event in SET_WISE:
                        store_set_wise(run, agent_id)
                    else:
                        store_event(run[0], agent_id)
                _cursor_set(spool_id, seq)
        except Exception as error:
            if is_database_outage(error):
                raise
            logger.warning(
                "a batch of %d events was refused (%s); storing one by one", len(events), error
            )
            for event in events:
                store_event(event, agent_id)
            _cursor_set(spool_id, seq)
        else:
            for event in events:
                if event.event in SET_WISE:
                    _log_stored(event)


def _cursor_set(spool_id: str, seq: int) -> None:
    """One statement per batch: an upsert (the row is created on a segment's first
    batch), written out because the ORM's compiling of it cost more than its round trip."""
    if not spool_id:
        return
    quote, meta = connection.ops.quote_name, IngestCursor._meta
    now = meta.get_field("updated_at").get_db_prep_save(timezone.now(), connection)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {quote(meta.db_table)} (spool_id, seq, updated_at) VALUES (%s, %s, %s) "
            "ON CONFLICT (spool_id) DO UPDATE SET seq = EXCLUDED.seq, updated_at = EXCLUDED.updated_at",
            [spool_id, seq, now],
        )


def _confirm(command: Command, *, rows_later: set[int]) -> Command:
    """`services.command_confirm`, its inbox rows left to the caller (`notify.coalesced`)."""
    with notify.coalesced(rows_later=rows_later):
        return services.command_confirm(command=command)


def cursor_get(spool_id: str) -> int:
    return IngestCursor.objects.filter(spool_id=spool_id).values_list("seq", flat=True).first() or 0


def cursor_delete(spool_id: str) -> None:
    IngestCursor.objects.filter(spool_id=spool_id).delete()


SET_WISE = frozenset({"whatsapp.session_started", "whatsapp.message"})


def _set_wise_runs(events: list) -> list[list]:
    """Consecutive session starts and customer messages together (stored set-wise),
    any other event alone."""
    runs: list[list] = []
    for event in events:
        if event.event in SET_WISE and runs and runs[-1][0].event in SET_WISE:
            runs[-1].append(event)
        else:
            runs.append([event])
    return runs


def store_set_wise(events: list, agent_id: str) -> None:
    """Many session starts and messages in one go, inside the batch's transaction.

    Starts go first: a session's start always precedes its messages anyway.
    Whatever fails here fails the batch, which `store_batch` then stores one
    event at a time.
    """
    starts = [_session_start(e, agent_id) for e in events if e.event == "whatsapp.session_started"]
    messages = [_customer_message(e, agent_id) for e in events if e.event == "whatsapp.message"]
    if starts:
        ingest.ingest_sessions_started(starts)
    if messages:
        ingest.ingest_customer_messages(messages)


def _session_start(e, agent_id: str) -> ingest.SessionStart:
    return ingest.SessionStart(
        agent_id=e.agent_id or agent_id,
        session_id=e.session_id,
        contact_phone=e.contact_phone or "",
        contact_name=e.contact_name or "",
    )


def _customer_message(e, agent_id: str) -> ingest.CustomerMessage:
    return ingest.CustomerMessage(
        agent_id=e.agent_id or agent_id,
        session_id=e.session_id,
        contact_phone=e.from_ or "",
        contact_name=e.name or "",
        message_id=e.message_id,
        type=e.type or "text",
        text=e.text or "",
        paused=e.paused,
    )


def store_event(event, agent_id: str) -> None:
    """One event in a savepoint of its own; refused data goes to the dead letters."""
    try:
        with transaction.atomic():
            STORE[event.event](event, _agent_of(event, agent_id))
    except Exception as error:
        if is_database_outage(error):
            raise
        # The data itself is refused: keep the frame and why, for admins and a later retry.
        logger.error("could not store %s (%s): kept as a dead letter", event.event, error)
        DeadLetter.objects.create(
            event=str(event.event)[:64], frame=_raw(event), reason=f"{type(error).__name__}: {error}"
        )
        metrics.DEAD_LETTERS.inc()
    else:
        _log_stored(event)


def dead_letter_retry(*, dead_letter: DeadLetter) -> bool:
    """Store a dead letter's frame again (its cause fixed); True when it was stored."""
    try:
        event = parse_event(dead_letter.frame)
        with notify.coalesced(), transaction.atomic():
            STORE[event.event](event, _agent_of(event, settings.PINECALL_AGENT_ID))
    except Exception as error:
        DeadLetter.objects.filter(pk=dead_letter.pk).update(
            reason=f"{type(error).__name__}: {error}"[:2000]
        )
        return False
    DeadLetter.objects.filter(pk=dead_letter.pk).update(resolved_at=timezone.now())
    return True


def _agent_of(event, agent_id: str) -> str:
    return event.agent_id if isinstance(event.agent_id, str) and event.agent_id else agent_id


def _raw(event) -> dict:
    raw = getattr(event, "raw", None)
    return raw if isinstance(raw, dict) else {"event": str(getattr(event, "event", ""))}


def _log_stored(event) -> None:
    logger.info("event %s session=%s", event.event, getattr(event, "session_id", None) or "-")


def _caption(event) -> None:
    """A live caption to the call's pages (through the broadcast queue; no database)."""
    call_id = getattr(event, "call_id", None)
    if not isinstance(call_id, str) or not call_id:
        return
    fields = {
        name: getattr(event, name)
        for name in ("text", "message_id", "word", "words_spoken", "reason")
        if getattr(event, name, None) is not None
    }
    try:
        notify.call_caption(call_id, event.event, **fields)
    except Exception:
        logger.warning("caption %s not forwarded", event.event, exc_info=True)


def _is_resume_all(event) -> bool:
    return event.event == "session.resumed" and not event.session_id and not event.contact


# The wire's fields, unpacked into the ingest services (which know nothing of the SDK).
STORE: dict[str, Callable] = {
    "whatsapp.session_started": lambda e, agent_id: ingest.ingest_sessions_started(
        [_session_start(e, agent_id)]
    ),
    "whatsapp.message": lambda e, agent_id: ingest.ingest_customer_messages(
        [_customer_message(e, agent_id)]
    ),
    "whatsapp.response": lambda e, agent_id: ingest.ingest_response(
        agent_id=agent_id,
        session_id=e.session_id,
        to=e.to or "",
        text=e.text or "",
        source=e.source,
        follows=getattr(e, "follows", None),
        rank=getattr(e, "rank", 1),
    ),
    "whatsapp.status": lambda e, agent_id: ingest.ingest_status(
        message_id=e.message_id, status=e.status, recipient=e.recipient or ""
    ),
    "whatsapp.session_ended": lambda e, agent_id: ingest.ingest_session_ended(
        agent_id=agent_id,
        session_id=e.session_id,
        contact_phone=e.contact_phone or "",
        contact_name=e.contact_name or "",
        reason=e.reason or "",
        ended_at=e.ended_at,
    ),
    "session.paused": lambda e, agent_id: ingest.ingest_pause_state(
        agent_id=agent_id, paused=True, session_id=e.session_id, contact=e.contact
    ),
    "session.resumed": lambda e, agent_id: ingest.ingest_pause_state(
        agent_id=agent_id, paused=False, session_id=e.session_id, contact=e.contact
    ),
    # Voice calls: final lines only (captions are live-only, see CAPTION_EVENTS).
    "call.started": lambda e, agent_id: ingest.ingest_call_started(
        agent_id=agent_id,
        call_id=e.call_id,
        from_number=e.from_ or "",
        to_number=e.to or "",
        direction=e.direction or "",
    ),
    "user.message": lambda e, agent_id: ingest.ingest_call_caller_line(
        agent_id=agent_id, call_id=e.call_id, message_id=e.message_id or "", text=e.text or ""
    ),
    "message.confirmed": lambda e, agent_id: ingest.ingest_call_line_confirmed(
        agent_id=agent_id, call_id=e.call_id, message_id=e.message_id or "", text=e.text or ""
    ),
    "bot.interrupted": lambda e, agent_id: ingest.ingest_call_interrupted(
        agent_id=agent_id, call_id=e.call_id, message_id=e.message_id or "", words_spoken=e.words_spoken
    ),
    "call.forwarded": lambda e, agent_id: ingest.ingest_call_forwarded(
        agent_id=agent_id, call_id=e.call_id, to=e.to or ""
    ),
    "call.held": lambda e, agent_id: ingest.ingest_call_switched(agent_id=agent_id, call_id=e.call_id, on_hold=True),
    "call.unheld": lambda e, agent_id: ingest.ingest_call_switched(agent_id=agent_id, call_id=e.call_id, on_hold=False),
    "call.muted": lambda e, agent_id: ingest.ingest_call_switched(
        agent_id=agent_id, call_id=e.call_id, caller_muted=True
    ),
    "call.unmuted": lambda e, agent_id: ingest.ingest_call_switched(
        agent_id=agent_id, call_id=e.call_id, caller_muted=False, muted_transcript=e.muted_transcript
    ),
    "call.ended": lambda e, agent_id: ingest.ingest_call_ended(
        agent_id=agent_id,
        call_id=e.call_id,
        reason=e.reason or "",
        duration_seconds=e.duration_seconds,
        started_at=e.started_at,
        ended_at=e.ended_at,
        from_number=e.from_ or "",
        to_number=e.to or "",
        direction=e.direction or "",
    ),
}
STORED_EVENTS = frozenset(STORE)

# Live-only: forwarded to the call's pages as they come, never stored (a reload
# shows the stored lines; a draft or a word in flight is simply gone).
# The client's method for each of a supervisor's switches on a call.
CALL_SWITCH_METHODS = {
    Command.Kind.HOLD: "call_hold",
    Command.Kind.UNHOLD: "call_unhold",
    Command.Kind.MUTE: "call_mute",
    Command.Kind.UNMUTE: "call_unmute",
}

CAPTION_EVENTS = frozenset({"user.speaking", "bot.speaking", "bot.word", "bot.interrupted", "bot.finished"})


# ---------------------------------------------------------------- the bridge, async


class PinecallBridge:
    """One Pinecall connection for one agent, wired to the domain's services."""

    def __init__(self) -> None:
        self._sender = None  # what `run` installed in notify (`notify.send_through`)
        self.agent_id = settings.PINECALL_AGENT_ID
        self.client: Pinecall | None = None
        self.agent = None
        # PostgreSQL picks the one active worker; the others wait as standbys.
        self.leadership = Leadership(self.agent_id)
        self.process = WorkerIdentity(agent_id=self.agent_id)
        # Every event reaches the spool the moment it is read; the store loop follows
        # it. Opened when first active: a standby has read nothing to keep.
        self.spool: Spool | None = None
        self._appended = asyncio.Event()
        self._anchors = ReplyAnchors()
        self._stored_seq = 0  # of the active segment
        self._broadcasts: asyncio.Queue = asyncio.Queue()
        # Sends handed to the loop and not yet made (`_publish_directly` waits for none).
        self._handed = 0
        self._handed_lock = threading.Lock()
        self._direct_paused_until = 0.0  # monotonic: after Redis failed a direct PUBLISH
        self._wake = asyncio.Event()
        self._registered = asyncio.Event()
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self.database_down = False
        self.failure: BaseException | None = None
        self._failed = asyncio.Event()
        self._reconciled = False
        self.sending = False  # only while this process holds the leadership
        self._last_heartbeat = 0.0
        self._http: asyncio.Server | None = None

    def _new_client(self) -> None:
        """A fresh Pinecall client for each period as the active worker."""
        self.client = Pinecall(
            api_key=settings.PINECALL_API_KEY or "embedded-simulator",
            url=settings.PINECALL_URL,
            command_timeout=settings.PINECALL_COMMAND_TIMEOUT,
        )
        self.agent = self.client.agent(
            self.agent_id,
            language=settings.PINECALL_AGENT_LANGUAGE,
            llm=settings.PINECALL_AGENT_LLM,
            prompt=settings.PINECALL_AGENT_PROMPT,
        )
        self.agent.add_whatsapp(
            phone_number_id=settings.WHATSAPP_PHONE_NUMBER_ID,
            access_token=settings.WHATSAPP_ACCESS_TOKEN,
            verify_token=settings.WHATSAPP_VERIFY_TOKEN,
            app_secret=settings.WHATSAPP_APP_SECRET,
        )
        for ref in settings.PINECALL_PHONE_NUMBERS:
            self.agent.add_phone(ref)
        self.agent.on("*", self.on_event)
        # After every (re)registration, once the WhatsApp channel is re-added.
        self.agent.on("registered", self._on_registered)
        self.client.on("connected", self._on_connected)
        self.client.on("disconnected", self._on_disconnected)
        self.client.on("error", self._on_client_error)
        self.client.on("fatal", self._on_client_fatal)

    # ---- lifecycle

    async def run(self) -> None:
        """Wait to be the active worker, serve while it lasts, and again, until stopped.

        Returns when stopped; raises when the bridge cannot go on (a rejected
        key, a loop that died): the process then exits non-zero.
        """
        sender = self._install_sender(asyncio.get_running_loop())
        try:
            await self._run()
        finally:
            # Cancelled without `stop()` (a crash, a test that failed): no write after
            # this may hand its fragments to a loop that is gone.
            notify.send_through(None, replacing=sender)

    def _install_sender(self, loop: asyncio.AbstractEventLoop):
        """Route this process's group sends: published at once from the ORM thread where
        that keeps their order (`_publish_directly`), else through `loop` (`_send_broadcasts`)."""

        def sender(group, message):
            if not self._on_loop(loop) and self._publish_directly(group, message):
                return
            with self._handed_lock:
                self._handed += 1
            try:
                loop.call_soon_threadsafe(self._broadcasts.put_nowait, (group, message))
            except RuntimeError:  # the loop is closed: this bridge is gone, send directly
                with self._handed_lock:
                    self._handed -= 1
                notify.send_through(None, replacing=sender)
                notify.send(group, message)

        self._sender = sender
        notify.send_through(sender)
        return sender

    @staticmethod
    def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
        try:
            return asyncio.get_running_loop() is loop
        except RuntimeError:
            return False

    def _publish_directly(self, group: str, message: dict) -> bool:
        """PUBLISH a fragment from this (ORM) thread instead of handing it to the loop:
        the hop and the async client were most of a millisecond before every screen.

        Only while nothing handed to the loop is still unsent (so the order stays), and
        not for `DIRECT_PUBLISH_PAUSE` seconds after Redis failed to answer within
        `notify.PUBLISH_NOW_TIMEOUT`: a stalled Redis delays storing by that once, then
        fragments wait on the loop again, as before. A fragment whose PUBLISH failed is
        dropped, not sent twice (it may have reached Redis): at most once, like the rest.
        """
        if time.monotonic() < self._direct_paused_until:
            return False
        with self._handed_lock:
            if self._handed:
                return False
        try:
            return notify.publish_now(group, message)
        except Exception as error:
            self._direct_paused_until = time.monotonic() + DIRECT_PUBLISH_PAUSE
            logger.warning(
                "could not notify group %s (%s); fragments go through the event loop for %.0f s",
                group, error, DIRECT_PUBLISH_PAUSE,
            )
            return True

    async def _run(self) -> None:
        self._spawn(self._send_broadcasts(), vital=True)
        self._spawn(self._report_process(), vital=True)
        if notify.fanout_enabled():
            self._spawn(self._wakes_from_redis())
        if settings.WORKER_HTTP_PORT:
            self._http = await asyncio.start_server(
                self._answer_http, "0.0.0.0", settings.WORKER_HTTP_PORT
            )
            logger.info("health and metrics on port %d", settings.WORKER_HTTP_PORT)
        while not self._stopping.is_set() and not self._failed.is_set():
            await self._become_active()
            if self._stopping.is_set():
                break
            await self._serve_while_active()
        if self._failed.is_set():
            raise self.failure

    async def _serve_while_active(self) -> None:
        """Connect, re-assert, drain the outbox; return once the leadership is gone for good."""
        if self.spool is None:
            self.spool = Spool(Path(settings.WORKER_SPOOL_DIR), self.agent_id)
            self._spawn(self._store_from_spool(), vital=True)
            self._spawn(self._heartbeat(), vital=True)
            self._spawn(self._handoff_clock(), vital=True)
        self._new_client()
        self._reconciled = False
        # Only the active worker ever judges what a dead one left in flight.
        await self._with_database(_recover_in_flight)
        self.sending = True
        kept = asyncio.ensure_future(self._keep_leadership())
        try:
            await self._connect(until=kept)
            while not (self._stopping.is_set() or self._failed.is_set() or kept.done()):
                try:
                    await self._drain_when_registered()
                except DatabaseError as error:
                    if not is_database_outage(error):
                        raise
                    self._database_unavailable(error)
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=OUTBOX_POLL_SECONDS)
                except TimeoutError:
                    pass
        finally:
            kept.cancel()
            if not self._stopping.is_set():
                # Someone else may be active now: leave Pinecall to them.
                self.sending = False
                self._registered.clear()
                self.process.active_since = None
                metrics.ACTIVE.set(0)
                metrics.CONNECTED.set(0)
                await self.client.close()
                logger.warning("standby again: the Pinecall connection is closed")

    async def _connect(self, *, until: asyncio.Future) -> None:
        """Open the Pinecall connection, retrying while Pinecall is unreachable."""
        while not (self._stopping.is_set() or until.done()):
            try:
                await self.client.connect()
                return
            except PinecallError as error:
                if error.code == "UNAUTHORIZED":
                    logger.error("Pinecall rejected the API key: %s", error)
                    raise
                logger.warning("cannot reach Pinecall yet (%s); retrying in 2 s", error)
            except OSError as error:
                logger.warning("cannot reach Pinecall yet (%s); retrying in 2 s", error)
            await self._sleep(2.0)

    # ---- leadership

    async def _become_active(self) -> None:
        """Wait as a standby until PostgreSQL makes this process the active worker."""
        said = False
        while not self._stopping.is_set():
            if await self.leadership.try_acquire():
                self.process.become_active()
                metrics.ACTIVE.set(1)
                metrics.LEADER_CHANGES.inc()
                logger.info("active worker for agent %s (%s)", self.agent_id, self.process)
                self._spawn(self._with_database(self.process.report))
                return
            if not said:
                logger.info("standby: another worker is active for agent %s; waiting", self.agent_id)
                said = True
            await self._sleep(1.0)

    async def _keep_leadership(self) -> None:
        """Watch the lock; return when it is lost for good.

        The moment the lock's connection fails, this worker cannot know whether
        another is active, so it stops sending at once. It keeps reading (and
        spooling) Pinecall's events for a short grace: a database that comes
        back quickly gives the lock back and nothing changed. Past the grace it
        gives the connection up, for whoever holds the lock now.
        """
        while True:
            await self.leadership.hold()
            self.sending = False
            metrics.ACTIVE.set(0)
            logger.error("leadership lost: not sending; the lock is retried for %.0f s",
                         LEADERSHIP_GRACE_SECONDS)
            deadline = time.monotonic() + LEADERSHIP_GRACE_SECONDS
            while True:
                await asyncio.sleep(1.0)
                if await self.leadership.try_acquire():
                    logger.warning("leadership regained: sending again")
                    self.sending = True
                    metrics.ACTIVE.set(1)
                    self.wake()
                    break
                if time.monotonic() > deadline:
                    return

    async def _report_process(self) -> None:
        """This process's row (active or standby), refreshed for the banner."""
        while True:
            try:
                await _db(self.process.report)()
            except DatabaseError as error:
                if not is_database_outage(error):
                    raise
            await asyncio.sleep(HEARTBEAT_SECONDS)

    def _fail(self, error: BaseException) -> None:
        """Crash-only: something the bridge cannot do without has died."""
        if self.failure is None:
            self.failure = error
            logger.error("the Pinecall bridge cannot go on: %r", error)
        self._failed.set()
        self._wake.set()

    # ---- health and metrics, for the process manager and Prometheus

    def readiness(self) -> tuple[bool, dict]:
        """Ready: a standby that can reach the database, or an active worker whose
        heartbeat is fresh and whose Pinecall connection is registered."""
        active = self.process.active_since is not None
        heartbeat_age = time.monotonic() - self._last_heartbeat if self._last_heartbeat else None
        fresh = heartbeat_age is not None and heartbeat_age < settings.WORKER_HEARTBEAT_STALE_SECONDS
        ready = not self.database_down and self.failure is None and (
            not active or (fresh and self._registered.is_set())
        )
        return ready, {
            "ready": ready,
            "role": "active" if active else "standby",
            "database": "unavailable" if self.database_down else "ok",
            "pinecall": "registered" if self._registered.is_set() else "not connected",
            "heartbeat_age_s": round(heartbeat_age, 1) if heartbeat_age is not None else None,
        }

    async def _answer_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            path = request_line.split(" ")[1] if " " in request_line else "/"
            headers = dict(
                line.split(":", 1) for line in header_lines if ":" in line
            )
            headers = {name.strip().lower(): value.strip() for name, value in headers.items()}
            if path == "/healthz":
                status, body, kind = 200, b"ok\n", "text/plain"
            elif path == "/readyz":
                ready, detail = self.readiness()
                status, body, kind = (200 if ready else 503), json.dumps(detail).encode(), "application/json"
            elif path == "/metrics" and metrics.token_accepted(headers.get("authorization", "")):
                status, body, kind = 200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST
            else:
                status, body, kind = 404, b"not found\n", "text/plain"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, IndexError, ValueError):
            pass
        finally:
            writer.close()

    # ---- the database, waited for

    async def _with_database(self, func: Callable, *args, **kwargs):
        """Call `func` on the ORM thread until the database answers; data errors raise."""
        delay = 0.25
        while True:
            try:
                result = await _db(func)(*args, **kwargs)
            except DatabaseError as error:
                if not is_database_outage(error):
                    raise
                self._database_unavailable(error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, DATABASE_RETRY_MAX_SECONDS)
                continue
            if self.database_down:
                self.database_down = False
                metrics.DATABASE_AVAILABLE.set(1)
                logger.warning("the database is back; storing what was kept meanwhile")
                notify.database_state_changed(available=True)
            return result

    def _database_unavailable(self, error: BaseException) -> None:
        metrics.DATABASE_AVAILABLE.set(0)
        if not self.database_down:
            self.database_down = True
            logger.warning(
                "the database is unavailable (%s); events are kept in the spool until it is back",
                str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__,
            )
            notify.database_state_changed(available=False)

    async def _heartbeat(self) -> None:
        """The banner's "Pinecall connected" is this fresh row, never a flag a dead worker left."""
        while True:
            try:
                if self.sending:  # the active worker speaks for the connection
                    await _db(services.agent_connection_set)(
                        agent_id=self.agent_id,
                        connected=self.client.connected and self._registered.is_set(),
                    )
                    self._last_heartbeat = time.monotonic()
            except DatabaseError as error:
                if not is_database_outage(error):
                    raise
                self._database_unavailable(error)
            await asyncio.sleep(HEARTBEAT_SECONDS)

    async def _handoff_clock(self) -> None:
        """The handoff's timers (fallback to the AI, idle hand-back, warnings), from stored times."""
        while True:
            await asyncio.sleep(HANDOFF_TICK_SECONDS)
            if not self.sending:
                continue
            try:
                done = await _db(services.handoff_tick)(agent_id=self.agent_id)
            except DatabaseError as error:
                if not is_database_outage(error):
                    raise
                self._database_unavailable(error)
                continue
            if any(done.values()):
                logger.info("handoff: %s", done)
                self.wake()

    # ---- the spool, stored in order

    async def _store_from_spool(self) -> None:
        """Store what earlier processes left in the spool, then follow this process's segment."""
        for segment in list(self.spool.leftovers):
            after = await self._with_database(cursor_get, segment.spool_id)
            while records := segment.read(after, INGEST_BATCH):
                await self._store_records(segment.spool_id, records)
                after = records[-1][0]
            self.spool.finished(segment)
            await self._with_database(cursor_delete, segment.spool_id)
            logger.info("replayed the spool left by an earlier worker (%s)", segment.spool_id)
        while True:
            self._appended.clear()
            active = self.spool.active
            records = active.read(self._stored_seq, INGEST_BATCH)
            if records:
                await self._store_records(active.spool_id, records)
                self._stored_seq = records[-1][0]
                metrics.INGEST_BACKLOG.set(self.spool.seq - self._stored_seq)
                continue
            dropped = self.spool.roll_over_if_large(self._stored_seq)
            if dropped:
                self._stored_seq = 0
                await self._with_database(cursor_delete, dropped)
                continue
            await self._appended.wait()

    async def _store_records(self, spool_id: str, records: list) -> None:
        """One batch: parsed once (reply anchors follow the stream), stored until it is."""
        events = []
        for _, frame, _ in records:
            if frame.get("event") == REGISTERED_MARK["event"]:
                self._anchors.forget()
                continue
            try:
                event = parse_event(frame)
            except Exception as error:  # the spool holds what the client parsed: rare
                logger.error("spool record not an event (%s): %.200r", error, frame)
                continue
            self._follow(event)
            events.append(event)
        await self._write_then_rows(store_batch, events, self.agent_id, spool_id=spool_id, seq=records[-1][0])
        for event in events:
            metrics.EVENTS_STORED.labels(event.event).inc()
        metrics.INGEST_LAG.set(max(0.0, time.time() - records[-1][2]))
        if any(_is_resume_all(event) for event in events):
            # Pinecall's resume-all cleared every level, humans' holds included.
            self._spawn(self._reassert_pauses())

    def _follow(self, event) -> None:
        session_id = event.session_id if isinstance(getattr(event, "session_id", None), str) else ""
        if event.event == "whatsapp.message" and isinstance(event.message_id, str):
            self._anchors.customer_message(session_id, event.message_id)
        elif event.event == "whatsapp.response":
            event.follows, event.rank = self._anchors.reply(session_id, event.text or "")

    async def _send_broadcasts(self) -> None:
        """Operators' fragments, sent in the order they were made, without blocking storing."""
        while True:
            group, message = await self._broadcasts.get()
            try:
                await notify.group_send(group, message)
            except Exception as error:  # Redis down: browsers catch up from the database
                logger.warning("could not notify group %s: %s", group, error)
            finally:
                with self._handed_lock:
                    self._handed -= 1
                self._broadcasts.task_done()

    async def _write_then_rows(self, write: Callable, *args, **kwargs) -> None:
        """`write(..., rows_later=…)` until the database answers; then the inbox rows it
        moved, once what it sent before them is published.

        Reading and rendering them (and the tabs' counts) is most of what a change
        costs after its commit; on the ORM thread beside the event loop it held the
        interpreter while the loop waited to publish the fragment that operators are
        looking at (the new message, the confirmed header). Waiting is bounded: a
        slow Redis delays the rows, never the storing, by more than that.
        """
        rows: set[int] = set()
        await self._with_database(write, *args, rows_later=rows, **kwargs)
        if not rows:
            return
        try:
            await asyncio.wait_for(self._broadcasts.join(), ROWS_WAIT_SECONDS)
        except TimeoutError:
            pass
        try:
            await _db(notify.inbox_rows_moved)(rows)
        except Exception as error:  # the database went away meanwhile: pages catch up
            logger.warning("could not send %d inbox rows: %s", len(rows), error)

    def _all_stored(self) -> bool:
        if self.spool is None:
            return True
        return not self.spool.leftovers and self._stored_seq >= self.spool.seq

    async def stop(self) -> None:
        # What was received is stored and told before the tasks stop (a few seconds at
        # most); what is not stays in the spool for the next run.
        if self.client is not None:
            await self.client.close()
        for _ in range(50):
            if self._all_stored() and self._broadcasts.empty():
                break
            await asyncio.sleep(0.1)
        if self._sender is not None:
            notify.send_through(None, replacing=self._sender)
        self._stopping.set()
        self._wake.set()
        for task in list(self._tasks):
            task.cancel()
        if self.spool is not None:
            self.spool.close(all_stored=self._all_stored())
        try:
            if self.process.active_since is not None and self.sending:
                # Only the active worker speaks for the connection.
                await _db(services.agent_connection_set)(agent_id=self.agent_id, connected=False)
            await _db(self.process.report)(stopped=True)
        except DatabaseError as error:
            logger.warning("could not record the stop: %s", error)
        await self.leadership.release()
        if self._http is not None:
            self._http.close()
        logger.info("worker stopped")

    def wake(self) -> None:
        self._wake.set()

    async def _wakes_from_redis(self) -> None:
        """The web processes' wake-ups (`notify.wake_worker`), with Redis; without it they
        come over the channel layer (`PinecallWorkerConsumer`). Lost ones wait for the poll."""

        async def subscribed() -> None:
            self.wake()  # whatever was published while this listener was away

        def lost(error: Exception, delay: float) -> None:
            logger.warning("wake-ups: Redis subscription lost (%s); again in %.2f s", error, delay)

        async def woken(channel: str, data: str) -> None:
            self.wake()

        await notify.listen(
            subscribe=lambda pubsub: pubsub.subscribe(notify.worker_wake_channel()),
            on_ready=subscribed,
            on_message=woken,
            on_lost=lost,
        )

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            pass

    # ---- connection events

    async def _on_connected(self, *_args) -> None:
        logger.info("connected to Pinecall at %s", settings.PINECALL_URL)

    async def _on_disconnected(self, *_args) -> None:
        self._registered.clear()
        metrics.CONNECTED.set(0)
        logger.warning("disconnected from Pinecall")
        self._spawn(self._record_connection(False))

    async def _on_client_error(self, error, *_args) -> None:
        logger.error("Pinecall client error: %s", error)

    async def _on_client_fatal(self, error, *_args) -> None:
        self._fail(error)

    async def _record_connection(self, connected: bool) -> None:
        if not self.sending:
            return  # a worker that lost leadership no longer speaks for the connection
        await self._with_database(
            services.agent_connection_set, agent_id=self.agent_id, connected=connected
        )

    async def _on_registered(self, *_args) -> None:
        """After every (re)registration: restore humans' pauses, then send the outbox."""
        self.spool.append(REGISTERED_MARK)
        self._appended.set()
        self._registered.set()
        metrics.CONNECTED.set(1)
        self._spawn(self._record_connection(True))
        self._spawn(self._reassert_pauses())
        if not self._reconciled:
            self._reconciled = True
            self._spawn(self._reconcile_history())
        self.wake()

    async def _reconcile_history(self) -> None:
        """Once per process: what Pinecall's history holds that the stream never brought.

        A crash loses what the kernel had read and not handed over; the server's
        history of each active session still has it. Compared once the spool is
        stored, so what is merely late is not reported as lost.
        """
        for _ in range(300):
            if self._all_stored():
                break
            await asyncio.sleep(0.1)
        conversations = await self._with_database(selectors.conversations_to_reconcile, self.agent_id)
        lacking = 0
        for conversation_id, session_id in conversations:
            try:
                history = await self.agent.get_history(session_id)
            except PinecallError as error:
                if error.code != "SESSION_NOT_FOUND":
                    logger.warning("history of %s unavailable: %s", session_id, error)
                continue
            said = [
                entry["content"]
                for entry in history
                if isinstance(entry, dict)
                and entry.get("role") == "user"
                and isinstance(entry.get("content"), str)
            ]
            missing = await self._with_database(
                services.conversation_unreceived_set,
                conversation_id=conversation_id,
                pinecall_said=[clean_text(text)[0] for text in said],
            )
            lacking += len(missing)
        logger.info(
            "compared %d conversations with Pinecall's history: %d customer messages not received",
            len(conversations),
            lacking,
        )

    # ---- events

    async def on_event(self, event) -> None:
        """Spool the event at once (a plain buffered write); the store loop takes it from there."""
        if event.event in CAPTION_EVENTS:
            _caption(event)
        if event.event in STORED_EVENTS:
            self.spool.append(_raw(event))
            self._appended.set()
        elif event.event not in CAPTION_EVENTS:
            logger.debug("event %s (not stored)", event.event)

    # ---- commands

    async def _drain_when_registered(self) -> None:
        if not self._registered.is_set() or not self.sending:
            return
        commands = await _db(services.commands_claim)(OUTBOX_BATCH)
        if not commands:
            return
        # In order per target (take over, send, hand back of one conversation must
        # not overtake each other); different targets go out concurrently.
        by_target: dict[tuple, list[Command]] = defaultdict(list)
        for command in commands:
            by_target[(command.scope, command.session_id, command.contact_phone)].append(command)
        await asyncio.gather(*(self._run_in_order(chain) for chain in by_target.values()))
        if len(commands) == OUTBOX_BATCH:
            self.wake()

    async def _run_in_order(self, chain: list[Command]) -> None:
        for command in chain:
            if not self.sending:
                # Leadership lost mid-batch: the next active worker requeues what is left.
                return
            await self.execute(command)

    async def execute(self, command: Command) -> None:
        try:
            await self._call_pinecall(command)
        except PinecallTimeout as error:
            await self._with_database(
                services.command_fail,
                command=command,
                code="TIMEOUT",
                message=f"Pinecall did not confirm in time ({error}).",
            )
            logger.warning("command %s %s: no confirmation", command.pk, command)
            metrics.COMMANDS.labels(command.kind, "timeout").inc()
            return
        except PinecallError as error:
            if error.code == "CONNECTION_LOST" and command.kind in (Command.Kind.PAUSE, Command.Kind.RESUME):
                # A pause or resume is safe to repeat: back in the outbox it goes.
                await self._with_database(services.command_requeue, command=command)
                logger.warning("command %s %s: connection lost, requeued", command.pk, command)
                metrics.COMMANDS.labels(command.kind, "requeued").inc()
                return
            await self._with_database(
                services.command_fail, command=command, code=error.code or "ERROR", message=str(error)
            )
            logger.warning("command %s %s failed: %s %s", command.pk, command, error.code, error)
            metrics.COMMANDS.labels(command.kind, "failed").inc()
            return
        # Pinecall did it: the answer is recorded even if the database has to come back first.
        await self._write_then_rows(_confirm, command)
        logger.info("command %s %s confirmed", command.pk, command)
        metrics.COMMANDS.labels(command.kind, "confirmed").inc()
        if command.kind == Command.Kind.RESUME and command.scope == Command.Scope.AGENT:
            await self._reassert_pauses()

    async def _call_pinecall(self, command: Command):
        Kind, Scope = Command.Kind, Command.Scope
        if command.scope == Scope.CALL:
            if command.kind == Kind.SAY:
                return await self.agent.call_say(command.session_id, command.text, message_id=command.line_id)
            if command.kind == Kind.HANGUP:
                return await self.agent.call_hangup(command.session_id)
            if command.kind == Kind.FORWARD:
                return await self.agent.call_forward(command.session_id, command.text)
            if command.kind in CALL_SWITCH_METHODS:
                return await getattr(self.agent, CALL_SWITCH_METHODS[command.kind])(command.session_id)
            if command.kind == Kind.STOP:
                # None: nothing was being said (the client sent nothing); done all the same.
                return await self.agent.call_cancel_speech(command.session_id)
            raise PinecallError(f"unknown call command {command.kind}", code="UNKNOWN_COMMAND")
        if command.kind == Kind.SEND:
            return await self.agent.send_message(
                session_id=command.session_id or None,
                contact=command.contact_phone or None,
                text=command.text,
            )
        action = self.agent.pause if command.kind == Kind.PAUSE else self.agent.resume
        if command.scope == Scope.SESSION:
            return await action(command.session_id)
        if command.scope == Scope.CONTACT:
            return await action(contact=command.contact_phone)
        return await action()

    async def _reassert_pauses(self) -> None:
        """Make Pinecall's pauses match what operators hold, after a reconnect or resume-all."""
        if not self.sending:
            return  # not the active worker (or not sure): the active one does it
        sessions, contacts, agent_paused = await self._with_database(
            _pauses_to_reassert, self.agent_id
        )
        calls = [self.agent.pause(session_id) for session_id in sessions]
        calls += [self.agent.pause(contact=phone) for phone in contacts]
        if agent_paused:
            calls.append(self.agent.pause())
        if not calls:
            return
        results = await asyncio.gather(*calls, return_exceptions=True)
        failures = [r for r in results if isinstance(r, Exception)]
        for session_id, result in zip(sessions, results):
            if isinstance(result, PinecallError) and result.code == "SESSION_NOT_FOUND":
                await self._with_database(ingest.ingest_session_ended,
                    agent_id=self.agent_id, session_id=session_id, reason="not_found"
                )
        logger.info(
            "re-asserted %d session, %d contact pauses%s (%d failed)",
            len(sessions),
            len(contacts),
            " and the kill switch" if agent_paused else "",
            len(failures),
        )

    def _spawn(self, coro, *, vital: bool = False) -> None:
        """A background task; a vital one that ends for any reason but a stop fails the bridge."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda t: self._task_done(t, vital))

    def _task_done(self, task: asyncio.Task, vital: bool) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None and not vital:
            logger.error("a worker task failed: %r", error, exc_info=error)
        elif vital and not self._stopping.is_set():
            self._fail(error or RuntimeError(f"{task.get_coro().__qualname__} ended"))


# ---------------------------------------------------------------- Channels glue


class PinecallWorkerConsumer(AsyncConsumer):
    """The `pinecall` channel's consumer: starts the bridge, relays wake-ups.

    The bridge belongs to the process, not to this instance: if Channels
    replaces a failed instance, the new one still reaches it.
    """

    bridge: PinecallBridge | None = None

    async def worker_start(self, message) -> None:
        bridge = PinecallWorkerConsumer.bridge = PinecallBridge()
        run = asyncio.ensure_future(bridge.run())
        run.add_done_callback(_exit_on_fatal)

    async def worker_stop(self, message) -> None:
        if PinecallWorkerConsumer.bridge is not None:
            await PinecallWorkerConsumer.bridge.stop()

    async def outbox_wake(self, message) -> None:
        if PinecallWorkerConsumer.bridge is not None:
            PinecallWorkerConsumer.bridge.wake()


# The worker's ASGI application: only its channel (web processes never load it).
worker_application = ChannelNameRouter({WORKER_CHANNEL: PinecallWorkerConsumer.as_asgi()})


class WorkerFailed:
    """Set when the bridge stops for good (a rejected key): the command exits non-zero."""

    error: BaseException | None = None


def _exit_on_fatal(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        WorkerFailed.error = task.exception()
        logger.error("the Pinecall bridge stopped: %s", task.exception())
        # A rejected key is not retried: the process exits and its manager shows why.
        signal.raise_signal(signal.SIGTERM)


class EagerWorker(Worker):
    """Channels' worker, with the Pinecall consumer started at once and kept alive.

    - Channels creates a channel's consumer when its first message arrives; ours
      must connect to Pinecall at start, so it is created (and told to start) here.
    - A channel-layer error (Redis restarting) is retried, not fatal: the outbox
      poll keeps commands moving meanwhile.
    - SIGTERM and SIGINT stop the bridge cleanly.
    """

    install_signal_handlers = True  # off when embedded in Daphne, whose reactor owns signals

    def request_stop(self) -> None:
        self._stop.set()

    async def handle(self) -> None:
        self._stop = asyncio.Event()
        queue = self.get_or_create_application_instance(
            WORKER_CHANNEL, {"type": "channel", "channel": WORKER_CHANNEL}
        )
        await queue.put({"type": "worker.start"})
        if self.install_signal_handlers:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop.set)
        listeners = [asyncio.ensure_future(self.listener(channel)) for channel in self.channels]
        await self._stop.wait()
        logger.info("stopping the worker")
        await queue.put({"type": "worker.stop"})
        await asyncio.sleep(0.5)  # let the consumer close the Pinecall socket
        for listener in listeners:
            listener.cancel()

    async def listener(self, channel: str) -> None:
        delay = 0.5
        while True:
            try:
                await super().listener(channel)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                logger.warning("channel layer unavailable (%s); retrying in %.1f s", error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            else:
                delay = 0.5
