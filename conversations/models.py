"""The record of every WhatsApp conversation the Pinecall agent has, and of what
operators did about it.

The database is the source of truth: the worker writes Pinecall's events here,
operators' intents are written here (the outbox) before they are attempted, and
the channel layer only wakes and notifies.
"""

from __future__ import annotations

import hashlib
import re

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.utils import timezone

from conversations import canned


class Conversation(models.Model):
    """One Pinecall WhatsApp session: one agent and one contact, until it ends."""

    class State(models.TextChoices):
        ACTIVE = "active", "Active"
        ENDED = "ended", "Ended"

    class Holder(models.TextChoices):
        AI = "ai", "AI"
        HUMAN = "human", "Human"

    session_id = models.CharField(max_length=64, unique=True)
    agent_id = models.CharField(max_length=100)
    contact_phone = models.CharField(max_length=32)
    contact_name = models.CharField(max_length=200, blank=True)

    state = models.CharField(max_length=10, choices=State.choices, default=State.ACTIVE)
    end_reason = models.CharField(max_length=40, blank=True)

    # Who answers the customer. A human holder is claimed when the operator clicks
    # Take over; `ai_paused` says whether Pinecall has confirmed the pause.
    holder = models.CharField(max_length=10, choices=Holder.choices, default=Holder.AI)
    held_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="held_conversations",
    )
    held_since = models.DateTimeField(null=True, blank=True)
    ai_paused = models.BooleanField(
        default=False, help_text="Pinecall confirmed that the AI is paused for this session."
    )
    needs_human = models.BooleanField(
        default=False,
        help_text="The customer asked for a person, or wrote while the AI was paused "
        "and nobody held the conversation.",
    )

    started_at = models.DateTimeField(default=timezone.now)
    ended_at = models.DateTimeField(null=True, blank=True)
    last_message_at = models.DateTimeField(null=True, blank=True)
    last_customer_message_at = models.DateTimeField(null=True, blank=True)

    # Kept on the row so that the inbox is one query whatever the history's size.
    last_message_preview = models.CharField(max_length=200, blank=True)
    last_message_author = models.CharField(max_length=10, blank=True)
    message_count = models.PositiveIntegerField(default=0)
    unread_count = models.PositiveIntegerField(
        default=0, help_text="Customer messages the holder has not seen yet."
    )
    # Customer messages Pinecall's history of the session holds and the live
    # stream never brought (lost in a crash): shown to operators, never stored
    # as messages, since the original may still arrive with its id.
    unreceived = models.JSONField(
        default=list,
        blank=True,
        help_text="Customer messages in Pinecall's history that this dashboard did not receive.",
    )
    unreceived_checked_at = models.DateTimeField(null=True, blank=True)

    # The handoff: since when the customer waits for a person (null: nobody
    # needs to), why, and whether the dashboard paused the AI itself meanwhile.
    class NeedsHuman(models.TextChoices):
        ASKED = "asked", "The customer asked for a person"
        AI_PASSED = "ai_passed", "The AI said it passes the conversation on"
        PAUSED_UNHELD = "paused_unheld", "The customer wrote while the AI was paused and nobody held it"

    needs_human_since = models.DateTimeField(null=True, blank=True)
    needs_human_reason = models.CharField(max_length=20, choices=NeedsHuman.choices, blank=True)
    needs_human_words = models.CharField(
        max_length=200, blank=True, help_text="What matched: the customer's or the AI's words."
    )
    auto_paused = models.BooleanField(
        default=False, help_text="The dashboard paused the AI itself while the customer waits for a person."
    )
    # The holder's last sign of life (took over, sent, "Keep it"): the idle clock.
    holder_active_at = models.DateTimeField(null=True, blank=True)
    idle_warned_at = models.DateTimeField(null=True, blank=True)

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-last_message_at", "-id"]
        indexes = [
            models.Index(fields=["state", "-last_message_at"], name="conv_state_activity"),
            models.Index(
                fields=["holder", "state", "-last_message_at"], name="conv_holder_activity"
            ),
            models.Index(fields=["held_by", "-last_message_at"], name="conv_held_by_activity"),
            models.Index(fields=["contact_phone", "-started_at"], name="conv_contact"),
            models.Index(fields=["agent_id", "state"], name="conv_agent_state"),
            # The "Needs a human" filter, the same predicate as the selector's.
            models.Index(
                fields=["-last_message_at"],
                name="conv_needs_human",
                condition=models.Q(state="active")
                & (models.Q(needs_human=True) | models.Q(ai_paused=True, held_by__isnull=True)),
            ),
            # A reconnecting browser asks for the rows changed since it last heard.
            models.Index(fields=["updated_at"], name="conv_updated"),
            # The reports count conversations by the day they started.
            models.Index(fields=["started_at"], name="conv_started"),
        ]
        permissions = [
            ("take_over_conversation", "Can take over, reply to and hand back conversations"),
            ("pause_contact_or_agent", "Can pause a contact or the whole agent"),
        ]

    def __str__(self) -> str:
        return f"{self.contact_name or self.contact_phone} ({self.session_id})"

    @property
    def is_active(self) -> bool:
        return self.state == self.State.ACTIVE

    @property
    def is_held_by_human(self) -> bool:
        return self.holder == self.Holder.HUMAN


class Message(models.Model):
    """One WhatsApp message in a conversation, in either direction."""

    class Direction(models.TextChoices):
        INBOUND = "in", "From the customer"
        OUTBOUND = "out", "To the customer"
        # A line in the timeline, not a WhatsApp message: "Ana took over", "Ended".
        NOTE = "note", "Timeline note"

    class Author(models.TextChoices):
        CUSTOMER = "customer", "Customer"
        AI = "ai", "AI"
        HUMAN = "human", "Human"
        SYSTEM = "system", "System"

    class Type(models.TextChoices):
        TEXT = "text", "Text"
        AUDIO = "audio", "Voice note"
        IMAGE = "image", "Image"
        VIDEO = "video", "Video"
        DOCUMENT = "document", "Document"

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        SENT = "sent", "Sent"
        DELIVERED = "delivered", "Delivered"
        READ = "read", "Read"
        FAILED = "failed", "Failed"

    # Indexed by msg_conversation (conversation, id) below; a second index only slows ingest.
    conversation = models.ForeignKey(
        Conversation, on_delete=models.CASCADE, related_name="messages", db_index=False
    )
    # WhatsApp's id: given for incoming messages; learnt from the first status
    # for outgoing ones (Pinecall's replies carry none). Unique through a
    # constraint, which on PostgreSQL spares the extra LIKE-pattern index.
    message_id = models.CharField(max_length=128, null=True, blank=True)
    direction = models.CharField(max_length=4, choices=Direction.choices)
    author = models.CharField(max_length=10, choices=Author.choices)
    operator = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="sent_messages",
    )
    type = models.CharField(max_length=10, choices=Type.choices, default=Type.TEXT)
    text = models.TextField(blank=True)
    paused = models.BooleanField(
        null=True, blank=True, help_text="The `paused` flag as Pinecall sent it (incoming only)."
    )
    status = models.CharField(max_length=10, choices=Status.choices, blank=True)
    error = models.CharField(max_length=300, blank=True)
    # A human send is stored at once; Pinecall then echoes it as a
    # `whatsapp.response` with source "human", which must not make a copy.
    echo_received = models.BooleanField(default=False)
    # When Pinecall's `whatsapp.response` said this reply went out. Receipts
    # bind to replies by recipient and order only, and this is the order they
    # went out in (a human send is stored at the click, before replies the AI
    # sent meanwhile).
    went_out_at = models.DateTimeField(null=True, blank=True)
    # Replies carry no id on the wire: this key (session, the customer message
    # it follows, its rank after it, its text) recognises a replayed one.
    reply_key = models.CharField(max_length=64, null=True, blank=True)
    altered = models.BooleanField(
        default=False,
        help_text="Stored with what could be stored: NUL bytes or broken characters removed, "
        "over-long fields shortened.",
    )

    created_at = models.DateTimeField(default=timezone.now)
    status_changed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["message_id"], name="uniq_message_id"),
            models.UniqueConstraint(fields=["reply_key"], name="uniq_reply_key"),
        ]
        indexes = [
            models.Index(fields=["conversation", "id"], name="msg_conversation"),
            models.Index(
                fields=["direction", "conversation", "id"],
                name="msg_unbound_outbound",
                condition=models.Q(message_id__isnull=True, direction="out"),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.get_author_display()}: {self.text[:60]}"

    # Delivery status only moves forward: read stays read.
    STATUS_RANK = {Status.PENDING: 0, Status.SENT: 1, Status.DELIVERED: 2, Status.READ: 3}

    def can_move_to(self, status: str) -> bool:
        if status == self.Status.FAILED:
            return self.status in ("", self.Status.PENDING, self.Status.SENT)
        if self.status == self.Status.FAILED:
            return False
        return self.STATUS_RANK.get(status, -1) > self.STATUS_RANK.get(self.status, -1)


class ContactPause(models.Model):
    """A contact for whom the AI is paused at Pinecall, across all their sessions."""

    agent_id = models.CharField(max_length=100)
    contact_phone = models.CharField(max_length=32)
    paused_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    paused_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["agent_id", "contact_phone"], name="uniq_contact_pause")
        ]

    def __str__(self) -> str:
        return f"{self.contact_phone} paused on {self.agent_id}"


class AgentState(models.Model):
    """The agent as the dashboard knows it: the kill switch and the worker's link."""

    agent_id = models.CharField(max_length=100, unique=True)
    ai_paused = models.BooleanField(default=False, help_text="The kill switch: AI off everywhere.")
    paused_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    paused_at = models.DateTimeField(null=True, blank=True)
    worker_connected = models.BooleanField(default=False)
    worker_seen_at = models.DateTimeField(
        null=True, blank=True, help_text="The worker's last heartbeat (every few seconds while it runs)."
    )

    def __str__(self) -> str:
        return self.agent_id

    @property
    def heartbeat_stale_seconds(self) -> float:
        return settings.WORKER_HEARTBEAT_STALE_SECONDS

    @property
    def worker_live(self) -> bool:
        """Connected, by a worker that is still alive: a dead one leaves a stale heartbeat."""
        if not self.worker_connected or self.worker_seen_at is None:
            return False
        age = (timezone.now() - self.worker_seen_at).total_seconds()
        return age < self.heartbeat_stale_seconds


class Command(models.Model):
    """The outbox: an operator's intent for Pinecall, stored before it is attempted.

    The worker sends pending commands in order and records Pinecall's answer.
    """

    class Kind(models.TextChoices):
        PAUSE = "pause", "Pause"
        RESUME = "resume", "Resume"
        SEND = "send", "Send"
        SAY = "say", "Say a line on a call"
        HANGUP = "hangup", "Hang up a call"
        FORWARD = "forward", "Forward a call"
        HOLD = "hold", "Put a call on hold"
        UNHOLD = "unhold", "Take a call off hold"
        MUTE = "mute", "Mute a caller"
        UNMUTE = "unmute", "Unmute a caller"
        STOP = "stop", "Stop the AI's speech"

    class Scope(models.TextChoices):
        SESSION = "session", "One conversation"
        CONTACT = "contact", "A contact"
        AGENT = "agent", "The whole agent"
        CALL = "call", "One voice call"

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        SENT = "sent", "Sent to Pinecall"
        CONFIRMED = "confirmed", "Confirmed"
        FAILED = "failed", "Failed"

    kind = models.CharField(max_length=10, choices=Kind.choices)
    scope = models.CharField(max_length=10, choices=Scope.choices)
    agent_id = models.CharField(max_length=100)
    session_id = models.CharField(max_length=64, blank=True)
    contact_phone = models.CharField(max_length=32, blank=True)
    text = models.TextField(blank=True)
    conversation = models.ForeignKey(
        Conversation, null=True, blank=True, on_delete=models.SET_NULL, related_name="commands"
    )
    message = models.OneToOneField(
        Message, null=True, blank=True, on_delete=models.SET_NULL, related_name="command"
    )
    # Voice calls (scope "call"): `session_id` holds the call_id; a line said has the
    # `message_id` we give Pinecall (`line_id`), a forward its number in `text`.
    call = models.ForeignKey(
        "Call", null=True, blank=True, on_delete=models.SET_NULL, related_name="commands"
    )
    line_id = models.CharField(max_length=100, blank=True)
    operator = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )

    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    error_code = models.CharField(max_length=60, blank=True)
    error_message = models.CharField(max_length=500, blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)
    sent_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["id"]
        indexes = [
            models.Index(
                fields=["id"],
                name="cmd_open",
                condition=models.Q(status__in=["pending", "sent"]),
            ),
            models.Index(fields=["conversation", "-id"], name="cmd_conversation"),
            # The reports' "failed commands", by when they were asked for.
            models.Index(fields=["created_at"], name="cmd_failed", condition=models.Q(status="failed")),
        ]

    def __str__(self) -> str:
        target = self.session_id or self.contact_phone or self.agent_id
        return f"{self.kind} {target} ({self.status})"

    @property
    def is_open(self) -> bool:
        return self.status in (self.Status.PENDING, self.Status.SENT)


class AuditEntry(models.Model):
    """Who did what, when, and how it ended."""

    class Action(models.TextChoices):
        TAKE_OVER = "take_over", "Took over"
        SEND = "send", "Sent a message"
        HAND_BACK = "hand_back", "Handed back to the AI"
        PAUSE_CONTACT = "pause_contact", "Paused a contact"
        RESUME_CONTACT = "resume_contact", "Resumed a contact"
        PAUSE_AGENT = "pause_agent", "Paused the whole agent"
        RESUME_AGENT = "resume_agent", "Resumed the whole agent"
        LOGIN = "login", "Logged in / tried to"
        AUTO_PAUSE = "auto_pause", "Paused the AI automatically (a customer asked for a person)"
        FALLBACK = "fallback", "Gave the conversation back to the AI (nobody took over)"
        AUTO_HAND_BACK = "auto_hand_back", "Handed back automatically (the holder was idle)"
        KEEP = "keep", "Kept the conversation (restarted its idle clock)"
        POLICY = "policy", "Changed the handoff policy"
        CALL_SAY = "call_say", "Said a line on a call"
        CALL_HANGUP = "call_hangup", "Hung up a call"
        CALL_FORWARD = "call_forward", "Forwarded a call"
        NOTE = "note", "Wrote an internal note"
        CANNED_REPLY = "canned_reply", "Changed a canned reply"
        EXPORT = "export", "Exported a CSV"
        CALL_HOLD = "call_hold", "Put a call on hold"
        CALL_UNHOLD = "call_unhold", "Took a call off hold"
        CALL_MUTE = "call_mute", "Muted a caller"
        CALL_UNMUTE = "call_unmute", "Unmuted a caller"
        CALL_STOP = "call_stop", "Stopped the AI's speech on a call"

    class Outcome(models.TextChoices):
        PENDING = "pending", "Pending"
        CONFIRMED = "confirmed", "Confirmed"
        FAILED = "failed", "Failed"
        REFUSED = "refused", "Refused"

    operator = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    action = models.CharField(max_length=20, choices=Action.choices)
    agent_id = models.CharField(max_length=100)
    conversation = models.ForeignKey(
        Conversation, null=True, blank=True, on_delete=models.SET_NULL, related_name="audit"
    )
    contact_phone = models.CharField(max_length=32, blank=True)
    command = models.OneToOneField(
        Command, null=True, blank=True, on_delete=models.SET_NULL, related_name="audit"
    )
    outcome = models.CharField(max_length=10, choices=Outcome.choices, default=Outcome.PENDING)
    detail = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    completed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        verbose_name_plural = "audit entries"
        indexes = [models.Index(fields=["conversation", "-id"], name="audit_conversation")]

    def __str__(self) -> str:
        return f"{self.operator} {self.get_action_display()} ({self.outcome})"


class Takeover(models.Model):
    """One time a person was needed or stepped in: from the customer's wait (or the take
    over) until the AI answers again. Written by the services in the same transaction as
    the events, so the reports read exact times, never a reconstruction."""

    class End(models.TextChoices):
        MANUAL = "manual", "Handed back"
        AUTO = "auto", "Handed back automatically (the holder was idle)"
        FALLBACK = "fallback", "Back to the AI: nobody took over"
        REASSIGNED = "reassigned", "Taken over by someone else"
        FAILED = "failed", "Pinecall did not pause the AI"
        ENDED = "ended", "The conversation ended"
        RESUMED = "resumed", "Resumed outside this dashboard"

    HANDED_BACK = (End.MANUAL, End.AUTO)

    conversation = models.ForeignKey(
        Conversation, on_delete=models.CASCADE, related_name="takeovers", db_index=False
    )
    agent_id = models.CharField(max_length=100)
    # When the episode counts in a report: the wait's start, else the take over's.
    started_at = models.DateTimeField(default=timezone.now)
    # The conversation's start, copied (it never changes): "handled by the AI alone"
    # counts the conversations of a range that had an episode without a join.
    conversation_started_at = models.DateTimeField()
    needs_human_at = models.DateTimeField(null=True, blank=True)
    needs_human_reason = models.CharField(max_length=20, blank=True)
    taken_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    claimed_at = models.DateTimeField(null=True, blank=True, help_text="The click on Take over.")
    taken_at = models.DateTimeField(null=True, blank=True, help_text="Pinecall confirmed the pause.")
    first_reply_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    end = models.CharField(max_length=10, choices=End.choices, blank=True)
    # Durations in seconds, set with the time that completes them: percentiles read
    # plain numbers on every database.
    wait_seconds = models.FloatField(null=True, blank=True, help_text="Needs a human -> taken over.")
    reply_seconds = models.FloatField(null=True, blank=True, help_text="Taken over -> first human message.")
    handling_seconds = models.FloatField(null=True, blank=True, help_text="Taken over -> handed back.")

    class Meta:
        ordering = ["-id"]
        indexes = [
            models.Index(fields=["started_at"], name="takeover_started"),
            models.Index(fields=["conversation", "-id"], name="takeover_conversation"),
            models.Index(fields=["conversation_started_at", "conversation"], name="takeover_conv_started"),
        ]

    def __str__(self) -> str:
        return f"takeover of {self.conversation_id} ({self.end or 'open'})"


class DeadLetter(models.Model):
    """An event that could not be stored even after sanitising, kept with its frame.

    Never a database outage (those are retried until the database is back): a
    frame the data model refuses. Admins see them; once the cause is fixed,
    "Store again" re-ingests the frame through the worker's path.
    """

    event = models.CharField(max_length=64, blank=True)
    frame = models.JSONField(help_text="The event as Pinecall sent it.")
    reason = models.TextField()
    created_at = models.DateTimeField(default=timezone.now)
    resolved_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"{self.event or 'frame'} #{self.pk}"


class IngestCursor(models.Model):
    """How far the worker has stored one spool file, written in the same
    transaction as the events: a restart replays exactly what is after it."""

    spool_id = models.CharField(max_length=64, unique=True)
    seq = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.spool_id} @ {self.seq}"


class WorkerProcess(models.Model):
    """A `runworker pinecall` process, as it last reported itself.

    Any number may run; PostgreSQL lets exactly one be active (it holds the
    Pinecall connection), the others wait as standbys. Each refreshes its row
    every few seconds, so the banner can tell the truth about who is active.
    """

    class Role(models.TextChoices):
        ACTIVE = "active", "Active"
        STANDBY = "standby", "Standby"
        STOPPED = "stopped", "Stopped"

    agent_id = models.CharField(max_length=100)
    host = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    role = models.CharField(max_length=10, choices=Role.choices, default=Role.STANDBY)
    started_at = models.DateTimeField(default=timezone.now)
    active_since = models.DateTimeField(null=True, blank=True)
    seen_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-seen_at"]
        constraints = [
            models.UniqueConstraint(fields=["agent_id", "host", "pid", "started_at"], name="uniq_worker")
        ]
        indexes = [models.Index(fields=["agent_id", "-seen_at"], name="worker_seen")]

    def __str__(self) -> str:
        return f"{self.host}:{self.pid} ({self.role})"

    @property
    def is_alive(self) -> bool:
        age = (timezone.now() - self.seen_at).total_seconds()
        return self.role != self.Role.STOPPED and age < settings.WORKER_HEARTBEAT_STALE_SECONDS


class HandoffPolicy(models.Model):
    """How the dashboard acts when a customer needs a person; supervisors change it at runtime.

    Created on first use from the HANDOFF_* settings (the defaults); a change
    applies at once to every process (each reads it when it needs it).
    """

    agent_id = models.CharField(max_length=100, unique=True)
    pause_on_ask = models.BooleanField(
        default=True, help_text="Pause the AI for the session the moment the customer asks for a person."
    )
    holding_message = models.TextField(
        blank=True, help_text="Sent to the customer when the AI steps aside (empty: none)."
    )
    fallback_seconds = models.PositiveIntegerField(
        default=600, help_text="Give it back to the AI when nobody took over within this many seconds."
    )
    idle_seconds = models.PositiveIntegerField(
        default=900, help_text="Hand a held conversation back when its holder sent nothing for this long."
    )
    ask_phrases = models.TextField(help_text="Words that mean 'a person, please': one per line.")
    ai_phrases = models.TextField(help_text="Words of the AI's that mean it passes the conversation on.")
    updated_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "handoff policies"

    def __str__(self) -> str:
        return f"handoff policy of {self.agent_id}"


class AlertPreferences(models.Model):
    """Which alerts one person's browser raises when a customer waits; kept on the server."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="alert_preferences"
    )
    sound = models.BooleanField(default=True)
    title = models.BooleanField(default=True, help_text="The waiting count in the tab's title and icon.")
    desktop = models.BooleanField(default=False, help_text="Desktop notifications (asked on a click).")

    def __str__(self) -> str:
        return f"alerts of {self.user}"


class OperatorProfile(models.Model):
    """What one person sets for themselves beyond their account: the phone a call is forwarded to."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="operator_profile"
    )
    phone = models.CharField(
        max_length=64, blank=True,
        help_text="E.164 (+ and 7 to 15 digits) or a sip: address: where 'Forward to my phone' sends a call.",
    )

    def __str__(self) -> str:
        return f"profile of {self.user}"


def dom_key(value: str) -> str:
    """A Pinecall id as a short, HTML-id-safe key (the same for the page and its captions)."""
    return hashlib.sha256((value or "").encode("utf-8")).hexdigest()[:16]


class Call(models.Model):
    """One Pinecall voice call: one agent and one caller, until it ends (or leaves Pinecall)."""

    class State(models.TextChoices):
        LIVE = "live", "Live"
        ENDED = "ended", "Ended"

    call_id = models.CharField(max_length=64, unique=True)
    agent_id = models.CharField(max_length=100)
    from_number = models.CharField(max_length=64, blank=True)
    to_number = models.CharField(max_length=64, blank=True)
    direction = models.CharField(max_length=10, blank=True)
    state = models.CharField(max_length=10, choices=State.choices, default=State.LIVE)
    started_at = models.DateTimeField(default=timezone.now)
    ended_at = models.DateTimeField(null=True, blank=True)
    end_reason = models.CharField(max_length=40, blank=True)
    duration_seconds = models.FloatField(null=True, blank=True)
    forwarded_to = models.CharField(max_length=64, blank=True)
    # The caller asked for a person (the same phrases as on WhatsApp).
    needs_human_since = models.DateTimeField(null=True, blank=True)
    # As Pinecall last confirmed them (`call.held`/`unheld`, `call.muted`/`unmuted`).
    on_hold = models.BooleanField(default=False)
    caller_muted = models.BooleanField(default=False)

    class Meta:
        ordering = ["-started_at", "-id"]
        indexes = [models.Index(fields=["state", "-started_at"], name="call_state_started")]

    def __str__(self) -> str:
        return f"call {self.call_id} from {self.from_number or '?'} ({self.state})"

    @property
    def is_live(self) -> bool:
        return self.state == self.State.LIVE

    @property
    def key(self) -> str:
        return dom_key(self.call_id)


class CallUtterance(models.Model):
    """One final line of a call: the caller's, the AI's or a supervisor's typed line.

    Interim captions (`user.speaking`, single `bot.word`) are never stored.
    """

    class Speaker(models.TextChoices):
        CALLER = "caller", "Caller"
        AI = "ai", "AI"
        SUPERVISOR = "supervisor", "Supervisor"

    call = models.ForeignKey(Call, on_delete=models.CASCADE, related_name="utterances")
    speaker = models.CharField(max_length=10, choices=Speaker.choices)
    message_id = models.CharField(max_length=100)
    text = models.TextField(blank=True)
    at = models.DateTimeField(default=timezone.now)
    interrupted = models.BooleanField(default=False)
    words_spoken = models.PositiveIntegerField(null=True, blank=True)
    # What the caller said while muted (the AI did not hear it): `call.unmuted`'s transcript.
    while_muted = models.BooleanField(default=False)

    class Meta:
        ordering = ["at", "id"]
        constraints = [
            models.UniqueConstraint(fields=["call", "message_id"], name="call_utterance_unique_id")
        ]

    def __str__(self) -> str:
        return f"{self.speaker}: {self.text[:40]}"

    @property
    def key(self) -> str:
        return dom_key(self.message_id)


# ---------------------------------------------------------------- operator tools: canned replies, notes

SHORTCUT_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]*")


class CannedReply(models.Model):
    """A ready answer an operator inserts with "/shortcut" and edits before sending.

    Shared (no owner: supervisors manage them) or one operator's own. Its text
    may hold variables (`conversations.canned`), filled for the conversation
    and the operator when it is inserted.
    """

    title = models.CharField(max_length=100)
    shortcut = models.CharField(
        max_length=40, help_text="Typed after “/” in the composer: lower-case letters, digits, - and _."
    )
    text = models.TextField(
        help_text="Variables: " + ", ".join("{{%s}}" % name for name in canned.VARIABLES) + "."
    )
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="canned_replies",
        help_text="Empty: shared with everyone (managed by supervisors).",
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    usage_count = models.PositiveIntegerField(default=0, help_text="Times it was inserted in a composer.")
    last_used_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["shortcut", "id"]
        verbose_name_plural = "canned replies"
        constraints = [
            models.UniqueConstraint(
                fields=["shortcut"], condition=models.Q(owner__isnull=True), name="uniq_shared_shortcut"
            ),
            models.UniqueConstraint(fields=["owner", "shortcut"], name="uniq_own_shortcut"),
        ]

    def __str__(self) -> str:
        return f"/{self.shortcut} ({'shared' if self.owner_id is None else self.owner})"

    @property
    def is_shared(self) -> bool:
        return self.owner_id is None

    def clean(self) -> None:
        errors = {}
        self.shortcut = (self.shortcut or "").strip().lstrip("/").lower()
        if not SHORTCUT_PATTERN.fullmatch(self.shortcut):
            errors["shortcut"] = "A shortcut is lower-case letters, digits, - and _ (for example “refund-policy”)."
        if not (self.text or "").strip():
            errors["text"] = "Write the reply's text."
        elif len(self.text) > settings.MESSAGE_MAX_LENGTH:
            errors["text"] = f"WhatsApp takes at most {settings.MESSAGE_MAX_LENGTH} characters."
        else:
            problems = canned.template_errors(self.text)
            if problems:
                errors["text"] = problems
        if errors:
            raise ValidationError(errors)


class Note(models.Model):
    """An internal note in a conversation's timeline: for colleagues, never for the customer.

    Never a Command, never sent to Pinecall, never in the AI's history. Its place
    in the timeline is a Message row of direction NOTE by a human (`timeline_entry`,
    carrying the same text: notes are never edited), so it pages and streams with
    the messages, in the order things happened.
    """

    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="internal_notes")
    author = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="notes"
    )
    text = models.TextField()
    mentions = models.ManyToManyField(settings.AUTH_USER_MODEL, blank=True, related_name="mentioned_in_notes")
    timeline_entry = models.OneToOneField(
        Message, null=True, blank=True, on_delete=models.SET_NULL, related_name="internal_note"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["conversation", "id"], name="note_conversation")]

    def __str__(self) -> str:
        return f"{self.author}: {self.text[:60]}"
